"""Command-line overrides for the module-level hyperparameters of a script, checked against the
ranges the script declares beside each constant.

nanoGPT's `configurator.py` idea without `exec`: a script defines its hyperparameters as
plain module-level constants, then calls

    config = apply_overrides(globals(), sys.argv[1:])

Each argument must be `--key=value` where `key` is one of those constants. The value is parsed
with `ast.literal_eval` (so `--lr=3e-4`, `--compile=False`, `--prompt='Once upon'` work) and
falls back to the raw string for string constants (`--out_dir=out/run1`). Unknown keys and
values whose type does not match the default are errors (`ConfigError`, a one-line message).
`None` defaults accept any type of value. `int` values are accepted where a `float` is
expected (`--lr=1` is 1.0). `--help` (or `-h`) prints every constant with its default, its
comment and its declared range, read from the script's own source, and exits 0.

Declared ranges: a constant's trailing comment may end with a tag in brackets, which
`apply_overrides` checks (on the final value, default or override) before the script does any work:

    batch_size = 8          # sequences per micro-batch [>=1]
    lr = 6e-4               # peak learning rate [>0]
    grad_clip = 1.0         # max global gradient norm (0: off) [>=0]
    warmup_frac = 0.02      # linear warmup, as a fraction of the run [0, 1]
    beta2 = 0.95            # AdamW beta2 [0, 1)
    data_dir = "data/demo"  # prepared by prepare_data.py [input folder]
    out_dir = "out/run"     # checkpoints and logs [output folder]
    init_from = "scratch"   # scratch | resume | a checkpoint [input path, or scratch | resume]

Numbers: `[>=a]`, `[>a]`, `[<=b]`, `[<b]`, or an interval `[a, b]`, `(a, b]`, `[a, b)`, `(a, b)`
(`inf` allowed as a bound); values must be finite (`--lr=1e999` is refused). Paths:
`[input file]`, `[input folder]`, `[input path]` (file or folder) must exist and be readable;
`[input paths]` is a comma-separated list of such paths; `[output folder]` must be a folder (or not
exist yet) that can be written (its nearest existing parent, when it does not exist yet) and is
neither the working directory nor one of its parents (scripts replace what they own in it);
`[output file]` must not be a folder, and its folder must be writable. `, or w1 | w2` lists words
accepted instead of a path; "" always means "not given" and is not checked as a path. The checks
run when the script runs as a program (`__main__`, or `check=True`); a module imported by a test or
a benchmark only parses its overrides (its own checks still apply where it uses the values).

The returned dict is a snapshot of every configurable constant after the overrides: the
config that is saved in checkpoints and sample files.
"""

from __future__ import annotations

import ast
import functools
import io
import math
import os
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

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


# ---- declared ranges -------------------------------------------------------------------------------------
_NUMBER = r"[-+]?(?:inf|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
_INTERVAL = re.compile(rf"([\[(])\s*({_NUMBER})\s*,\s*({_NUMBER})\s*([\])])\s*$")
_BOUND = re.compile(rf"\[\s*(>=|>|<=|<)\s*({_NUMBER})\s*\]\s*$")
_PATH = re.compile(r"\[\s*(input|output)\s+(file|folder|path)(s?)\s*(?:,\s*or\s+([^\[\]]+?))?\s*\]\s*$")


@dataclass(frozen=True)
class Range:
    """A numeric range: low/high bounds (None: unbounded), each open or closed."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    text: str = ""

    def error(self, value) -> str | None:
        """Why `value` is out of range (None when it is in range)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # the type check of the parser has the say
        if not math.isfinite(value):
            return f"must be a finite number {self.describe()}"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"must be {self.describe()}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)'."""
        if "," in self.text:
            return f"in {self.text}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"

    def invalid_examples(self, default) -> list:
        """Values just outside the range, of the default's type (tests generate their cases from these)."""
        step = 1 if isinstance(default, int) else 0.5
        out = []
        if self.low is not None:
            out.append(self.low if self.low_open else self.low - step)
        if self.high is not None:
            out.append(self.high if self.high_open else self.high + step)
        out = [int(math.floor(v)) if isinstance(default, int) else float(v) for v in out]
        if isinstance(default, float):
            out.append(float("inf"))
        return [v for v in dict.fromkeys(out) if self.error(v)]


@dataclass(frozen=True)
class PathRule:
    """What a script does with a path constant: reads it (input) or writes into it (output)."""
    role: str                 # "input" | "output"
    kind: str                 # "file" | "folder" | "path" (input: file or folder)
    many: bool = False        # comma-separated list of paths
    words: tuple = ()         # values accepted instead of a path ("hub", "scratch", ...)
    text: str = ""

    def error(self, value: str) -> str | None:
        """Why `value` cannot be used as this path (None when it can)."""
        if not isinstance(value, str) or value == "" or value in self.words:
            return None
        paths = [p.strip() for p in value.split(",") if p.strip()] if self.many else [value]
        for p in paths:
            why = (_input_error if self.role == "input" else _output_error)(Path(p), self.kind)
            if why:
                alt = f" (or one of: {', '.join(self.words)})" if self.words else ""
                if len(paths) == 1:
                    return f"{why}{alt}"
                return f"{p} not found{alt}" if why.startswith("no such") else f"{p}: {why}{alt}"
        return None


