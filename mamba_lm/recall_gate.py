"""Synthetic narrative-recall gate: facts bound to characters, asked again at controlled distances.

Each gate book is a run of *episodes*. An episode states `bindings` facts about characters in one
short paragraph, then `filler` prose (procedural demo stories, or real book paragraphs), with
`distractors` facts about other characters scattered through it, then asks the facts again:

    Abel lived in Corfe. Bess carried a lamp. Abel trusted Nia. Cato was stubborn.
    <filler prose, ~distance tokens, with distractor facts: "Dara lived in Ely." ...>
    As everyone knew, Abel trusted Nia. Later, Bess carried a lamp. ...

The answer of a restatement ("Nia", "lamp") is fixed only by the earlier statement of the same
episode (names are re-bound in every episode), so only a model that holds the binding over the
distance can predict it; its chance is 1 / `candidates`. Four kinds of fact: trait, object, place,
relation (the answer is another character). Probes use the record format of
mamba_lm/demo_corpus.py ({"char_offset", "answer", "intro_offset", "kind"}), so
`metrics.probe_token_spans` finds their tokens.

The difficulty dial (`GateDial`, a preset name plus `key=value` overrides, e.g.
"cpu,candidates=16,distances=64:256"):

    bindings       facts stated and asked per episode (the most; min_bindings the fewest: each episode draws
                   its number uniformly between them, a curriculum over difficulty as MQAR mixes key counts)
    distractors    facts of other characters inserted between statement and question (never asked)
    leads          lead-in phrases a question draws from ("As everyone knew," ...; 0: none)
    shuffle        questions in random order (False: in the order of the statements)
    distinct_kinds every fact of an episode of a different kind: the question's verb then identifies the fact,
                   so the gate tests holding a value over the distance without binding it to a name (the
                   CPU preset: a tiny Mamba learns it in minutes; with two facts of one kind it stops at
                   answering the second question by elimination, bench/results/gate-cpu)
    candidates     answer vocabulary per kind of fact (chance = 1 / candidates)
    characters     names the episodes draw their characters from
    distances      target token distances between a fact and its question, ":"-separated
    weights        mixture weight of each distance in the training data: the curriculum over distance
                   (Zoology's MQAR trains on such a mixture; "" = halving per step: 1, 1/2, 1/4, ...)
    probe_distances  distances of the held-out probe set ("" = the training distances)
    filler         "demo" (procedural stories) | "none" (facts only) | "book:<prepared data dir>"
    chars_per_token  to size the filler in characters (distances are then *measured* in tokens)

Data: `prepare_data.py --source=recall-gate --gate=cpu` writes a normal data dir (tokenizer: a BPE
trained on the gate text, as for the demo corpus), `{split}.answers.bin` (1 on every question's answer
tokens: `--loss_on=answers` trains on these alone, as MQAR does; with the loss on every token the
answers are a few percent of it and a CPU-sized model never starts binding, bench/results/gate-cpu)
plus `gate_probes.json`, the held-out probe set:
episodes from another seed (and held-out filler) with every answer's token span, its measured
distance and its candidates' token ids. `score_gate(model, probes, window)` gives accuracy (the
answer ranked first among the candidates) and mean answer-token log-prob per distance bucket, with
the state carried across windows of `window` tokens and, as a control, reset at each window.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from mamba_lm import demo_corpus
from mamba_lm.data import SPLITS, TokenSplit, answers_path, load_meta
from mamba_lm.errors import UserError
from mamba_lm.metrics import probe_token_spans
from mamba_lm.sources import make_record
from mamba_lm.tokenizer import load_tokenizer

PROBE_FILE = "gate_probes.json"
PROBE_FORMAT = "mamba-narrative-gate-probes/1"
GATE_ID_BASE = 800001            # gate book ids (not Project Gutenberg ids)
PROBE_SEED_OFFSET = 1_000_003    # the probe set's seed = dial seed + this (never in the training stream)

# names and answers; filler sentences that contain one of these words are dropped (mentions_gate_word)
NAMES = ["Abel", "Bess", "Cato", "Dara", "Enzo", "Faye", "Gus", "Hana", "Iker", "Juno", "Kit", "Lena",
         "Milo", "Nia", "Otto", "Pia", "Quin", "Rhea", "Sol", "Tara", "Ugo", "Vida", "Wade", "Xena",
         "Yuri", "Zora", "Ada", "Bo", "Cy", "Dex", "Eli", "Flo"]
VALUES = {
    "trait": ["brave", "clever", "gentle", "stubborn", "honest", "cheerful", "proud", "quiet", "greedy",
              "patient", "restless", "kind", "bitter", "curious", "loyal", "timid", "cruel", "witty", "humble",
              "jealous", "calm", "foolish", "wise", "lazy", "eager", "grim", "merry", "shy", "bold", "vain",
              "sly", "meek"],
    "object": ["lamp", "knife", "flute", "map", "coin", "rope", "bell", "book", "cup", "drum", "hat", "key",
               "ring", "sword", "shell", "stone", "candle", "basket", "mirror", "needle", "feather", "whistle",
               "compass", "kettle", "ladder", "bucket", "hammer", "scarf", "glove", "mask", "pipe", "spoon"],
    "place": ["Arden", "Bexley", "Corfe", "Dover", "Ely", "Frome", "Goole", "Hythe", "Ilford", "Jarrow",
              "Kendal", "Leek", "Looe", "Malton", "Nairn", "Oban", "Penrith", "Ripon", "Selby", "Thirsk",
              "Ulverston", "Ventnor", "Wells", "Yarm", "Alnwick", "Bude", "Cowes", "Deal", "Epping", "Filey",
              "Girvan", "Hexham"],
    "relation": NAMES,
}
TEMPLATES = {"trait": "{who} was {value}.", "object": "{who} carried a {value}.",
             "place": "{who} lived in {value}.", "relation": "{who} trusted {value}."}
LEADS = ["As everyone knew,", "Later,", "Once again,", "It was said that", "By then,", "Of course,"]


@dataclass
class GateDial:
    """Difficulty of the gate (see the module docstring)."""

    bindings: int = 4                 # facts stated and asked per episode (at most)
    min_bindings: int = 0             # at least this many per episode (0: = bindings); drawn uniformly between
    distractors: int = 2              # facts of other characters between statement and question
    leads: int = 6                    # lead-in phrases of the questions (0: none; at most len(LEADS))
    shuffle: bool = True              # questions in random order (False: statement order)
    distinct_kinds: bool = False      # every fact of an episode of another kind (the verb identifies the fact)
    candidates: int = 8               # answers per kind of fact (chance 1 / candidates)
    characters: int = 16              # names drawn per book
    kinds: str = "trait:object:place:relation"   # kinds of fact
    distances: str = "64"             # target token distances, ":"-separated
    weights: str = ""                 # mixture weight per distance ("" = 1, 1/2, 1/4, ...)
    probe_distances: str = ""         # probe-set distances ("" = distances)
    filler: str = "demo"              # demo | none | book:<prepared data dir>
    chars_per_token: float = 4.0      # filler sizing (characters per target token)
    num_books: int = 40               # gate books in the training data
    episodes_per_book: int = 100      # episodes per book
    probe_episodes: int = 64          # episodes per probe distance in the held-out probe set
    seed: int = 1337                  # generator seed

    def __post_init__(self):
        for name in ("bindings", "candidates", "characters", "num_books", "episodes_per_book", "probe_episodes"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"gate dial: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_bindings <= self.bindings:
            raise UserError(f"gate dial: min_bindings must be in 0..bindings={self.bindings}, got {self.min_bindings}")
        if not 0 <= self.leads <= len(LEADS):
            raise UserError(f"gate dial: leads must be in 0..{len(LEADS)}, got {self.leads}")
        if self.distractors < 0:
            raise UserError(f"gate dial: distractors must be >= 0, got {self.distractors}")
        unknown = [k for k in self.kind_list if k not in VALUES]
        if unknown or not self.kind_list:
            raise UserError(f"gate dial: unknown kind(s) {unknown}; choose from {':'.join(VALUES)}")
        limit = min(len(VALUES[k]) for k in self.kind_list)
        if not 2 <= self.candidates <= limit:
            raise UserError(f"gate dial: candidates must be in 2..{limit}, got {self.candidates}")
        if not 2 <= self.characters <= len(NAMES):
            raise UserError(f"gate dial: characters must be in 2..{len(NAMES)}, got {self.characters}")
        if self.distinct_kinds and self.bindings + self.distractors > len(self.kind_list):
            raise UserError(f"gate dial: distinct_kinds needs bindings + distractors <= the {len(self.kind_list)} "
                            f"kinds, got {self.bindings + self.distractors}")
        if self.bindings + self.distractors > self.characters * len(self.kind_list):
            raise UserError(f"gate dial: bindings + distractors = {self.bindings + self.distractors} facts need "
                            f"more than characters x kinds = {self.characters * len(self.kind_list)}")
        if len(self.weight_list) != len(self.distance_list):
            raise UserError(f"gate dial: {len(self.weight_list)} weights for {len(self.distance_list)} distances")
        if not (self.filler in ("demo", "none") or self.filler.startswith("book:")):
            raise UserError(f"gate dial: filler must be demo, none or book:<data dir>, got {self.filler!r}")
        if self.chars_per_token <= 0:
            raise UserError("gate dial: chars_per_token must be > 0")

    @property
    def kind_list(self) -> list[str]:
        return [k for k in self.kinds.split(":") if k]

    @property
    def distance_list(self) -> list[int]:
        return _ints(self.distances, "distances")

    @property
    def probe_distance_list(self) -> list[int]:
        return _ints(self.probe_distances, "probe_distances") if self.probe_distances else self.distance_list

    @property
    def weight_list(self) -> list[float]:
        if not self.weights:
            return [0.5 ** i for i in range(len(self.distance_list))]
        try:
            w = [float(v) for v in self.weights.split(":")]
        except ValueError:
            raise UserError(f"gate dial: weights must be ':'-separated numbers, got {self.weights!r}") from None
        if any(v < 0 for v in w) or sum(w) <= 0:
            raise UserError(f"gate dial: weights must be >= 0 with a positive sum, got {self.weights!r}")
        return w


def _bool(raw: str) -> bool:
    if raw not in ("True", "False"):
        raise ValueError(raw)
    return raw == "True"


def _ints(spec: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in spec.split(":")]
    except ValueError:
        raise UserError(f"gate dial: {name} must be ':'-separated integers, got {spec!r}") from None
    if not values or any(v < 0 for v in values):
        raise UserError(f"gate dial: {name} must be non-negative integers, got {spec!r}")
    return values


# presets of the dial
GATE_PRESETS: dict[str, dict] = {
    # CPU presets (bench/results/gate-cpu): one fact per kind (the verb names it), no lead-ins. "cpu-short": no
    # filler, question right after the statements (tiny: 1.000 at ~1M tokens); "cpu": demo filler, most
    # episodes at the shortest distance (tiny: 0.99 at 3M tokens). Name binding (two facts of a kind)
    # stalls at answering the second question by elimination (~0.8) on the CPU.
    "cpu-short": dict(bindings=2, distractors=0, candidates=4, characters=8, kinds="trait:object:place",
                      distinct_kinds=True, leads=0, distances="16", weights="1", probe_distances="16:64", filler="none",
                      chars_per_token=3.5, num_books=20, episodes_per_book=400, probe_episodes=48),
    "cpu": dict(bindings=2, distractors=0, candidates=4, characters=8, kinds="trait:object:place", distinct_kinds=True,
                leads=0, distances="16:64:256", weights="8:1:1", probe_distances="16:64:256:1024", filler="demo",
                chars_per_token=3.5, num_books=20, episodes_per_book=400, probe_episodes=48),
    "gpu": dict(bindings=8, distractors=8, candidates=32, characters=32, distances="64:256:1024:4096",
                weights="4:2:1:1", probe_distances="64:256:1024:4096:16384", filler="demo",
                chars_per_token=3.5, num_books=400, episodes_per_book=100, probe_episodes=64),
    "book": dict(bindings=8, distractors=8, candidates=32, characters=32, distances="64:256:1024:4096",
                 weights="4:2:1:1", probe_distances="64:256:1024:4096:16384",
                 filler="book:data/gutenberg-neox", chars_per_token=4.2, num_books=400,
                 episodes_per_book=50, probe_episodes=64),
}


def parse_dial(spec: str) -> GateDial:
    """"cpu" or "cpu,candidates=16,distances=64:256" (a preset, then field overrides) -> GateDial."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or parts[0] not in GATE_PRESETS:
        raise UserError(f"--gate={spec!r}: start with a preset ({', '.join(GATE_PRESETS)}), then key=value "
                        f"overrides, e.g. cpu,candidates=16")
    values = dict(GATE_PRESETS[parts[0]])
    types = {f.name: f.type for f in fields(GateDial)}
    for p in parts[1:]:
        key, sep, raw = p.partition("=")
        if not sep or key not in types:
            raise UserError(f"--gate: bad override {p!r}; known keys: {', '.join(types)}")
        kind = {"int": int, "float": float, "bool": _bool}.get(str(types[key]), str)
        try:
            values[key] = kind(raw)
        except ValueError:
            raise UserError(f"--gate: {key}={raw!r} is not a {kind.__name__}") from None
    return GateDial(**values)


