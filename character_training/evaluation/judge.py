"""Judge-model evaluation: trait scores and revealed preferences.

Trait scores: a judge (any data_gen backend: vLLM in this process, an OpenAI-compatible server,
a fake in tests) rates each answer from 0 to 100 for each trait of the constitution
(``data_gen/templates/eval_trait_judge.j2``) and for coherence, whatever the style
(``eval_coherence_judge.j2``). A reply that refuses, or that holds no score, is counted and
re-sent (only those requests) up to ``retries`` more times; after that the score is None. A
missing score is never a zero and never guessed: means and intervals are over the scores that
came back, and each cell says how many are missing. The rounds and the verdict parsers are
``data_gen/judging.py``'s, shared with the GRPO reward and the data stages' judges.

Revealed preferences: the model under evaluation sees a user's question and two ways of
answering it, each described by a trait, and answers in the way that feels most like itself
(``eval_revealed_choice.j2``). A judge reads the answer and names the trait it expresses more
(``eval_revealed_judge.j2``): P(A) from its first token's logprobs when the backend gives them,
else its text. Each verdict is a match between two traits; an Elo rating per trait, averaged
over shuffled orders of the matches, ranks the traits the model acts out when it may choose.
Pairs are drawn in both orders so that a position bias (of the model or of the judge) cancels.

Traits are named by short keys, ``trait_1`` .. ``trait_n`` in the constitution's order
(``trait_keys``); results carry the key -> statement mapping. Nothing here writes files: the
evaluation stage stores what these functions return.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from functools import partial

import numpy as np

from character_training.errors import UserError
from character_training.evaluation.paired import clustered_interval
from data_gen.backends import Backend, Sampling
from data_gen.filters import is_refusal
from data_gen.judging import judge_request, judge_rounds, read_choice, read_score
from data_gen.templating import render

COHERENCE = "coherence"

# A verdict is a letter; a few tokens leave room for "(A)", and the first token's top
# alternatives give P(A) vs P(B).
REVEALED_JUDGE_SAMPLING = Sampling(temperature=0.0, top_p=1.0, max_tokens=4, logprobs=20)


def trait_keys(constitution) -> dict[str, str]:
    """``{"trait_1": statement, ...}`` in the constitution's order."""
    return {f"trait_{i}": t.trait for i, t in enumerate(constitution.traits, 1)}


def _summary_cell(values: list[float | None], prompts: list[str], seed: int) -> dict:
    """The mean score and its 95% interval, resampling prompts (a prompt's several answers are
    drawn together, not passed off as independent evidence)."""
    kept = [(v, p) for v, p in zip(values, prompts) if v is not None]
    scored = np.array([v for v, _ in kept], dtype=float)
    cell = {"mean": None, "ci95": None, "n": int(len(scored)), "missing": len(values) - len(scored)}
    if len(scored):
        lo, hi = clustered_interval(scored, [p for _, p in kept], seed=seed)
        cell["mean"] = float(scored.mean())
        cell["ci95"] = [lo, hi]
    return cell


