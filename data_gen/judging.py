"""Asking a judge model and reading its verdicts: one module for every stage that judges.

A judge request is one user message rendered from a template in ``data_gen/templates/``
(``judge_request``). A verdict is one of three kinds, each read by one parser:

    score    a number on a 0..scale scale ("73", "Score: 8/10", "**80**")   ``parse_score``
    choice   P(A) between two options A and B, from the first token's
             logprobs when the backend gives them, else from the text        ``choice_verdict``
    yes/no   True or False, from the first token's logprobs, else the text  ``yes_no_verdict``

``judge_rounds`` sends a batch of requests, then re-sends only the ones whose reply held no
verdict (or, with ``tolerate_errors``, whose call raised), up to ``retries`` more rounds, one
``chat`` call per round, and counts every failure by its reason. Used by the GRPO reward, the
evaluation judge, the rlaif stage and the sdf stage's consistency filter; each keeps its own
templates, sampling and retries.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from data_gen.backends import Backend, Completion, Conversation, Sampling
from data_gen.errors import UserError
from data_gen.filters import is_refusal
from data_gen.templating import render

EXAMPLES_KEPT = 5  # failed replies kept (first 200 characters) to show what the judge said

# A reader turns a reply into (verdict, None) or (None, why there is no verdict).
Reader = Callable[[Completion], tuple[object, str | None]]


def judge_request(template: str, /, **values) -> Conversation:
    """One user message: ``template`` (in data_gen/templates/) rendered with ``values``."""
    return [{"role": "user", "content": render(template, **values).strip()}]


# ============================================================================= scores

# The first number in a reply, optionally "out of" a maximum: "73", "Score: 73/100", "**80**",
# "7/10", "85 out of 100". A leading minus sign makes it no score (negative is out of range).
_SCORE = re.compile(r"(?<![\d.\-])(\d+(?:\.\d+)?)(?:\s*(?:/|out of)\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)
# A judge that echoes the scale ("Score (0-100): 73") names the range before its score.
_RANGE = re.compile(r"(?<![\d.])0\s*(?:-|–|to)\s*\d+", re.IGNORECASE)


def parse_score(text: str, scale: float = 100) -> float | None:
    """The judge's score on a 0..scale scale, or None when the reply holds no score in range.
    "7/10" is read as 70 on a 0-100 scale."""
    match = _SCORE.search(_RANGE.sub(" ", text or ""))
    if not match:
        return None
    value = float(match.group(1))
    if match.group(2) is not None:
        out_of = float(match.group(2))
        if out_of <= 0:
            return None
        value = value / out_of * scale
    return value if 0 <= value <= scale else None


def read_score(reply: Completion, *, scale: float = 100, refusals: bool = False) -> tuple[float | None, str | None]:
    """(score, None), or (None, "unparseable"). With ``refusals``, a reply that reads as a
    refusal is (None, "refused") even when it holds a number ("I can't give this a 10")."""
    if refusals and is_refusal(reply.text):
        return None, "refused"
    score = parse_score(reply.text, scale)
    return (score, None) if score is not None else (None, "unparseable")


# ============================================================================= choices (A or B)

_LETTER_TEXT = re.compile(
    r"^[\s*\"'(\[]*(?:(?i:the\s+)?(?i:answer|response|option|choice|verdict)(?i:\s+is)?[\s:*\-]*)?"
    r"[\s*\"'(\[]*([AB])(?![A-Za-z])")


def letter_from_logprobs(first_logprobs: dict[str, float] | None) -> float | None:
    """P(A) among the first token's alternatives whose text is "A" or "B" (whitespace, case and
    brackets aside; the probabilities of all spellings of a letter add up), or None when
    neither letter is among them."""
    if not first_logprobs:
        return None
    mass = {"A": 0.0, "B": 0.0}
    for token, logprob in first_logprobs.items():
        letter = token.strip().strip("(*[").upper()
        if letter in mass and logprob is not None and logprob > float("-inf"):
            mass[letter] += math.exp(logprob)
    total = mass["A"] + mass["B"]
    return mass["A"] / total if total > 0 else None


def letter_from_text(text: str) -> str | None:
    """"A" or "B" from a short reply ("A", "(B)", "Answer: A", "Response B", "**A**"), else None."""
    match = _LETTER_TEXT.match(text)
    return match.group(1) if match else None


def choice_verdict(c: Completion) -> tuple[float | None, str]:
    """(P(A), source): source is "logprobs", "text" or "unparseable" (P(A) None)."""
    p = letter_from_logprobs(c.first_logprobs)
    if p is not None:
        return p, "logprobs"
    letter = letter_from_text(c.text)
    if letter is not None:
        return (1.0 if letter == "A" else 0.0), "text"
    return None, "unparseable"


def read_choice(reply: Completion) -> tuple[tuple[float, str] | None, str | None]:
    """((P(A), source), None), or (None, "refused" / "unparseable") when there is no choice."""
    p_a, source = choice_verdict(reply)
    if p_a is not None:
        return (p_a, source), None
    return None, "refused" if is_refusal(reply.text) else "unparseable"


# ============================================================================= yes or no


def _first_word(token: str) -> str:
    return re.sub(r"[^a-z]", "", token.lower())


def yes_no_verdict(c: Completion) -> bool | None:
    """True for "yes", False for "no", None when the verdict is neither. The first token's
    log-probabilities decide when "yes" or "no" is among them; otherwise the text does: its
    first word, else the one of "yes"/"no" it says (None when it says both or neither)."""
    if c.first_logprobs:
        yes = max((lp for tok, lp in c.first_logprobs.items() if _first_word(tok) == "yes"), default=None)
        no = max((lp for tok, lp in c.first_logprobs.items() if _first_word(tok) == "no"), default=None)
        if yes is not None or no is not None:
            return no is None or (yes is not None and yes > no)
    words = re.findall(r"[a-z]+", c.text.lower())
    if words and words[0] in ("yes", "no"):
        return words[0] == "yes"
    said = {w for w in words if w in ("yes", "no")}
    return said.pop() == "yes" if len(said) == 1 else None


def read_yes_no(reply: Completion) -> tuple[bool | None, str | None]:
    """(True/False, None), or (None, "unparseable")."""
    said = yes_no_verdict(reply)
    return (said, None) if said is not None else (None, "unparseable")


# ============================================================================= rounds


@dataclass
class Rounds:
    """What ``judge_rounds`` got back, one entry per request in the requests' order.

    ``values``: the verdict, None when none came back; ``reasons``: why the last reply held
    none (None when it did, or when no reply came back at all); ``replies``: the last reply
    (None when every call for it raised); ``missing``: indices of the requests left without a
    verdict. ``counts``: "requests" (sent, retries included), "retried" (re-sent) and one count
    per failure reason, every reply counted. ``examples``: a few failed replies (200
    characters). ``errors``: the exceptions of calls that raised; ``last_error`` the last
    round's (None when the last round's call came back).
    """

    values: list
    reasons: list[str | None]
    replies: list[Completion | None]
    missing: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)
    last_error: Exception | None = None


def judge_rounds(judge: Backend, requests: list[Conversation], sampling: Sampling, read: Reader, *,
                 retries: int = 0, desc: str = "judging", tolerate_errors: bool = False) -> Rounds:
    """Send every request, then re-send only the failed ones, up to ``retries`` more rounds, one
    ``judge.chat`` call per round (none when nothing is pending). ``read(reply) -> (value, None)``
    or ``(None, reason)``.

    A call that raises propagates, unless ``tolerate_errors``: then the round's requests stay
    pending for the next round and the exception is kept in ``errors`` / ``last_error`` for the
    caller to judge (the GRPO reward raises when a judge failed on everything). A backend that
    answers a different number of replies than requests is a bug and raises RuntimeError.
    """
    if retries < 0:
        raise UserError(f"judge retries: {retries}; give 0 or more")
    result = Rounds(values=[None] * len(requests), reasons=[None] * len(requests), replies=[None] * len(requests))
    pending = list(range(len(requests)))
    for attempt in range(1 + retries):
        if not pending:
            break
        result.counts["requests"] += len(pending)
        if attempt:
            result.counts["retried"] += len(pending)
        try:
            replies = judge.chat([requests[i] for i in pending], sampling,
                                 desc=desc if not attempt else f"{desc} (retry {attempt})")
        except Exception as exc:  # any backend failure: the same requests go again next round
            if not tolerate_errors:
                raise
            result.errors.append(exc)
            result.last_error = exc
            continue
        result.last_error = None
        if len(replies) != len(pending):
            raise RuntimeError(f"judge backend returned {len(replies)} replies for {len(pending)} requests")
        pending = _read_round(result, pending, replies, read)
    result.missing = pending
    return result


def _read_round(result: Rounds, pending: list[int], replies: list[Completion], read: Reader) -> list[int]:
    """Record one round's replies; returns the indices that failed."""
    failed = []
    for i, reply in zip(pending, replies):
        result.replies[i] = reply
        result.values[i], result.reasons[i] = read(reply)
        if result.reasons[i] is not None:
            result.counts[result.reasons[i]] += 1
            failed.append(i)
            if len(result.examples) < EXAMPLES_KEPT:
                result.examples.append(reply.text[:200])
    return failed
