#!/usr/bin/env bash
# setup.sh: install mamba-narrative into a virtual environment (default .venv). Idempotent: a re-run
# checks what is there and only installs what is missing (a few seconds).
#
#   ./setup.sh                      CPU or GPU machine with PyPI access: venv + pinned requirements;
#                                   on an NVIDIA GPU also builds mamba-ssm and causal-conv1d for the local GPU only
#                                   and checks flash-linear-attention's Triton kernels (no build step)
#   ./setup.sh --use-system-torch   keep the machine's own (CUDA) torch: venv with --system-site-packages
#   ./setup.sh --wheelhouse DIR     install from a local folder of wheels/sdists (machines without network)
#   ./setup.sh --offline            no package index at all: only what is installed or in --wheelhouse
#   ./setup.sh --mamba-only         build mamba-ssm but not causal-conv1d (saves ~6 min; conv falls back to PyTorch)
#   ./setup.sh --no-kernels         never build the CUDA kernels (pure-PyTorch paths everywhere)
#   ./setup.sh --kernels            build the kernels even if they are already importable
#   ./setup.sh --venv DIR           another venv location ("none": install into the current python)
#   ./setup.sh --help               this text
#
# Options combine, e.g. ./setup.sh --use-system-torch --offline --wheelhouse sdists --mamba-only (INSTALL.md).
#
# On a CPU-only machine mamba-ssm and causal-conv1d are NOT installed: there `import mamba_ssm` fails on
# selective_scan_cuda, and transformers binds the CUDA code paths whenever mamba_ssm imports. Everything
# runs on the pure-PyTorch reference paths of mamba_lm/ops.py.
set -uo pipefail

TORCH_VERSION="2.13.0"           # the pinned torch (CPU machines take the CPU build lying on disk)
MAMBA_SSM_VERSION="2.3.2.post1"  # built from its sdist on GPU machines
CAUSAL_CONV1D_VERSION="1.7.0"    # built from its sdist on GPU machines
FLA_VERSION="0.6.0"              # flash-linear-attention core (fla-core): Triton kernels, no build step

# Options are parsed in the caller's directory: relative --venv / --wheelhouse paths are relative to it.
VENV=".venv"; USE_SYSTEM_TORCH=0; WHEELHOUSE=""; OFFLINE=0; MAMBA_ONLY=0; KERNELS="auto"
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || { echo "setup.sh: $1 needs a value (see ./setup.sh --help)"; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) need_arg "$@"; VENV="$2"; [ "$VENV" = "none" ] || VENV="$(realpath -m "$VENV")"; shift ;;
    --use-system-torch) USE_SYSTEM_TORCH=1 ;;
    --wheelhouse) need_arg "$@"
      WHEELHOUSE="$(cd "$2" 2>/dev/null && pwd)" || { echo "setup.sh: --wheelhouse $2: no such folder"; exit 2; }; shift ;;
    --offline) OFFLINE=1 ;;
    --mamba-only) MAMBA_ONLY=1 ;;
    --no-kernels) KERNELS="no" ;;
    --kernels) KERNELS="force" ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see ./setup.sh --help)"; exit 2 ;;
  esac
  shift
done
if [ $MAMBA_ONLY = 1 ] && [ "$KERNELS" = "no" ]; then
  echo "setup.sh: --mamba-only and --no-kernels contradict each other (pick one)"; exit 2
fi
cd "$(dirname "$0")"
REPO=$(pwd)

T0=$(date +%s)
KWORK=""
trap '[ -n "$KWORK" ] && rm -rf "$KWORK"' EXIT
step_start() { STEP="$1"; STEP_T0=$(date +%s); echo "==> $STEP"; }
step_done() { echo "    done: $STEP ($(( $(date +%s) - STEP_T0 )) s)"; }
fail() { echo "setup.sh: FAILED at step '$STEP': $1"; exit 1; }

# ---- 1. virtual environment -------------------------------------------------------------------
step_start "virtual environment ($VENV)"
if [ $USE_SYSTEM_TORCH = 1 ] && [ "$VENV" != "none" ] && python3 -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)'; then
  # A venv made from a venv's python does not see that venv's packages (only the base interpreter's):
  # install into the python that holds the system torch instead.
  echo "    python3 is itself a virtual environment ($(python3 -c 'import sys; print(sys.prefix)')): installing into it (--venv none)"
  VENV="none"
fi
if [ "$VENV" = "none" ]; then
  PY=$(command -v python3) || fail "no python3 on PATH"
