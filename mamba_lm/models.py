"""Model registry: build any model of the repository from (model_type, config).

    MODEL_TYPES = {"mamba": (MambaConfig, MambaLMHeadModel),
                   "multitrack": (MultiTrackConfig, MultiTrackLM)}   # registered by `import multitrack`

The core package never imports `multitrack` (it sits above the core; CONTRACTS.md "Layers"): the
multi-track package registers its model type with `register_model_type` when it is imported, and
every script that may load any model type (generate_text.py, evaluate.py, export.py, the train
scripts) imports `multitrack` explicitly. An unregistered type is a UserError saying so.

Checkpoints store `model_type` and `model_config_dict(model)`; `build_model` turns them back into a
model. Derived config fields (those with `init=False`, e.g. MambaConfig.d_inner) are recomputed.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch.nn as nn

from mamba_lm.errors import UserError
from mamba_lm.mamba import MambaConfig, MambaLMHeadModel

MODEL_TYPES: dict[str, tuple[type, type]] = {"mamba": (MambaConfig, MambaLMHeadModel)}
# packages that register a model type when imported (the message for an unregistered type names them)
PROVIDERS = {"multitrack": "multitrack"}


def register_model_type(model_type: str, config_cls: type, model_cls: type) -> None:
    """Make `model_type` buildable by build_model. Called by the package that defines the model when it
    is imported (multitrack/multitrack_model.py registers "multitrack"); registering the same classes
    again is a no-op, other classes under a taken name are a ValueError."""
    known = MODEL_TYPES.get(model_type)
    if known is not None and known != (config_cls, model_cls):
        raise ValueError(f"model_type {model_type!r} is already registered to {known[1].__name__}")
    MODEL_TYPES[model_type] = (config_cls, model_cls)


def config_from_dict(config_cls: type, config: dict):
    """config_cls(**config) keeping only constructor fields; unknown keys are a UserError."""
    init_names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    derived = {f.name for f in dataclasses.fields(config_cls) if not f.init}
    unknown = set(config) - init_names - derived
    if unknown:
        raise UserError(f"unknown {config_cls.__name__} field(s) {', '.join(sorted(unknown))} in the model config "
                        f"(checkpoint from a different version?); known: {', '.join(sorted(init_names))}")
    return config_cls(**{k: v for k, v in config.items() if k in init_names})


def build_model(model_type: str, config, device=None) -> nn.Module:
    """A freshly initialised model. config: a dict (e.g. from a checkpoint) or the config dataclass itself."""
    if model_type not in MODEL_TYPES:
        hint = (f"; the script must `import {PROVIDERS[model_type]}` to load it" if model_type in PROVIDERS
                else f"; available: {', '.join(sorted(MODEL_TYPES))}")
        raise UserError(f"model_type {model_type!r} is not registered{hint}")
    config_cls, model_cls = MODEL_TYPES[model_type]
    if isinstance(config, dict):
        config = config_from_dict(config_cls, config)
    elif not isinstance(config, config_cls):
        raise UserError(f"model_type {model_type!r} needs a {config_cls.__name__} or a dict, got {type(config).__name__}")
    if device is not None and "device" in inspect.signature(model_cls.__init__).parameters:
        return model_cls(config, device=device)
    model = model_cls(config)
    return model if device is None else model.to(device)


def model_config_dict(model: nn.Module) -> dict:
    """dataclasses.asdict(model.config): JSON-safe, what checkpoints store as "model_config"."""
    return dataclasses.asdict(model.config)
