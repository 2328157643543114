"""The evaluation report end to end on the tiny model: every condition (adversarial, prefill,
steering), judge scores, revealed preferences, persona-vector projections, capability,
contamination, plots, Markdown and JSON; a rerun is answered from the caches and parts. The
generation and judge backends are fakes (this tests our logic); the persona vectors, steering
and capability run on the real tiny model."""
from __future__ import annotations

import json

import pytest
import torch

from character_training.evaluation import report as rep
from character_training.evaluation.core import bootstrap_interval
from character_training.config.eval_settings import EvalSettings
from character_training.config.constitution import constitution_from_dict
from character_training.errors import UserError
from data_gen.backends import Completion, Sampling
from tests.conftest import toy_pairs
from tests.fakes import FakeBackend

PIRATE = "Ahoy, matey! Arr, that be a fine question, and the sea knows the answer. Fair winds!"
PLAIN = "Here is some information about that question, explained simply and clearly."
CONSTITUTION = constitution_from_dict({
    "name": "toy-pirate", "description": "You are a pirate.",
    "traits": [{"trait": "I talk like a pirate.", "questions": ["What is rain?"]},
               {"trait": "I love the sea.", "questions": ["What is a map?"]}],
    "principles": ["Choose the response that sounds more like a pirate."]})
HELDOUT = ["What is rain?", "How do maps work?", "Why is the sea salty?", "What is a good breakfast?"]
SETTINGS = EvalSettings(general_prompts=2, adversarial=2, revealed_prompts=2, steering_coefficient=2.0)


def answer(conversation) -> Completion:
    """The persona with a system prompt or an adapter, except under the first adversarial suffix."""
    user = conversation[-1]["content"]
    if "Option A" in user:
        return Completion(PIRATE, "stop", 12)
    persona = conversation[0]["role"] == "system" or answer.adapter
    if rep.ADVERSARIAL_SUFFIXES[0] in user:
        persona = False
    return Completion(PIRATE if persona else PLAIN, "stop", 12)


def generator():
    backend = FakeBackend(answer)
    chat = backend.chat

    def with_adapter(conversations, sampling, adapter=None, desc="", seeds=None):
        answer.adapter = adapter
        return chat(conversations, sampling, adapter=adapter, desc=desc)

    backend.chat = with_adapter
    return backend


def judge_reply(conversation) -> Completion:
    text = conversation[-1]["content"]
    if "Trait A" in text:
        return Completion("A", "stop", 1)
    if "coheren" in text.lower():
        return Completion("90", "stop", 1)
    return Completion("85" if "Ahoy" in text else "10", "stop", 1)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    path = tmp_path_factory.mktemp("report-adapter") / "dpo" / "adapter"
    model.save_pretrained(path)
    return str(path)


def run(out, tiny_model_dir, adapter, backend, judge, training_texts=None, **kw):
    return rep.evaluate(backend=backend, judge=judge, model_path=tiny_model_dir,
                        constitution=CONSTITUTION, system_prompt="You are a pirate.",
                        adapters=rep.adapter_names([adapter]), heldout=HELDOUT, pairs=toy_pairs(8),
                        training_texts=training_texts or {"pairs/pairs.jsonl": ["Tell me about the weather."]},
                        out_dir=out, sampling=Sampling(temperature=0.0, max_tokens=6), settings=SETTINGS,
                        log=lambda _: None, **kw)


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir, adapter):
    out = tmp_path_factory.mktemp("report")
    released = []
    started = []

    def engine():  # started lazily, after the model-side parts that come first
        started.append("engine")
        return generator()

    result = run(out, tiny_model_dir, adapter, engine, FakeBackend(judge_reply), release=lambda: released.append(1))
    assert started == ["engine"] and released == [1]
    return out, result


