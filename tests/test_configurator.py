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


# ---- declared ranges and --help -------------------------------------------------------------------------
import ast  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

from mamba_lm.configurator import PathRule, Range, help_text, parse_rule, read_declarations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py")]
                 if "apply_overrides(" in p.read_text(encoding="utf-8"))

TOY = '''"""A toy script.

More text."""
import sys
# ----------------------------------------------------------------
# sizes
batch_size = 8          # sequences per micro-batch [>=1]
lr = 6e-4               # peak learning rate [>0]
# rates
beta = 0.9              # momentum [0, 1)
top_p = 0.95            # nucleus mass (0, 1]
warm = 0.5              # fraction of the run,
                        # continued here [0, 1]
data_dir = "data"       # prepared data [input folder]
out_dir = "out/run"     # outputs [output folder]
init_from = "scratch"   # scratch or a file [input path, or scratch | resume]
free = 3                # no range
# ----------------------------------------------------------------
'''


def toy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    path = tmp_path / "toy.py"
    path.write_text(TOY, encoding="utf-8")
    ns = {"__file__": str(path), "__doc__": ast.get_docstring(ast.parse(TOY)), "__name__": "__main__"}
    exec(compile(TOY.split("# ---", 1)[1].split("\n", 1)[1], str(path), "exec"), ns)
    return ns


def test_parse_rule_forms():
    """Every documented tag form parses to the bounds it says; prose brackets that are no tag give None."""
    assert parse_rule("x [>=1]") == Range(low=1, text="[>=1]")
    assert parse_rule("x [>0]") == Range(low=0, low_open=True, text="[>0]")
    assert parse_rule("x [<=2.5]") == Range(high=2.5, text="[<=2.5]")
    assert parse_rule("x [0, 1)") == Range(0, 1, False, True, "[0, 1)")
    assert parse_rule("x (0, 1]") == Range(0, 1, True, False, "(0, 1]")
    assert parse_rule("x [1e-3, inf)") == Range(1e-3, None, False, True, "[1e-3, inf)")
    assert parse_rule("x [input folder]") == PathRule("input", "folder", text="[input folder]")
    assert parse_rule("x [input paths]") == PathRule("input", "path", True, text="[input paths]")
    assert parse_rule("x [input path, or hub | demo]").words == ("hub", "demo")
    assert parse_rule("x [output file]") == PathRule("output", "file", text="[output file]")
    assert parse_rule("clamp to [dt_min / f, dt_max * f]") is None
    assert parse_rule("(0: off)") is None and parse_rule("") is None


@pytest.mark.parametrize("value, ok", [(1, True), (0, False), (-1, False)])
def test_range_at_least_one(value, ok):
    """[>=1] accepts 1 and refuses 0 and -1."""
    assert (Range(low=1, text="[>=1]").error(value) is None) is ok


@pytest.mark.parametrize("value, ok", [(0.0, True), (0.999, True), (1.0, False), (-0.1, False),
                                       (math.inf, False), (math.nan, False)])
def test_range_half_open(value, ok):
    """[0, 1) includes 0, excludes 1, and refuses inf and nan."""
    assert (Range(0, 1, False, True, "[0, 1)").error(value) is None) is ok


def test_invalid_examples_are_invalid_and_typed():
    """The generated out-of-range examples are refused by the range and keep the default's type."""
    for rule, default in [(Range(low=1, text="[>=1]"), 8), (Range(low=0, low_open=True, text="[>0]"), 1e-3),
                          (Range(0, 1, False, True, "[0, 1)"), 0.9), (Range(0, 999, text="[0, 999]"), 50)]:
        examples = rule.invalid_examples(default)
        assert examples and all(rule.error(v) for v in examples)
        assert all(type(v) is type(default) for v in examples)


def test_declarations_read_from_source(tmp_path, monkeypatch):
    """Comments, continuation lines, sections and tags come from the script's own source."""
    decls = read_declarations(str(toy(tmp_path, monkeypatch)["__file__"]))
    assert decls["batch_size"].comment == "sequences per micro-batch [>=1]"
    assert decls["batch_size"].section == "sizes" and decls["beta"].section == "rates"
    assert decls["warm"].comment == "fraction of the run, continued here [0, 1]"
    assert decls["warm"].rule == Range(0, 1, text="[0, 1]")
    assert decls["free"].rule is None and decls["lr"].default_src == "6e-4"


