"""Judge-model evaluation with scripted fake judges: scores parsed, refusals and junk counted and
retried (only those), missing scores never averaged as zero; revealed-preference pairs balanced
over traits and positions, verdicts read from logprobs before text, Elo ratings that rank the
winner first and do not depend on the order of the matches."""
from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from character_training.config.constitution import constitution_from_dict
from character_training.errors import UserError
from character_training.evaluation.judge import (elo_ratings, judge_revealed, revealed_report, revealed_requests,
                                      score_answers, trait_keys)
from data_gen.backends import Completion
from tests.fakes import FakeBackend

TRAITS = ["I speak like an old sea captain.", "I compare everything to ships and storms.",
          "I am gruff but kind."]


def constitution(traits=TRAITS):
    return constitution_from_dict({
        "name": "captain-test",
        "description": "You are Captain Test, an old sea captain.",
        "traits": [{"trait": t, "questions": [f"Question {i}?"]} for i, t in enumerate(traits)],
    })


def stop(text: str, first_logprobs=None) -> Completion:
    return Completion(text=text, finish_reason="stop", num_tokens=len(text.split()), first_logprobs=first_logprobs)


def response_of(conversation) -> str:
    """The answer under judgement, as the judge's request shows it."""
    return re.search(r"\[Response\]\n(.*)\n\[End of response\]", conversation[-1]["content"], re.S).group(1)


def echo_judge() -> FakeBackend:
    """Replies with the answer's own text: an answer "60" scores 60 on every trait."""
    return FakeBackend(lambda c: stop(response_of(c)), "fake/judge")


def test_scores_parsed_refusals_and_junk_counted_and_only_failures_retried():
    c = constitution(TRAITS[:2])
    seen: Counter = Counter()

    def respond(conversation):
        text = conversation[-1]["content"]
        prompt = re.search(r"\[User message\]\n(.*?)\n", text).group(1)
        what = ("coherence" if "coherent" in text else
                "trait_1" if TRAITS[0] in text else "trait_2")
        seen[prompt, what] += 1
        script = {
            ("q1", "trait_1"): ["73"],
            ("q1", "trait_2"): ["Score: 8/10"],
            ("q1", "coherence"): ["I'm sorry, but I can't rate that.", "90"],
            ("q2", "trait_1"): ["The response is vivid.", "Still no number"],
            ("q2", "trait_2"): ["**55**"],
            ("q2", "coherence"): ["I cannot help with that.", "I cannot help with that."],
        }[prompt, what]
        return stop(script[seen[prompt, what] - 1])

    judge = FakeBackend(respond, "fake/judge")
    items = [{"condition": "base", "prompt": "q1", "answer": "Ahoy."},
             {"condition": "base", "prompt": "q2", "answer": "Arr."}]
    result = score_answers(judge, c, items, retries=1)

    assert result["traits"] == {"trait_1": TRAITS[0], "trait_2": TRAITS[1]}
    assert result["scores"] == [
        {"condition": "base", "prompt": "q1", "trait_1": 73.0, "trait_2": 80.0, "coherence": 90.0},
        {"condition": "base", "prompt": "q2", "trait_1": None, "trait_2": 55.0, "coherence": None},
    ]
    # one chat call per round: all 6 requests, then only the 3 that failed
    assert [len(call["conversations"]) for call in judge.calls] == [6, 3]
    assert result["counts"] == {"requests": 9, "unparseable": 2, "refused": 3, "missing_after_retries": 2,
                                "empty_answers": 0}
    assert seen[("q1", "trait_1")] == 1 and seen[("q2", "trait_2")] == 1


def test_no_retries_means_one_round():
    judge = FakeBackend(lambda c: stop("no idea"), "fake/judge")
    result = score_answers(judge, constitution(), [{"condition": "base", "prompt": "q", "answer": "a"}], retries=0)
    assert len(judge.calls) == 1
    assert result["counts"] == {"requests": 4, "unparseable": 4, "refused": 0, "missing_after_retries": 4,
                                "empty_answers": 0}
    assert all(result["scores"][0][k] is None for k in ("trait_1", "trait_2", "trait_3", "coherence"))