def score_answers(judge: Backend, constitution, items: list[dict],
                  sampling: Sampling = Sampling(temperature=0.0, max_tokens=8), retries: int = 1,
                  seed: int = 0) -> dict:
    """Rate each item's answer 0-100 for every trait and for coherence.

    ``items``: ``{"condition", "prompt", "answer"}``. Returns ``{"traits": {key: statement},
    "scores": [{"condition", "prompt", "trait_1": score|None, ..., "coherence": score|None}],
    "summary": {condition: {key: {"mean", "ci95", "n", "missing"}}}, "counts": {"requests",
    "unparseable", "refused", "missing_after_retries"}, "unparseable_examples": [...],
    "judge": {...}}``. ``unparseable`` and ``refused`` count every such reply, retries included;
    ``missing_after_retries`` counts the scores left None. A cell with no score has mean and
    ci95 None. The bootstrap interval resamples prompts and is seeded with ``seed``.
    """
    traits = trait_keys(constitution)
    keys = [*traits, COHERENCE]
    requests, slots = [], []
    empty = 0
    for n, item in enumerate(items):
        if not item["answer"].strip():  # nothing to judge: its scores stay None (counted, never sent)
            empty += 1
            continue
        for key, t in zip(traits, constitution.traits):
            requests.append(judge_request("eval_trait_judge.j2", trait=t.trait, clarification=t.clarification,
                                          prompt=item["prompt"], response=item["answer"]))
            slots.append((n, key))
        requests.append(judge_request("eval_coherence_judge.j2", prompt=item["prompt"], response=item["answer"]))
        slots.append((n, COHERENCE))
    # A refusal is counted as one even when it holds a number ("I can't give this a 10").
    rounds = judge_rounds(judge, requests, sampling, partial(read_score, scale=100, refusals=True),
                          retries=retries, desc="eval: judging traits")
    values, counts = rounds.values, rounds.counts

    scores = [{"condition": item["condition"], "prompt": item["prompt"], **dict.fromkeys(keys)} for item in items]
    for (n, key), value in zip(slots, values):
        scores[n][key] = value
    by_condition: dict[str, list[dict]] = {}
    for row in scores:
        by_condition.setdefault(row["condition"], []).append(row)
    summary = {cond: {key: _summary_cell([r[key] for r in rows], [r["prompt"] for r in rows], seed) for key in keys}
               for cond, rows in by_condition.items()}
    return {
        "traits": traits,
        "scores": scores,
        "summary": summary,
        "counts": {"requests": counts["requests"], "unparseable": counts["unparseable"],
                   "refused": counts["refused"], "missing_after_retries": sum(v is None for v in values),
                   "empty_answers": empty},
        "unparseable_examples": rounds.examples,
        "judge": {"model": getattr(judge, "model", None), "sampling": sampling.to_dict(), "retries": retries},
    }


def revealed_requests(constitution, prompts: list[str], pairs_per_prompt: int = 1, seed: int = 0) -> list[dict]:
    """Conversations offering the model two traits to answer in.

    Pairs are dealt from a shuffled deck of every ordered pair of different traits, reshuffled
    when it runs out: each trait appears about equally often, in position A as often as in B.
    Returns ``{"prompt", "trait_a", "trait_b", "trait_a_text", "trait_b_text", "conversation"}``
    per request (``trait_a``/``trait_b`` are keys; the texts let the judge work from the
    records alone).
    """
    traits = trait_keys(constitution)
    if len(traits) < 2:
        raise UserError(f"revealed preferences need at least two traits; the constitution "
                        f"'{constitution.name}' has {len(traits)}")
    if pairs_per_prompt < 1:
        raise UserError(f"revealed preferences: pairs_per_prompt {pairs_per_prompt}; give 1 or more")
    rng = random.Random(seed)
    ordered = [(a, b) for a in traits for b in traits if a != b]
    deck: list[tuple[str, str]] = []
    records = []
    for prompt in prompts:
        for _ in range(pairs_per_prompt):
            if not deck:
                deck = ordered[:]
                rng.shuffle(deck)
            a, b = deck.pop()
            content = render("eval_revealed_choice.j2", prompt=prompt, trait_a=traits[a], trait_b=traits[b])
            conversation = [{"role": "user", "content": content.strip()}]  # to the model, not a judge
            records.append({"prompt": prompt, "trait_a": a, "trait_b": b, "trait_a_text": traits[a],
                            "trait_b_text": traits[b], "conversation": conversation})
    return records


