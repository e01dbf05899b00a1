"""Bad input never costs a traceback or a file: every script refuses every out-of-range value of every
numeric and path flag with exit 2 and one line, before touching an existing output folder.

The invalid cases are generated from the scripts' own range declarations (mamba_lm.configurator: the
`[>=1]`, `(0, 1]`, `[output folder]` ... tags at the end of each constant's comment), so a new flag
with a tag is covered without editing this file. --help is one more case of each batch (exit 0, every
constant with its default and comment).

Speed: a script run costs an interpreter start plus its imports (evaluate.py imports torch first:
seconds on a busy 2-core machine), and there are about 150 cases. So the cases of one script run in one
helper process that runs the script's imports once and then forks one child per case; the child runs
the script exactly as `python script.py args` would (runpy as __main__, its own argv, cwd, stdout and
stderr files, the exit status of SystemExit or 1 with a traceback). One case per script also runs as a
plain subprocess, so the real command line is checked too.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_lm.configurator import PathRule, Range, read_declarations

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("prepare_data.py", "train_baseline.py", "train_multitrack.py", "generate_text.py", "evaluate.py",
           "export.py")
# flags that name the output folder of each script, and the flags that allow replacing what is in it
OUTPUT_FLAG = {"prepare_data.py": "out_dir", "train_baseline.py": "out_dir", "train_multitrack.py": "out_dir",
               "generate_text.py": "generations_dir", "evaluate.py": "state_dir", "export.py": "out"}
PERMISSIVE = {"prepare_data.py": ["--force=True"], "train_baseline.py": ["--overwrite=True"],
              "train_multitrack.py": ["--overwrite=True"], "export.py": ["--overwrite=True"],
              "evaluate.py": ["--resume=True"], "generate_text.py": []}

HELPER = r'''
import json, os, runpy, sys, traceback
root, script, cases_file, results_file = sys.argv[1:5]
sys.path.insert(0, root)
import ast
tree = ast.parse(open(script, encoding="utf-8").read())
imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) and n.col_offset == 0]
for node in imports:   # the script's own imports, once here: every forked case finds them loaded
    try:
        exec(compile(ast.Module([node], []), script, "exec"), {})
    except Exception:
        pass
results = []
for case in json.load(open(cases_file)):
    out, err = case["stdout"], case["stderr"]
    pid = os.fork()
    if pid == 0:
        os.chdir(case["cwd"])
        fd1, fd2 = os.open(out, os.O_WRONLY | os.O_CREAT), os.open(err, os.O_WRONLY | os.O_CREAT)
        os.dup2(fd1, 1)
        os.dup2(fd2, 2)
        sys.argv = [script, *case["args"]]
        code = 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    results.append(os.waitstatus_to_exitcode(status))
json.dump(results, open(results_file, "w"))
'''


def _default(decl):
    try:
        return ast.literal_eval(decl.default_src)
    except (ValueError, SyntaxError):
        return None


def invalid_cases(script: str, places: dict) -> list[tuple[str, str]]:
    """[(key, bad value)] for every range-tagged numeric flag and path flag of `script`."""
    cases = []
    for key, decl in read_declarations(str(ROOT / script)).items():
        rule = decl.rule
        if isinstance(rule, Range):
            cases += [(key, repr(v) if isinstance(v, float) and v != v else str(v).replace("inf", "1e999"))
                      for v in rule.invalid_examples(_default(decl))]
        elif isinstance(rule, PathRule) and rule.role == "input":
            cases.append((key, places["missing"]))
            if rule.kind == "folder":
                cases.append((key, places["file"]))
            if rule.kind == "file":
                cases.append((key, places["folder"]))
        elif isinstance(rule, PathRule) and rule.kind == "folder":
            cases += [(key, "."), (key, ".."), (key, places["file"]), (key, places["under_file"])]
        elif isinstance(rule, PathRule):
            cases += [(key, places["folder"]), (key, places["under_file"])]
    return cases


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file below `folder` (and the folders themselves)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working directory with a pre-existing output folder of each kind, a file and a folder to misuse."""
    cwd = tmp_path_factory.mktemp("bad_input")
    existing = cwd / "existing"
    (existing / "tb").mkdir(parents=True)
    for name, data in {"ckpt_latest.pt": b"\x80 weights", "ckpt_best.pt": b"best", "log.txt": b"step 1\n",
                       "meta.json": b"{}", "train.bin": b"\x01\x00" * 8, "tb/events": b"ev",
                       "generations_20260101.md": b"# old samples\n"}.items():
        (existing / name).write_bytes(data)
    (cwd / "a_file.txt").write_text("not a folder\n")
    (cwd / "a_folder").mkdir()
    (cwd / "a_folder" / "x.pt").write_bytes(b"x")
    places = {"missing": "nowhere/missing.pt", "file": "a_file.txt", "folder": "a_folder",
              "under_file": "a_file.txt/sub"}
    return cwd, existing, places