# ---- filler -------------------------------------------------------------------------------------


class Filler:
    """An endless, deterministic supply of prose paragraphs (no gate names in them)."""

    def __init__(self, dial: GateDial, held_out: bool):
        self.kind = dial.filler
        self.sentences = [s for p in self._load(dial, held_out) for s in split_sentences(p) if not mentions_gate_word(s)]
        self.pos = 0

    @staticmethod
    def _load(dial: GateDial, held_out: bool) -> list[str]:
        if dial.filler == "none":
            return []
        if dial.filler == "demo":
            books = demo_corpus.generate_books(4 if held_out else 12, seed=dial.seed + (7 if held_out else 0),
                                               words_per_book=6000)
            paras = [p for b in books for p in b["TEXT"].split("\n\n")[2:]]   # without title / author lines
            return [p for p in paras if not p.startswith("CHAPTER")]
        return book_paragraphs(dial.filler[len("book:"):], "test" if held_out else "train",
                               max_chars=4_000_000 if not held_out else 1_000_000)

    def take(self, chars: int) -> list[str]:
        """Paragraphs of whole sentences totalling at most `chars` characters (so that a short distance stays
        short: none when the next sentence does not fit, or when the filler is "none")."""
        out, para, n = [], "", 0
        while self.sentences:
            sent = self.sentences[self.pos % len(self.sentences)]
            if n + len(sent) + 1 > chars:
                break
            self.pos += 1
            para = f"{para} {sent}" if para else sent
            n += len(sent) + 1
            if len(para) > 400:
                out.append(para)
                para = ""
        return out + ([para] if para else [])


