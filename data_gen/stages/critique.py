"""Self-critique dialogues: the supervised half of constitutional AI.

For each prompt the model answers, then for ``rounds`` rounds critiques its latest answer
against one of the constitution's principles (drawn per prompt per round) and revises it. A
round is one conversation in the constitutional-AI style:

    user: prompt          assistant: answer
    user: critique request citing the principle (critique_request.j2)
    assistant: critique
    user: revision request (critique_revision.j2)
    assistant: revision

A later round starts again from the prompt and the latest revision rather than the whole
history, so the context stays short (small models have small windows) while each round still
critiques the newest answer. Each step is one batched request for every chain still going. A
chain with an unusable step (empty, cut off, refused, looping ...) is dropped and counted as
``<step>_<reason>``; a revision loses its "Sure, here is the revised response:" wrapping.

Writes ``sft.jsonl`` ({"messages": [user prompt, assistant final revision]}), ``pairs.jsonl``
(TRL preference records: chosen = final revision, rejected = first answer; no system
message in either) and ``dialogues.jsonl`` (every chain, with its principles, critiques,
revisions and drop reason, for inspection).
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from data_gen.backends import Backend, Completion, Conversation, Message, Sampling
from data_gen.errors import UserError
from data_gen.filters import completion_problem, strip_boilerplate
from data_gen.stages.prompts import normalize
from data_gen.store import CONVERSATIONS, PREFERENCES, write_jsonl
from data_gen.templating import render

# What the stage writes for others, by kind of record (the stage table, config/stages.py, reads it here).
OUTPUTS = {CONVERSATIONS: "sft.jsonl", PREFERENCES: "pairs.jsonl"}
CONSTITUTION = "constitution"  # the system-prompt option meaning "the constitution's system prompt"


@dataclass(frozen=True)
class CritiqueSettings:
    """The critique stage's settings: the recipe's ``critique`` section (with ``sampling``)."""

    rounds: int = 1                          # critique-and-revise rounds per prompt
    # None: the first answer has no system prompt; "constitution": the constitution's system
    # prompt (kept for the whole dialogue, which continues that conversation)
    answer_system_prompt: str | None = None
    min_chars: int = 2                       # a shorter answer, critique or revision is "empty"
    max_answer_chars: int = 2000             # a longer answer or revision is "over_long"
    min_distinct_3grams: float = 0.0         # share of distinct word 3-grams below which a text loops

    def __post_init__(self):
        if self.rounds < 1:
            raise UserError(f"rounds: {self.rounds}; give at least 1 critique-and-revise round")
        if self.min_chars < 0:
            raise UserError(f"min_chars: {self.min_chars}; give 0 or more")
        if self.max_answer_chars < max(1, self.min_chars):
            raise UserError(f"max_answer_chars: {self.max_answer_chars}; give at least 1 and at least "
                            f"min_chars ({self.min_chars})")
        if not 0.0 <= self.min_distinct_3grams <= 1.0:
            raise UserError(f"min_distinct_3grams: {self.min_distinct_3grams}; give a share from 0 to 1 "
                            "(0 keeps looping texts)")
        if self.answer_system_prompt not in (None, CONSTITUTION):
            raise UserError(f"answer_system_prompt: '{self.answer_system_prompt}' is not an option; use null (no "
                            f"system prompt) or '{CONSTITUTION}' (the constitution's system prompt)")


SAMPLING = Sampling(temperature=0.7, max_tokens=200)  # the stage's default sampling (a recipe's sampling: overrides keys)


def require_principles(constitution, stage: str) -> None:
    """UserError, before any generation, when the constitution has no principles."""
    if not constitution.principles:
        where = getattr(constitution, "path", None) or "the constitution"
        raise UserError(f"{where}: constitution '{constitution.name}' has no principles, and the {stage} stage "
                        "judges answers against them; add a `principles:` list, e.g. "
                        "'- Choose the response that ...'")


def system_head(option: str | None, constitution, field: str) -> list[Message]:
    """The system message for a system-prompt option: none, or the constitution's."""
    if option is None:
        return []
    if option == CONSTITUTION:
        return [{"role": "system", "content": constitution.system_prompt()}]
    raise UserError(f"{field}: '{option}' is not an option; use null (no system prompt) or '{CONSTITUTION}' "
                    "(the constitution's system prompt)")


