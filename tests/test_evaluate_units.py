"""Evaluation arithmetic: coherence, intervals, the classifier and the quick check's report,
with a fake backend and classifier (our logic only)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from character_training.evaluation import likelihood
from character_training.evaluation import quick as evaluate
from character_training.evaluation.core import Condition, bootstrap_interval
from character_training.evaluation.quick import format_table, quick_check
from data_gen.backends import Completion
from data_gen.filters import distinct_3gram_share
from tests.conftest import toy_pairs


def test_distinct_3grams_falls_on_repetition():
    assert distinct_3gram_share("the cat sat on the mat today") == 1.0
    looping = "I'm just happy, " * 10
    assert distinct_3gram_share(looping) < 0.2
    assert distinct_3gram_share("two words") == 1.0


def test_bootstrap_interval_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = (rng.random(20) < 0.5).astype(float)
    large = (rng.random(2000) < 0.5).astype(float)
    lo, hi = bootstrap_interval(small)
    assert lo <= small.mean() <= hi
    lo2, hi2 = bootstrap_interval(large)
    assert hi2 - lo2 < hi - lo
    assert bootstrap_interval(np.ones(10)) == (1.0, 1.0)


def test_persona_classifier_separates_styles():
    from data_gen.scoring import PersonaClassifier

    pairs = toy_pairs(10)
    clf = PersonaClassifier()
    info = clf.fit([p["chosen"][0]["content"] for p in pairs], [p["rejected"][0]["content"] for p in pairs])
    assert info["cv_accuracy"] > 0.9
    flags = clf.persona_flags(["Ahoy, matey! Arr, the weather be fine on me ship. Fair winds!",
                               "Here is some information about the weather."])
    assert flags.tolist() == [1.0, 0.0]


class FakeBackend:
    model = "fake"

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        out = []
        for conv in conversations:
            if adapter or conv[0]["role"] == "system":
                out.append(Completion("Ahoy, matey! Arr, that be a fine question. Fair winds!", "stop", 12))
            else:
                out.append(Completion("Here is some information about that question.", "stop", 8))
        return out


class KeywordClassifier:
    """A persona classifier double: "Ahoy" is the persona; records what it was fitted on and scored."""
    fitted: list[list[str]] = []
    scored: list[list[str]] = []

    def fit(self, persona, plain):
        KeywordClassifier.fitted.append(list(persona) + list(plain))
        return {"train_examples": len(persona) + len(plain)}

    def persona_flags(self, texts):
        KeywordClassifier.scored.append(list(texts))
        return np.array([float("Ahoy" in t) for t in texts])


@pytest.fixture
def quick_env(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "answer_perplexities",
                        lambda model, prompts, answers, desc: [(2.0 * len(a.split()), len(a.split())) for a in answers])
    KeywordClassifier.fitted, KeywordClassifier.scored = [], []
    return [Condition("base"), Condition("base+system_prompt", system_prompt="Be a pirate."),
            Condition("adapter", adapter=str(tmp_path))]


def test_quick_check_reports_each_set_and_condition_with_paired_differences(tmp_path, quick_env):
    sets = {"heldout": ["What is rain?", "What is snow?", "What is hail?", "What is fog?"],
            "general": ["How do I boil an egg?", "Write a haiku about a cat on a keyboard."]}
    report = quick_check(FakeBackend(), "fake", quick_env, sets, [], tmp_path / "eval", classifier=KeywordClassifier,
                         samples_per_prompt=2)
    for name in ("heldout", "general"):
        found = report["sets"][name]
        c = found["conditions"]
        assert c["base"]["persona_rate"] == 0.0
        assert c["base+system_prompt"]["persona_rate"] == c["adapter"]["persona_rate"] == 1.0
        assert c["base"]["perplexity"] == pytest.approx(np.exp(2.0))
        assert found["paired"]["adapter - base"]["persona_rate"]["ci95"] == [1.0, 1.0]
        assert found["paired"]["adapter - base+system_prompt"]["persona_rate"]["difference"] == 0.0
        assert found["measurable"] and found["adapter_over_system_prompt"] == 1.0
    assert report["sets"]["general"]["prompts"] == 2
    assert report["scorer"]["heldout_accuracy"] == 1.0
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["sets"]["heldout"]["conditions"] == report["sets"]["heldout"]["conditions"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 6 * 2 and [r["sample"] for r in rows[:3]] == [0, 1, 0]
    assert [r["set"] for r in rows[:12]] == ["heldout"] * 8 + ["general"] * 4
    table = format_table(report)
    assert "[heldout] 4 prompts x 2 answers" in table and "paired differences" in table and "scorer" in table
    with pytest.raises(ValueError, match="samples_per_prompt"):
        quick_check(FakeBackend(), "fake", quick_env, sets, [], tmp_path / "e2", samples_per_prompt=0)


def test_two_adapters_in_one_quick_check_are_compared_with_each_other_as_paired_differences(tmp_path, quick_env):
    class TwoAdapters(FakeBackend):  # the adapter "dpo" (a directory named so) answers plainly
        def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
            plain = adapter is not None and adapter.endswith("dpo")
            return super().chat(conversations, sampling, None if plain else adapter, desc, seeds)

    conditions = evaluate.quick_conditions("Be a pirate.", str(tmp_path / "distill"), {"dpo": str(tmp_path / "dpo")})
    assert [c.name for c in conditions] == ["base", "base+system_prompt", "adapter", "dpo"]
    assert evaluate.comparisons_of(conditions) == [
        ("adapter", "base+system_prompt"), ("adapter", "base"), ("base+system_prompt", "base"),
        ("dpo", "base+system_prompt"), ("dpo", "base"), ("adapter", "dpo")]
    assert evaluate.comparisons_of(conditions[:3]) == evaluate.comparisons_of(quick_env)  # one adapter: as before
    report = quick_check(TwoAdapters(), "fake", conditions, {"heldout": ["What is rain?", "What is snow?",
                                                                         "What is hail?", "What is fog?"]},
                         [], tmp_path / "eval", classifier=KeywordClassifier)
    paired = report["sets"]["heldout"]["paired"]
    assert paired["adapter - dpo"]["persona_rate"]["difference"] == 1.0
    assert paired["dpo - base"]["persona_rate"]["ci95"] == [0.0, 0.0]
    assert "adapter - dpo" in format_table(report)
    with pytest.raises(ValueError, match="'adapter' is taken"):
        evaluate.quick_conditions("Be a pirate.", "a", {"adapter": "b"})


def test_the_scorer_never_sees_the_answers_it_scores_nor_any_training_pair(tmp_path, quick_env):
    prompts = [f"Question number {i} about the weather?" for i in range(6)]
    quick_check(FakeBackend(), "fake", quick_env, {"heldout": prompts}, [], tmp_path / "eval",
                classifier=KeywordClassifier)
    assert len(KeywordClassifier.fitted) == 2  # one classifier a fold of prompts
    rows = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    # Each fold's classifier was fitted on the other fold's base and system-prompted answers: 3 prompts x 2.
    assert [len(f) for f in KeywordClassifier.fitted] == [6, 6]
    pair_texts = {t for p in toy_pairs(10) for t in (p["chosen"][-1]["content"], p["rejected"][-1]["content"])}
    assert not pair_texts & {t for f in KeywordClassifier.fitted for t in f}
    assert {r["condition"] for r in rows} == {"base", "base+system_prompt", "adapter"}


def test_a_contaminated_heldout_prompt_is_dropped_and_counted(tmp_path, quick_env):
    training = ["How do I learn to sail a small boat on a lake in the summer?", "What is a good hobby?"]
    sets = {"heldout": ["What is rain?", "how do I learn to sail a small boat on a lake in the summer",
                        "What is snow?"], "general": ["Explain how vaccines train the immune system."]}
    report = quick_check(FakeBackend(), "fake", quick_env, sets, training, tmp_path / "eval",
                         classifier=KeywordClassifier)
    assert report["contamination"]["heldout"]["dropped"] == 1
    assert report["contamination"]["heldout"]["dropped_prompts"][0]["reason"] == "normalized"
    assert report["sets"]["heldout"]["prompts"] == 2
    rows = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert not any("sail" in r["prompt"] for r in rows)
    assert "heldout 1 dropped of 3" in format_table(report)


def test_a_scorer_that_does_not_separate_base_from_the_system_prompt_prints_no_ratio(tmp_path, quick_env):
    class Plain(FakeBackend):
        def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
            return [Completion("Ahoy, matey! Arr." if adapter else "Here is some information.", "stop", 4)
                    for _ in conversations]

    report = quick_check(Plain(), "fake", quick_env, {"heldout": ["a b c d?", "e f g h?", "i j k l?"]}, [],
                         tmp_path / "eval", classifier=KeywordClassifier)
    found = report["sets"]["heldout"]
    assert found["measurable"] is False and "adapter_over_system_prompt" not in found
    assert "not measurable" in format_table(report)


def test_batched_perplexities_match_scoring_each_answer_alone(tiny_model_dir):
    import torch
    from transformers import AutoTokenizer

    prompts = ["What is rain?", "Tell me about the sea, please, in some detail.", "Hi", "Why?"]
    answers = ["Rain is water falling from clouds.", "Arr, the sea be wide and deep and full of fish, matey!",
               "", "Because."]
    batched = likelihood.answer_perplexities(tiny_model_dir, prompts, answers, desc="test", batch_size=3)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = likelihood.base_lm(tiny_model_dir)
    for prompt, answer, (nll, n) in zip(prompts, answers, batched):
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
        assert n == len(answer_ids)
        if not answer_ids:
            assert nll == 0.0
            continue
        with torch.no_grad():
            logits = model(torch.tensor([head_ids + answer_ids])).logits[0, len(head_ids) - 1:-1].float()
        alone = float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer_ids), reduction="sum"))
        assert nll == pytest.approx(alone, rel=1e-4, abs=1e-4)
