"""Tokenizers: GPT-NeoX-20B (hub id or local tokenizer.json), byte-level, and the demo BPE.

`TextTokenizer` is one small picklable wrapper around either a Hugging Face `tokenizers.Tokenizer`
(kind "hf", built from its JSON text) or raw UTF-8 bytes (kind "byte": ids 0..255 are bytes, 256 is
end-of-text). Everything downstream (prepare_data, checkpoints, generation, narrative signal tables)
only sees this wrapper, so a checkpoint can rebuild its tokenizer offline from `to_dict()`.

    load_tokenizer("EleutherAI/gpt-neox-20b")                  # hub (needs internet once, then HF cache)
    load_tokenizer("../shared/data/tokenizers/gpt-neox-20b/tokenizer.json")   # local file (or its folder)
    load_tokenizer("byte")                                     # 257 ids, no file needed
    train_demo_bpe(texts, vocab_size=4096)                     # byte-level BPE trained on the fly

`sha256` identifies the tokenizer *definition*: for "hf" it is the sha256 of the canonical JSON
(keys sorted, no whitespace), so the same tokenizer fetched from the hub or copied from disk with
different formatting hashes the same; for "byte" it is "byte-v1". `data.check_tokenizer_match`
compares it between a data dir and a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from functools import lru_cache

from mamba_lm.errors import UserError

NEOX_NAME = "EleutherAI/gpt-neox-20b"
BYTE_SHA256 = "byte-v1"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[EOS]")  # first one present is the end-of-text id
LOCAL_NEOX_HINT = "../shared/data/tokenizers/gpt-neox-20b/tokenizer.json"
# canonical sha256 (see module docstring) of well-known tokenizer files -> their hub name, so a local copy
# is named like the hub one in meta.json and checkpoints
KNOWN_SHA256 = {"d169a59a0a2c7e1270a2b952b9fcb3956e3d7b531f3444c6ad6e9af173fbe600": NEOX_NAME}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet of `tokenizers`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _byte_encoder() -> dict[int, str]:
    """GPT-2's bytes_to_unicode, cached: byte value -> printable stand-in character."""
    return bytes_to_unicode()


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable stand-in character -> byte value."""
    return {c: b for b, c in _byte_encoder().items()}


def _canonical_sha256_of(spec: dict) -> str:
    canon = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def canonical_sha256(json_text: str) -> str:
    """sha256 of a tokenizer.json's canonical form (sorted keys, compact separators)."""
    return _canonical_sha256_of(json.loads(json_text))