def judge_revealed(judge: Backend, records: list[dict], sampling: Sampling = REVEALED_JUDGE_SAMPLING,
                   retries: int = 1) -> list[dict]:
    """Which of its two traits each answer expresses more.

    ``records``: ``revealed_requests`` records with the model's ``"answer"`` added (and usually
    a ``"condition"``). Returns copies with ``"p_a"`` (P(trait A), None when no verdict),
    ``"verdict"`` ("logprobs", "text", "unparseable", "refused", or "no_answer" for an empty or
    refused answer, which is not sent to the judge) and ``"winner"`` (the trait key; None when
    there is no verdict or P(A) is exactly 0.5). Unparseable verdicts are re-sent up to
    ``retries`` more times.
    """
    out = [dict(r) for r in records]
    judged = [r for r in out if (r.get("answer") or "").strip() and not is_refusal(r["answer"])]
    requests = [judge_request("eval_revealed_judge.j2", trait_a=r["trait_a_text"], trait_b=r["trait_b_text"],
                              prompt=r["prompt"], response=r["answer"]) for r in judged]
    rounds = judge_rounds(judge, requests, sampling, read_choice, retries=retries,
                          desc="eval: judging revealed preferences")
    for r in out:
        r.update(p_a=None, verdict="no_answer", winner=None)
    for r, value, reason in zip(judged, rounds.values, rounds.reasons):
        if value is None:
            r["verdict"] = reason
            continue
        p_a, source = value
        r["p_a"], r["verdict"] = p_a, source
        if p_a != 0.5:
            r["winner"] = r["trait_a"] if p_a > 0.5 else r["trait_b"]
    return out


def elo_ratings(matches: list[tuple[str | None, str | None]], traits, k: float = 32, initial: float = 1000,
                orderings: int = 100, seed: int = 0) -> dict[str, float]:
    """Elo rating per trait from ``(winner, loser)`` matches, averaged over ``orderings``
    shuffled orders of the matches (sequential Elo weighs recent matches more; averaging over
    orders removes that). Matches with a None side or a trait against itself are skipped. The
    matches are sorted before shuffling, so the result does not depend on the input order.
    A trait without matches keeps ``initial``.
    """
    if orderings < 1:
        raise ValueError(f"orderings must be at least 1, got {orderings}")
    traits = list(traits)
    played = sorted((w, l) for w, l in matches if w is not None and l is not None and w != l)
    unknown = {t for match in played for t in match} - set(traits)
    if unknown:
        raise ValueError(f"matches name traits not in the list: {sorted(unknown)}")
    rng = random.Random(seed)
    total = dict.fromkeys(traits, 0.0)
    for _ in range(orderings):
        rng.shuffle(played)
        rating = dict.fromkeys(traits, float(initial))
        for winner, loser in played:
            expected = 1.0 / (1.0 + 10 ** ((rating[loser] - rating[winner]) / 400))
            rating[winner] += k * (1.0 - expected)
            rating[loser] -= k * (1.0 - expected)
        for t in traits:
            total[t] += rating[t]
    return {t: total[t] / orderings for t in traits}


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def revealed_report(records_by_condition: dict[str, list[dict]], traits=None, seed: int = 0) -> dict:
    """``{condition: {"elo": {trait: rating}, "matches", "ties", "unparseable", "refused",
    "no_answer"}}`` from ``judge_revealed`` records. ``traits``: the keys to rate (default: every
    key the records name, across all conditions, so that conditions are rated on the same
    traits). ``matches`` counts decided verdicts; the other counts are records without one."""
    if traits is None:
        traits = sorted({r[side] for records in records_by_condition.values() for r in records
                         for side in ("trait_a", "trait_b")}, key=_natural)
    report = {}
    for condition, records in records_by_condition.items():
        matches = [(r["winner"], r["trait_b"] if r["winner"] == r["trait_a"] else r["trait_a"])
                   for r in records if r.get("winner") is not None]
        verdicts = Counter(r.get("verdict") for r in records)
        report[condition] = {"elo": elo_ratings(matches, traits, seed=seed), "matches": len(matches),
                             "ties": sum(r.get("verdict") in ("logprobs", "text") and r.get("winner") is None
                                         for r in records),
                             "unparseable": verdicts["unparseable"], "refused": verdicts["refused"],
                             "no_answer": verdicts["no_answer"]}
    return report