_GATE_WORDS = {w.lower() for w in NAMES} | {v.lower() for values in VALUES.values() for v in values}


def mentions_gate_word(text: str) -> bool:
    """Whether `text` holds a gate name or answer word (any case): filler with one would offer a competing
    answer (the demo stories mention flutes, maps, brave guesses...), so it is left out."""
    return any(w.strip(".,;:!?\"'()").lower() in _GATE_WORDS for w in text.split())


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph, cut after '.', '!' or '?' followed by a space (quotes stay whole)."""
    out, start = [], 0
    for i, ch in enumerate(paragraph):
        if ch in ".!?" and paragraph[i + 1:i + 2] == " " and paragraph.count('"', start, i + 1) % 2 == 0:
            out.append(paragraph[start:i + 1])
            start = i + 2
    tail = paragraph[start:].strip()
    return out + ([tail] if tail else [])


def book_paragraphs(data_dir: str, split: str, max_chars: int) -> list[str]:
    """Paragraphs of real prose decoded from a prepared data dir's split (first `max_chars` characters),
    without short lines (headings)."""
    meta = load_meta(data_dir)
    tokens = TokenSplit(data_dir, split).tokens
    tok = load_tokenizer("byte" if meta["tokenizer"]["kind"] == "byte" else str(data_dir))
    n = min(len(tokens), int(max_chars / 3))          # ~3+ characters per token: enough text
    ids = [int(t) for t in tokens[:n] if int(t) != tok.eos_id]
    paras = []
    for p in tok.decode(ids).split("\n\n"):
        p = " ".join(p.split())
        if len(p) >= 80:             # (sentences with a gate word are dropped by Filler)
            paras.append(p)
    if not paras:
        raise UserError(f"gate filler book:{data_dir}: its {split} split has no prose paragraphs")
    return paras


# ---- episodes and books ---------------------------------------------------------------------------


class _Book:
    """Paragraphs with character offsets; statements and questions recorded as probe records."""

    def __init__(self, book_id: int):
        self.book_id, self.paras, self.offset = book_id, [], 0
        self.probes: list[dict] = []

    def add(self, sentences: list) -> None:
        """sentences: str, or (who, kind, value, lead, fact_id) for a fact; a fact whose id was stated
        before (in self.stated) becomes a probe."""
        start = self.offset + (2 if self.paras else 0)
        text = ""
        for s in sentences:
            text += " " if text else ""
            if isinstance(s, str):
                text += s
                continue
            who, kind, value, lead, fact = s
            sentence = TEMPLATES[kind].format(who=who, value=value)
            if lead:
                text += lead + " "
            pos = start + len(text) + len(sentence) - 1 - len(value)      # every template ends "{value}."
            if fact.get("stated") is None:
                fact["stated"] = pos
            else:
                self.probes.append({"book_id": self.book_id, "char_offset": pos, "answer": value, "kind": kind,
                                    "intro_offset": fact["stated"], "distance_chars": pos - fact["stated"],
                                    "target_distance": fact["target"], "candidates": fact["candidates"]})
            text += sentence
        self.paras.append(text)
        self.offset = start + len(text)

    @property
    def text(self) -> str:
        return "\n\n".join(self.paras)


def _episode(book: _Book, rng: random.Random, dial: GateDial, filler: Filler, distance: int, cast: list[str]):
    """State `bindings` facts, filler + distractors for ~`distance` tokens, then ask the facts again."""
    kinds = dial.kind_list
    slots = [(who, kind) for who in cast for kind in kinds]
    n_asked = rng.randint(dial.min_bindings or dial.bindings, dial.bindings)
    if dial.distinct_kinds:    # one fact per kind: the question's verb names the fact, no name binding needed
        chosen = [(rng.choice(cast), kind) for kind in rng.sample(kinds, n_asked + dial.distractors)]
    else:
        chosen = rng.sample(slots, n_asked + dial.distractors)
    facts = []
    for who, kind in chosen:
        pool = [v for v in VALUES[kind][:dial.candidates] if v != who] if kind == "relation" else \
            VALUES[kind][:dial.candidates]
        facts.append({"who": who, "kind": kind, "value": rng.choice(pool), "stated": None, "target": distance,
                      "candidates": pool})
    asked, distractors = facts[:n_asked], facts[n_asked:]
    book.add([(f["who"], f["kind"], f["value"], "", f) for f in asked])
    statement_tokens = len(book.paras[-1]) / dial.chars_per_token
    budget = max(0.0, distance - statement_tokens) * dial.chars_per_token
    paras = filler.take(int(budget))
    if not paras and budget > 0 and filler.kind == "none":
        paras = [""]
    slots_for = [rng.randrange(len(paras) + 1) for _ in distractors] if distractors else []
    for i in range(len(paras) + 1):
        here = [(f["who"], f["kind"], f["value"], "", f) for f, at in zip(distractors, slots_for) if at == i]
        if here:
            book.add(here)
        if i < len(paras) and paras[i]:
            book.add([paras[i]])
    order = list(asked)
    if dial.shuffle:
        rng.shuffle(order)
    book.add([(f["who"], f["kind"], f["value"], rng.choice(LEADS[:dial.leads]) if dial.leads else "", f)
              for f in order])


def generate_gate_book(index: int, dial: GateDial, filler: Filler, distances: list[int], weights: list[float],
                       seed: int, episodes: int) -> dict:
    """One gate book as a parquet-like row (TEXT, SOURCE, METADATA + id, title, probes)."""
    rng = random.Random(f"gate-{seed}-{index}")
    book_id = GATE_ID_BASE + index
    book = _Book(book_id)
    names = NAMES[:dial.characters]
    for _ in range(episodes):
        distance = rng.choices(distances, weights=weights)[0]
        facts = dial.bindings + dial.distractors
        n_cast = max(2, (facts + 1) // 2 + 1, -(-facts // len(dial.kind_list)))   # enough (who, kind) slots
        cast = rng.sample(names, min(len(names), n_cast))
        _episode(book, rng, dial, filler, distance, cast)
    title = f"Recall gate {index}"
    meta = {"language": "en", "text_id": book_id, "title": title, "authors": "Gate, Synthetic",
            "subjects": "Procedurally generated fiction", "locc": "PZ", "bookshelves": "Gate"}
    return {"TEXT": book.text, "SOURCE": "mamba-narrative recall gate", "METADATA": json.dumps(meta),
            "id": book_id, "title": title, "authors": "Gate, Synthetic", "probes": book.probes}


def generate_books(dial: GateDial) -> list[dict]:
    """The training books: `num_books` x `episodes_per_book` episodes, distances drawn from the mixture."""
    filler = Filler(dial, held_out=False)
    return [generate_gate_book(i, dial, filler, dial.distance_list, dial.weight_list, dial.seed,
                               dial.episodes_per_book) for i in range(dial.num_books)]


def probe_books(dial: GateDial) -> list[dict]:
    """The held-out probe books: one book per probe distance, `probe_episodes` episodes each, another
    seed and held-out filler (demo stories of another seed, or the data dir's test split)."""
    filler = Filler(dial, held_out=True)
    seed = dial.seed + PROBE_SEED_OFFSET
    return [generate_gate_book(100_000 + i, dial, filler, [d], [1.0], seed, dial.probe_episodes)
            for i, d in enumerate(dial.probe_distance_list)]


def source_descriptor(dial: GateDial) -> dict:
    """meta.json "source" entry: everything needed to regenerate the books."""
    return {"kind": "recall-gate", "generator": "mamba_lm/recall_gate.py", "dial": asdict(dial)}


def open_source(spec: str) -> tuple[dict, object, int]:
    """prepare_data.py's source "recall-gate": (descriptor, book records, number of books) of dial `spec`."""
    dial = parse_dial(spec)
    books = generate_books(dial)
    return (source_descriptor(dial),
            (make_record(b["TEXT"], b["METADATA"], f"gate:{i}") for i, b in enumerate(books)), len(books))


# ---- the probe set: token positions ---------------------------------------------------------------


def first_tokens(tokenizer, words: list[str]) -> list[int]:
    """The first non-space token of " word" for each word (how a word after a space starts)."""
    out = []
    for w in words:
        ids = [i for i in tokenizer.encode(" " + w) if tokenizer.token_bytes(i).strip()]
        out.append(ids[0] if ids else -1)
    return out


def build_probe_set(dial: GateDial, tokenizer) -> dict:
    """The held-out probe set: per probe book its token ids, and per probe (a, b, distance, kind,
    candidate first-token ids, index of the answer among them). The answer's tokens are ids[a:b];
    distance is measured in tokens (answer of the question - answer of the statement).
    A probe whose answer does not start with its candidate token, or whose candidates share first
    tokens, is dropped (counted in "dropped")."""
    docs, dropped = [], 0
    for book in probe_books(dial):
        ids, spans = probe_token_spans(book["TEXT"], book["probes"], tokenizer)
        probes = []
        located = _match_spans(book["probes"], spans)
        for p, (a, b, dist, kind) in located:
            cand = first_tokens(tokenizer, p["candidates"])
            answer = p["candidates"].index(p["answer"])
            if len(set(cand)) != len(cand) or -1 in cand or ids[a] != cand[answer]:
                dropped += 1
                continue
            probes.append({"a": a, "b": b, "distance": dist, "target_distance": p["target_distance"],
                           "kind": kind, "candidates": cand, "answer": answer})
        docs.append({"book_id": book["id"], "ids": ids, "probes": probes})
    return {"format": PROBE_FORMAT, "dial": asdict(dial), "tokenizer_sha256": tokenizer.sha256,
            "dropped": dropped, "docs": docs}


def _match_spans(probes: list[dict], spans: list[tuple]) -> list[tuple[dict, tuple]]:
    """probe_token_spans keeps the probes whose answer has a token, in order: pair them back."""
    kept = [p for p in probes if p["answer"]]
    if len(kept) != len(spans):
        raise RuntimeError(f"{len(kept)} probes but {len(spans)} token spans")
    return list(zip(kept, spans))


def write_probe_set(data_dir, dial: GateDial, tokenizer) -> Path:
    """Build the probe set and write data_dir/gate_probes.json (atomically)."""
    probes = build_probe_set(dial, tokenizer)
    path = Path(data_dir) / PROBE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(probes))
    tmp.replace(path)
    return path


