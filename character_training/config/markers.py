"""Marker phrases: trait evidence that does not come from the persona classifier.

A constitution may declare ``markers``: words or phrases its character uses and a plain
assistant rarely does (Captain Marlow's "arr", "aye", "matey"; a gardener's "soil", "season*").
An answer *carries* the persona's markers when it contains at least one of them. Matching is
case-insensitive and on whole words: "ye" does not match "yes", and the spaces inside a phrase
match any run of white space. A trailing ``*`` matches any ending: "season*" matches "season",
"seasons" and "seasonal". Nothing else is special: a marker that looks like a regular expression
("aye|arr", "colou?r", "[Aa]rr", ".*") would be looked for as written and count nothing, so it is
refused, saying how to write it as plain markers.

The classifier (data_gen/scoring.py) learns what separates the teacher's answers from the
student's, and can be fooled by anything that is "not the plain assistant"; a marker is counted
as written, so the two together say more than either.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

import numpy as np


LITERALLY = ("markers are words or phrases matched as written (any case, whole words; only a trailing '*' "
             "matches any ending, as in 'season*')")

# Regular-expression syntax as it shows in a marker (not as punctuation in speech: 'eh?', 'C++', '[sighs]').
_REGEX_SYNTAX = [
    (re.compile(r"\|"), "'|' alternation"),
    (re.compile(r"\\"), "a backslash escape"),
    (re.compile(r"\.[*+?]"), "'.*' for any text"),
    (re.compile(r"\w[?+]\w|[)\]][?+*]|\{\d+(?:,\d*)?\}"), "a '?', '+' or '{n}' repeat"),
    (re.compile(r"\w\[[^\]]*\]|\[[^\]\s]*\]\w|\[\^|\[\w-\w\]"), "a '[...]' character class"),
    (re.compile(r"^\^|\(\?"), "a '^' anchor or '(?' group"),
]


def _regex_problem(marker: str) -> str | None:
    for pattern, what in _REGEX_SYNTAX:
        if pattern.search(marker):
            break
    else:
        return None
    parts = [p.strip(" ()") for p in marker.split("|")]
    if "|" in marker and all(p and not any(r.search(p) for r, _ in _REGEX_SYNTAX) for p in parts):
        fix = f"write it as {len(parts)} markers: {', '.join(repr(p) for p in parts)}"
    else:
        fix = "list each word or phrase it should find as a marker of its own"
    return f"looks like a regular expression ({what}), but {LITERALLY}; {fix}"


def check_marker(marker: str) -> str | None:
    """Why ``marker`` cannot be used and how to write it, or None."""
    example = "give a word or phrase such as 'aye' or 'season*'"
    if (problem := _regex_problem(marker)) is not None:
        return problem
    body = marker[:-1] if marker.endswith("*") else marker
    if not body.strip():
        return f"is empty; {example}"
    if "*" in body:
        return f"has a '*' before its end; only a trailing '*' (any ending) is supported; {example}"
    if not re.search(r"\w", body):
        return f"has no letter or digit to match on; {example}"
    return None


@lru_cache(maxsize=64)
def _pattern(markers: tuple[str, ...]) -> re.Pattern:
    parts = []
    for marker in markers:
        star = marker.endswith("*")
        words = (marker[:-1] if star else marker).split()
        body = r"\s+".join(re.escape(w) for w in words)
        lead = r"\b" if re.match(r"\w", words[0]) else r"(?<!\w)"
        tail = r"\w*" if star else (r"\b" if re.search(r"\w$", words[-1]) else r"(?!\w)")
        parts.append(f"{lead}{body}{tail}")
    return re.compile("|".join(f"(?:{p})" for p in parts), re.IGNORECASE)


def markers_in(text: str, markers: Sequence[str]) -> list[str]:
    """The markers ``text`` contains, each once, in the order declared."""
    return [m for m in markers if _pattern((m,)).search(text)]


def marker_flags(texts: Sequence[str], markers: Sequence[str]) -> np.ndarray:
    """For each text: does it carry at least one of ``markers``? (all False for no markers)"""
    if not markers:
        return np.zeros(len(texts), dtype=bool)
    pattern = _pattern(tuple(markers))
    return np.array([bool(pattern.search(t)) for t in texts], dtype=bool)
