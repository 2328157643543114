"""Capability check on a tiny random Llama: perplexity and multiple-choice scores against
log-likelihoods computed by hand one text at a time, base vs random LoRA adapters,
contamination on planted matches, and the shipped data sets."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from character_training.evaluation import capability as cap
from character_training.adapters.algebra import one_thread
from character_training.errors import UserError
from data_gen.store import write_jsonl


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # the model is tiny; on a busy machine threads mostly wait on each other
        yield


def _load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def _logprob(model, context: list[int], continuation: list[int]) -> float:
    """Summed log-probability of ``continuation`` after ``context``, one unpadded sequence."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(context) + k - 1, t]) for k, t in enumerate(continuation))


TEXTS = ["The cat sat on the mat.",
         "Bread is one of the oldest prepared foods, made from flour, water and usually salt and a "
         "leavening agent such as yeast, which ferments sugars and makes the dough rise."]


def test_perplexity_is_exp_of_the_token_weighted_mean_nll_with_padding(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert len(ids[0]) < len(ids[1]) // 2  # one batch, the short text heavily padded
    nll = -sum(_logprob(model, [tok.bos_token_id], i) for i in ids)
    tokens = sum(len(i) for i in ids)

    result = cap.text_perplexity(model, tok, TEXTS, batch_size=8)
    assert result["tokens"] == tokens
    assert result["nll"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert cap.text_perplexity(model, tok, TEXTS, batch_size=1)["perplexity"] == pytest.approx(result["perplexity"], rel=1e-5)


def test_multiple_choice_picks_the_most_likely_choice_raw_and_length_normalized(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    question, choices = "What is the capital of France?", ["Paris", "Lyon on the Rhone river", "Nice", "a"]
    context = [tok.bos_token_id] + tok(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
    raw = [_logprob(model, context, tok(" " + c, add_special_tokens=False)["input_ids"]) for c in choices]
    normed = [lp / len(" " + c) for lp, c in zip(raw, choices)]
    best_raw, best_norm = raw.index(max(raw)), normed.index(max(normed))
    wrong = next(i for i in range(4) if i not in (best_raw, best_norm))
    items = [{"question": question, "choices": choices, "answer": a, "subject": s}
             for a, s in [(best_raw, "geography"), (best_norm, "geography"), (wrong, "other")]]

    result = cap.multiple_choice_accuracy(model, tok, items, batch_size=3)
    agree = float(best_raw == best_norm)
    assert result["n"] == 3
    assert result["accuracy"] == pytest.approx((1 + agree) / 3)
    assert result["accuracy_norm"] == pytest.approx((agree + 1) / 3)
    assert result["per_subject"]["other"] == {"accuracy": 0.0, "n": 1}
    assert result["per_subject"]["geography"]["n"] == 2
    lo, hi = result["ci95"]
    assert 0.0 <= lo <= result["accuracy"] <= hi <= 1.0

    with pytest.raises(UserError, match="not an index"):
        cap.multiple_choice_accuracy(model, tok, [{**items[0], "answer": 4}])


def _random_lora(model_dir, out, *, zero: bool = False) -> str:
    from peft import LoraConfig, get_peft_model

    model, _ = _load(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.zeros_like(param) if zero else torch.randn_like(param) * 0.5
    peft_model.save_pretrained(out)
    return str(out)


def test_capability_report_scores_base_and_each_adapter(tiny_model_dir, tmp_path):
    persona = _random_lora(tiny_model_dir, tmp_path / "persona")
    noop = _random_lora(tiny_model_dir, tmp_path / "noop", zero=True)  # B = 0: the base model exactly
    mc = cap.load_multiple_choice()[:3]
    report = cap.capability_report(tiny_model_dir, {"persona": persona, "noop": noop}, texts=TEXTS, mc=mc)

    model, tok = _load(tiny_model_dir)
    fresh = cap.text_perplexity(model, tok, TEXTS)["perplexity"]
    conditions = report["conditions"]
    assert list(conditions) == ["base", "persona", "noop"]
    assert conditions["base"]["text"]["perplexity"] == pytest.approx(fresh, rel=1e-5)
    assert conditions["noop"]["text"]["perplexity"] == pytest.approx(fresh, rel=1e-5)
    assert abs(conditions["persona"]["text"]["perplexity"] - fresh) > 1e-3 * fresh
    delta = report["deltas"]["persona"]
    assert delta["perplexity"] == pytest.approx(conditions["persona"]["text"]["perplexity"] - fresh, rel=1e-4)
    assert delta["accuracy"] == (conditions["persona"]["multiple_choice"]["accuracy"]
                                 - conditions["base"]["multiple_choice"]["accuracy"])
    assert report["texts"] == 2 and report["questions"] == 3

    with pytest.raises(UserError, match="taken by the base model"):
        cap.capability_report(tiny_model_dir, {"base": persona}, texts=TEXTS, mc=mc)
    with pytest.raises(UserError, match="adapter_config.json missing"):
        cap.capability_report(tiny_model_dir, {"x": str(tmp_path)}, texts=TEXTS[:1], mc=mc[:1])


def test_the_shipped_prompts_are_clean_against_the_shipped_text_and_a_planted_one_is_not():
    from character_training.evaluation.contamination import check_contamination

    training = [t["text"] for t in cap.load_neutral_text()] + ["What is the quickest way to defrost frozen chicken safely?"]
    general = [p["prompt"] for p in cap.load_general_prompts()]
    planted = "  what is the QUICKEST way to\tdefrost frozen chicken   safely"
    found = check_contamination(general + [planted], training)
    assert [d["prompt"] for d in found.dropped] == [planted]
    assert len(general) >= 200 and len(set(general)) == len(general)
    assert cap.general_prompts(12) == [next(p["prompt"] for p in cap.load_general_prompts() if p["category"] == c)
                                      for c in dict.fromkeys(p["category"] for p in cap.load_general_prompts())]


def test_training_texts_of_run_reads_every_training_file(tmp_path):
    def chat(user, assistant):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}

    (tmp_path / "prompts").mkdir()
    write_jsonl(tmp_path / "prompts" / "prompts.jsonl", [
        {"prompt": "train q", "trait": "t", "split": "train", "source": "seed"},
        {"prompt": "heldout q", "trait": "t", "split": "heldout", "source": "generated"}])
    (tmp_path / "pairs").mkdir()
    write_jsonl(tmp_path / "pairs" / "pairs.jsonl", [{
        "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "pair q"}],
        "chosen": [{"role": "assistant", "content": "chosen a"}],
        "rejected": [{"role": "assistant", "content": "rejected a"}]}])
    (tmp_path / "critique").mkdir()
    write_jsonl(tmp_path / "critique" / "sft.jsonl", [chat("sft q", "sft a")])
    (tmp_path / "reflection").mkdir()
    write_jsonl(tmp_path / "reflection" / "reflection.jsonl", [chat("reflect q", "reflect a")])
    (tmp_path / "interaction").mkdir()
    write_jsonl(tmp_path / "interaction" / "interaction.jsonl", [chat("hi", "hello"), chat("and you?", "fine")])
    (tmp_path / "sdf").mkdir()
    write_jsonl(tmp_path / "sdf" / "documents.jsonl", [{"text": "a document", "type": "memo"}])
    (tmp_path / "sdf" / "dropped.jsonl").write_text(json.dumps({"text": "dropped"}) + "\n")

    assert cap.training_texts_of_run(tmp_path) == {
        "pairs/pairs.jsonl": ["pair q"],
        "critique/sft.jsonl": ["sft q", "sft a"],
        "reflection/reflection.jsonl": ["reflect q", "reflect a"],
        "interaction/interaction.jsonl": ["hi", "hello", "and you?", "fine"],
        "sdf/documents.jsonl": ["a document"],
        "prompts/prompts.jsonl": ["train q"],
    }
    (tmp_path / "empty").mkdir()
    assert cap.training_texts_of_run(tmp_path / "empty") == {}
    with pytest.raises(UserError, match="no such run directory"):
        cap.training_texts_of_run(tmp_path / "missing")


def test_run_lm_eval_without_the_harness_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UserError, match="pip install lm-eval") as info:
        cap.run_lm_eval("some/model", None, ["hellaswag"])
    assert "HF_DATASETS_OFFLINE" in str(info.value)


def test_shipped_data_sets_load_with_documented_counts_and_fields():
    prompts = cap.load_general_prompts()
    assert len(prompts) == 247 and len({p["prompt"] for p in prompts}) == 247
    assert len({p["category"] for p in prompts}) == 12

    texts = cap.load_neutral_text()
    assert len(texts) == 30 and len({t["topic"] for t in texts}) == 30
    assert all(set(t) == {"text", "topic"} and 80 <= len(t["text"].split()) <= 150 for t in texts)

    mc = cap.load_multiple_choice()
    assert len(mc) == 40
    for item in mc:
        assert set(item) == {"question", "choices", "answer", "subject"}
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert isinstance(item["answer"], int) and 0 <= item["answer"] < 4