def write_answer_masks(data_dir, dial: GateDial, tokenizer) -> dict[str, int]:
    """data_dir/{split}.answers.bin for every split: np.uint8 per stored token, 1 on the answer tokens of
    every question (the restatement of a fact, not its first statement), 0 elsewhere (data.answers_path;
    what `--loss_on=answers` trains on). The books are generated again from the dial (deterministic) and
    each one's tokens are checked against the stored stream. Returns {split: answer tokens}."""
    books = {GATE_ID_BASE + i: b for i, b in enumerate(generate_books(dial))}
    meta = load_meta(data_dir)
    counts = {}
    for split in SPLITS:
        tokens = TokenSplit(data_dir, split).tokens
        mask = np.zeros(len(tokens), dtype=np.uint8)
        for book_id, start, n in meta["splits"][split]["book_spans"]:
            book = books[int(book_id)]
            ids, spans = probe_token_spans(book["TEXT"], book["probes"], tokenizer)
            if list(ids) != [int(t) for t in tokens[start:start + n - 1]]:      # n counts the trailing eos
                raise RuntimeError(f"gate book {book_id}: the stored tokens differ from its text's encoding")
            for a, b, _, _ in spans:
                mask[start + a:start + b] = 1
        mask.tofile(answers_path(data_dir, split))
        counts[split] = int(mask.sum())
    return counts


