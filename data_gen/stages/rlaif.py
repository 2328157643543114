"""AI-judged preference pairs (RLAIF): the model's own answers, ranked by a judge against the
constitution's principles.

For each prompt the model samples two candidate answers (the same conversation twice, in one
batch: the cache keeps repeated requests as distinct samples). A judge (the same model unless
another is given) compares them against a principle drawn per prompt and answers with one
letter, in both orders (candidate 1 as A, then as B), which cancels a judge's preference for a
position. Each verdict is P(A): from the judge's first-token logprobs (the probability mass on
"A" vs "B") when it gives them, else parsed from its text ("A", "(A)", "Answer: A").

The preference for candidate 1 is the mean of P(candidate 1 better) over the two orders;
``margin = |preference - 0.5| * 2``. Pairs under ``min_margin`` (the judge cannot tell, or only
prefers a position), with an unparseable verdict, or with an unusable candidate (empty, cut
off, refused, looping, identical to the other) are dropped and counted.

Writes ``pairs.jsonl`` (TRL's conversational preference format, no system message) and
``judgments.jsonl`` (prompt, principle, both candidates, both verdicts, probabilities, margin,
whether kept).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from data_gen.backends import MAX_LOGPROBS, Backend, Completion, Sampling
from data_gen.errors import UserError
from data_gen.filters import completion_problem
from data_gen.judging import choice_verdict, judge_request, judge_rounds, read_choice
from data_gen.stages.critique import CONSTITUTION, require_principles, system_head
from data_gen.stages.prompts import normalize
from data_gen.store import PREFERENCES, write_jsonl


# What the stage writes for others, by kind of record (the stage table, config/stages.py, reads it here).
OUTPUTS = {PREFERENCES: "pairs.jsonl"}
SAMPLING = Sampling(temperature=0.9, max_tokens=160)  # the candidates' default; a recipe's rlaif.sampling overrides keys


@dataclass(frozen=True)
class RlaifSettings:
    # None: candidates answer without a system prompt; "constitution": with the constitution's
    candidates_system_prompt: str | None = None
    min_margin: float = 0.2          # |P(candidate 1 better) - 0.5| * 2 under which a pair is dropped
    min_answer_chars: int = 2        # a shorter candidate is "empty"
    max_answer_chars: int = 2000     # a longer candidate is "over_long"
    min_distinct_3grams: float = 0.0  # share of distinct word 3-grams below which a candidate loops
    judge_max_tokens: int = 4        # the judge answers with one letter; a few tokens leave room for "(A)"
    judge_logprobs: int = 20         # top alternatives of the judge's first token read for P(A)

    def __post_init__(self):
        """Range checks when the settings are built (from a recipe, the CLI or code); the recipe
        loader puts the file and section in front of the message."""
        if self.candidates_system_prompt not in (None, CONSTITUTION):
            raise UserError(f"candidates_system_prompt: '{self.candidates_system_prompt}' is not an option; use "
                            f"null (no system prompt) or '{CONSTITUTION}' (the constitution's system prompt)")
        if not 0.0 <= self.min_margin <= 1.0:
            raise UserError(f"min_margin: {self.min_margin}; give a number from 0 to 1 (0.2 keeps pairs the "
                            "judge prefers at 60/40 or more)")
        if self.min_answer_chars < 0:
            raise UserError(f"min_answer_chars: {self.min_answer_chars}; give 0 or more")
        if self.max_answer_chars < max(1, self.min_answer_chars):
            raise UserError(f"max_answer_chars: {self.max_answer_chars}; give at least 1 and at least "
                            f"min_answer_chars ({self.min_answer_chars})")
        if not 0.0 <= self.min_distinct_3grams <= 1.0:
            raise UserError(f"min_distinct_3grams: {self.min_distinct_3grams}; give a share from 0 to 1 "
                            "(0 keeps looping candidates)")
        if self.judge_max_tokens < 1:
            raise UserError(f"judge_max_tokens: {self.judge_max_tokens}; give at least 1 (the judge answers "
                            "with one letter; 4 leaves room for \"(A)\")")
        if not 0 <= self.judge_logprobs <= MAX_LOGPROBS:
            raise UserError(f"judge_logprobs: {self.judge_logprobs}; give 0 (read the verdict from the text) to "
                            f"{MAX_LOGPROBS} (vLLM's max_logprobs; 20: P(A) from the first token's top 20 alternatives)")


def _candidate_problem(c: Completion, settings: RlaifSettings) -> str | None:
    return completion_problem(c, min_chars=settings.min_answer_chars, max_chars=settings.max_answer_chars,
                              min_distinct_3grams=settings.min_distinct_3grams, refusals=True)


def run_rlaif(backend: Backend, constitution, prompts: list[str], out_dir: Path, *,
              settings: RlaifSettings = RlaifSettings(),
              sampling: Sampling = SAMPLING,
              judge: Backend | None = None, seed: int = 0) -> dict:
    require_principles(constitution, "rlaif")
    head = system_head(settings.candidates_system_prompt, constitution, "rlaif.candidates_system_prompt")
    if not prompts:
        raise UserError("rlaif: no prompts to answer; run the prompts stage or pass --prompts FILE")
    judge = judge or backend
    judge_sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=settings.judge_max_tokens,
                              logprobs=settings.judge_logprobs)

    rng = random.Random(seed)
    principles = [rng.choice(constitution.principles) for _ in prompts]
    conversations = [head + [{"role": "user", "content": p}] for p in prompts]
    answers = backend.chat([c for c in conversations for _ in range(2)], sampling, desc="rlaif: candidates")

    drops: Counter = Counter()
    judged = []  # (prompt index, candidate 1, candidate 2)
    for i in range(len(prompts)):
        pair = answers[2 * i:2 * i + 2]
        problem = next((p for p in (_candidate_problem(c, settings) for c in pair) if p), None)
        if problem:
            drops[f"candidate_{problem}"] += 1
        elif normalize(pair[0].text) == normalize(pair[1].text):
            drops["candidates_identical"] += 1
        else:
            judged.append((i, pair[0].text.strip(), pair[1].text.strip()))

    def ask(i: int, a: str, b: str) -> list[dict]:
        return judge_request("rlaif_judge.j2", constitution=constitution, prompt=prompts[i],
                             principle=principles[i], response_a=a, response_b=b)

    # One round, no retries: an unparseable verdict drops the pair (counted), never re-asked.
    requests = [r for i, one, two in judged for r in (ask(i, one, two), ask(i, two, one))]
    verdicts = judge_rounds(judge, requests, judge_sampling, read_choice, desc="rlaif: judging").replies
    judgments = [judgment(prompts[i], principles[i], one, two, verdicts[2 * n], verdicts[2 * n + 1],
                          settings.min_margin) for n, (i, one, two) in enumerate(judged)]
    drops.update(j["drop_reason"] for j in judgments if j["drop_reason"])
    records = [preference_pair(j) for j in judgments if j["kept"]]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / OUTPUTS[PREFERENCES], records)
    write_jsonl(out_dir / "judgments.jsonl", judgments)
    kept_margins = [j["margin"] for j in judgments if j["kept"]]
    return {
        "stage": "rlaif",
        "model": backend.model,
        "judge_model": judge.model,
        "seed": seed,
        "sampling": sampling.to_dict(),
        "judge_sampling": judge_sampling.to_dict(),
        "settings": asdict(settings),
        "constitution": constitution.name,
        "counts": {"prompts": len(prompts), "pairs": len(records), "judged": len(judged),
                   "dropped_pairs": len(prompts) - len(records), "candidates": len(answers),
                   "verdicts": len(verdicts), "candidate_tokens": sum(c.num_tokens for c in answers),
                   "judge_tokens": sum(c.num_tokens for c in verdicts)},
        "drops": dict(drops),
        **verdict_stats(judgments),
        "mean_margin_kept": sum(kept_margins) / len(kept_margins) if kept_margins else None,
        "principle_usage": dict(Counter(principles)),
    }


def judgment(prompt: str, principle: str, one: str, two: str, first: Completion, second: Completion,
             min_margin: float) -> dict:
    """The record of one judged pair: both orders' verdicts (``first`` with candidate 1 as A,
    ``second`` with candidate 2 as A), P(candidate 1 better), the margin, which candidate is
    chosen, and whether the pair is kept or why it is dropped."""
    (p1, s1), (p2, s2) = choice_verdict(first), choice_verdict(second)
    record = {"prompt": prompt, "principle": principle, "candidates": [one, two],
              "verdicts": [{"order": "candidate 1 as A", "text": first.text, "p_a": p1, "source": s1},
                           {"order": "candidate 2 as A", "text": second.text, "p_a": p2, "source": s2}],
              "p_candidate_1": None, "margin": None, "chosen": None, "kept": False, "drop_reason": None}
    if p1 is None or p2 is None:
        record["drop_reason"] = "judge_unparseable"
        return record
    # P(candidate 1 better): P(A) in the first order, P(B) in the swapped one.
    p_one = (p1 + (1.0 - p2)) / 2
    margin = abs(p_one - 0.5) * 2
    record.update(p_candidate_1=p_one, margin=margin, chosen=1 if p_one > 0.5 else 2 if p_one < 0.5 else None)
    if margin == 0 or margin < min_margin:
        record["drop_reason"] = "low_margin"
    else:
        record["kept"] = True
    return record


def preference_pair(judged: dict) -> dict:
    """A kept judgment as TRL's conversational preference record (no system message)."""
    one, two = judged["candidates"]
    chosen, rejected = (one, two) if judged["chosen"] == 1 else (two, one)
    return {"prompt": [{"role": "user", "content": judged["prompt"]}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def verdict_stats(judgments: list[dict]) -> dict:
    """How the judge behaved, over every judged pair: the manifest's order_agreement,
    position_bias and verdict_sources."""
    verdicts = [v for j in judgments for v in j["verdicts"]]
    sources = Counter(v["source"] for v in verdicts)
    first_position = [v["p_a"] for v in verdicts if v["p_a"] is not None]
    both_parsed = [j for j in judgments if j["p_candidate_1"] is not None]
    agreements = sum((j["verdicts"][0]["p_a"] - 0.5) * ((1.0 - j["verdicts"][1]["p_a"]) - 0.5) > 0
                     for j in both_parsed)
    return {
        # Both orders prefer the same candidate (a judge that only picks a position scores 0).
        "order_agreement": agreements / len(both_parsed) if both_parsed else None,
        # Mean P(the response in position A wins) - 0.5 over all parsed verdicts (0: no bias).
        "position_bias": sum(first_position) / len(first_position) - 0.5 if first_position else None,
        "verdict_sources": {"logprobs": sources["logprobs"], "text": sources["text"],
                            "unparseable": sources["unparseable"]},
    }
