"""The generation cache: a stage killed mid-generation resumes with nothing lost or duplicated."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from character_training.config.layout import clear_stage_dir
from data_gen.backends import Completion, Sampling
from data_gen.cache import CACHE_FILE, CachedBackend, request_key
from data_gen.stages.prompts import ExpandSettings, expand_prompts

SAMPLING = Sampling(temperature=0.7, max_tokens=32)


class CountingBackend:
    """Answers each request with its content and how many times that content was asked before
    (as a sampler would give a new sample); can crash after ``fail_after`` batches."""

    def __init__(self, fail_after: int | None = None, model: str = "fake/model"):
        self.model = model
        self.fail_after = fail_after
        self.batches: list[int] = []
        self.seen: dict[str, int] = {}

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.batches.append(len(conversations))
        out = []
        for c in conversations:
            text = c[-1]["content"]
            self.seen[text] = self.seen.get(text, 0) + 1
            out.append(Completion(text=f"{text} #{self.seen[text]}", finish_reason="stop", num_tokens=3))
        return out


def convs(*texts):
    return [[{"role": "user", "content": t}] for t in texts]


def test_repeated_requests_are_distinct_samples_and_are_replayed_from_disk(tmp_path):
    path = tmp_path / CACHE_FILE
    first = CachedBackend(CountingBackend(), path)
    answers = [c.text for c in first.chat(convs("a", "a", "b"), SAMPLING)]
    assert answers == ["a #1", "a #2", "b #1"]

    inner = CountingBackend()
    again = CachedBackend(inner, path)
    assert [c.text for c in again.chat(convs("a", "a", "b"), SAMPLING)] == answers
    assert inner.batches == [] and again.stats()["cache_hits"] == 3
    # A third 'a' is a new sample; other sampling settings are other requests.
    assert again.chat(convs("a"), SAMPLING)[0].text == "a #1" and inner.batches == [1]
    assert again.chat(convs("b"), Sampling(temperature=0.1))[0].text == "b #1" and inner.batches == [1, 1]


def test_kill_mid_generation_then_resume_loses_and_duplicates_nothing(tmp_path):
    requests = convs(*[f"q{i}" for i in range(10)])
    path = tmp_path / CACHE_FILE
    killed = CachedBackend(CountingBackend(fail_after=2), path, chunk_size=3)
    with pytest.raises(KeyboardInterrupt):
        killed.chat(requests, SAMPLING)
    assert len(path.read_text().splitlines()) == 6  # two chunks made it to disk

    inner = CountingBackend()
    resumed = CachedBackend(inner, path, chunk_size=3)
    answers = [c.text for c in resumed.chat(requests, SAMPLING)]
    assert answers == [f"q{i} #1" for i in range(10)]
    assert sum(inner.batches) == 4  # only the four missing requests were generated
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 10


def test_a_torn_last_line_is_ignored_and_regenerated(tmp_path):
    path = tmp_path / CACHE_FILE
    CachedBackend(CountingBackend(), path).chat(convs("a", "b"), SAMPLING)
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:20])  # killed while writing the second record
    inner = CountingBackend()
    cache = CachedBackend(inner, path)
    assert cache.torn_lines == 1
    assert [c.text for c in cache.chat(convs("a", "b"), SAMPLING)] == ["a #1", "b #1"]
    assert inner.batches == [1]
    # The record written after the torn line is on a line of its own: a third start loses nothing.
    again = CountingBackend()
    reloaded = CachedBackend(again, path)
    assert reloaded.torn_lines == 1
    assert [c.text for c in reloaded.chat(convs("a", "b"), SAMPLING)] == ["a #1", "b #1"]
    assert again.batches == []


def test_adapter_and_model_are_part_of_the_key(tmp_path):
    path = tmp_path / CACHE_FILE
    inner = CountingBackend()
    cache = CachedBackend(inner, path)
    cache.chat(convs("a"), SAMPLING)
    cache.chat(convs("a"), SAMPLING, adapter="/adapters/x")
    assert inner.batches == [1, 1]
    other = CountingBackend(model="other/model")
    CachedBackend(other, path).chat(convs("a"), SAMPLING)
    assert other.batches == [1]


def test_every_sampling_setting_is_part_of_the_key():
    conv = convs("a")[0]
    key = request_key("m", None, conv, SAMPLING)
    for change in ({"frequency_penalty": 0.5}, {"repetition_penalty": 1.1}, {"top_p": 0.9}, {"logprobs": 2}):
        assert request_key("m", None, conv, dataclasses.replace(SAMPLING, **change)) != key, change


def test_logprobs_survive_the_round_trip(tmp_path):
    class LogprobBackend(CountingBackend):
        def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
            return [Completion("A", "stop", 1, first_logprobs={"A": -0.1, "B": -2.3}) for _ in conversations]

    path = tmp_path / CACHE_FILE
    CachedBackend(LogprobBackend(), path).chat(convs("judge"), SAMPLING)
    again = CachedBackend(CountingBackend(fail_after=0), path).chat(convs("judge"), SAMPLING)
    assert again[0].first_logprobs == {"A": -0.1, "B": -2.3}


def test_a_stage_resumed_after_a_kill_keeps_what_was_made_and_makes_only_the_rest(tmp_path):
    seeds = {"I am calm.": ["How do I relax?", "What is patience?"],
             "I love boats.": ["What is a sloop?", "How do sails work?"]}
    settings = ExpandSettings(per_trait=4, heldout_per_trait=1, per_request=3)
    made = iter(range(10_000))

    class Expander(CountingBackend):  # every answer unique, as a sampler's would be
        def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
            super().chat(conversations, sampling, adapter, desc)
            return [Completion("\n".join(f"Could you tell me about topic {n} number {j} please?"
                                          for j in range(3)), "stop", 30) for n in (next(made) for _ in conversations)]

    out = tmp_path / "prompts"
    with pytest.raises(KeyboardInterrupt):
        expand_prompts(CachedBackend(Expander(fail_after=1), out / CACHE_FILE, chunk_size=2), seeds, out,
                       settings=settings)
    assert not (out / "prompts.jsonl").exists()
    before_kill = [json.loads(line)["text"] for line in (out / CACHE_FILE).read_text().splitlines()]
    assert len(before_kill) == 2

    inner = Expander()
    manifest = expand_prompts(CachedBackend(inner, out / CACHE_FILE, chunk_size=2), seeds, out, settings=settings)
    raw = [json.loads(line)["text"] for line in (out / "expansions.jsonl").read_text().splitlines()]
    assert len(raw) == manifest["requests"] == len(set(raw))  # every request answered once
    assert raw[:2] == before_kill  # what was made before the kill is used, in its place
    assert sum(inner.batches) == manifest["requests"] - 2  # and not generated again


def test_an_unfinished_stage_keeps_its_cache_and_a_forced_one_drops_it(tmp_path):
    out = tmp_path / "pairs"
    out.mkdir()
    (out / CACHE_FILE).write_text("{}\n")
    (out / "pairs.jsonl").write_text("half")
    (out / "sub").mkdir()
    clear_stage_dir(out, keep_resume=True)
    assert sorted(p.name for p in out.iterdir()) == [CACHE_FILE]
    clear_stage_dir(out, keep_resume=False)
    assert list(out.iterdir()) == []


def test_a_multi_step_stage_killed_between_steps_resumes_without_regenerating(tmp_path):
    """Self-critique has three dependent steps; killed after the first, the rerun answers step
    one from the cache and builds steps two and three on the same answers."""
    from character_training.config.constitution import load_constitution
    from data_gen.stages.critique import run_critique

    constitution = load_constitution(Path(__file__).resolve().parent.parent / "constitutions" / "captain-marlow.yaml")
    prompts = [f"How do I tie knot number {i}?" for i in range(5)]
    made = iter(range(10_000))

    class Writer(CountingBackend):
        def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
            super().chat(conversations, sampling, adapter, desc)
            return [Completion(f"Arr, answer number {next(made)} about tying the knot well.", "stop", 12)
                    for _ in conversations]

    out = tmp_path / "critique"
    with pytest.raises(KeyboardInterrupt):
        run_critique(CachedBackend(Writer(fail_after=1), out / CACHE_FILE), constitution, prompts, out)
    first_answers = [json.loads(line)["text"] for line in (out / CACHE_FILE).read_text().splitlines()]
    assert len(first_answers) == 5

    inner = Writer()
    manifest = run_critique(CachedBackend(inner, out / CACHE_FILE), constitution, prompts, out)
    assert inner.batches == [5, 5]  # critiques and revisions only
    rejected = [json.loads(line)["rejected"][0]["content"] for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert sorted(rejected) == sorted(first_answers) and manifest["counts"]["pairs"] == 5
    keys = [json.loads(line)["key"] for line in (out / CACHE_FILE).read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 15
