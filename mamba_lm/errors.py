"""User-facing errors: one clear line that says what to do, never a traceback."""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input or environment. The message is shown as `error: <message>` and the script exits 2."""


@contextmanager
def user_errors():
    """Scripts wrap their main work in `with user_errors():` to print UserError as one line and exit 2."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def unpickling_refused(e: BaseException) -> str | None:
    """Why `torch.load(..., weights_only=True)` refused a file, in words for a one-line error (None when
    `e` is another failure). Replaces torch's several-line advice to pass weights_only=False."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if "Weights only load failed" not in text or not found:
        return None  # not a refusal of foreign objects (corrupt data: see torch_load_problem)
    return (f"it holds objects that are not plain tensors (e.g. {found.group(1)}), and they will not be "
            "unpickled (unpickling them could run code from the file)")


def torch_load_problem(e: BaseException, summary=None) -> str:
    """A short phrase for any other torch.load failure (a truncated zip, bytes that are no pickle, ...):
    never torch's advice to pass weights_only=False. `summary(e)` words the rest (default: first line)."""
    text = str(e).strip()
    if "Weights only load failed" in text:
        operand = re.search(r"Unsupported operand (\d+)", text)
        return "unreadable pickle data" + (f" (opcode {operand.group(1)})" if operand else "")
    if summary is not None:
        return summary(e)
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