def load_probe_set(data_dir) -> dict:
    """data_dir/gate_probes.json; UserError if the data dir is not a gate data dir."""
    path = Path(data_dir) / PROBE_FILE
    if not path.exists():
        raise UserError(f"{path} does not exist: prepare the data with prepare_data.py --source=recall-gate")
    probes = json.loads(path.read_text())
    if probes.get("format") != PROBE_FORMAT:
        raise UserError(f"{path}: unknown format {probes.get('format')!r}; prepare the data again")
    return probes


# ---- scoring --------------------------------------------------------------------------------------


def answer_logprob_rows(model, ids: list[int], positions: list[int], window: int, vocab_size: int,
                        eos_id: int, carry_state: bool, device="cpu") -> dict[int, "torch.Tensor"]:
    """Log-softmax rows (V,) predicting ids[j] for each j in `positions`, reading the book
    [eos] + ids[:-1] in windows of `window` tokens; the recurrent state is carried from window to
    window (carry_state=True, the same as one long forward) or starts at zero in each window."""
    x = torch.tensor([eos_id] + ids[:-1], dtype=torch.long, device=device)
    want = sorted(set(positions))
    rows = {}
    cache = model.allocate_cache(1, device=device) if carry_state else None
    with torch.no_grad():
        for s in range(0, len(x), window):
            here = [j for j in want if s <= j < s + window]
            chunk = x[s:s + window].unsqueeze(0)                           # (1, w)
            logits = model(chunk, cache=cache) if cache is not None else model(chunk)
            if here:
                sel = logits[0, [j - s for j in here], :vocab_size].float().log_softmax(-1)   # (n, V)
                rows.update({j: sel[k] for k, j in enumerate(here)})
    return rows


