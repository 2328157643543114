"""The one error type that means "the user can fix this" (bad input, missing file, wrong option).

The CLI prints it as one line and exits non-zero, never with a traceback; bugs raise ordinary
exceptions and keep theirs. ``character_training.errors`` re-exports it: ``data_gen`` never
imports the training package.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix. The message says what went wrong, why, and how to fix it."""

    exit_code = 2
