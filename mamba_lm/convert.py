"""Format conversion: Hugging Face / mamba-ssm model folders <-> our MambaLMHeadModel, config and names.

Three on-disk layouts hold the same Mamba-1 language model:

    repo       a `*.pt` checkpoint of this repository (mamba_lm/checkpoint.py)
    mamba_ssm  `config.json` (d_model, n_layer, vocab_size, ssm_cfg, ...) + `pytorch_model.bin`,
               as `mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel.save_pretrained` writes it
               (state-spaces/mamba-130m ... mamba-2.8b). No tokenizer: those models use
               EleutherAI/gpt-neox-20b.
    hf         `config.json` with "model_type": "mamba" (transformers' MambaConfig: hidden_size,
               num_hidden_layers, state_size, ...) + `model.safetensors` or `pytorch_model.bin`
               (possibly sharded, with an `*.index.json`), usually with tokenizer files
               (state-spaces/mamba-130m-hf ...).

Parameter names. Ours equal mamba-ssm's; transformers renames one tensor and drops the tied head:

    ours / mamba-ssm                       transformers
    backbone.embedding.weight   (V_pad, D)  backbone.embeddings.weight
    backbone.layers.{i}.mixer.*             backbone.layers.{i}.mixer.*   (same shapes)
    backbone.layers.{i}.norm.weight         backbone.layers.{i}.norm.weight
    backbone.norm_f.weight                  backbone.norm_f.weight
    lm_head.weight (tied to the embedding)  omitted when tie_word_embeddings (tied on load)

Vocabulary padding. mamba-ssm stores the tokenizer's vocabulary size (50277 for NeoX) and
`pad_vocab_size_multiple` (8): the embedding has V_pad = 50280 rows. transformers stores only the
padded size (`vocab_size` 50280). Loading an HF folder recovers the real size from its tokenizer
(or the one passed in); without one, `vocab_size` is the padded size and `vocab_exact` is False.

Public API (a leaf of the weight stack: it imports no checkpoint code; mamba_lm/weights.py is the
door that callers use, and it calls these):

    detect_layout(path) -> "hf" | "mamba_ssm" | "repo"
    load_folder(folder, layout, tokenizer=None) -> (model on CPU, tokenizer | None, info dict)
    describe_folder(path) -> dict        # vocabulary / tokenizer of a folder, without reading weights
    config_from_hf / config_from_mamba_ssm / hf_config_dict / mamba_ssm_config_dict   # config maps
    to_repo_state_dict(state, tie)       # key map: theirs -> ours
    write_hf_folder(model, folder, tok=None, info=None, name=None) -> list[str]
    write_mamba_ssm_folder(model, folder, tok=None, info=None) -> list[str]
    mamba_ssm_model(config)              # mamba-ssm's own model of our shape (tests, benchmarks)

Only the baseline Mamba (model_type "mamba") has these external formats; a multitrack checkpoint
stays a repo `.pt`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from mamba_lm.errors import UserError, torch_load_problem, unpickling_refused
from mamba_lm.mamba import MambaConfig, MambaLMHeadModel
from mamba_lm.runtime import count_params
from mamba_lm.tokenizer import bytes_to_unicode, canonical_sha256, load_tokenizer, tokenizer_from_dict

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                   "pytorch_model.bin", "pytorch_model.bin.index.json")
MAMBA_SSM_WEIGHTS = "pytorch_model.bin"

# transformers MambaConfig field  <-  our MambaConfig field (mamba-ssm names)
HF_FIELD_NAMES = {
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layer",
    "state_size": "d_state",
    "conv_kernel": "d_conv",
    "expand": "expand",
    "time_step_rank": "dt_rank",
    "time_step_min": "dt_min",
    "time_step_max": "dt_max",
    "time_step_floor": "dt_init_floor",
    "use_conv_bias": "conv_bias",
    "use_bias": "bias",
    "layer_norm_epsilon": "norm_epsilon",
    "residual_in_fp32": "residual_in_fp32",
    "tie_word_embeddings": "tie_embeddings",
}
# mamba-ssm's `Mamba` (Mamba-1 mixer) constructor arguments that may appear in ssm_cfg
SSM_CFG_FIELDS = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor",
                  "conv_bias", "bias")
MAMBA_SSM_CONFIG_KEYS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                         "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32",
                         "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")


# -----------------------------------------------------------------------------
# reading folders

def detect_layout(path) -> str:
    """Which layout `path` holds: "repo" (a .pt file), "hf" or "mamba_ssm" (a folder).

    UserError when it is none of them (missing path, folder without config.json, unknown config).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a repo checkpoint (.pt) or a folder with "
                        f"config.json + weights (Hugging Face or mamba-ssm layout)")
    if path.is_file():
        if path.name == "config.json":
            return detect_layout(path.parent)
        if path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"):
            raise UserError(f"{path} is a weights file; pass the folder that holds it with its config.json")
        return "repo"
    config_path = path / "config.json"
    if not config_path.is_file():
        pts = sorted(p.name for p in path.glob("*.pt"))
        hint = f" (it has {', '.join(pts)}: pass one of those files)" if pts else ""
        raise UserError(f"{path} has no config.json{hint}; expected a Hugging Face or mamba-ssm "
                        f"model folder (config.json + weights) or a repo checkpoint .pt")
    cfg = read_json(config_path)
    if cfg.get("model_type") == "mamba":
        return "hf"
    if "model_type" in cfg:
        raise UserError(f"{config_path}: model_type {cfg['model_type']!r} is not supported; only "
                        f"Mamba-1 models (model_type 'mamba') load here")
    if "d_model" in cfg and "n_layer" in cfg:
        return "mamba_ssm"
    raise UserError(f"{config_path} is neither a transformers Mamba config (model_type 'mamba') nor a "
                    f"mamba-ssm config (d_model, n_layer, vocab_size); point at a Mamba model folder")


