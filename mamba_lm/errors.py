"""User-facing errors: one clear line that says what to do, never a traceback."""

from __future__ import annotations

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