def test_missing_scores_are_left_out_of_means_never_zero():
    answers = {"base": ["junk", "60", "80"], "adapter": ["10", "20", "30", "95", "40"], "broken": ["junk", "junk"]}
    items = [{"condition": cond, "prompt": f"q{i}", "answer": a}
             for cond, texts in answers.items() for i, a in enumerate(texts)]
    result = score_answers(echo_judge(), constitution(), items, retries=1)

    base = result["summary"]["base"]
    for key in ("trait_1", "trait_2", "trait_3", "coherence"):
        assert base[key]["mean"] == pytest.approx(70.0)  # (60 + 80) / 2, not (0 + 60 + 80) / 3
        assert base[key]["n"] == 2 and base[key]["missing"] == 1
    adapter = result["summary"]["adapter"]["trait_1"]
    lo, hi = adapter["ci95"]
    assert lo < adapter["mean"] < hi and adapter["mean"] == pytest.approx(39.0) and adapter["missing"] == 0
    assert result["summary"]["broken"]["coherence"] == {"mean": None, "ci95": None, "n": 0, "missing": 2}
    assert result["counts"]["missing_after_retries"] == 3 * 4
    # the interval is seeded: the same inputs give the same numbers
    assert score_answers(echo_judge(), constitution(), items)["summary"] == result["summary"]


def test_revealed_requests_balance_traits_and_positions():
    c = constitution()
    prompts = [f"Question number {i}?" for i in range(6)]
    records = revealed_requests(c, prompts, pairs_per_prompt=1, seed=3)
    keys = trait_keys(c)

    pairs = [(r["trait_a"], r["trait_b"]) for r in records]
    assert len(records) == 6 and all(a != b for a, b in pairs)
    assert set(pairs) == {(a, b) for a in keys for b in keys if a != b}  # every pair, in both orders
    assert Counter(r["trait_a"] for r in records) == Counter(r["trait_b"] for r in records) == Counter(
        {k: 2 for k in keys})
    for r, prompt in zip(records, prompts):
        content = r["conversation"][-1]["content"]
        assert r["prompt"] == prompt and prompt in content
        assert content.index(keys[r["trait_a"]]) < content.index(keys[r["trait_b"]])
        assert (r["trait_a_text"], r["trait_b_text"]) == (keys[r["trait_a"]], keys[r["trait_b"]])

    more = revealed_requests(c, prompts, pairs_per_prompt=4, seed=3)
    assert len(more) == 24
    assert set(Counter((r["trait_a"], r["trait_b"]) for r in more).values()) == {4}
    assert revealed_requests(c, prompts, seed=3) == records
    with pytest.raises(UserError, match="at least two traits"):
        revealed_requests(constitution(TRAITS[:1]), prompts)


def test_judge_revealed_reads_logprobs_before_text_and_retries_unparseable():
    c = constitution()
    records = revealed_requests(c, ["p0", "p1", "p2", "p3"], seed=0)
    answers = ["logprobs say B", "text says B", "junk", "I'm sorry, but I can't answer that."]
    for r, a in zip(records, answers):
        r["answer"], r["condition"] = a, "base"

    def respond(conversation):
        answer = response_of(conversation)
        if answer == "logprobs say B":  # the text says A; the first token's probabilities say B
            return stop("A", first_logprobs={"A": math.log(0.1), " B": math.log(0.9), "The": -6.0})
        if answer == "text says B":
            return stop("(B)")
        return stop("Hmm, hard to say.")

    judge = FakeBackend(respond, "fake/judge")
    out = judge_revealed(judge, records, retries=1)

    assert out[0]["verdict"] == "logprobs" and out[0]["p_a"] == pytest.approx(0.1)
    assert out[0]["winner"] == records[0]["trait_b"]
    assert out[1]["verdict"] == "text" and out[1]["winner"] == records[1]["trait_b"]
    assert out[2]["verdict"] == "unparseable" and out[2]["winner"] is None and out[2]["p_a"] is None
    assert out[3]["verdict"] == "no_answer" and out[3]["winner"] is None  # a refused answer is not judged
    assert [len(call["conversations"]) for call in judge.calls] == [3, 1]  # only the unparseable one again
    assert judge.calls[0]["sampling"].logprobs > 0
    first = judge.calls[0]["conversations"][0][-1]["content"]
    assert first.index(f"Trait A: {records[0]['trait_a_text']}") < first.index(f"Trait B: {records[0]['trait_b_text']}")
    assert "winner" not in records[0]  # the input records are not changed