def _input_error(p: Path, kind: str) -> str | None:
    if not p.exists():
        return "no such file or folder" if kind == "path" else f"no such {kind}"
    if kind == "file" and p.is_dir():
        return "is a folder, expected a file"
    if kind == "folder" and not p.is_dir():
        return "is a file, expected a folder"
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        return "cannot be read (permission denied)"
    return None


def _output_error(p: Path, kind: str) -> str | None:
    target = p.resolve()
    if kind == "folder":
        cwd = Path.cwd().resolve()
        if target == cwd or target in cwd.parents:
            return ("is the working directory or one of its parents; scripts create, replace and clean up files "
                    "in their output folder: give it a folder of its own, e.g. out/run1")
        if p.exists() and not p.is_dir():
            return "is a file, expected a folder"
    elif p.is_dir():
        return "is a folder, expected a file path"
    elif p.exists() and not os.access(p, os.W_OK):
        return "cannot be written (permission denied)"
    probe = target if (kind == "folder" and target.is_dir()) else target.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, so nothing can be created below it"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"cannot write to {probe} (permission denied); choose a writable place"
    return None


def parse_rule(comment: str):
    """The Range / PathRule declared at the end of a constant's comment, or None."""
    m = _INTERVAL.search(comment)
    if m:
        lo, hi = float(m.group(2)), float(m.group(3))
        return Range(None if lo == -math.inf else lo, None if hi == math.inf else hi,
                     m.group(1) == "(", m.group(4) == ")", m.group(0).strip())
    m = _BOUND.search(comment)
    if m:
        op, v = m.group(1), float(m.group(2))
        text = m.group(0).strip()
        return (Range(low=v, low_open=op == ">", text=text) if op in (">", ">=")
                else Range(high=v, high_open=op == "<", text=text))
    m = _PATH.search(comment)
    if m:
        words = tuple(w.strip() for w in (m.group(4) or "").split("|") if w.strip())
        return PathRule(m.group(1), m.group(2), bool(m.group(3)), words, m.group(0).strip())
    return None


@dataclass
class Declaration:
    """One constant as the script's source declares it."""
    name: str
    default_src: str                  # the default as written
    comment: str = ""                 # the trailing comment (and its continuation lines), without '#'
    section: str = ""                 # the nearest '# section' comment line above it
    rule: Range | PathRule | None = field(default=None)


_HEAD_END = re.compile(r"^(?:def |class |async def |@|if __name__)", re.M)


def read_declarations(path: str) -> dict[str, Declaration]:
    """Every top-level `name = value  # comment [tag]` of a script's head (the source before its first
    top-level def, class or `if __name__`: where the hyperparameters live), in source order."""
    stat = os.stat(path)
    return _read_declarations(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _read_declarations(path: str, mtime_ns: int, size: int) -> dict[str, Declaration]:
    with open(path, encoding="utf-8") as f:
        source = f.read()
    head_end = _HEAD_END.search(source)
    source = source[:head_end.start()] if head_end else source
    comments: dict[int, tuple[int, str]] = {}   # line -> (column, text without '#')
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER, tokenize.ENCODING):
            code_lines.add(tok.start[0])
    lines = source.splitlines()
    out: dict[str, Declaration] = {}
    section = ""
    own_line = {n: text for n, (col, text) in comments.items() if col == 0 and n not in code_lines}
    tree = ast.parse(source)
    last_line = 0
    for node in tree.body:
        for n in range(last_line + 1, node.lineno):  # '# model' names a section, a '# ----' ruler ends one
            if n in own_line:
                section = "" if set(own_line[n]) <= set("-= ") else own_line[n]
        last_line = node.end_lineno
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            section = ""
            continue
        end = node.end_lineno
        parts = [comments[end][1]] if end in comments and end in code_lines else []
        n = end + 1
        while n in comments and n not in code_lines and comments[n][0] > 0 and parts:  # indented continuation
            parts.append(comments[n][1])
            last_line = n
            n += 1
        comment = " ".join(parts)
        value = node.value
        src = (lines[value.lineno - 1].encode()[value.col_offset:value.end_col_offset].decode()  # byte offsets
               if value.lineno == value.end_lineno else lines[node.lineno - 1])
        out[node.targets[0].id] = Declaration(node.targets[0].id, src, comment, section, parse_rule(comment))
    return out