else
  if [ ! -x "$VENV/bin/python" ]; then
    ARGS=""; [ $USE_SYSTEM_TORCH = 1 ] && ARGS="--system-site-packages"
    python3 -m venv $ARGS "$VENV" || fail "python3 -m venv failed; install python3-venv (apt-get install python3-venv)"
  fi
  case "$VENV" in /*) PY="$VENV/bin/python" ;; *) PY="$REPO/$VENV/bin/python" ;; esac
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || fail "Python 3.10 or newer is needed ($("$PY" --version 2>&1))"
PIP=("$PY" -m pip --disable-pip-version-check)
PIP_SRC=()
[ -n "$WHEELHOUSE" ] && PIP_SRC+=(--find-links "$WHEELHOUSE")
[ $OFFLINE = 1 ] && PIP_SRC+=(--no-index)
step_done

# ---- 2. torch ---------------------------------------------------------------------------------
step_start "torch"
if [ $USE_SYSTEM_TORCH = 1 ]; then
  "$PY" -c 'import torch' 2>/dev/null || fail "--use-system-torch given but $PY cannot import torch: run with the python that has the CUDA torch, or drop --use-system-torch"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  "${PIP[@]}" install -q "${PIP_SRC[@]}" "torch==$TORCH_VERSION" \
    || fail "pip install torch==$TORCH_VERSION failed; on a machine with its own CUDA torch use --use-system-torch"
fi
"$PY" -W ignore -c 'import torch; print(f"    torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")'
step_done

# ---- 3. pinned requirements -------------------------------------------------------------------
step_start "requirements.txt"
if "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as md, re, sys
for line in open("requirements.txt"):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, version = re.split(r"==", line)
    if md.version(name) != version:
        sys.exit(1)
EOF
then
  echo "    all pinned requirements already installed"
elif [ $USE_SYSTEM_TORCH = 1 ] && [ $OFFLINE = 1 ]; then
  # A GPU image without network: keep its own packages, install only what is missing from the wheelhouse.
  missing=$("$PY" - <<'EOF'
import importlib.util, re
mods = {"tokenizers": "tokenizers", "transformers": "transformers", "safetensors": "safetensors",
        "pyarrow": "pyarrow", "einops": "einops", "tqdm": "tqdm", "matplotlib": "matplotlib",
        "numpy": "numpy", "pytest": "pytest", "tensorboard": "tensorboard"}
print(" ".join(p for p, m in mods.items() if importlib.util.find_spec(m) is None))
EOF
)
  if [ -n "$missing" ]; then
    echo "    missing on this machine: $missing"
    "${PIP[@]}" install -q "${PIP_SRC[@]}" $missing || echo "    WARNING: could not install: $missing (put their wheels in --wheelhouse)"
  fi
else
  "${PIP[@]}" install -q "${PIP_SRC[@]}" -r requirements.txt \
    || fail "pip install -r requirements.txt failed (offline? use --wheelhouse DIR with the wheels)"
fi
step_done

# ---- 4. CUDA kernels (GPU machines only) ------------------------------------------------------
HAS_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$KERNELS" = "no" ]; then
  echo "==> CUDA kernels: skipped (--no-kernels); pure-PyTorch paths will be used"
elif [ "$HAS_GPU" != "1" ]; then
  echo "==> CUDA kernels: no CUDA GPU visible to torch; mamba-ssm / causal-conv1d are not installed (pure-PyTorch paths)"
else
  ARCH=$("$PY" -c 'import torch; ma, mi = torch.cuda.get_device_capability(); print(f"{ma}{mi}")')
  command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] \
    || { STEP="CUDA kernels"; fail "nvcc not found: install the CUDA toolkit matching torch.version.cuda or set CUDA_HOME"; }
  # nvcc, and the venv's own bin (its `ninja`): torch's cpp_extension looks both up on PATH.
  export PATH="$(dirname "$PY"):${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  # --no-build-isolation builds with this python's own build tools: their setup.py imports packaging,
  # setuptools and wheel (a fresh venv lacks wheel), and without ninja torch compiles serially (far slower).
  TO_BUILD=0
  for m in mamba_ssm $([ $MAMBA_ONLY = 1 ] || echo causal_conv1d); do "$PY" -c "import $m" 2>/dev/null || TO_BUILD=1; done
  [ "$KERNELS" = "force" ] && TO_BUILD=1
  if [ $TO_BUILD = 1 ]; then
  step_start "build tools (setuptools, wheel, packaging, ninja)"
  need=$("$PY" -c 'import importlib.util as u, shutil
need = []
try:
    import setuptools  # noqa: F401  (recent setuptools vendors wheel: import it first, like their setup.py)
except ImportError:
    need.append("setuptools")
need += [m for m in ("wheel", "packaging") if u.find_spec(m) is None]
print(" ".join(need + ([] if shutil.which("ninja") else ["ninja"])))')
  if [ -n "$need" ]; then
    echo "    installing: $need"
    "${PIP[@]}" install -q "${PIP_SRC[@]}" $need || echo "    WARNING: could not install $need (offline? put their wheels in --wheelhouse)"
  fi
  "$PY" -c 'import setuptools, wheel.bdist_wheel, packaging' 2>/dev/null \
    || fail "setuptools, wheel and packaging are needed to build the kernels: put their wheels in --wheelhouse"
  command -v ninja >/dev/null || echo "    WARNING: no ninja on PATH: torch falls back to a serial build (much slower); add ninja to --wheelhouse"
  step_done
  fi
  build_kernel() {  # $1 = pip name, $2 = version, $3 = import name, $4 = env prefix
    local name="$1" version="$2" module="$3" prefix="$4"
    step_start "$name $version for sm_$ARCH only"
    if [ "$KERNELS" != "force" ] && "$PY" -c "import $module" 2>/dev/null; then
      echo "    $module already importable"; step_done; return
    fi
    local work; work=$(mktemp -d); KWORK="$work"  # removed on exit, also when the build fails
    local sdist=""
    [ -n "$WHEELHOUSE" ] && sdist=$(ls "$WHEELHOUSE"/${name//-/_}-"$version".tar.gz 2>/dev/null | head -1)
    if [ -z "$sdist" ]; then
      [ $OFFLINE = 1 ] && fail "no ${name//-/_}-$version.tar.gz in --wheelhouse and --offline given"
      env "${prefix}_SKIP_CUDA_BUILD=TRUE" "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation \
        -d "$work" "$name==$version" || fail "could not download the $name sdist (offline? use --wheelhouse)"
      sdist=$(ls "$work"/*.tar.gz | head -1)
    fi
    tar xzf "$sdist" -C "$work" || fail "could not unpack $sdist"
    local src; src=$(ls -d "$work"/*/ | head -1)
    # Their setup.py compiles ~9 architectures and ignores TORCH_CUDA_ARCH_LIST: keep only the local one.
    "$PY" "$REPO/tools/patch_gencode.py" "$src/setup.py" "$ARCH" || fail "could not patch $src/setup.py"
    # FORCE_BUILD: without it an offline build crashes trying to download a prebuilt wheel.
    ( cd "$src" && env "${prefix}_FORCE_BUILD=TRUE" "${PIP[@]}" install -q --no-build-isolation --no-deps . ) \
      || fail "building $name failed (see the compiler output above); --no-kernels skips it"
    "$PY" -c "import $module" || fail "$name built but 'import $module' fails"
    rm -rf "$work"
    step_done
  }
  if [ $MAMBA_ONLY = 1 ]; then
    echo "==> causal-conv1d: skipped (--mamba-only); the short convolution runs in PyTorch"
  else
    build_kernel causal-conv1d "$CAUSAL_CONV1D_VERSION" causal_conv1d CAUSAL_CONV1D
  fi
  build_kernel mamba-ssm "$MAMBA_SSM_VERSION" mamba_ssm MAMBA
  # The character memory's gated delta rule (multitrack/delta_rule.py): fla-core comes with
  # requirements.txt; its kernels need triton, which CUDA builds of torch bring (else fla[cuda] adds it).
  step_start "flash-linear-attention $FLA_VERSION Triton kernels (gated delta rule)"
  if "$PY" -c "from fla.ops.gated_delta_rule import chunk_gated_delta_rule" 2>/dev/null; then
    echo "    fla kernels importable"
  else
    "${PIP[@]}" install -q "${PIP_SRC[@]}" "fla-core[cuda]==$FLA_VERSION" \
      || echo "    WARNING: could not install fla-core[cuda] (offline? put its wheel and triton's in --wheelhouse); the delta rule runs in PyTorch"
    "$PY" -c "from fla.ops.gated_delta_rule import chunk_gated_delta_rule" 2>/dev/null \
      || echo "    WARNING: fla's kernels do not import; the delta rule runs in PyTorch (slow on GPU)"
  fi
  step_done
fi

# ---- 5. check ---------------------------------------------------------------------------------
step_start "import check"
"$PY" -c 'import mamba_lm.ops as ops, multitrack.delta_rule as dr; print(f"    {ops.describe_kernels()}, gated_delta_rule={dr.KERNEL}")' \
  || fail "the repository's modules do not import; see the error above"
step_done
if [ "$VENV" = "none" ]; then echo "setup.sh: finished in $(( $(date +%s) - T0 )) s (installed into $PY)"; else echo "setup.sh: finished in $(( $(date +%s) - T0 )) s. Use: source $VENV/bin/activate"; fi