def base_args(script: str, existing: Path) -> list[str]:
    """Valid flags that point every path at something that exists, and the output at the existing folder."""
    return [f"--{OUTPUT_FLAG[script]}={existing}", *PERMISSIVE[script]]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_invalid_flag_value_exits_2_with_one_line(script, workspace, tmp_path):
    """For each numeric and path flag of the script (from its declarations): exit status 2, exactly one
    line on stderr that names the flag, no traceback, and the pre-existing output folder byte-for-byte
    unchanged (its path given as the script's output folder, with --overwrite/--force where it has one)."""
    cwd, existing, places = workspace
    cases = invalid_cases(script, places)
    assert len(cases) >= 2
    before = snapshot(existing)
    specs = []
    for i, (key, value) in enumerate(cases):
        args = [a for a in base_args(script, existing) if not a.startswith(f"--{key}=")] + [f"--{key}={value}"]
        specs.append({"args": args, "cwd": str(cwd), "stdout": str(tmp_path / f"{i}.out"),
                      "stderr": str(tmp_path / f"{i}.err")})
    specs.append({"args": ["--help"], "cwd": str(cwd), "stdout": str(tmp_path / "help.out"),
                  "stderr": str(tmp_path / "help.err")})
    (tmp_path / "cases.json").write_text(json.dumps(specs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", HELPER, str(ROOT), str(ROOT / script), str(tmp_path / "cases.json"),
                        str(tmp_path / "results.json")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    codes = json.loads((tmp_path / "results.json").read_text())
    failures = []
    for (key, value), spec, code in zip(cases, specs, codes):
        err = Path(spec["stderr"]).read_text()
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or "Traceback" in err or f"--{key}=" not in lines[0]:
            failures.append(f"--{key}={value}: exit {code}, stderr {err.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)
    assert snapshot(existing) == before
    assert codes[-1] == 0 and (tmp_path / "help.err").read_text() == ""
    check_help((tmp_path / "help.out").read_text(), script)


def check_help(text: str, script: str) -> None:
    """--help lists every configurable constant of the script with its default and its comment."""
    assert f"usage: python {script}" in text
    for name, decl in read_declarations(str(ROOT / script)).items():
        if name.islower() and not name.startswith("_") and decl.comment and _default(decl) is not None:
            assert f"--{name}=" in text and decl.comment in text, name


@pytest.mark.parametrize("script", SCRIPTS)
def test_real_command_line_refuses(script, workspace):
    """As a plain subprocess (no fork helper): the first invalid case exits 2 with one line, no traceback."""
    cwd, existing, places = workspace
    key, value = invalid_cases(script, places)[0]
    r = subprocess.run([sys.executable, str(ROOT / script), *base_args(script, existing), f"--{key}={value}"],
                       cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: --{key}=")


# ---- refused unpickling -----------------------------------------------------------------------------------
class _RunsCode:
    """An object whose unpickling would run code (writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_refused_torch_load_explains_in_one_line(tmp_path):
    """A .pt / pytorch_model.bin holding non-tensor objects: a one-line UserError saying the file holds
    objects that are not plain tensors and will not be unpickled (not torch's advice to pass
    weights_only=False), naming the file; the object's code never runs."""
    import torch

    from mamba_lm.checkpoint import load_checkpoint
    from mamba_lm.errors import UserError
    from mamba_lm.convert import load_weight_file

    marker = tmp_path / "marker.txt"
    for name, load in (("ckpt.pt", load_checkpoint), ("pytorch_model.bin", load_weight_file)):
        path = tmp_path / name
        torch.save({"format": "mamba-narrative-ckpt/1", "model": {"w": torch.zeros(2)}, "x": _RunsCode(marker)}, path)
        with pytest.raises(UserError) as e:
            load(path)
        message = str(e.value)
        assert "\n" not in message and str(path) in message, message
        assert "not plain tensors" in message and "will not be unpickled" in message
        assert "weights_only" not in message and "add_safe_globals" not in message
        assert not marker.exists()
        (tmp_path / f"junk-{name}").write_bytes(b"not a torch file at all")   # corrupt, not refused
        with pytest.raises(UserError) as e:
            load(tmp_path / f"junk-{name}")
        assert "unreadable pickle data" in str(e.value) and "weights_only" not in str(e.value)


# ---- evaluate.py: no result is an error, a NaN is no result ---------------------------------------------------
def test_evaluate_without_any_result_exits_nonzero(tmp_path, demo_data_dir):
    """A checkpoint with NaN weights (loss stage: non-finite loss) and a stage that has nothing to score
    (generation on books shorter than prompt + continuation): no report is written and evaluate.py
    exits 2 with one line, instead of a report of NaNs or of skips that looks like a success."""
    import torch

    from mamba_lm.checkpoint import save_checkpoint
    from mamba_lm.mamba import mamba_config
    from mamba_lm.models import build_model, model_config_dict
    from mamba_lm.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = build_model("mamba", mamba_config("tiny", vocab_size=257, d_model=16, n_layer=1, d_state=4))
    state = {k: (v.clone().fill_(float("nan")) if k.endswith("out_proj.weight") else v)
             for k, v in model.state_dict().items()}
    ckpt = tmp_path / "nan.pt"
    save_checkpoint(ckpt, {"model_type": "mamba", "model_config": model_config_dict(model), "model": state,
                           "optimizer": None, "train_config": {}, "tokenizer": load_tokenizer("byte").to_dict(),
                           "data": {}, "step": 1, "tokens_seen": 32, "metrics": {}})
    common = [str(ROOT / "evaluate.py"), f"--ckpts={ckpt}", f"--data_dir={demo_data_dir}", "--device=cpu",
              f"--state_dir={tmp_path / 'state'}", "--max_sequences=4", "--prompt_tokens=100000"]
    out = tmp_path / "eval.md"
    r = subprocess.run([sys.executable, *common, "--stages=loss,generation", f"--out={out}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[-1].startswith("error: no stage produced a result"), lines[-1]
    assert "non-finite loss" in lines[-1] and "has 100256 tokens" in lines[-1], lines[-1]
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_export_refuses_to_replace_the_folder_it_reads(tmp_path):
    """export.py --overwrite=True with --out equal to (or above) the folder of --ckpt: exit 2 before
    loading anything, the source untouched."""
    src = tmp_path / "exports" / "model"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    for out in (src, src.parent):
        r = subprocess.run([sys.executable, str(ROOT / "export.py"), f"--ckpt={src}", f"--out={out}",
                            "--overwrite=True"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "would delete the source" in r.stderr and len(r.stderr.splitlines()) == 1
        assert (src / "config.json").read_text() == "{}"
