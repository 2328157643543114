"""The evaluation core: one set of surface metrics for the quick check and the report, and one
log-likelihood scorer that returns exactly (bit for bit) what the three scorers it replaced
returned, so that published perplexities do not move."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from character_training.evaluation import capability, likelihood
from character_training.evaluation.core import Condition, bootstrap_interval, surface_metrics

PROMPTS = ["What is rain?", "Tell me about the sea, please, in some detail.", "Hi", "Why?", "Name a colour.",
           "How do ships float on water when they are made of steel?", "Count to three.", "Say ahoy.",
           "What is a map?", "Describe bread."]
ANSWERS = ["Rain is water falling from clouds.", "Arr, the sea be wide and deep and full of fish, matey!", "",
           "Because.", "Blue.", "Ships push aside their own weight of water; the hull's air makes them light " * 3,
           "One, two, three.", "Ahoy!", "", "Bread is flour, water, salt and yeast, baked."]


def _old_answer_perplexities(model, tok, prompts, answers, batch_size=8):
    """The quick check's scorer before the evaluation core (character_training/evaluate.py)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = []
    for prompt, answer in zip(prompts, answers):
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        rows.append((tok(head, add_special_tokens=False)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]))
    out = [(0.0, 0)] * len(rows)
    order = sorted((i for i, (_, a) in enumerate(rows) if a), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs = [rows[i][0] + rows[i][1] for i in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq in seqs])
        with torch.no_grad():
            logits = model(ids).logits.float()
        for row, i in enumerate(chunk):
            head_ids, answer_ids = rows[i]
            scored = logits[row, len(head_ids) - 1:len(head_ids) + len(answer_ids) - 1]
            nll = torch.nn.functional.cross_entropy(scored, torch.tensor(answer_ids), reduction="sum")
            out[i] = (float(nll), len(answer_ids))
    return out