# Junk around critiques and revisions that filters.strip_boilerplate does not know (yet).
_CRITIQUE_LABEL = re.compile(r"^[ \t#*]*(?:(?:here(?:'s| is) )?(?:my |the )?critique)[ \t*]*:[ \t*]*", re.IGNORECASE)
_REVISION_LABEL = re.compile(
    r"^[ \t#*]*(?:(?:here(?:'s| is) )?(?:my |the )?)?(?:revision|(?:revised|rewritten|improved) (?:response|answer|version))"
    r"[ \t*]*:[ \t*]*", re.IGNORECASE | re.MULTILINE)
# A first line that only announces the revision: "Here's my revised response, in a captain's voice:"
_ANNOUNCEMENT_LINE = re.compile(r"^[^\n]{0,160}\b(?:revis|rewr|improved|updated)[^\n]{0,160}:[ \t*]*\n", re.IGNORECASE)
# ... or a first paragraph that does: "Sure, I can revise my response.\n\n"
_ANNOUNCEMENT_PARAGRAPH = re.compile(
    r"^\s*(?:sure|certainly|of course|okay|ok|absolutely)\b[^\n]{0,120}\b(?:revis|rewrit)[^\n]*\n\s*\n", re.IGNORECASE)


def clean_critique(text: str) -> str:
    """The critique without a leading "Critique:" / "Here is my critique:" label."""
    return _CRITIQUE_LABEL.sub("", text.strip(), count=1).strip()


def clean_revision(text: str) -> str:
    """The revision as the user should read it: without a leading "Revision:" label, an
    announcement ("Sure, here is the revised response:"), wrapping quotes, a trailing "I hope
    this helps", or a repeated critique before a "Revision:" label."""
    out = text.strip()
    if _CRITIQUE_LABEL.match(out):  # "Critique: ... Revision: ...": keep what follows the last label
        labels = list(_REVISION_LABEL.finditer(out))
        if labels:
            out = out[labels[-1].end():]
    # Only a label at the very start: "Revision:" inside an answer about exams is content.
    out = _REVISION_LABEL.sub("", out.strip(), count=1) if _REVISION_LABEL.match(out.strip()) else out
    out = _ANNOUNCEMENT_PARAGRAPH.sub("", out.strip(), count=1)
    out = _ANNOUNCEMENT_LINE.sub("", out.strip(), count=1)
    return strip_boilerplate(out)


def _problem(text: str, c: Completion, settings: CritiqueSettings, *, max_chars: int | None,
             refusals: bool) -> str | None:
    return completion_problem(Completion(text, c.finish_reason, c.num_tokens), min_chars=settings.min_chars,
                              max_chars=max_chars, min_distinct_3grams=settings.min_distinct_3grams,
                              refusals=refusals)


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def _write_outputs(chains: list[dict], finished: list[dict], out_dir: Path) -> tuple[list, list, Counter]:
    """Writes sft.jsonl (prompt -> final answer of every finished chain), pairs.jsonl (final over
    first answer, where the revision changed it) and dialogues.jsonl (every chain, a dropped one
    with no final answer); returns (sft, pairs, pair drops)."""
    sft = [{"messages": [_user(ch["prompt"]), _assistant(ch["final"])]} for ch in finished]
    pairs, pair_drops = [], Counter()
    for ch in finished:
        if normalize(ch["final"]) == normalize(ch["initial"]):
            pair_drops["unchanged"] += 1
            continue
        pairs.append({"prompt": [_user(ch["prompt"])], "chosen": [_assistant(ch["final"])],
                      "rejected": [_assistant(ch["initial"])]})
    for ch in chains:
        if ch["dropped"]:
            ch["final"] = None
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / OUTPUTS[CONVERSATIONS], sft)
    write_jsonl(out_dir / OUTPUTS[PREFERENCES], pairs)
    write_jsonl(out_dir / "dialogues.jsonl", ({k: v for k, v in ch.items() if k != "principles"} for ch in chains))
    return sft, pairs, pair_drops


