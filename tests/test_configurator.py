"""Tests of mamba_lm.configurator: the --key=value overrides every script uses."""

import pytest

from mamba_lm.configurator import ConfigError, apply_overrides


def namespace():
    return {"lr": 6e-4, "batch_size": 8, "compile": False, "out_dir": "out/run", "init_from": None,
            "_private": 1, "helper": len}


def test_overrides_parse_types():
    """Values are parsed to the type of the default: float, int, bool, str, and anything for None."""
    ns = namespace()
    cfg = apply_overrides(ns, ["--lr=3e-4", "--batch_size=16", "--compile=True", "--out_dir=out/x",
                               "--init_from=ckpt.pt"], exit_on_error=False)
    assert ns["lr"] == 3e-4 and ns["batch_size"] == 16 and ns["compile"] is True
    assert ns["out_dir"] == "out/x" and ns["init_from"] == "ckpt.pt"
    assert cfg == {"lr": 3e-4, "batch_size": 16, "compile": True, "out_dir": "out/x", "init_from": "ckpt.pt"}


def test_int_accepted_for_float_and_dashes_for_underscores():
    """`--lr=1` becomes 1.0 and `--batch-size=4` names batch_size."""
    ns = namespace()
    apply_overrides(ns, ["--lr=1", "--batch-size=4"], exit_on_error=False)
    assert ns["lr"] == 1.0 and isinstance(ns["lr"], float) and ns["batch_size"] == 4


@pytest.mark.parametrize("arg, message", [
    ("--lrr=1e-3", "unknown config key --lrr"),
    ("--batch_size=1.5", "expects int"),
    ("--compile=maybe", "expects True or False"),
    ("lr=1e-3", "not of the form --key=value"),
    ("--_private=2", "unknown config key"),
    ("--helper=3", "unknown config key"),
])
def test_bad_overrides_are_errors(arg, message):
    """Unknown keys, wrong types and malformed arguments raise ConfigError and change nothing."""
    ns = namespace()
    before = dict(ns)
    with pytest.raises(ConfigError, match=message):
        apply_overrides(ns, [arg], exit_on_error=False)
    assert ns == before


def test_script_mode_exits_2(capsys):
    """In script mode a bad argument prints one `error:` line and exits with status 2."""
    with pytest.raises(SystemExit) as e:
        apply_overrides(namespace(), ["--nope=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown config key --nope")
