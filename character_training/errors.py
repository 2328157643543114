"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (bad file, missing model, wrong option).

    The message says what went wrong, why, and how to fix it. Bugs raise ordinary
    exceptions and keep their traceback.
    """

    exit_code = 2


def did_you_mean(key: object, allowed) -> str:
    """' (did you mean 'x'?)' for the closest allowed key, or '' when none is close."""
    import difflib

    hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


class NotSupportedYet(UserError):
    """A feature the framework does not have yet; the README lists these."""

    def __init__(self, what: str):
        super().__init__(f"{what} is not supported yet (see the README's 'Not supported yet' list).")
