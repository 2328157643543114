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
from data_gen.store import write_jsonl
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

    def chat(self, conversations, sampling, adapter=None, desc=""):
        out = []
        for conv in conversations:
            if adapter or conv[0]["role"] == "system":
                out.append(Completion("Ahoy, matey! Arr, that be a fine question. Fair winds!", "stop", 12))
            else:
                out.append(Completion("Here is some information about that question.", "stop", 8))
        return out


def test_quick_check_reports_each_condition(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(10))
    monkeypatch.setattr(evaluate, "answer_perplexities",
                        lambda model, prompts, answers, desc: [(2.0 * len(a.split()), len(a.split())) for a in answers])
    conditions = [Condition("base"), Condition("base+system_prompt", system_prompt="Be a pirate."),
                  Condition("adapter", adapter=str(tmp_path))]
    report = quick_check(FakeBackend(), "fake", conditions, ["What is rain?", "What is snow?"],
                         tmp_path / "pairs.jsonl", tmp_path / "eval")
    c = report["conditions"]
    assert c["base"]["persona_rate"] == 0.0
    assert c["base+system_prompt"]["persona_rate"] == c["adapter"]["persona_rate"] == 1.0
    assert report["adapter_over_system_prompt"] == 1.0
    assert c["base"]["perplexity"] == pytest.approx(np.exp(2.0))
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["conditions"] == c
    assert len((tmp_path / "eval" / "answers.jsonl").read_text().splitlines()) == 6
    table = format_table(report)
    assert "persona rate" in table and "adapter" in table and "perplexity" in table


def test_quick_check_samples_each_prompt_several_times_and_resamples_prompts(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(10))
    monkeypatch.setattr(evaluate, "answer_perplexities",
                        lambda model, prompts, answers, desc: [(2.0 * len(a.split()), len(a.split())) for a in answers])
    backend = FakeBackend()
    report = quick_check(backend, "fake", [Condition("base"), Condition("adapter", adapter=str(tmp_path))],
                         ["What is rain?", "What is snow?", "What is hail?"], tmp_path / "pairs.jsonl",
                         tmp_path / "eval", samples_per_prompt=3)
    assert report["samples_per_prompt"] == 3 and report["heldout_prompts"] == 3
    assert report["conditions"]["base"]["answers"] == 9
    rows = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and [r["sample"] for r in rows[:4]] == [0, 1, 2, 0]
    assert [r["prompt"] for r in rows[:9]] == ["What is rain?"] * 3 + ["What is snow?"] * 3 + ["What is hail?"] * 3
    assert "3 held-out prompts x 3 answers" in format_table(report)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        quick_check(backend, "fake", [Condition("base")], ["x"], tmp_path / "pairs.jsonl", tmp_path / "e2",
                    samples_per_prompt=0)


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
