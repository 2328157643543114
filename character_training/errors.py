"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""
from __future__ import annotations

from data_gen.errors import UserError  # defined there so that data_gen's stages can raise it

__all__ = ["UserError", "did_you_mean"]


def did_you_mean(key: object, allowed) -> str:
    """' (did you mean 'x'?)' for the closest allowed key, or '' when none is close."""
    import difflib

    hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""