def read_json(path) -> dict:
    """A JSON object from `path`; UserError naming the file when it is missing or not JSON."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore the file from the model's source") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def load_weight_file(path) -> dict:
    """{name: tensor} from one `.safetensors` or torch (`.bin` / `.pt`) file, loaded safely.

    torch files go through `torch.load(weights_only=True)`: no code runs from the file. A
    corrupted or truncated file is a UserError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} is missing; download the model folder again")
    fix = "the file is corrupted or truncated; download it again"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional: only .safetensors folders need it
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError: any unreadable file
            raise UserError(f"cannot read {path} ({type(e).__name__}: {first_line(e)}); {fix}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError ...
        refused = unpickling_refused(e)
        if refused:
            raise UserError(f"cannot read {path}: {refused}; use the folder's model.safetensors, or a "
                            "pytorch_model.bin that holds only tensors") from None
        raise UserError(f"cannot read {path} ({type(e).__name__}: {torch_load_problem(e, first_line)}); {fix}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict) and "format" in state:
        raise UserError(f"{path} is a repo checkpoint, not a bare state dict; pass the .pt file itself")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors; {fix}")
    return state


def first_line(e: Exception) -> str:
    """The first line of an exception message, cut after its first sentence when long (torch's zip
    errors run on for several sentences)."""
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    if len(line) > 120:
        end = line.find(". ", 20)
        line = line[:end + 1] if 0 < end < 200 else line[:200] + "…"
    return line


def load_folder_weights(folder: Path, layout: str) -> tuple[dict, str]:
    """All tensors of a model folder (single file or shards), and the name of what was read."""
    if layout == "mamba_ssm":
        names = (MAMBA_SSM_WEIGHTS, "pytorch_model.bin.index.json", "model.safetensors")
    else:
        names = HF_WEIGHT_FILES
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            index = read_json(path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{path} has no weight_map; download the model folder again")
            state = {}
            for shard in sorted(set(weight_map.values())):
                state.update(load_weight_file(folder / shard))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise UserError(f"{path} lists {len(missing)} tensors that its shards lack "
                                f"(e.g. {missing[0]}); download the model folder again")
            return state, name
        return load_weight_file(path), name
    raise UserError(f"{folder} has config.json but no weights ({' or '.join(names[:2])}); "
                    f"download the weights into that folder")


# -----------------------------------------------------------------------------
# configs

def padded_size(vocab_size: int, multiple: int) -> int:
    return math.ceil(vocab_size / multiple) * multiple


def pad_multiple_for(vocab_size: int, padded: int) -> int | None:
    """A `pad_vocab_size_multiple` that pads `vocab_size` to exactly `padded` (8 preferred), or None."""
    for m in [8] + list(range(1, padded + 1)):
        if padded % m == 0 and padded_size(vocab_size, m) == padded:
            return m
    return None


def config_from_hf(hf: dict, vocab_size: int | None, where: str) -> dict:
    """Our MambaConfig kwargs from a transformers MambaConfig dict.

    `vocab_size`: the tokenizer's size when known (HF only stores the padded size).
    """
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if key not in hf:
            raise UserError(f"{where} lacks {key!r}; it is not a complete transformers Mamba config")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (Mamba uses silu)")
    kwargs = {ours: hf[theirs] for theirs, ours in HF_FIELD_NAMES.items() if theirs in hf}
    kwargs["rms_norm"] = True  # transformers' Mamba always uses RMSNorm
    padded = int(hf["vocab_size"])
    if vocab_size is None:
        vocab_size = padded
    if vocab_size > padded:
        raise UserError(f"the tokenizer has {vocab_size} tokens but {where} has an embedding of only "
                        f"{padded} rows; this tokenizer does not belong to this model")
    multiple = pad_multiple_for(vocab_size, padded)
    if multiple is None:  # no multiple pads exactly: keep the stored size (samplers slice vocab_size)
        vocab_size, multiple = padded, 1
    kwargs["vocab_size"] = vocab_size
    kwargs["pad_vocab_size_multiple"] = multiple
    return kwargs


def config_from_mamba_ssm(cfg: dict, where: str) -> dict:
    """Our MambaConfig kwargs from a mamba-ssm config.json (state-spaces/mamba-130m's)."""
    unknown = sorted(set(cfg) - set(MAMBA_SSM_CONFIG_KEYS) - {"_name_or_path", "architectures"})
    if unknown:
        raise UserError(f"{where} has keys a mamba-ssm MambaConfig does not know: {', '.join(unknown)}")
    ssm_cfg = dict(cfg.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise UserError(f"{where}: ssm_cfg layer {layer!r} is not supported; only Mamba-1 models load here")
    if cfg.get("attn_layer_idx"):
        raise UserError(f"{where}: hybrid models with attention layers (attn_layer_idx) are not supported")
    if cfg.get("d_intermediate", 0):
        raise UserError(f"{where}: d_intermediate > 0 (MLP blocks) is not supported; only pure Mamba-1 models")
    bad = sorted(set(ssm_cfg) - set(SSM_CFG_FIELDS) - {"dt_init", "dt_scale", "use_fast_path"})
    if bad:
        raise UserError(f"{where}: ssm_cfg keys {', '.join(bad)} are not supported by this repo's Mamba")
    kwargs = {k: ssm_cfg[k] for k in SSM_CFG_FIELDS if k in ssm_cfg}
    for key in ("d_model", "n_layer", "vocab_size", "rms_norm", "residual_in_fp32",
                "pad_vocab_size_multiple", "tie_embeddings"):
        if key in cfg:
            kwargs[key] = cfg[key]
    return kwargs


def hf_config_dict(config, eos_id: int | None) -> dict:
    """A transformers MambaConfig dict (config.json) for our MambaConfig."""
    if not config.rms_norm:
        raise UserError("transformers' Mamba only has RMSNorm; a model trained with rms_norm=False "
                        "cannot be exported to the Hugging Face format (use --format=mamba_ssm)")
    token_id = 0 if eos_id is None else int(eos_id)
    out = {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}
    for theirs, ours in HF_FIELD_NAMES.items():
        out[theirs] = getattr(config, ours)
    out.update({
        "vocab_size": int(config.padded_vocab_size),
        "time_step_rank": int(config.dt_rank),
        "intermediate_size": int(config.d_inner),
        "hidden_act": "silu",
        "initializer_range": 0.1,
        "time_step_scale": 1.0,
        "time_step_init_scheme": "random",
        "rescale_prenorm_residual": False,
        "use_cache": True,
        "bos_token_id": token_id, "eos_token_id": token_id, "pad_token_id": token_id,
        "dtype": "float32",
    })
    try:
        import transformers  # optional: only to record the version in config.json
        out["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    return dict(sorted(out.items()))


def mamba_ssm_config_dict(config) -> dict:
    """A mamba-ssm MambaConfig dict (config.json) for our MambaConfig: exactly its dataclass fields."""
    if config.norm_epsilon != 1e-5:
        raise UserError(f"mamba-ssm's config.json has no norm epsilon (it is fixed at 1e-5); this model "
                        f"uses {config.norm_epsilon}: export with --format=hf instead")
    defaults = type(config)(d_model=config.d_model, n_layer=config.n_layer, vocab_size=config.vocab_size)
    ssm_cfg = {k: getattr(config, k) for k in SSM_CFG_FIELDS if getattr(config, k) != getattr(defaults, k)}
    return {
        "d_model": config.d_model, "d_intermediate": 0, "n_layer": config.n_layer,
        "vocab_size": config.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
        "rms_norm": config.rms_norm, "residual_in_fp32": config.residual_in_fp32,
        "fused_add_norm": True, "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "tie_embeddings": config.tie_embeddings,
    }


def mamba_ssm_model(config, device=None, dtype=None, fused_add_norm: bool | None = None):
    """mamba-ssm's own `MambaLMHeadModel` with our MambaConfig's shape (random weights; our state_dict
    loads into it unchanged: the names match). The reference for equivalence tests and benchmarks.

    fused_add_norm: mamba-ssm's Triton residual-add + RMSNorm (default: on CUDA only). Raises
    ImportError when mamba_ssm is not installed.
    """
    # optional CUDA package: only the equivalence tests and benchmarks build its model
    from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as SsmModel

    fields = mamba_ssm_config_dict(config)
    if fused_add_norm is None:
        fused_add_norm = str(device or "cpu").startswith("cuda")
    return SsmModel(SsmConfig(**{**fields, "fused_add_norm": fused_add_norm}), device=device, dtype=dtype)


# -----------------------------------------------------------------------------
# tokenizers

def resolve_tokenizer(spec):
    """A TextTokenizer from a spec string / TextTokenizer / to_dict() dict / None."""
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        return load_tokenizer(str(spec))
    if isinstance(spec, dict):
        return tokenizer_from_dict(spec)
    return spec


def tokenizer_summary(tokenizer) -> dict:
    """{"name","kind","vocab_size","eos_id","sha256"} of a TextTokenizer or its to_dict() dict: what
    mamba_lm.data.check_tokenizer_match compares."""
    d = tokenizer if isinstance(tokenizer, dict) else tokenizer.to_dict()
    return {k: d.get(k) for k in ("name", "kind", "vocab_size", "eos_id", "sha256")}


def folder_tokenizer(folder: Path):
    """The TextTokenizer of a model folder's tokenizer.json, or None when it has none.

    The tokenizer.json that write_hf_folder writes for the byte tokenizer comes back as the byte
    tokenizer itself (same ids, and sha256 "byte-v1", so data made with it still matches).
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    tok = load_tokenizer(str(path))
    if tok.vocab_size == 257 and tok.sha256 == canonical_sha256(hf_tokenizer_json(load_tokenizer("byte"))[0]):
        return load_tokenizer("byte")
    return tok


def hf_tokenizer_json(tokenizer) -> tuple[str, str]:
    """(tokenizer.json text, eos token string) for a TextTokenizer.

    "hf" tokenizers are written as they are. The "byte" tokenizer (id = byte value, eos = 256)
    becomes a byte-level BPE without merges, which encodes every byte to its own id.
    """
    d = tokenizer.to_dict()
    if d.get("kind") == "hf" and d.get("json"):
        return d["json"], tokenizer.id_to_token(tokenizer.eos_id)
    if d.get("kind") == "byte":
        # optional: the `tokenizers` package is needed only to write a tokenizer.json
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        vocab = {ch: b for b, ch in bytes_to_unicode().items()}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        eos = "<|endoftext|>"
        tok.add_special_tokens([AddedToken(eos, special=True)])
        if tok.token_to_id(eos) != tokenizer.eos_id:
            raise UserError(f"byte tokenizer eos id {tokenizer.eos_id} is not 256; cannot write tokenizer.json")
        return tok.to_str(), eos
    raise UserError(f"tokenizer {d.get('name')!r} (kind {d.get('kind')!r}) has no tokenizer.json to export")


def write_hf_tokenizer(folder: Path, tokenizer) -> list[str]:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json for AutoTokenizer."""
    text, eos = hf_tokenizer_json(tokenizer)
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    special = {"bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": eos}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                  "add_bos_token": False, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000}
    write_json(folder / "tokenizer_config.json", tok_config)
    write_json(folder / "special_tokens_map.json", special)
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


# -----------------------------------------------------------------------------
# loading folders

def describe_folder(path) -> dict:
    """What load_folder would report about an HF / mamba-ssm folder's vocabulary and tokenizer,
    read from config.json and tokenizer.json only (no weights): {"path", "layout", "vocab_size",
    "padded_vocab_size", "vocab_exact", "tokenizer": summary dict | "missing"}. For checks that
    must fail before any expensive work (evaluate.py checks every checkpoint first)."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == "repo":
        raise UserError(f"{path} is a repo checkpoint file, not a model folder")
    tok = folder_tokenizer(path)
    _, config = folder_config(path, layout, tok)
    return {"path": str(path), "layout": layout, "vocab_size": config.vocab_size,
            "padded_vocab_size": config.padded_vocab_size, "vocab_exact": layout == "mamba_ssm" or tok is not None,
            "tokenizer": tokenizer_summary(tok) if tok is not None else "missing"}


def folder_config(folder: Path, layout: str, tok):
    """(config.json dict, our MambaConfig) of an HF or mamba-ssm folder. `tok`: the model's tokenizer
    or None; HF: it gives the real vocabulary size; mamba-ssm: UserError unless its size is vocab_size."""
    config_path = folder / "config.json"
    raw = read_json(config_path)
    if layout == "hf":
        kwargs = config_from_hf(raw, tok.vocab_size if tok is not None else None, str(config_path))
    else:
        kwargs = config_from_mamba_ssm(raw, str(config_path))
        if tok is not None and tok.vocab_size != kwargs.get("vocab_size", 50277):
            raise UserError(f"{config_path} has vocab_size {kwargs.get('vocab_size', 50277)} but tokenizer "
                            f"{tok.name!r} has {tok.vocab_size} tokens; use the tokenizer this model was trained with")
    try:
        return raw, MambaConfig(**kwargs)
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"{config_path}: cannot build a Mamba config ({first_line(e)})") from None


def load_folder(folder: Path, layout: str, tokenizer=None):
    """(model on CPU, tokenizer, info) from an HF or mamba-ssm folder (strict, shape-checked load).
    `tokenizer`: a TextTokenizer used when the folder has no tokenizer.json.

    info: a dict with the mamba_lm.weights.WeightsInfo fields a folder knows (weights.py wraps it).
    """
    tok = folder_tokenizer(folder)
    source = "folder" if tok is not None else "missing"
    if tok is None and tokenizer is not None:
        tok, source = tokenizer, "given"
    raw, config = folder_config(folder, layout, tok)
    state, weights_name = load_folder_weights(folder, layout)
    stored_dtype = str(next(iter(state.values())).dtype).replace("torch.", "") if state else "?"
    state = to_repo_state_dict(state, config.tie_embeddings)
    model = MambaLMHeadModel(config)
    check_state_dict(model, state, folder / "config.json", folder / weights_name)
    model.load_state_dict(state, strict=True)
    info = {
        "layout": layout, "path": str(folder), "model_type": "mamba",
        "model_config": dataclasses.asdict(config), "vocab_size": config.vocab_size,
        "padded_vocab_size": config.padded_vocab_size,
        "vocab_exact": layout == "mamba_ssm" or tok is not None,
        "tokenizer": tokenizer_summary(tok) if tok is not None else "missing",
        "tokenizer_source": source, "weights": weights_name, "stored_dtype": stored_dtype,
        "num_params": count_params(model), "source_config": raw,
    }
    return model, tok, info


def to_repo_state_dict(state: dict, tie: bool) -> dict:
    """HF / mamba-ssm tensors -> our names: embeddings -> embedding; tied head filled in."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("backbone.embeddings."):
            name = name.replace("backbone.embeddings.", "backbone.embedding.", 1)
        out[name] = tensor
    if tie and "backbone.embedding.weight" in out:
        out["lm_head.weight"] = out["backbone.embedding.weight"]
    return out


def check_state_dict(model, state: dict, config_path: Path, weights_path: Path) -> None:
    """UserError (one line) when the weights do not fit the model built from config.json."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    fix = f"{config_path} does not match {weights_path}; use the config.json that came with these weights"
    if wrong:
        k, got, want = wrong[0]
        raise UserError(f"{k} has shape {got} in the weights but {want} from the config "
                        f"({len(wrong)} tensors differ): {fix}")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise UserError(f"weights have {' and '.join(parts)} tensors: {fix}")


# -----------------------------------------------------------------------------
# exporting

def refuse_non_baseline(model_type, where: str) -> None:
    """UserError unless `model_type` is the baseline "mamba": only it has the HF / mamba-ssm formats."""
    if model_type != "mamba":
        raise UserError(f"{where} is a {model_type!r} model; only the baseline Mamba (model_type 'mamba') "
                        f"exports to the Hugging Face / mamba-ssm formats (multitrack models stay repo .pt files)")


def cpu_state_dict(model) -> dict:
    """The model's tensors detached, on CPU, contiguous (what the folder writers save)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def write_hf_folder(model, folder, tok=None, info=None, name: str | None = None) -> list[str]:
    """Write a transformers folder for a baseline `model`: MambaForCausalLM / AutoTokenizer
    .from_pretrained(folder) load it.

    Files: config.json, generation_config.json, model.safetensors (backbone.embeddings.weight; the
    tied lm_head omitted, as save_pretrained does), tokenizer files (when `tok` is given), README.md
    (model card from `info`: a WeightsInfo or a dict with some of its fields).
    name: the model's name in the model card (default: the folder's name).
    Returns the file names written.
    """
    from safetensors.torch import save_file  # optional: only the HF export writes safetensors
    info = info if info is not None else {}
    refuse_non_baseline(getattr(model, "model_type", info.get("model_type")), info.get("path") or "this model")
    config = model.config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    eos_id = tok.eos_id if tok is not None else None
    write_json(folder / "config.json", hf_config_dict(config, eos_id))
    token_id = 0 if eos_id is None else int(eos_id)
    write_json(folder / "generation_config.json",
               {"bos_token_id": token_id, "eos_token_id": token_id, "pad_token_id": token_id})
    state = {}
    for key, tensor in cpu_state_dict(model).items():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue  # transformers ties it back to backbone.embeddings.weight on load
        state[key.replace("backbone.embedding.", "backbone.embeddings.", 1)] = tensor.clone()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder / "model.safetensors", 0o666 & ~umask)  # safetensors writes 0600; share like the others
    written = ["config.json", "generation_config.json", "model.safetensors"]
    if tok is not None:
        written += write_hf_tokenizer(folder, tok)
    (folder / "README.md").write_text(model_card(model, tok, info, name or folder.name), encoding="utf-8")
    return written + ["README.md"]


def write_mamba_ssm_folder(model, folder, tok=None, info=None) -> list[str]:
    """Write config.json + pytorch_model.bin for a baseline `model` as mamba-ssm's
    MambaLMHeadModel.save_pretrained does; `MambaLMHeadModel.from_pretrained(folder)` reads them
    (strict load: lm_head.weight included). A tokenizer.json is added when `tok` has one (mamba-ssm
    ignores it; mamba_lm.weights.load_weights uses it). Returns the file names written.
    """
    info = info if info is not None else {}
    refuse_non_baseline(getattr(model, "model_type", info.get("model_type")), info.get("path") or "this model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", mamba_ssm_config_dict(model.config))
    torch.save(cpu_state_dict(model), folder / MAMBA_SSM_WEIGHTS)
    written = ["config.json", MAMBA_SSM_WEIGHTS]
    if tok is not None and tok.to_dict().get("kind") == "hf":
        (folder / "tokenizer.json").write_text(tok.to_dict()["json"], encoding="utf-8")
        written.append("tokenizer.json")
    return written


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def fmt_int(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def data_facts(data_dir) -> list[tuple[str, str]]:
    """(label, value) rows about the training split from the data dir's meta.json, when it is there."""
    meta_path = Path(data_dir) / "meta.json" if data_dir else None
    if meta_path is None or not meta_path.is_file():
        return []
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        train = meta["splits"]["train"]
        rows = [("train split", f"{fmt_int(train['books'])} books, {fmt_int(train['tokens'])} tokens")]
        source = meta.get("source") or {}
        if source:
            rows.append(("source", ", ".join(f"{k}={v}" for k, v in source.items() if not isinstance(v, (dict, list)))))
        return rows
    except (OSError, ValueError, KeyError, TypeError):
        return []


def model_card(model, tok, info: dict, name: str) -> str:
    """README.md for the Hugging Face folder: YAML front matter, training facts, how to load."""
    c = model.config
    metrics = info.get("metrics") or {}
    data = info.get("data") or {}
    val_loss = metrics.get("val_loss", info.get("best_val_loss"))
    val_ppl = metrics.get("val_ppl", math.exp(val_loss) if isinstance(val_loss, (int, float)) and val_loss < 50 else None)
    n_params = count_params(model)
    lines = [
        "---", "library_name: transformers", "license: apache-2.0", "pipeline_tag: text-generation",
        "tags:", "- mamba", "- state-space-model", "- mamba-narrative", "- fiction", "---", "",
        f"# {name}", "",
        f"A Mamba-1 language model ({n_params / 1e6:.1f}M parameters: d_model={c.d_model}, "
        f"n_layer={c.n_layer}, d_state={c.d_state}, expand={c.expand}), "
        + (f"trained with mamba-narrative on long-form fiction (`{data['dir']}`)." if data.get("dir")
           else f"converted by mamba-narrative from `{info.get('path', 'a model')}`."), "",
        "## Training", "",
        "| | |", "|---|---|",
    ]
    facts = [
        ("data", data.get("dir")), *data_facts(data.get("dir")), ("data fingerprint", data.get("fingerprint")),
        ("sequence length", data.get("seq_len")),
        ("tokenizer", f"{tok.name} (vocab {tok.vocab_size})" if tok is not None else "not included"),
        ("tokens seen", fmt_int(info.get("tokens_seen"))), ("steps", fmt_int(info.get("step"))),
        ("epochs", info.get("epoch")),
        ("val loss", f"{val_loss:.4f}" if isinstance(val_loss, (int, float)) else None),
        ("val perplexity", f"{val_ppl:.2f}" if isinstance(val_ppl, (int, float)) else None),
        ("script", info.get("script")), ("created", info.get("created")),
    ]
    lines += [f"| {k} | {v} |" for k, v in facts if v not in (None, "None")]
    train_config = info.get("train_config") or {}
    if train_config:
        lines += ["", "### Training config", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | `{v!r}` |" for k, v in sorted(train_config.items())]
    lines += [
        "", "## How to load", "", "```python",
        "from transformers import AutoTokenizer, MambaForCausalLM", "",
        f'model = MambaForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        'ids = tokenizer("It was a dark and stormy night", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=64, do_sample=True, top_p=0.9)[0]))",
        "```", "",
        f"The logits have {c.padded_vocab_size} columns (vocabulary padded to a multiple of "
        f"{c.pad_vocab_size_multiple}); ids >= {c.vocab_size} are padding and never trained.",
        "", "In mamba-narrative: `from mamba_lm.weights import load_weights; "
        f'model, tokenizer, info = load_weights("{name}")`.', "",
    ]
    return "\n".join(lines)
