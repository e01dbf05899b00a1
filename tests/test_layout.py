"""The import graph follows the layer table (CONTRACTS.md "Layers"): no circle, nothing imports upward,
the core never imports `multitrack`, scripts never import each other, and function-local imports are
only of optional dependencies, each with a comment saying why.

The graph is read with `ast` from every .py of mamba_lm/, multitrack/ and the top-level scripts (no
module is imported), so a hidden import inside a function counts like one at the top.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mamba_lm", "multitrack")
SCRIPTS_LAYER = 8

# layer of every package module; a module imports only from its own layer or lower ones.
# Keep in step with CONTRACTS.md "Layers" (test_contracts_table_matches checks it).
LAYERS = {
    "mamba_lm": 0,
    "mamba_lm.errors": 0, "mamba_lm.runtime": 0, "mamba_lm.configurator": 0,
    "mamba_lm.ops": 1, "mamba_lm.tokenizer": 1, "mamba_lm.gutenberg": 1, "mamba_lm.demo_corpus": 1,
    "mamba_lm.sources": 2, "mamba_lm.data": 2, "mamba_lm.streams": 2, "mamba_lm.mamba": 2, "mamba_lm.stateful": 2, "mamba_lm.metrics": 2, "mamba_lm.longrange": 2, "mamba_lm.report": 2,
    "mamba_lm.recall_gate": 2, "mamba_lm.stats": 2,
    "mamba_lm.generation": 2,
    "mamba_lm.models": 3,
    "multitrack": 4, "multitrack.multitrack_config": 4, "multitrack.narrative": 4, "multitrack.router": 4,
    "multitrack.cross_track": 4, "multitrack.triple_track": 4, "multitrack.plot_clock": 4,
    "multitrack.delta_rule": 4, "multitrack.char_memory": 4, "multitrack.multitrack_model": 4,
    "mamba_lm.convert": 5, "mamba_lm.checkpoint": 5,
    "mamba_lm.weights": 6, "mamba_lm.rundir": 6, "mamba_lm.distributed": 6, "mamba_lm.stream_training": 6,
    "mamba_lm.trainer": 7, "mamba_lm.evaluation": 7, "mamba_lm.eval_report": 7,
    "mamba_lm.plan": 7, "mamba_lm.plan_report": 7,
}

# packages a function may import locally (not installed everywhere, or only needed on one path);
# every such import carries a comment on its line or the line above saying why it is local
OPTIONAL = {"mamba_ssm", "causal_conv1d", "fla", "triton", "matplotlib", "tensorboard", "huggingface_hub",
            "safetensors", "transformers", "tokenizers", "datasets", "pyarrow", "torch.distributed",
            "torch.utils.tensorboard"}


def source_files() -> dict[str, Path]:
    """{module name: path} for the packages' modules and the top-level scripts."""
    files = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            files[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    for path in sorted(ROOT.glob("*.py")):
        files[path.stem] = path
    return files


FILES = source_files()


def is_script(module: str) -> bool:
    return "." not in module and module not in PACKAGES


def layer(module: str) -> int:
    return SCRIPTS_LAYER if is_script(module) else LAYERS[module]


def imported_names(node: ast.AST, module: str) -> list[str]:
    """Absolute dotted names an import statement brings in (`from a import b` -> a.b and a)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative import: from the importing module's package, `level - 1` packages up
        package = module if FILES[module].stem == "__init__" else module.rpartition(".")[0]
        parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def project_target(name: str) -> str | None:
    """The project module `name` refers to (longest known prefix), or None for third-party names."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in FILES:
            return candidate
    return None


def imports_of(module: str):
    """[(target module, line, function-local?)] for every import of a project module in `module`."""
    tree = ast.parse(FILES[module].read_text(encoding="utf-8"))
    local_nodes = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        targets = {project_target(n) for n in imported_names(node, module)} - {None, module}
        if isinstance(node, ast.ImportFrom) and len(targets) > 1:
            # `from pkg import sub` names pkg.sub; pkg itself only when nothing more precise matched
            targets = {t for t in targets if not any(o != t and o.startswith(t + ".") for o in targets)}
        out += [(t, node.lineno, id(node) in local_nodes) for t in sorted(targets)]
    return out


GRAPH = {m: imports_of(m) for m in FILES}


def test_every_module_is_in_the_layer_table():
    """A new package module must be placed in a layer before it can be checked."""
    unknown = [m for m in FILES if not is_script(m) and m not in LAYERS]
    assert not unknown, "; ".join(f"add module {m} to the layer table in tests/test_layout.py and CONTRACTS.md"
                                  for m in unknown)
    stale = [m for m in LAYERS if m not in FILES]
    assert not stale, f"the layer table names modules that do not exist: {stale}"


def test_no_upward_imports():
    """Nothing imports from a higher layer; the core never imports multitrack; scripts never import scripts."""
    bad = []
    for module, edges in GRAPH.items():
        if not is_script(module) and module not in LAYERS:
            continue  # reported by test_every_module_is_in_the_layer_table
        for target, line, _ in edges:
            if not is_script(target) and target not in LAYERS:
                continue
            where = f"{FILES[module].relative_to(ROOT)}:{line}"
            if layer(target) > layer(module):
                bad.append(f"{where} imports {target} (layer {layer(target)}) from layer {layer(module)}")
            elif module.split(".")[0] == "mamba_lm" and target.split(".")[0] == "multitrack":
                bad.append(f"{where} imports {target}: the core package never imports multitrack")
            elif is_script(module) and is_script(target):
                bad.append(f"{where} imports the script {target}: move the shared code into mamba_lm/")
    assert not bad, "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    """No circle among modules, nor among packages (mamba_lm, multitrack, each script)."""
    modules = {m: {t for t, _, _ in edges} for m, edges in GRAPH.items()}
    cycle = find_cycle(modules)
    assert cycle is None, "module import circle: " + " -> ".join(cycle)
    packages = {}
    for module, targets in modules.items():
        src = module.split(".")[0]
        packages.setdefault(src, set()).update(t.split(".")[0] for t in targets if t.split(".")[0] != src)
    cycle = find_cycle(packages)
    assert cycle is None, "package import circle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    """The circle finder itself: a -> b -> c -> a is found, a tree is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def function_local_imports():
    """[(file:line, imported name, has comment)] for every import inside a function."""
    found = []
    for module, path in FILES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                commented = any("#" in line for line in lines[node.lineno - 1:node.end_lineno]) \
                    or comment_above(lines, node.lineno - 1)
                for name in names:
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", name, commented))
    return found


def comment_above(lines: list[str], index: int) -> bool:
    """A comment in the block of comment / import / `try:` lines directly above lines[index]
    (one comment may explain a group of imports)."""
    for line in reversed(lines[max(0, index - 6):index]):
        text = line.strip()
        if not text.startswith(("#", "from ", "import ", "try:")):
            return False
        if "#" in text:
            return True
    return False


def is_optional(name: str) -> bool:
    return any(name == o or name.startswith(o + ".") for o in OPTIONAL)


def test_function_local_imports_are_optional_dependencies_with_a_reason():
    """Project modules and required packages are imported at the top; a function imports only an
    optional dependency, with a comment saying why."""
    found = function_local_imports()
    not_optional = [f"{where}: import {name} inside a function; move it to the top of the file"
                    for where, name, _ in found if not is_optional(name)]
    assert not not_optional, "\n".join(not_optional)
    silent = [f"{where}: function-local import of {name} needs a comment saying why it is local"
              for where, name, commented in found if not commented]
    assert not silent, "\n".join(silent)


def contracts_layers() -> dict[int, set[str]]:
    """{layer: module names} from the table under CONTRACTS.md's "## Layers" heading."""
    text = (ROOT / "CONTRACTS.md").read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    table = {}
    for row in re.findall(r"^\| (\d+) [^|]*\| ([^|]*)\|", section, flags=re.M):
        table[int(row[0])] = set(re.findall(r"`((?:mamba_lm|multitrack)[\w.*]*)`", row[1]))
    return table


def test_contracts_table_matches():
    """CONTRACTS.md's layer table names the same modules in the same layers as LAYERS here."""
    documented = contracts_layers()
    assert documented, "CONTRACTS.md has no '## Layers' table"
    for module, n in LAYERS.items():
        if module in PACKAGES:
            continue
        pkg = module.split(".")[0]
        assert module in documented.get(n, set()) or f"{pkg}.*" in documented.get(n, set()), \
            f"CONTRACTS.md's layer table lacks {module} in layer {n}: add module {module} to it"
    for n, names in documented.items():
        for name in names - {"multitrack.*"}:
            assert LAYERS.get(name) == n, f"CONTRACTS.md puts {name} in layer {n}, tests/test_layout.py in {LAYERS.get(name)}"


@pytest.mark.parametrize("module", sorted(m for m in LAYERS if m.startswith("mamba_lm.")))
def test_core_module_has_docstring(module):
    """Every core module starts with a docstring saying what it holds (listed in mamba_lm/__init__.py)."""
    tree = ast.parse(FILES[module].read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"{module} has no module docstring"
    init_doc = ast.get_docstring(ast.parse(FILES["mamba_lm"].read_text(encoding="utf-8")))
    assert re.search(rf"^\s+{module.split('.')[1]}\s", init_doc, flags=re.M), \
        f"mamba_lm/__init__.py's docstring does not list {module}"