def _script_path(namespace: dict, script: str | None) -> str | None:
    path = script or namespace.get("__file__")
    return path if path and os.path.isfile(path) and path.endswith(".py") else None


# ---- --help ------------------------------------------------------------------------------------------------
def help_text(namespace: dict, script: str | None = None) -> str:
    """usage, the first paragraph of the script's docstring, then every constant: default, comment, range."""
    path = _script_path(namespace, script)
    decls = read_declarations(path) if path else {}
    name = os.path.basename(path) if path else "script"
    doc = (namespace.get("__doc__") or "").strip().split("\n\n")[0].strip()
    out = [f"usage: python {name} [--key=value ...]", ""]
    if doc:
        out += [doc, ""]
    out += ["Hyperparameters (edit them at the top of the script, or override as --key=value; "
            "values are checked against the [range] before any work):"]
    section = None
    keys = config_keys(namespace)
    ordered = [k for k in decls if k in keys] + [k for k in keys if k not in decls]
    width = max((len(f"--{k}={namespace[k]!r}") for k in ordered), default=0)
    width = min(width, 44)
    for k in ordered:
        d = decls.get(k)
        if d and d.section != section:
            section = d.section
            out += ["", f"  # {section}"] if section else [""]
        flag = f"--{k}={_shown(namespace[k])}"
        comment = d.comment if d else ""
        out.append(f"  {flag:<{width}}  {comment}".rstrip() if len(flag) <= width
                   else f"  {flag}\n  {'':<{width}}  {comment}".rstrip())
    return "\n".join(out)


def _shown(v) -> str:
    return v if isinstance(v, str) and v and " " not in v else repr(v)


# ---- parsing and checking ------------------------------------------------------------------------------------
def _parse_value(key: str, raw: str, default):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
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
    return {k: v for k, (v, _) in _parse_args(namespace, argv).items()}


def _parse_args(namespace: dict, argv: list[str]) -> dict:
    """{key: (value, raw text)} of `--key=value` arguments."""
    keys = set(config_keys(namespace))
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value (--help lists the keys)")
        key, raw = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in keys:
            close = sorted(k for k in keys if k.split("_")[0] == key.split("_")[0])
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key --{key}{hint}; known keys: {', '.join(sorted(keys))}")
        overrides[key] = (_parse_value(key, raw, namespace[key]), raw)
    return overrides


def check_declared(namespace: dict, values: dict, script: str | None = None, given: dict | None = None) -> None:
    """Check `values` against the ranges declared in the script's source; ConfigError on the first bad one
    (the keys given on the command line first, then the defaults). given: {key: raw text} of the
    command line, shown in the message."""
    path = _script_path(namespace, script)
    if not path:
        return
    decls = read_declarations(path)
    given = given or {}
    order = [k for k in given if k in decls] + [k for k in decls if k not in given]
    for key in order:
        decl = decls[key]
        if key not in values or decl.rule is None:
            continue
        why = decl.rule.error(values[key])
        if why:
            value = values[key]
            shown = given.get(key, value if isinstance(value, str) else repr(value))
            what = decl.comment.removesuffix(decl.rule.text).strip()
            says_what = isinstance(decl.rule, Range) or (decl.rule.role == "input" and "no such" in why)
            hint = f" ({what})" if what and says_what else ""  # e.g. "prepared by prepare_data.py"
            raise ConfigError(f"--{key}={shown}: {why}{hint}")


def apply_overrides(namespace: dict, argv: list[str] | None = None, exit_on_error: bool = True,
                    script: str | None = None, check: bool | None = None) -> dict:
    """Apply `--key=value` overrides to `namespace` (a script's `globals()`) and return the config.

    check: whether to check every value against the range declared in the script (`script`, default
    the namespace's `__file__`) before anything is applied; None (default): when the script runs as a
    program (`__name__ == "__main__"`), not when a test or a benchmark imports it as a module (those
    meet the script's own checks, and may import it without its default paths existing).
    `--help` / `-h` prints the script's hyperparameters and exits 0. On a bad argument: prints one
    line to stderr and exits with status 2 (scripts), or raises `ConfigError` when `exit_on_error=False`.
    """
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("--help", "-h") for a in argv):
        try:
            print(help_text(namespace, script), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    try:
        parsed = _parse_args(namespace, argv)
        overrides = {k: v for k, (v, _) in parsed.items()}
        values = {k: overrides.get(k, namespace[k]) for k in config_keys(namespace)}
        if check if check is not None else namespace.get("__name__") == "__main__":
            check_declared(namespace, values, script, given={k: raw for k, (_, raw) in parsed.items()})
    except ConfigError as e:
        if not exit_on_error:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    for k, v in overrides.items():
        print(f"override: {k} = {v!r}")
        namespace[k] = v
    return {k: namespace[k] for k in config_keys(namespace)}