@pytest.mark.parametrize("arg, message", [
    ("--batch_size=0", "--batch_size=0: must be >= 1 (sequences per micro-batch)"),
    ("--lr=-1", "--lr=-1: must be > 0"),
    ("--lr=1e999", "must be a finite number"),
    ("--beta=1", "must be in [0, 1)"),
    ("--top_p=0", "must be in (0, 1]"),
    ("--warm=2", "must be in [0, 1]"),
    ("--data_dir=missing", "--data_dir=missing: no such folder"),
    ("--init_from=missing.pt", "no such file or folder (or one of: scratch, resume)"),
    ("--out_dir=.", "is the working directory or one of its parents"),
    ("--out_dir=..", "is the working directory or one of its parents"),
    ("--out_dir=toy.py", "is a file, expected a folder"),
    ("--out_dir=toy.py/sub", "is a file, so nothing can be created below it"),
])
def test_declared_ranges_are_checked_before_applying(tmp_path, monkeypatch, arg, message):
    """A value outside its declared range is a ConfigError naming the flag, and nothing is applied."""
    ns = toy(tmp_path, monkeypatch)
    before = dict(ns)
    with pytest.raises(ConfigError) as e:
        apply_overrides(ns, ["--free=5", arg], exit_on_error=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert ns == before


def test_values_in_range_and_words_pass(tmp_path, monkeypatch):
    """In-range values, the declared words, a new output folder and an existing input are accepted."""
    ns = toy(tmp_path, monkeypatch)
    apply_overrides(ns, ["--batch_size=1", "--lr=1", "--beta=0", "--top_p=1", "--init_from=resume",
                         "--out_dir=out/new/deeper", "--data_dir=data"], exit_on_error=False)
    assert ns["init_from"] == "resume" and ns["out_dir"] == "out/new/deeper" and not (tmp_path / "out").exists()


def test_help_prints_defaults_comments_ranges_and_exits_0(tmp_path, monkeypatch, capsys):
    """--help exits 0 and lists every constant with its default and its comment (with the range) from the
    source, under its section, after the docstring's first paragraph; bad arguments beside it do not matter."""
    ns = toy(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as e:
        apply_overrides(ns, ["--nope=1", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python toy.py" in out and "A toy script." in out and "More text" not in out
    assert "# sizes" in out and "# rates" in out
    for line in ("--batch_size=8", "sequences per micro-batch [>=1]", "--lr=0.0006", "--out_dir=out/run",
                 "outputs [output folder]", "--free=3", "fraction of the run, continued here [0, 1]"):
        assert line in out
    assert help_text(ns) in out


def _numeric_constants(path: Path) -> dict:
    """{name: (default, Declaration)} of the int/float hyperparameters declared at the top of a script."""
    out = {}
    for name, decl in read_declarations(str(path)).items():
        if name.startswith("_") or not name.islower():
            continue
        try:
            value = ast.literal_eval(decl.default_src)
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = (value, decl)
    return out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_numeric_constant_declares_a_valid_range(script):
    """Each int/float hyperparameter of every script ends its comment with a range tag, and its default
    is inside it (so --help shows the range and the bad-input tests cover the flag)."""
    constants = _numeric_constants(script)
    missing = [k for k, (_, d) in constants.items() if not isinstance(d.rule, Range)]
    assert not missing, f"{script.name}: add a [range] tag to the comment of {missing}"
    bad = [k for k, (v, d) in constants.items() if d.rule.error(v)]
    assert not bad, f"{script.name}: defaults outside their declared range: {bad}"


def test_imported_module_parses_without_checking(tmp_path, monkeypatch):
    """A script imported as a module (a test or a benchmark) only parses its overrides: its default paths
    need not exist and its own checks meet the values where it uses them; check=True forces the checks."""
    ns = toy(tmp_path, monkeypatch) | {"__name__": "toy"}
    apply_overrides(ns, ["--batch_size=0", "--data_dir=missing"], exit_on_error=False)
    assert ns["batch_size"] == 0 and ns["data_dir"] == "missing"
    with pytest.raises(ConfigError, match="must be >= 1"):
        apply_overrides(ns, ["--batch_size=0"], exit_on_error=False, check=True)
