"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""
from __future__ import annotations

from data_gen.errors import UserError  # defined there so that data_gen's stages can raise it

__all__ = ["UserError", "NotSupportedYet", "did_you_mean"]


def did_you_mean(key: object, allowed) -> str:
    """' (did you mean 'x'?)' for the closest allowed key, or '' when none is close."""
    import difflib

    hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


class NotSupportedYet(UserError):
    """A feature the framework does not have yet; the README lists these."""

    def __init__(self, what: str):
        super().__init__(f"{what} is not supported yet (see the README's 'Not supported yet' list).")
