"""Command-line overrides for the module-level hyperparameters of a script.

nanoGPT's `configurator.py` idea without `exec`: a script defines its hyperparameters as
plain module-level constants, then calls

    config = apply_overrides(globals(), sys.argv[1:])

Each argument must be `--key=value` where `key` is one of those constants. The value is parsed
with `ast.literal_eval` (so `--lr=3e-4`, `--compile=False`, `--prompt='Once upon'` work) and
falls back to the raw string for string constants (`--out_dir=out/run1`). Unknown keys and
values whose type does not match the default are errors (`ConfigError`, a one-line message).
`None` defaults accept any type of value. `int` values are accepted where a `float` is
expected (`--lr=1` is 1.0).

The returned dict is a snapshot of every configurable constant after the overrides: the
config that is saved in checkpoints and sample files.
"""

from __future__ import annotations

import ast
import sys

CONFIG_TYPES = (int, float, bool, str, type(None))


class ConfigError(ValueError):
    """A bad `--key=value` argument; the message says what to do."""


def config_keys(namespace: dict) -> list[str]:
    """The configurable names of a module namespace: public constants of simple types."""
    return [
        k for k, v in namespace.items()
        if not k.startswith("_") and isinstance(v, CONFIG_TYPES) and not callable(v)
        and k not in ("annotations",)
    ]


def _parse_value(key: str, raw: str, default):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # bare strings: --out_dir=out/run1
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"--{key} expects True or False, got {raw!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        return raw  # --prompt=123 stays a string
    if type(value) is not type(default):
        raise ConfigError(
            f"--{key} expects {type(default).__name__} (default {default!r}), got {raw!r}")
    return value


def parse_overrides(namespace: dict, argv: list[str]) -> dict:
    """Parse `--key=value` arguments against `namespace`; returns {key: value} without applying."""
    keys = set(config_keys(namespace))
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value")
        key, raw = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in keys:
            close = sorted(k for k in keys if k.split("_")[0] == key.split("_")[0])
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key --{key}{hint}; known keys: {', '.join(sorted(keys))}")
        overrides[key] = _parse_value(key, raw, namespace[key])
    return overrides


def apply_overrides(namespace: dict, argv: list[str] | None = None, exit_on_error: bool = True) -> dict:
    """Apply `--key=value` overrides to `namespace` (a script's `globals()`) and return the config.

    On a bad argument: prints one line to stderr and exits with status 2 (scripts), or raises
    `ConfigError` when `exit_on_error=False` (tests).
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides = parse_overrides(namespace, argv)
    except ConfigError as e:
        if not exit_on_error:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    for k, v in overrides.items():
        print(f"override: {k} = {v!r}")
        namespace[k] = v
    return {k: namespace[k] for k in config_keys(namespace)}
