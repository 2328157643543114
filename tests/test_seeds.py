"""Per-request seeds (data_gen/seeds.py) and how the cache hands them to a backend. The real
engine's side of it is in test_integration_seeds.py."""
from __future__ import annotations

from data_gen.backends import Completion, Sampling
from data_gen.cache import CachedBackend
from data_gen.seeds import request_seed, seeds_for

SYSTEM = {"role": "system", "content": "You are Captain Marlow."}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class SeedRecorder:
    model, seed = "fake/model", 5

    def __init__(self):
        self.seeds: dict[str, list[int]] = {}

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        for c, s in zip(conversations, seeds):
            self.seeds.setdefault(c[-1]["content"], []).append(s)
        return [Completion(f"{c[-1]['content']}|{s}", "stop", 1) for c, s in zip(conversations, seeds)]


def test_every_condition_gets_the_same_seed_for_a_prompt_and_sample():
    prompts = ["What is rain?", "What is rain?", "Why?"]  # a prompt asked twice: samples 1 and 2
    base = seeds_for(0, [user(p) for p in prompts])
    prompted = seeds_for(0, [[SYSTEM] + user(p) for p in prompts])
    adapter = seeds_for(0, [user(p) for p in prompts], adapter="runs/demo/distill/adapter")
    assert base == prompted == adapter
    assert base[0] != base[1]                        # the second sample is another draw
    assert seeds_for(1, [user(p) for p in prompts]) != base  # the run's seed moves every draw
    assert all(0 <= s < 2 ** 31 for s in base)


def test_a_seed_does_not_depend_on_order_or_neighbours():
    convs = [user(f"question {i}") for i in range(6)]
    seeds = seeds_for(0, convs)
    assert seeds_for(0, convs[::-1])[::-1] == seeds
    assert seeds_for(0, [user("other")] + convs)[1:] == seeds
    assert [seeds_for(0, [c])[0] for c in convs] == seeds
    assert seeds[2] == request_seed(0, convs[2], 1)


def test_the_cache_seeds_each_sample_by_its_occurrence_in_the_stage_and_keeps_them_on_resume(tmp_path):
    backend = SeedRecorder()
    cached = CachedBackend(backend, tmp_path / "cache.jsonl", chunk_size=2)
    first = cached.chat([user("a"), user("b")], Sampling(), desc="")
    second = cached.chat([user("a")], Sampling(), desc="")  # the second sample of "a", in a later call
    assert backend.seeds == {"a": [request_seed(5, user("a"), 1), request_seed(5, user("a"), 2)],
                             "b": [request_seed(5, user("b"), 1)]}
    # Resumed after the first call: the second sample of "a" gets the seed it got before.
    (tmp_path / "cache.jsonl").write_text("".join((tmp_path / "cache.jsonl").read_text().splitlines(True)[:2]))
    again = SeedRecorder()
    resumed = CachedBackend(again, tmp_path / "cache.jsonl")
    assert resumed.chat([user("a"), user("b")], Sampling(), desc="") == first
    assert resumed.chat([user("a")], Sampling(), desc="") == second
    assert again.seeds == {"a": [request_seed(5, user("a"), 2)]}


def test_a_training_stage_initializes_its_lora_the_same_on_every_run(tiny_model_dir, tmp_path):
    """The LoRA's random init comes before the Trainer seeds itself: make_config seeds it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from character_training.config import trainer_fields as common
    from character_training.config.training import LoraSettings

    def lora_a(seed):
        common.make_config("sft", {}, {}, tmp_path / "out", seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               common.peft_config(LoraSettings(r=4, alpha=8, target_modules=["q_proj"])))
        torch.rand(1)  # whatever ran before in the process does not matter: the seed is set again
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])

    torch.manual_seed(123)
    first = lora_a(7)
    torch.manual_seed(456)
    assert torch.equal(first, lora_a(7))
    assert not torch.equal(first, lora_a(8))
