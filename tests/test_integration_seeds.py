"""Per-request seeds on the real vLLM CPU engine (prefix caching on, LoRA on): an answer depends
on its own request only, not on the batch, the order, the requests beside it or a resume; and
the same user message and sample get the same draws under every condition (common random
numbers: a LoRA whose update is zero answers exactly as the base model)."""
from __future__ import annotations

import json

import pytest

from data_gen.backends import Sampling
from data_gen.cache import CachedBackend

pytestmark = pytest.mark.integration

SYSTEM = {"role": "system", "content": "You are Captain Marlow, an old sea captain who speaks in nautical terms. " * 8}
QUESTIONS = ["What is rain?", "How do I bake bread?", "Tell me about cats.", "Why is the sky blue?",
             "What is a good hobby?", "How do I learn Python?"]
# With a shared system prompt (prefix caching serves its blocks) and without.
CONVERSATIONS = [[{"role": "user", "content": q}] for q in QUESTIONS] + [[SYSTEM, {"role": "user", "content": q}]
                                                                         for q in QUESTIONS]
SAMPLING = Sampling(temperature=1.0, max_tokens=40)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, default_model_dir):
    """Two LoRA adapters of the default model: one whose update is zero (PEFT's own init, B = 0),
    one with random nonzero factors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("seed-adapters")
    paths = {}
    for name in ("zero", "random"):
        model = AutoModelForCausalLM.from_pretrained(default_model_dir)
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        if name == "random":
            torch.manual_seed(0)
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.02)
        peft.save_pretrained(out / name)
        paths[name] = str(out / name)
    return paths


@pytest.fixture(scope="module")
def engine(default_model_dir):
    from data_gen.backends import VLLMBackend

    backend = VLLMBackend(default_model_dir, seed=0, max_model_len=1024, kv_cache_gib=1, enable_lora=True,
                          max_lora_rank=8)
    yield backend
    backend.close()


def texts(completions) -> list[str]:
    return [c.text for c in completions]


def test_an_answer_does_not_depend_on_batch_order_neighbours_or_adapter_beside_it(engine, adapters):
    batch = texts(engine.chat(CONVERSATIONS, SAMPLING, desc=""))
    assert len(set(batch)) > len(batch) // 2, "sampled answers should differ between prompts"
    assert texts(engine.chat(CONVERSATIONS[::-1], SAMPLING, desc=""))[::-1] == batch
    alone = [engine.chat([c], SAMPLING, desc="")[0].text for c in CONVERSATIONS[::3]]
    assert alone == batch[::3]
    # Another stage's requests before, between and after them in one call.
    other = [[{"role": "user", "content": f"Write a long story about the number {i}."}] for i in range(6)]
    mixed = texts(engine.chat(other[:3] + CONVERSATIONS + other[3:], SAMPLING, desc=""))
    assert mixed[3:3 + len(CONVERSATIONS)] == batch
    # ... and with an adapter's requests in flight beside them (two calls, the engine reused).
    engine.chat(other, SAMPLING, adapter=adapters["random"], desc="")
    assert texts(engine.chat(CONVERSATIONS, SAMPLING, desc="")) == batch


def test_adapter_answers_are_batch_independent_and_a_zero_update_answers_as_the_base(engine, adapters):
    plain = [c for c in CONVERSATIONS if c[0]["role"] != "system"]
    base = texts(engine.chat(plain, SAMPLING, desc=""))
    # Common random numbers: the same user message and sample, the same seed under every condition.
    assert texts(engine.chat(plain, SAMPLING, adapter=adapters["zero"], desc="")) == base
    lora = texts(engine.chat(plain, SAMPLING, adapter=adapters["random"], desc=""))
    assert lora != base
    assert [engine.chat([c], SAMPLING, adapter=adapters["random"], desc="")[0].text for c in plain[:2]] == lora[:2]


def test_samples_of_one_request_differ_and_repeat_in_order(engine):
    twice = [CONVERSATIONS[0]] * 3
    first = texts(engine.chat(twice, SAMPLING, desc=""))
    assert len(set(first)) > 1  # best-of-n: the n-th sample has its own seed
    assert texts(engine.chat(twice, SAMPLING, desc="")) == first


def test_a_resumed_cache_gives_the_answers_of_an_uninterrupted_run(engine, tmp_path):
    whole = CachedBackend(engine, tmp_path / "whole.jsonl", chunk_size=5)
    expected = texts(whole.chat(CONVERSATIONS, SAMPLING, desc=""))
    # A run killed after its first chunk: the cache holds 5 answers; the next run makes the rest
    # in another chunking, beside other requests it did not make before.
    lines = (tmp_path / "whole.jsonl").read_text().splitlines()
    (tmp_path / "killed.jsonl").write_text("\n".join(lines[:5]) + "\n")
    resumed = CachedBackend(engine, tmp_path / "killed.jsonl", chunk_size=3)
    assert texts(resumed.chat(CONVERSATIONS, SAMPLING, desc="")) == expected
    assert resumed.stats()["cache_hits"] == 5
    keys = [json.loads(line)["key"] for line in (tmp_path / "killed.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len(CONVERSATIONS)