def run_critique(backend: Backend, constitution, prompts: list[str], out_dir: Path, *,
                 settings: CritiqueSettings = CritiqueSettings(),
                 sampling: Sampling = SAMPLING, seed: int = 0, student: Backend | None = None) -> dict:
    """``student``: the model whose first answers are critiqued and revised by ``backend`` (the
    teacher); None: ``backend`` answers first too (the model critiques itself)."""
    student = student or backend
    require_principles(constitution, "critique")
    head = system_head(settings.answer_system_prompt, constitution, "critique.answer_system_prompt")
    if not prompts:
        raise UserError("critique: no prompts to answer; run the prompts stage or pass --prompts FILE")

    rng = random.Random(seed)
    chains = [{"prompt": p, "system_prompt": head[0]["content"] if head else None,
               "principles": [rng.choice(constitution.principles) for _ in range(settings.rounds)],
               "initial": None, "rounds": [], "final": None, "dropped": None} for p in prompts]
    drops: Counter = Counter()
    usage = {"requests": 0, "tokens": 0}

    def step(conversations: list[Conversation], desc: str, by: Backend = backend) -> list[Completion]:
        usage["requests"] += len(conversations)
        completions = by.chat(conversations, sampling, desc=desc)
        usage["tokens"] += sum(c.num_tokens for c in completions)
        return completions

    def drop(chain: dict, reason: str) -> None:
        chain["dropped"] = reason
        drops[reason] += 1

    # A refused first answer is kept: the revision can fix it, and it is an honest rejected answer.
    answers = step([head + [_user(ch["prompt"])] for ch in chains], "critique: first answers", student)
    for chain, c in zip(chains, answers):
        chain["initial"] = chain["final"] = c.text.strip()
        problem = _problem(chain["initial"], c, settings, max_chars=settings.max_answer_chars, refusals=False)
        if problem:
            drop(chain, f"initial_{problem}")

    for k in range(settings.rounds):
        live = [ch for ch in chains if not ch["dropped"]]
        if not live:
            break
        asked = [head + [_user(ch["prompt"]), _assistant(ch["final"]),
                         _user(render("critique_request.j2", constitution=constitution,
                                      principle=ch["principles"][k]).strip())] for ch in live]
        critiques = step(asked, f"critique: critiques (round {k + 1})")
        kept = []
        for chain, conversation, c in zip(live, asked, critiques):
            critique = clean_critique(c.text)
            chain["rounds"].append({"principle": chain["principles"][k], "critique": critique,
                                    "revision": None, "revision_raw": None})
            problem = _problem(critique, c, settings, max_chars=None, refusals=True)
            if problem:
                drop(chain, f"critique_{problem}")
            else:
                kept.append((chain, conversation + [
                    _assistant(critique),
                    _user(render("critique_revision.j2", constitution=constitution,
                                 principle=chain["principles"][k]).strip())]))
        if not kept:
            break
        revisions = step([conversation for _, conversation in kept], f"critique: revisions (round {k + 1})")
        for (chain, _), c in zip(kept, revisions):
            revision = clean_revision(c.text)
            chain["rounds"][-1].update(revision=revision, revision_raw=c.text)
            problem = _problem(revision, c, settings, max_chars=settings.max_answer_chars, refusals=True)
            if problem is None and _CRITIQUE_LABEL.match(revision):
                problem = "is_critique"  # it critiqued again instead of rewriting
            if problem:
                drop(chain, f"revision_{problem}")
            else:
                chain["final"] = revision

    finished = [ch for ch in chains if not ch["dropped"]]
    sft, pairs, pair_drops = _write_outputs(chains, finished, Path(out_dir))
    return {
        "stage": "critique",
        "model": backend.model,
        "models": {"teacher": backend.model, "student": student.model},  # who revised, who answered first
        "seed": seed,
        "sampling": sampling.to_dict(),
        "settings": asdict(settings),
        "constitution": constitution.name,
        "counts": {"prompts": len(prompts), "sft": len(sft), "pairs": len(pairs),
                   "dropped_chains": len(chains) - len(finished), **usage},
        "drops": {"chains": dict(drops), "pairs": dict(pair_drops)},
        "principle_usage": dict(Counter(p for ch in chains for p in ch["principles"])),
        "principle_usage_kept": dict(Counter(r["principle"] for ch in finished for r in ch["rounds"])),
    }
