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
    if "Weights only load failed" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    example = f" (e.g. {found.group(1)})" if found else ""
    return (f"it holds objects that are not plain tensors{example}, and they will not be unpickled "
            "(unpickling them could run code from the file)")