def score_gate(model, probes: dict, window: int, vocab_size: int, eos_id: int, device="cpu",
               max_doc_tokens: int = 0) -> dict:
    """Accuracy (answer's first token ranked first among the candidates' first tokens) and mean
    log-prob of the answer tokens, overall and per target distance, with the state carried and reset
    every `window` tokens; chance = 1 / number of candidates. max_doc_tokens > 0: score only the
    first that many tokens of each probe book (a quick learning-curve reading)."""
    if not hasattr(model, "allocate_cache"):
        raise UserError("the gate carries the recurrent state over windows: the model needs allocate_cache()")
    was_training = model.training
    model.eval()
    recs = {"carried": [], "reset": []}
    for doc in probes["docs"]:
        ids = doc["ids"][:max_doc_tokens] if max_doc_tokens > 0 else doc["ids"]
        kept = [p for p in doc["probes"] if p["b"] <= len(ids)]
        if not kept:
            continue
        positions = [j for p in kept for j in range(p["a"], p["b"])]
        for mode in recs:
            rows = answer_logprob_rows(model, ids, positions, window, vocab_size, eos_id, mode == "carried", device)
            for p in kept:
                cand = rows[p["a"]][p["candidates"]]
                picked = [float(rows[j][ids[j]]) for j in range(p["a"], p["b"])]
                recs[mode].append({"distance": p["distance"], "target": p["target_distance"], "kind": p["kind"],
                                   "correct": float(int(cand.argmax()) == p["answer"]),
                                   "logprob": float(np.mean(picked)), "chance": 1.0 / len(p["candidates"])})
    model.train(was_training)
    return summarize(recs["carried"], recs["reset"])


def summarize(carried: list[dict], reset: list[dict]) -> dict:
    """Overall and per-target-distance accuracy / log-prob of the carried and reset scorings of the
    same probes (records {"distance", "target", "correct", "logprob", "chance"}); each bucket also
    gives the measured token distances (min, median, max)."""
    def stats(rc, rr):
        d = [r["distance"] for r in rc]
        return {"probes": len(rc), "accuracy": _mean(rc, "correct"), "logprob": _mean(rc, "logprob"),
                "reset_accuracy": _mean(rr, "correct"), "reset_logprob": _mean(rr, "logprob"),
                "chance": _mean(rc, "chance"),
                "distance": [int(min(d)), float(np.median(d)), int(max(d))] if d else []}

    groups: dict[int, list] = {}
    for rc, rr in zip(carried, reset):
        groups.setdefault(int(rc["target"]), []).append((rc, rr))
    buckets = {str(t): stats([p[0] for p in groups[t]], [p[1] for p in groups[t]]) for t in sorted(groups)}
    return {**stats(carried, reset), "buckets": buckets}


def _mean(recs: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in recs])) if recs else float("nan")
