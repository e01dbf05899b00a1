"""Cut the CUDA architecture list of mamba-ssm's / causal-conv1d's setup.py to the local GPU.

Their setup.py appends `-gencode arch=compute_XX,code=sm_XX` for about nine architectures and ignores
TORCH_CUDA_ARCH_LIST, so a build takes 9x longer than needed. This removes every such pair and puts
the local architecture in place of the first one.

    python tools/patch_gencode.py path/to/setup.py 90      # sm_90 (H100/H200) only
"""

import re
import sys

PAIR = re.compile(
    r'^(?P<indent>[ \t]*)cc_flag\.append\("-gencode"\)\n[ \t]*cc_flag\.append\("arch=compute_\d+a?,code=sm_\d+a?"\)\n',
    re.MULTILINE)


def patch(text: str, arch: str) -> str:
    """Return setup.py text whose gencode list is only `arch` (e.g. "90"); raises if nothing matched."""
    pairs = list(PAIR.finditer(text))
    if not pairs:
        raise SystemExit("patch_gencode: no '-gencode' pairs found; the setup.py layout changed")
    first = pairs[0]
    local = f'{first["indent"]}cc_flag += ["-gencode", "arch=compute_{arch},code=sm_{arch}"]  # patched: local GPU only\n'
    # The first pair may sit inside an `if bare_metal_version >= ...:` block in other versions; the
    # first one in 2.3.x / 1.7.x is unconditional, which is where the local arch must go.
    out = PAIR.sub("", text[first.end():])
    return text[:first.start()] + local + out


def fill_empty_blocks(text: str) -> str:
    """Give `pass` to an `if ...:` whose body was only gencode pairs (next code line not indented deeper)."""
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        stripped = line.strip()
        if stripped.startswith("if ") and stripped.endswith(":"):
            indent = len(line) - len(line.lstrip())
            nxt = next((l for l in lines[i + 1:] if l.strip()), "")
            if len(nxt) - len(nxt.lstrip()) <= indent:
                out.append(" " * (indent + 4) + "pass")
    return "\n".join(out)


if __name__ == "__main__":
    path, arch = sys.argv[1], sys.argv[2]
    src = open(path).read()
    new = patch(src, arch)
    new = fill_empty_blocks(new)
    compile(new, path, "exec")  # refuse to write a broken setup.py
    open(path, "w").write(new)
    n = len(PAIR.findall(src))
    print(f"    patched {path}: {n} architectures -> sm_{arch}")