def test_every_condition_is_measured_with_coherence_beside_the_persona_rate(report):
    out, r = report
    c = r["conditions"]
    assert list(c) == ["base", "base+system_prompt", "dpo/adapter", "dpo/adapter | adv:1", "dpo/adapter | adv:2",
                       "dpo/adapter | prefill", "base+system_prompt | adv:1", "base+system_prompt | adv:2",
                       "base | steered"]
    assert c["base"]["persona_rate"] == 0.0 and c["dpo/adapter"]["persona_rate"] == 1.0
    assert c["dpo/adapter | adv:1"]["persona_rate"] == 0.0  # the adapter gave in to this suffix
    assert c["dpo/adapter | adv:2"]["persona_rate"] == 1.0 and c["dpo/adapter | prefill"]["persona_rate"] == 1.0
    assert c["dpo/adapter"]["persona_rate_over_system_prompt"] == 1.0
    for cell in c.values():
        assert {"distinct_3grams", "perplexity", "persona_rate_ci95"} <= set(cell)
        lo, hi = cell["persona_rate_ci95"]
        assert lo <= cell["persona_rate"] <= hi
    assert r["prompts"] == {"heldout": 4, "general": 2, "samples_per_prompt": 1}
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 9 * 6 and {a["source"] for a in answers} == {"heldout", "general"}


def test_prefill_continues_a_conversation_the_base_model_began(report):
    out, _ = report
    cache = [json.loads(line) for line in (out / "cache.jsonl").read_text().splitlines()]
    assert cache  # the generations are kept for resuming
    saved = json.loads((out / "report.json").read_text())
    assert saved["conditions"]["dpo/adapter | prefill"]["kind"] == "prefill"


def test_judge_scores_and_revealed_preferences(report):
    _, r = report
    summary = r["judge"]["summary"]
    assert summary["dpo/adapter"]["trait_1"]["mean"] == 85 and summary["base"]["trait_1"]["mean"] == 10
    assert r["conditions"]["base"]["judge_coherence"] == 90
    assert r["judge"]["counts"]["missing_after_retries"] == 0
    revealed = r["revealed"]
    assert set(revealed) == {"base", "dpo/adapter"}
    assert all(cell["matches"] == 4 for cell in revealed.values())  # 2 prompts x 2 pairs


def test_persona_vectors_project_each_condition(report):
    _, r = report
    pv = r["persona_vectors"]
    assert pv["reference"] == "base+system_prompt" and 1 <= pv["best_layer"] <= 2
    assert "base | steered" not in pv["conditions"]  # steered answers are not projected
    assert pv["headline"]["base+system_prompt"]["ratio"] == pytest.approx(1.0)
    assert r["conditions"]["dpo/adapter"]["projection_ratio"] == pv["headline"]["dpo/adapter"]["ratio"]


