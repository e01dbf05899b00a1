"""The one door for weights: any of the three forms -> (model, tokenizer, WeightsInfo), and exports.

    repo       a `*.pt` checkpoint of this repository (mamba_lm/checkpoint.py), any registered model type
    hf         a transformers `MambaForCausalLM` folder (config.json + safetensors / bin, tokenizer files)
    mamba_ssm  a mamba-ssm `MambaLMHeadModel.save_pretrained` folder (config.json + pytorch_model.bin)

    load_weights(source, device="cpu", tokenizer=None) -> (model, tokenizer | None, WeightsInfo)
    describe_weights(path) -> WeightsInfo          # the metadata only: no tensor is read, no model built
    check_data_tokenizer(info, data_tokenizer, data_dir=None)   # a model vs prepared data (--init_from)
    export_hf(source, folder, tokenizer=None, info=None, name=None) -> list[str]
    export_mamba_ssm(source, folder, tokenizer=None, info=None) -> list[str]

Every caller (generate_text.py, evaluate.py, export.py, the trainer's --init_from, bench/, tests)
loads weights through `load_weights`; checkpoint.py only saves and loads repo `.pt` files and
convert.py only maps the external formats. A repo checkpoint of a model type defined outside the core
(multitrack) loads once that package is imported (mamba_lm.models registry); the core never imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from mamba_lm.checkpoint import load_checkpoint, model_from_checkpoint
from mamba_lm.convert import (describe_folder, detect_layout, load_folder, padded_size, refuse_non_baseline,
                              resolve_tokenizer, tokenizer_summary, write_hf_folder, write_mamba_ssm_folder)
from mamba_lm.data import check_tokenizer_match
from mamba_lm.errors import UserError
from mamba_lm.runtime import count_params
from mamba_lm.tokenizer import TextTokenizer, tokenizer_from_dict


@dataclass
class WeightsInfo:
    """What is known about loaded weights: one shape for all three forms.

    Fields a form does not have stay None / empty (a folder has no step; a repo checkpoint has no
    source_config of its own). Also readable as a mapping (`info["step"]`, `info.get("metrics")`)
    so report code that formats facts generically, and model_card, take it or a plain dict.
    """
    layout: str                        # "repo" | "hf" | "mamba_ssm": which form was read
    path: str                          # the .pt file or the folder
    model_type: str                    # "mamba" | "multitrack" | ... (mamba_lm.models registry)
    model_config: dict                 # dataclasses.asdict of the model's config (derived fields included)
    vocab_size: int                    # the tokenizer's vocabulary (padded size when not exact)
    padded_vocab_size: int             # embedding rows
    vocab_exact: bool = True           # False: an HF folder without tokenizer (only the padded size is known)
    tokenizer: dict | str = "missing"  # tokenizer summary {"name","kind","vocab_size","eos_id","sha256"} | "missing"
    tokenizer_source: str = "missing"  # "checkpoint" | "folder" | "given" | "missing" (callers may note others)
    num_params: int | None = None      # distinct parameters (None from describe_weights: no model built)
    weights: str = ""                  # the weights file read (file name)
    stored_dtype: str = "float32"      # dtype of the stored tensors (loaded as float32)
    source_config: dict = field(default_factory=dict)   # the folder's config.json as read (repo: model_config)
    step: int | None = None            # optimizer steps (repo checkpoints)
    epoch: int | None = None
    tokens_seen: int | None = None
    best_val_loss: float | None = None
    metrics: dict = field(default_factory=dict)          # last evaluation ({"val_loss", "val_ppl", ...})
    data: dict = field(default_factory=dict)             # {"dir", "fingerprint", "seq_len"} of the training data
    train_config: dict = field(default_factory=dict)     # the training script's hyperparameters
    script: str | None = None          # the script that wrote the checkpoint
    created: str | None = None         # ISO time the checkpoint was written

    @property
    def data_fingerprint(self) -> str | None:
        """Fingerprint of the data the weights were trained on (repo checkpoints), else None."""
        return (self.data or {}).get("fingerprint")

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        value = getattr(self, key, None) if key in self.__dataclass_fields__ else None
        return default if value is None else value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -----------------------------------------------------------------------------
# loading

def load_weights(source, device="cpu", tokenizer=None) -> tuple[nn.Module, TextTokenizer | None, WeightsInfo]:
    """Load any of the three forms: a repo `.pt` path (or its already-loaded dict), an HF folder or a
    mamba-ssm folder. The model comes back in eval mode on `device`, loaded strictly (shape-checked).

    tokenizer: optional spec (str path / hub id, TextTokenizer, or to_dict() dict) used when the
    weights come without one; if they have one and it differs, UserError. The returned tokenizer is
    None only for a folder without tokenizer.json when no spec is given.
    """
    given = resolve_tokenizer(tokenizer)
    if isinstance(source, dict):
        model, tok, info = _load_repo(source, "the checkpoint", device)
    else:
        path = Path(source)
        layout = detect_layout(path)
        if layout == "repo":
            model, tok, info = _load_repo(load_checkpoint(path), str(path), device)
        else:
            model, tok, facts = load_folder(path, layout, given)
            model, info = model.to(device), WeightsInfo(**facts)
    if tok is not None and given is not None and given.sha256 != tok.sha256:
        raise UserError(f"{info.path} comes with tokenizer {tok.name!r} (vocab {tok.vocab_size}) but "
                        f"--tokenizer {given.name!r} (vocab {given.vocab_size}) was given; drop --tokenizer")
    if tok is None and given is not None:
        tok, info.tokenizer, info.tokenizer_source = given, tokenizer_summary(given), "given"
    return model.eval(), tok, info


def _load_repo(ckpt: dict, path: str, device):
    """(model, tokenizer | None, WeightsInfo) of a loaded repo checkpoint dict."""
    model, ckpt = model_from_checkpoint(ckpt, device=device)
    tok = tokenizer_from_dict(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None
    info = _repo_info(ckpt, path, tok)
    info.num_params = count_params(model)
    return model, tok, info


def _repo_info(ckpt: dict, path: str, tok) -> WeightsInfo:
    """WeightsInfo of a repo checkpoint dict (`tok`: its tokenizer, or a summary dict, or None)."""
    cfg = ckpt["model_config"]
    summary = tokenizer_summary(tok) if tok is not None else "missing"
    return WeightsInfo(
        layout="repo", path=path, model_type=ckpt["model_type"], model_config=cfg,
        vocab_size=cfg.get("vocab_size"), padded_vocab_size=cfg.get("padded_vocab_size", cfg.get("vocab_size")),
        vocab_exact=True, tokenizer=summary, tokenizer_source="checkpoint" if tok is not None else "missing",
        weights=Path(path).name, stored_dtype="float32", source_config=cfg,
        step=ckpt.get("step"), epoch=ckpt.get("epoch"), tokens_seen=ckpt.get("tokens_seen"),
        best_val_loss=ckpt.get("best_val_loss"), metrics=ckpt.get("metrics") or {}, data=ckpt.get("data") or {},
        train_config=ckpt.get("train_config") or {}, script=ckpt.get("script"), created=ckpt.get("created"))


def describe_weights(path) -> WeightsInfo:
    """The WeightsInfo that load_weights would return, from the metadata only: a repo checkpoint is
    memory-mapped (its tensors are not read), a folder's config.json and tokenizer.json are read.
    For checks that must fail before any expensive work (evaluate.py checks every checkpoint first).
    num_params is None (no model is built)."""
    path = Path(path)
    if detect_layout(path) == "repo":
        ckpt = load_checkpoint(path, mmap=True)
        return _repo_info(ckpt, str(path), tokenizer_summary(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None)
    facts = describe_folder(path)
    return WeightsInfo(model_type="mamba", model_config={}, **facts)


def check_data_tokenizer(info, data_tokenizer: dict, data_dir=None) -> None:
    """Refuse using `info`'s model on data made with another tokenizer (UserError).

    info: a WeightsInfo (or a dict with its fields). data_tokenizer: meta.json's "tokenizer" dict.
    With a model tokenizer (info["tokenizer"] a dict) name, sha256, vocab size and eos must agree
    (mamba_lm.data.check_tokenizer_match). Without one (state-spaces/mamba-*), only the vocabulary
    size can be checked.
    """
    model_tok = info.get("tokenizer")
    where = f" ({data_dir})" if data_dir else ""
    data_desc = f"{data_tokenizer.get('name')!r} (vocab {data_tokenizer.get('vocab_size')})"
    if isinstance(model_tok, dict):
        check_tokenizer_match(data_tokenizer, model_tok)
        return
    data_vocab = int(data_tokenizer["vocab_size"])
    model_vocab, padded = int(info["vocab_size"]), int(info["padded_vocab_size"])
    if info.get("vocab_exact", True):
        ok = data_vocab == model_vocab
    else:  # HF folder without tokenizer: only the padded size is known
        ok = data_vocab <= padded and any(padded_size(data_vocab, m) == padded for m in (8, 16, 32, 64, 128))
    if not ok:
        raise UserError(
            f"{info['path']} has no tokenizer and a vocabulary of {model_vocab} (padded {padded}); the data"
            f"{where} uses tokenizer {data_desc}: prepare the data with the model's tokenizer "
            f"(state-spaces/mamba-* use EleutherAI/gpt-neox-20b) or use a model made for this data")


# -----------------------------------------------------------------------------
# exporting

def export_source(source, tokenizer=None, info=None):
    """(model, tokenizer, info) to export from a repo .pt / folder path, a checkpoint dict, or a model.

    Non-baseline repo checkpoints are refused from their model_type before any model is built.
    tokenizer: a spec that replaces the source's own (export.py --tokenizer, for folders without one).
    """
    if isinstance(source, (str, Path, dict)):
        if isinstance(source, dict) or detect_layout(source) == "repo":
            ckpt = source if isinstance(source, dict) else load_checkpoint(source)
            where = "the checkpoint" if isinstance(source, dict) else str(source)
            refuse_non_baseline(ckpt.get("model_type"), where)
            model, tok, loaded = _load_repo(ckpt, where, "cpu")
        else:
            model, tok, loaded = load_weights(source, tokenizer=tokenizer)
        info = dataclasses.replace(loaded, **(info or {}))
    else:
        model, tok, info = source, None, info if info is not None else {}
    refuse_non_baseline(getattr(model, "model_type", info.get("model_type")), info.get("path") or "this model")
    if tokenizer is not None:
        tok = resolve_tokenizer(tokenizer)
    return model, tok, info


def export_hf(source, folder, tokenizer=None, info=None, name: str | None = None) -> list[str]:
    """Write a transformers folder (convert.write_hf_folder) from any source export_source takes;
    MambaForCausalLM / AutoTokenizer .from_pretrained(folder) load it. Returns the file names written."""
    model, tok, info = export_source(source, tokenizer, info)
    return write_hf_folder(model, folder, tok, info, name)


def export_mamba_ssm(source, folder, tokenizer=None, info=None) -> list[str]:
    """Write a mamba-ssm folder (convert.write_mamba_ssm_folder) from any source export_source takes;
    mamba-ssm's MambaLMHeadModel.from_pretrained(folder) loads it. Returns the file names written."""
    model, tok, info = export_source(source, tokenizer, info)
    return write_mamba_ssm_folder(model, folder, tok, info)