class TextTokenizer:
    """Picklable tokenizer wrapper. kind "hf": a `tokenizers` JSON definition; kind "byte": UTF-8 bytes.

    Attributes: name, kind, vocab_size (the size of the id space: largest id + 1, added tokens included;
    NeoX 50277; at least the number of tokens, more when a tokenizer's ids have gaps), eos_id (NeoX 0, byte 256),
    sha256 (see module docstring), json (the tokenizer.json text, or None for "byte").
    """

    def __init__(self, name: str, kind: str, json_text: str | None = None, sha256: str | None = None):
        if kind not in ("hf", "byte"):
            raise UserError(f"unknown tokenizer kind {kind!r} (expected 'hf' or 'byte')")
        self.name, self.kind, self.json = name, kind, json_text
        self._tok = None
        if kind == "byte":
            self.vocab_size, self.eos_id, self.sha256 = 257, 256, BYTE_SHA256
            return
        try:
            tok = self._backend()
        except Exception as e:  # the tokenizers library raises a bare Exception for a JSON that is no tokenizer
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"tokenizer {name!r} is not a tokenizer.json of the `tokenizers` library ({first})") from None
        ids = tok.get_vocab(with_added_tokens=True).values()   # ids may be sparse: the size is the largest + 1
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
        eos = next((tok.token_to_id(t) for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        if eos is None:
            raise UserError(f"tokenizer {name!r} has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")
        self.eos_id = eos
        spec = json.loads(json_text)  # parsed once for the hash and the decoder check (NeoX: ~2 MB)
        self.sha256 = sha256 or _canonical_sha256_of(spec)
        self._special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self._byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or {})

    # -- pickling: ship the JSON text, rebuild the Rust object lazily in the worker -------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tok"] = None
        return state

    def _backend(self):
        if self._tok is None:
            from tokenizers import Tokenizer  # optional: the byte tokenizer works without the package
            self._tok = Tokenizer.from_str(self.json)
        return self._tok

    def __repr__(self):
        return f"TextTokenizer(name={self.name!r}, kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    # -- encode / decode -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added (the caller appends `eos_id` per document)."""
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        return self._backend().encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts; the Rust backend runs them in parallel on all cores."""
        if self.kind == "byte":
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self._backend().encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text of `ids` (special tokens such as eos are skipped; invalid UTF-8 becomes U+FFFD)."""
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self._backend().decode(ids, skip_special_tokens=True)

    def id_to_token(self, i: int) -> str:
        """Raw vocabulary string of id `i` (byte-level BPE form, e.g. 'Ġthe' for ' the')."""
        if self.kind == "byte":
            if i == self.eos_id:
                return "<|endoftext|>"
            return _byte_encoder()[int(i)]
        tok = self._backend().id_to_token(int(i))
        if tok is None:
            raise IndexError(f"token id {i} is outside the vocabulary of {self.name} (size {self.vocab_size})")
        return tok

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes id `i` stands for (b'' for special tokens such as eos). Used for bits-per-byte."""
        i = int(i)
        if self.kind == "byte":
            return b"" if i == self.eos_id else bytes([i])
        if i in self._special_ids:
            return b""
        tok = self.id_to_token(i)
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in tok):
                return bytes(table[c] for c in tok)
        return self._backend().decode([i], skip_special_tokens=False).encode("utf-8")

    def to_dict(self) -> dict:
        """JSON-safe description, enough to rebuild the tokenizer offline (`tokenizer_from_dict`)."""
        return {"name": self.name, "kind": self.kind, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "sha256": self.sha256, "json": self.json}


def tokenizer_from_dict(d: dict) -> TextTokenizer:
    """Inverse of `TextTokenizer.to_dict` (from a checkpoint or a data dir's meta.json plus tokenizer.json)."""
    if d.get("kind") == "byte":
        return TextTokenizer(d.get("name", "byte"), "byte")
    if not d.get("json"):
        raise UserError(f"tokenizer {d.get('name')!r} is stored without its definition (json); "
                        "load it from the data dir's tokenizer.json instead")
    tok = TextTokenizer(d["name"], "hf", d["json"])
    if d.get("sha256") and d["sha256"] != tok.sha256:
        raise UserError(f"tokenizer {d['name']!r}: stored sha256 {d['sha256'][:12]} does not match its definition "
                        f"({tok.sha256[:12]}); the file was modified")
    return tok


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if huggingface.co answers on port 443 within `timeout` s (and HF_HUB_OFFLINE is not set).

    Checked first so that an offline machine fails at once instead of after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download_from_hub(repo_id: str) -> str:
    """Path of `tokenizer.json` of hub repo `repo_id`; offline only the local HF cache. Tests monkeypatch this."""
    from huggingface_hub import hf_hub_download  # optional: only hub ids need it (local files and byte do not)
    return hf_hub_download(repo_id=repo_id, filename="tokenizer.json", local_files_only=not hub_reachable())


def _read_json_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read tokenizer file {path}: {e}") from None
    return text


def load_tokenizer(spec: str) -> TextTokenizer:
    """A tokenizer from "byte", a path to tokenizer.json, a folder holding one, or a hub id like
    "EleutherAI/gpt-neox-20b". Offline hub access raises a UserError naming the local alternative."""
    if spec == "byte":
        return TextTokenizer("byte", "byte")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise UserError(f"folder {spec} has no tokenizer.json")
    if os.path.isfile(path):
        tok = TextTokenizer(spec, "hf", _read_json_file(path))
        tok.name = KNOWN_SHA256.get(tok.sha256, spec)
        return tok
    if spec.endswith(".json") or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"tokenizer {spec!r} not found: expected 'byte', a tokenizer.json path, or a hub id "
                        f"like {NEOX_NAME}")
    try:
        path = _download_from_hub(spec)
    except Exception as e:  # connection errors, offline mode, missing repo: all mean "use a local file"
        raise UserError(f"cannot reach the Hugging Face hub for {spec!r} ({type(e).__name__}); pass a local "
                        f"tokenizer.json path, e.g. --tokenizer={LOCAL_NEOX_HINT}") from None
    return TextTokenizer(spec, "hf", _read_json_file(path))


def train_demo_bpe(texts, vocab_size: int = 4096) -> TextTokenizer:
    """A byte-level BPE (GPT-2 style, like NeoX) trained on `texts` with `tokenizers`; eos "<|endoftext|>" = id 0.

    Deterministic for the same texts and vocab_size. Named "demo-bpe-<vocab_size>".
    """
    # optional: the `tokenizers` package is needed only to train the demo BPE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return TextTokenizer(f"demo-bpe-{vocab_size}", "hf", tok.to_str())
