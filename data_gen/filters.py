"""What makes a generation unusable, and the junk small models wrap around usable text.

Every stage drops unusable generations and counts them by reason (the reasons are the keys
of the manifest's ``drops``); nothing here raises on bad text.
"""
from __future__ import annotations

import re

from data_gen.backends import Completion

REFUSAL_RE = re.compile(
    r"^\s*(?:i'?m sorry,? but|i am sorry,? but|sorry,? (?:but )?i can(?:not|'t)|i can(?:not|'t) (?:help|assist|"
    r"comply|provide|do that|fulfil)|i(?: am|'m) (?:not able|unable) to|as an ai(?: language model)?,? i "
    r"(?:cannot|can't|don't))", re.IGNORECASE)

# "Sure, here is the revised response:", "Revised answer:", "Here's a rewritten version:" ...
_PREAMBLE_RE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok|absolutely)[!,.]?\s*)?"
    r"(?:(?:here(?:'s| is| are)|below is|this is)\s+(?:the\s+|a\s+|an\s+|my\s+)?)?"
    r"(?:(?:revised|rewritten|improved|updated|new|final|edited|corrected)\s+)?"
    r"(?:version|response|answer|reply|document|text|draft|revision)"
    r"(?:\s+(?:of|to)\s+[^:\n]{0,60})?\s*:\s*",
    re.IGNORECASE)
_LEADING_PLEASANTRY_RE = re.compile(r"^\s*(?:sure|certainly|of course|absolutely)[!.]\s+", re.IGNORECASE)


def strip_boilerplate(text: str) -> str:
    """The text without a leading "Sure, here is the revised response:" and without wrapping
    quotes or a trailing "I hope this helps" line. Text without boilerplate comes back stripped."""
    out = text.strip()
    for _ in range(2):  # "Sure! Here is ...:" takes two passes
        new = _PREAMBLE_RE.sub("", out, count=1).strip()
        new = _LEADING_PLEASANTRY_RE.sub("", new, count=1).strip()
        if new == out:
            break
        out = new
    if len(out) >= 2 and out[0] == out[-1] and out[0] in "\"'" and out.count(out[0]) == 2:
        out = out[1:-1].strip()
    out = re.sub(r"\n+\s*(?:i hope (?:this|that) helps|let me know if)[^\n]*$", "", out, flags=re.IGNORECASE)
    return out.strip()


def distinct_3gram_share(text: str) -> float:
    """Distinct word 3-grams / all word 3-grams (1.0: no repetition). Short texts count 1."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


# A sentence ends at . ! or ? (not a list number's "1."), with any closing quotes or brackets,
# followed by white space or the end of the text.
_SENTENCE_END_RE = re.compile(r"(?<!\b\d)(?<!\b\d\d)[.!?]+[\"')\]\u201d\u2019*]*(?=\s|$)")


def trim_to_sentence(text: str, min_chars: int = 2) -> str | None:
    """A cut-off answer back to its last complete sentence, or None when not even its first
    sentence is complete (or what is left is shorter than ``min_chars``)."""
    text = text.strip()
    ends = [m.end() for m in _SENTENCE_END_RE.finditer(text)]
    if not ends:
        return None
    trimmed = text[:ends[-1]].strip()
    return trimmed if len(trimmed) >= max(1, min_chars) else None


def is_refusal(text: str) -> bool:
    return bool(REFUSAL_RE.match(text))


def completion_problem(c: Completion, *, min_chars: int = 2, max_chars: int | None = None,
                       min_distinct_3grams: float = 0.0, refusals: bool = True) -> str | None:
    """Why a generation cannot be used ("empty", "unfinished", "over_long", "repetitive",
    "refused"), or None when it can."""
    text = c.text.strip()
    if len(text) < max(1, min_chars):
        return "empty"
    if not c.finished:
        return "unfinished"
    if max_chars is not None and len(text) > max_chars:
        return "over_long"
    if distinct_3gram_share(text) < min_distinct_3grams:
        return "repetitive"
    if refusals and is_refusal(text):
        return "refused"
    return None