def _old_continuation_logprobs(model, tokenizer, requests, batch_size=8):
    """The capability check's scorer before the evaluation core (character_training/capability.py)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    scores = [(0.0, 0)] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        seqs = [requests[i][0] + requests[i][1] for i in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        scored = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
        for row, (i, seq) in enumerate(zip(batch, seqs)):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            scored[row, len(requests[i][0]) - 1:len(seq) - 1] = True
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        logprob = -(nll * scored).sum(dim=1)
        for row, i in enumerate(batch):
            scores[i] = (float(logprob[row]), len(requests[i][1]))
    return scores


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoTokenizer

    return likelihood.base_lm(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_answer_perplexities_are_bit_for_bit_the_quick_checks_old_values(tiny_model_dir, tiny, batch_size):
    model, tok = tiny
    new = likelihood.answer_perplexities(tiny_model_dir, PROMPTS, ANSWERS, desc="test", batch_size=batch_size)
    assert new == _old_answer_perplexities(model, tok, PROMPTS, ANSWERS, batch_size=batch_size)
    assert [n for _, n in new].count(0) == 2 and all(v > 0 for v, n in new if n)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_capability_scores_are_bit_for_bit_the_old_values(tiny, batch_size):
    model, tok = tiny
    bos = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    requests = [(bos + tok(p, add_special_tokens=False)["input_ids"], tok(" " + a, add_special_tokens=False)["input_ids"])
                for p, a in zip(PROMPTS, ANSWERS)]
    new = capability.continuation_logprobs(model, tok, requests, batch_size=batch_size)
    assert new == _old_continuation_logprobs(model, tok, requests, batch_size=batch_size)


def test_the_scorer_gives_each_request_its_own_score_whatever_the_batch(tiny):
    model, tok = tiny
    requests = [(tok(p, add_special_tokens=False)["input_ids"], tok(a, add_special_tokens=False)["input_ids"])
                for p, a in zip(PROMPTS, ANSWERS)]
    pad = likelihood.pad_id_of(tok, fallback=0)
    alone = [likelihood.continuation_nll(model, [r], pad_id=pad)[0] for r in requests]
    for batching in (likelihood.ANSWERS, likelihood.TEXTS,
                     likelihood.Batching(longest_first=True, attention_mask=False, whole_batch=False)):
        batched = likelihood.continuation_nll(model, requests, pad_id=pad, batch_size=4, batching=batching)
        assert [n for _, n in batched] == [n for _, n in alone]
        assert [v for v, _ in batched] == pytest.approx([v for v, _ in alone], rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="non-empty context"):
        likelihood.continuation_nll(model, [([], [1, 2])], pad_id=pad)


def test_pad_batch_right_and_left():
    ids, mask = likelihood.pad_batch([[1, 2, 3], [4]], pad_id=0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = likelihood.pad_batch([[1, 2, 3], [4]], pad_id=9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_an_empty_answer_is_counted_not_scored_as_perfectly_varied():
    texts = ["the cat sat on the mat the cat sat on the mat", ""]
    m = surface_metrics(texts, np.array([1.0, 0.0]), [(6.0, 3), (0.0, 0)], [True, False], seed=0)
    assert m["empty"] == 1 and m["answers"] == 2 and m["unfinished"] == 1
    assert m["distinct_3grams"] == pytest.approx(6 / 10)  # the spoken answer only; "" would have scored 1.0
    assert m["perplexity"] == pytest.approx(math.exp(2.0)) and m["persona_rate"] == 0.5
    nothing = surface_metrics(["", ""], np.array([0.0, 0.0]), [(0.0, 0), (0.0, 0)], [True, True], seed=0)
    assert math.isnan(nothing["distinct_3grams"]) and math.isnan(nothing["perplexity"]) and nothing["empty"] == 2


def test_several_answers_per_prompt_resample_prompts():
    flags = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # 3 prompts x 2 answers
    m = surface_metrics(["a b c d"] * 6, flags, [(1.0, 1)] * 6, [True] * 6, seed=3, samples_per_prompt=2)
    assert m["persona_rate_ci95"] == list(bootstrap_interval(np.array([1.0, 0.0, 0.5]), seed=3))
    one = surface_metrics(["a b c d"] * 6, flags, [(1.0, 1)] * 6, [True] * 6, seed=3)
    assert one["persona_rate_ci95"] == list(bootstrap_interval(flags, seed=3))  # one answer each: the flags


def test_condition_conversation():
    assert Condition("b").conversation("hi") == [{"role": "user", "content": "hi"}]
    c = Condition("x", system_prompt="Be a pirate.", suffix="Answer plainly.")
    assert c.conversation("hi") == [{"role": "system", "content": "Be a pirate."},
                                    {"role": "user", "content": "hi\n\nAnswer plainly."}]


def test_a_kept_part_is_reused_while_its_key_and_the_file_it_needs_hold(tmp_path):
    from character_training.evaluation.core import forget_stale, kept_part

    calls = []

    def compute(value):
        def run():
            calls.append(value)
            (tmp_path / "tensors").write_text("t")
            return {"v": value}
        return run

    assert kept_part(tmp_path, "x", "k1", compute(1), needs=tmp_path / "tensors") == {"v": 1}
    assert kept_part(tmp_path, "x", "k1", compute(2), needs=tmp_path / "tensors") == {"v": 1}  # reused
    assert kept_part(tmp_path, "x", "k2", compute(3)) == {"v": 3}                               # another key
    (tmp_path / "tensors").unlink()
    assert kept_part(tmp_path, "x", "k2", compute(4), needs=tmp_path / "tensors") == {"v": 4}  # its file is gone
    assert calls == [1, 3, 4]

    (tmp_path / "cache.jsonl").write_text("{}\n")
    logged = []
    forget_stale(tmp_path, {"model": "m"}, ("cache.jsonl",), "changed", logged.append)
    assert (tmp_path / "cache.jsonl").is_file() and (tmp_path / "parts" / "x.json").is_file() and not logged
    forget_stale(tmp_path, {"model": "other"}, ("cache.jsonl",), "changed", logged.append)
    assert logged == ["changed"] and not (tmp_path / "cache.jsonl").exists()
    assert not (tmp_path / "parts" / "x.json").exists() and (tmp_path / "parts" / "inputs.json").is_file()