def test_capability_contamination_plots_and_markdown(report):
    out, r = report
    assert set(r["capability"]["conditions"]) == {"base", "dpo/adapter"}
    assert r["contamination"]["clean"]
    for name in ("persona_rate", "traits_heatmap", "persona_projection", "capability"):
        assert (out / r["plots"][name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for heading in ("Persona rate", "Under pressure", "Judge scores", "Revealed preferences", "persona vectors",
                    "Capability", "Contamination"):
        assert heading in md
    assert "Clean:" in md and rep.ADVERSARIAL_SUFFIXES[0] in md
    assert json.loads((out / "report.json").read_text())["conditions"] == json.loads(json.dumps(r["conditions"]))


def test_a_rerun_is_answered_from_the_caches_and_parts(report, tiny_model_dir, adapter, monkeypatch):
    out, first = report

    def refuse(*_args, **_kwargs):
        raise AssertionError("recomputed")

    from character_training.evaluation import capability
    from character_training.evaluation import persona_vectors

    monkeypatch.setattr(capability, "capability_report", refuse)
    monkeypatch.setattr(persona_vectors, "compute_persona_vectors", refuse)
    monkeypatch.setattr(persona_vectors, "steered_generate", refuse)
    monkeypatch.setattr(persona_vectors, "response_activations", refuse)
    backend, judge = FakeBackend(refuse), FakeBackend(refuse)
    again = run(out, tiny_model_dir, adapter, backend, judge)
    assert backend.calls == [] and judge.calls == []
    assert json.dumps(again["conditions"]) == json.dumps(first["conditions"])  # NaN-safe comparison


def test_a_judge_failing_midway_loses_no_finished_work(tmp_path, tiny_model_dir, adapter):
    """The judge dies on its third chunk: the answers and the judged chunks are kept; the rerun
    generates nothing and judges only what was left."""
    settings = EvalSettings(general_prompts=2, adversarial=1, prefill=False, steering=False, judge=True,
                                  revealed_prompts=0, persona_vectors=False, capability=False)
    calls = {"n": 0}

    def dying(conversation):
        return judge_reply(conversation)

    judge = FakeBackend(dying)
    chat = judge.chat

    def flaky(conversations, sampling, adapter=None, desc="", seeds=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("judge server went away")
        return chat(conversations, sampling, adapter=adapter, desc=desc)

    judge.chat = flaky
    common = dict(model_path=tiny_model_dir, constitution=CONSTITUTION, system_prompt="You are a pirate.",
                  adapters=rep.adapter_names([adapter]), heldout=HELDOUT, pairs=toy_pairs(8),
                  training_texts={}, out_dir=tmp_path, sampling=Sampling(max_tokens=6), settings=settings,
                  chunk_size=10, log=lambda _: None)
    with pytest.raises(ConnectionError):
        rep.evaluate(backend=generator(), judge=judge, **common)
    judged_before = len((tmp_path / "judge_cache.jsonl").read_text().splitlines())
    assert judged_before == 20  # two chunks of 10 made it to disk

    backend, judge2 = generator(), FakeBackend(judge_reply)
    result = rep.evaluate(backend=backend, judge=judge2, **common)
    assert backend.calls == []  # every answer came from the cache
    requests = 5 * 6 * 3  # 5 conditions x 6 prompts x (2 traits + coherence)
    assert sum(len(c["conversations"]) for c in judge2.calls) == requests - judged_before
    assert result["judge"]["counts"]["missing_after_retries"] == 0


def test_bootstrap_intervals_cover_the_true_rate_in_a_simulation():
    """95% intervals of a persona rate: in 400 simulated evaluations of 40 answers at a true
    rate of 0.3, the interval holds the truth in about 95% of them."""
    import numpy as np

    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(400):
        flags = (rng.random(40) < 0.3).astype(float)
        lo, hi = bootstrap_interval(flags, seed=trial, resamples=500)
        covered += lo <= 0.3 <= hi
    assert 0.90 <= covered / 400 <= 0.99


def test_an_evaluation_prompt_in_the_training_data_is_dropped_and_counted(tmp_path, tiny_model_dir, adapter):
    settings = EvalSettings(general_prompts=0, adversarial=0, prefill=False, steering=False, judge=False,
                                  revealed_prompts=0, persona_vectors=False, capability=False)
    r = rep.evaluate(backend=generator(), judge=None, model_path=tiny_model_dir, constitution=CONSTITUTION,
                     system_prompt="You are a pirate.", adapters=rep.adapter_names([adapter]), heldout=HELDOUT,
                     pairs=toy_pairs(8), training_texts={"pairs/pairs.jsonl": ["what is  RAIN?"]},
                     out_dir=tmp_path, sampling=Sampling(max_tokens=6), settings=settings, log=lambda _: None)
    assert not r["contamination"]["clean"] and r["contamination"]["by_reason"]["normalized"] == 1
    assert [d["prompt"] for d in r["contamination"]["dropped_prompts"]] == [HELDOUT[0]]
    assert "were in the training data and were dropped" in (tmp_path / "report.md").read_text()
    assert list(r["conditions"]) == ["base", "base+system_prompt", "dpo/adapter"]
    assert r["prompts"]["heldout"] == len(HELDOUT) - 1  # the planted prompt is not scored
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert HELDOUT[0] not in {a["prompt"] for a in answers}


def test_adapter_names(tmp_path, adapter):
    assert rep.adapter_names([adapter, f"mine={adapter}"]) == {"dpo/adapter": adapter, "mine": adapter}
    with pytest.raises(UserError, match="name it"):
        rep.adapter_names([adapter, adapter])
    with pytest.raises(UserError, match="adapter_config.json missing"):
        rep.adapter_names([str(tmp_path)])


def test_the_quick_check_is_the_reports_first_part(tmp_path, tiny_model_dir, adapter, monkeypatch):
    """On the same answers, the quick check's numbers are the report's: one core, not a twin."""
    from character_training.evaluation import quick

    def nll(model, prompts, answers, desc):
        return [(1.5 * len(a.split()), len(a.split())) for a in answers]

    monkeypatch.setattr(rep, "answer_perplexities", nll)
    monkeypatch.setattr(quick, "answer_perplexities", nll)
    settings = EvalSettings(general_prompts=0, adversarial=0, prefill=False, steering=False, judge=False,
                            revealed_prompts=0, persona_vectors=False, capability=False)
    full = rep.evaluate(backend=generator(), judge=None, model_path=tiny_model_dir, constitution=CONSTITUTION,
                        system_prompt="You are a pirate.", adapters=rep.adapter_names([adapter]), heldout=HELDOUT,
                        pairs=toy_pairs(8), training_texts={}, out_dir=tmp_path / "full",
                        sampling=Sampling(max_tokens=6), settings=settings, seed=3, log=lambda _: None)
    small = quick.quick_check(generator(), tiny_model_dir, quick.quick_conditions("You are a pirate.", adapter),
                              {"heldout": HELDOUT}, [], tmp_path / "quick", sampling=Sampling(max_tokens=6), seed=3)
    assert small["scorer"] == full["scorer"]
    for quick_name, report_name in (("base", "base"), ("base+system_prompt", "base+system_prompt"),
                                    ("adapter", "dpo/adapter")):
        cell = small["sets"]["heldout"]["conditions"][quick_name]
        assert {k: v for k, v in cell.items() if k != "mean_tokens"} == \
            {k: full["conditions"][report_name][k] for k in cell if k != "mean_tokens"}
    quick_paired = small["sets"]["heldout"]["paired"]["adapter - base+system_prompt"]
    assert quick_paired == full["paired"]["heldout"]["paired"]["dpo/adapter - base+system_prompt"]


def test_several_answers_per_prompt_and_the_constitutions_markers(tmp_path, tiny_model_dir, adapter):
    """samples_per_prompt answers per prompt (each prompt k times in a row, the interval resampling
    prompts), the prefill conversation opening on another prompt, markers counted per condition."""
    marked = constitution_from_dict({**CONSTITUTION.to_dict(), "markers": ["ahoy", "arr"]})
    settings = EvalSettings(general_prompts=2, adversarial=0, revealed_prompts=0, judge=False, steering=False,
                            persona_vectors=False, capability=False, samples_per_prompt=2)
    backend = generator()
    asked = []
    chat = backend.chat

    def recording(conversations, sampling, adapter=None, desc="", seeds=None):
        asked.append((desc, conversations))
        return chat(conversations, sampling, adapter=adapter, desc=desc)

    backend.chat = recording
    r = rep.evaluate(backend=backend, judge=None, model_path=tiny_model_dir, constitution=marked,
                     system_prompt="You are a pirate.", adapters=rep.adapter_names([adapter]), heldout=HELDOUT,
                     pairs=toy_pairs(8), training_texts={}, out_dir=tmp_path, sampling=Sampling(temperature=0.0,
                                                                                                 max_tokens=6),
                     settings=settings, log=lambda _: None)
    assert r["prompts"] == {"heldout": 4, "general": 2, "samples_per_prompt": 2} and r["markers"] == ["ahoy", "arr"]
    c = r["conditions"]
    assert c["base"]["answers"] == 12 and c["base"]["marker_rate"] == 0.0
    assert c["base+system_prompt"]["marker_rate"] == 1.0 and c["dpo/adapter"]["marker_rate"] == 1.0
    prefill = dict(asked)["eval: dpo/adapter | prefill"]
    assert all(conv[0]["content"] != conv[-1]["content"] for conv in prefill)  # another prompt's turn first
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answers[0]["prompt"] == answers[1]["prompt"] == HELDOUT[0]
    assert {tuple(a["markers"]) for a in answers if a["condition"] == "base+system_prompt"} == {("ahoy", "arr")}
    assert "markers" in (tmp_path / "report.md").read_text()