def test_elo_ranks_the_winner_first_and_is_order_independent():
    traits = ["trait_1", "trait_2", "trait_3"]
    matches = [("trait_1", "trait_2")] * 6 + [("trait_1", "trait_3")] * 6 + [("trait_2", "trait_3"),
                                                                             ("trait_3", "trait_2")] * 3
    ratings = elo_ratings(matches, traits)
    assert ratings["trait_1"] > ratings["trait_2"] and ratings["trait_1"] > ratings["trait_3"]
    assert ratings["trait_2"] == pytest.approx(ratings["trait_3"], abs=3.0)
    assert sum(ratings.values()) == pytest.approx(3 * 1000)  # Elo moves points, never makes them
    assert elo_ratings(list(reversed(matches)), traits) == ratings
    # ties, missing verdicts and unrated traits
    assert elo_ratings(matches + [(None, "trait_1"), ("trait_2", None), ("trait_3", "trait_3")], traits) == ratings
    assert elo_ratings(matches, traits + ["trait_4"])["trait_4"] == 1000
    with pytest.raises(ValueError, match="trait_9"):
        elo_ratings([("trait_9", "trait_1")], traits)


def test_elo_symmetric_results_give_equal_ratings_whatever_the_order():
    traits = ["trait_1", "trait_2"]
    # even results; one (shuffled) order of them leaves a gap by chance, the average over orders closes it
    blocks = [("trait_1", "trait_2")] * 15 + [("trait_2", "trait_1")] * 15
    one = elo_ratings(blocks, traits, orderings=1, seed=1)
    averaged = elo_ratings(blocks, traits, orderings=400)
    assert averaged["trait_1"] == pytest.approx(averaged["trait_2"], abs=4.0)
    assert abs(averaged["trait_1"] - averaged["trait_2"]) < abs(one["trait_1"] - one["trait_2"])


def test_revealed_report_before_and_after():
    def record(a, b, winner, verdict="text"):
        return {"trait_a": a, "trait_b": b, "winner": winner, "verdict": verdict}

    before = [record("trait_1", "trait_2", "trait_1"), record("trait_2", "trait_1", "trait_2"),
              record("trait_1", "trait_3", None, "unparseable"), record("trait_3", "trait_2", None, "no_answer")]
    after = [record("trait_1", "trait_2", "trait_1"), record("trait_2", "trait_1", "trait_1"),
             record("trait_3", "trait_1", "trait_1"), record("trait_1", "trait_3", None, "logprobs")]
    report = revealed_report({"base": before, "adapter": after})

    assert set(report["base"]["elo"]) == set(report["adapter"]["elo"]) == {"trait_1", "trait_2", "trait_3"}
    assert report["base"]["matches"] == 2 and report["base"]["unparseable"] == 1 and report["base"]["no_answer"] == 1
    assert report["base"]["elo"]["trait_1"] == pytest.approx(report["base"]["elo"]["trait_2"], abs=1.0)
    assert report["adapter"]["matches"] == 3 and report["adapter"]["ties"] == 1
    assert max(report["adapter"]["elo"], key=report["adapter"]["elo"].get) == "trait_1"


def test_empty_answers_are_never_sent_to_the_judge_and_are_counted():
    sent = []

    def respond(conversation):
        sent.append(conversation[-1]["content"])
        return stop("70")

    judge = FakeBackend(respond)
    items = [{"condition": "a", "prompt": "Hi?", "answer": "Ahoy there."},
             {"condition": "a", "prompt": "Yo?", "answer": "   "}]
    result = score_answers(judge, constitution(), items)
    assert result["counts"]["empty_answers"] == 1 and all("Yo?" not in t for t in sent)
    assert all(v is None for k, v in result["scores"][1].items() if k not in ("condition", "prompt"))
    assert result["summary"]["a"]["coherence"]["missing"] == 1 and result["summary"]["a"]["coherence"]["mean"] == 70
