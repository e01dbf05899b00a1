"""Tests of the install tooling: the gencode patch that setup.sh applies to the kernel sdists, and setup.sh options."""

import importlib.util
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("patch_gencode", REPO / "tools" / "patch_gencode.py")
patch_gencode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(patch_gencode)

# The shape of the gencode block in mamba-ssm 2.3.2.post1 / causal-conv1d 1.7.0 setup.py.
SETUP_PY = '''
import os
cc_flag = []
bare_metal_version = (13, 0)
if True:
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_75,code=sm_75")
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_80,code=sm_80")
    if bare_metal_version >= (11, 8):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_90,code=sm_90")
    if bare_metal_version >= (12, 8):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_100,code=sm_100")
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_120,code=sm_120")

HIP_BUILD = False
if HIP_BUILD:

    x = 1
RESULT = cc_flag
'''


def run_patched(text):
    ns = {}
    exec(compile(text, "setup.py", "exec"), ns)
    return ns["RESULT"]


def test_patch_keeps_only_local_arch():
    """The patched setup.py compiles for the local GPU only, and stays valid Python."""
    assert len(run_patched(SETUP_PY)) == 10  # five architectures before
    patched = patch_gencode.fill_empty_blocks(patch_gencode.patch(SETUP_PY, "90"))
    assert run_patched(patched) == ["-gencode", "arch=compute_90,code=sm_90"]


def test_patch_does_not_touch_unrelated_blocks():
    """An `if` with a real body after a blank line (HIP_BUILD) gets no `pass` inserted."""
    patched = patch_gencode.fill_empty_blocks(patch_gencode.patch(SETUP_PY, "120"))
    hip = patched[patched.index("if HIP_BUILD:"):]
    assert "pass" not in hip.split("x = 1")[0]
    assert "arch=compute_120,code=sm_120" in patched


def test_patch_refuses_unknown_layout(tmp_path):
    """A setup.py without gencode pairs is refused (non-zero exit) and left unchanged."""
    f = tmp_path / "setup.py"
    f.write_text("print('hello')\n")
    r = subprocess.run(["python3", str(REPO / "tools" / "patch_gencode.py"), str(f), "90"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "no '-gencode' pairs" in (r.stderr + r.stdout)
    assert f.read_text() == "print('hello')\n"


def test_ci_runs_the_readme_test_command():
    """.ci/run must run exactly the test command that README.md gives."""
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    readme = (REPO / "README.md").read_text()
    assert ci[-1] in readme, f"README.md does not contain the CI test command {ci[-1]!r}"


def _setup(*args):
    return subprocess.run(["bash", str(REPO / "setup.sh"), *args], capture_output=True, text=True, timeout=60)


def test_setup_sh_help_lists_every_option():
    """./setup.sh --help exits 0, shows only the usage text (no shell code) and names every option it parses."""
    r = _setup("--help")
    assert r.returncode == 0
    parsed = set(re.findall(r"^\s*(--[a-z-]+)(?:\|[^)]*)?\)", (REPO / "setup.sh").read_text(), re.M))
    assert {"--venv", "--wheelhouse", "--offline", "--mamba-only", "--no-kernels", "--kernels"} <= parsed
    for opt in parsed:
        assert opt in r.stdout, f"{opt} is parsed by setup.sh but missing from --help"
    assert "set -uo" not in r.stdout and "TORCH_VERSION" not in r.stdout


def test_setup_sh_bad_options_fail_fast_with_one_line(tmp_path):
    """Bad options exit 2 with one 'setup.sh: ...' line before anything is installed or created."""
    cases = {("--frobnicate",): "unknown option", ("--venv",): "--venv needs a value",
             ("--wheelhouse",): "--wheelhouse needs a value",
             ("--wheelhouse", "--offline"): "--wheelhouse needs a value",
             ("--wheelhouse", str(tmp_path / "nope")): "no such folder",
             ("--mamba-only", "--no-kernels"): "contradict"}
    for args, msg in cases.items():
        r = _setup("--venv", str(tmp_path / "v"), *args)
        out = (r.stdout + r.stderr).strip().splitlines()
        assert r.returncode == 2 and len(out) == 1 and out[0].startswith("setup.sh: ") and msg in out[0], (args, out)
    assert not (tmp_path / "v").exists()


def test_demo_sh_without_setup_says_run_setup(tmp_path):
    """./demo.sh with no usable python (setup.sh not run) stops with one line saying to run ./setup.sh."""
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "no-python")}
    r = subprocess.run(["bash", str(REPO / "demo.sh")], capture_output=True, text=True, timeout=60, env=env)
    out = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 2 and len(out) == 1 and "./setup.sh" in out[0]
