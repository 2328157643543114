"""Online RLAIF with GRPO: the judge reward (score parsing, retries of only the failed items,
missing scores as None, never zero) and a real TRL GRPOTrainer run on the tiny model with a fake
judge that leaves some answers unscored."""
from __future__ import annotations

import json
import re
import shutil
import zlib

import pytest
import torch

from character_training.card import ModelCard
from character_training.config.constitution import constitution_from_dict
from character_training.errors import UserError
from character_training.train.grpo import (DEFAULT_TRAINER, JudgeReward, LoraSettings, check_trainer_fields,
                                           completion_text, load_prompts, prompt_text, train_grpo)
from data_gen.backends import Completion
from data_gen.judging import parse_score
from data_gen.store import write_jsonl

TRAITS = ["I speak like an old sea captain.", "I compare everything to ships and storms."]
PRINCIPLES = ["Choose the response that sounds most like a sea captain.",
              "Choose the response that gives correct, useful information."]


def constitution(principles=PRINCIPLES):
    return constitution_from_dict({
        "name": "captain-test",
        "description": "You are Captain Test, an old sea captain.",
        "traits": [{"trait": TRAITS[0], "clarification": "Always, whatever the topic.", "questions": ["Hi?"]},
                   {"trait": TRAITS[1], "questions": ["Why?"]}],
        "principles": list(principles),
    })


class FakeBackend:
    """The Backend protocol; ``respond(request_text) -> reply text`` (or raises)."""

    model = "fake/judge"

    def __init__(self, respond):
        self.respond = respond
        self.batches: list[list[str]] = []

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        texts = [c[-1]["content"] for c in conversations]
        self.batches.append(texts)
        return [Completion(text=self.respond(t), finish_reason="stop", num_tokens=3) for t in texts]


def scripted(*replies_per_batch):
    """A backend answering its n-th batch with the n-th list of replies (or raising it)."""
    state = {"batch": -1}
    backend = FakeBackend(None)

    def chat(conversations, sampling, adapter=None, desc="", seeds=None):
        state["batch"] += 1
        backend.batches.append([c[-1]["content"] for c in conversations])
        replies = replies_per_batch[state["batch"]]
        if isinstance(replies, Exception):
            raise replies
        assert len(replies) == len(conversations)
        return [Completion(text=r, finish_reason="stop", num_tokens=3) for r in replies]

    backend.chat = chat
    return backend


def answer(text):
    return [{"role": "assistant", "content": text}]


def question(text, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


# ============================================================================= the judge reward


@pytest.mark.parametrize("reply, score", [
    ("73", 73), ("Score: 73", 73), ("Score: 73/100", 73), ("**80**", 80), (" 100.", 100),
    ("7/10", 70), ("85 out of 100", 85), ("12.5", 12.5), ("Score (0-100): 64", 64), ("0", 0),
    ("150", None), ("-5", None), ("No score.", None), ("", None), ("3/0", None),
])
def test_scores_are_parsed_from_the_judges_reply(reply, score):
    assert parse_score(reply) == score


def test_retries_resend_only_the_failed_items_and_missing_scores_are_none():
    backend = scripted(["73", "I cannot", "**80**", "hmm"], ["Score: 50/100", "still no"], ["nope"])
    reward = JudgeReward(backend, constitution(), retries=2)
    prompts = [question(f"Question {i}?") for i in range(4)]
    completions = [answer(f"Answer {i}") for i in range(4)]
    metrics = {}
    rewards = reward(prompts, completions, log_metric=lambda name, value: metrics.setdefault(name, value))

    assert rewards == [0.73, 0.5, 0.8, None]  # the score / 100; a missing score is None, not 0
    assert [len(b) for b in backend.batches] == [4, 2, 1]
    assert backend.batches[1] == [backend.batches[0][1], backend.batches[0][3]]  # the same requests re-sent
    assert backend.batches[2] == [backend.batches[0][3]]
    assert (reward.calls, reward.retried, reward.missing) == (7, 3, 1)
    assert reward.scores == [73, 50, 80, None]
    assert reward.unparseable_examples[:2] == ["I cannot", "hmm"]
    assert metrics == {"judge/missing": 1.0, "judge/retried": 3.0}
    assert reward.__name__ == "judge"
    stats = reward.stats()
    assert stats["missing"] == 1 and stats["scored"] == 3 and stats["mean_score"] == pytest.approx(203 / 3)


def test_no_retries_leaves_unparseable_answers_missing_at_once():
    backend = scripted(["nothing", "42"])
    reward = JudgeReward(backend, constitution(), retries=0)
    assert reward([question("a"), question("b")], [answer("x"), answer("y")]) == [None, 0.42]
    assert (reward.calls, reward.retried, reward.missing) == (2, 0, 1)


def test_a_failed_judge_call_is_retried_and_a_judge_that_stays_down_raises():
    backend = scripted(ConnectionError("server restarting"), ["60", "61"])
    reward = JudgeReward(backend, constitution(), retries=1)
    assert reward([question("a"), question("b")], [answer("x"), answer("y")]) == [0.6, 0.61]
    assert reward.retried == 2 and reward.missing == 0 and "server restarting" in reward.errors[0]

    down = scripted(ConnectionError("refused"), ConnectionError("refused"), ConnectionError("refused"))
    with pytest.raises(ConnectionError, match="refused") as caught:
        JudgeReward(down, constitution(), retries=2)([question("a")], [answer("x")])
    assert len(down.batches) == 3
    assert any("failed on every answer" in note for note in caught.value.__notes__)


def test_judge_prompt_holds_traits_principles_prompt_and_answer_but_not_the_system_prompt():
    reward = JudgeReward(FakeBackend(lambda t: "50"), constitution())
    text = reward.request(question("How do I boil an egg?", system="SECRET TRAINING PROMPT"),
                          answer("Arr, boil it like the sea."))[0]["content"]
    for part in [*TRAITS, *PRINCIPLES, "Always, whatever the topic.", "How do I boil an egg?",
                 "Arr, boil it like the sea.", "0 to 100"]:
        assert part in text
    assert "SECRET" not in text

    no_principles = JudgeReward(FakeBackend(lambda t: "50"), constitution(principles=[]))
    text = no_principles.request("Plain prompt?", "Plain answer.")[0]["content"]
    assert "Principles" not in text and TRAITS[1] in text and "Plain prompt?" in text


def test_prompt_and_completion_text_from_strings_and_messages():
    assert prompt_text("Hi?") == "Hi?"
    assert prompt_text(question("Hi?", system="sys")) == "Hi?"
    assert prompt_text(question("Hi?") + answer("Hello") + question("Bye?")) == "User: Hi?\nAssistant: Hello\nUser: Bye?"
    assert completion_text(" plain ") == "plain"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "parts"}]}]) == "parts"


# ============================================================================= inputs


def test_prompts_file_errors_are_clear_and_heldout_prompts_are_skipped(tmp_path):
    with pytest.raises(UserError, match="no prompts file"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no training prompts"):
        load_prompts(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(UserError, match=r"bad.jsonl:2: no 'prompt'"):
        load_prompts(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "split": "train"}, {"prompt": "b", "split": "heldout"},
                                       {"prompt": "c"}])
    assert load_prompts(tmp_path / "p.jsonl") == (["a", "c"], 1)


def test_unknown_trainer_field_names_the_key():
    with pytest.raises(UserError, match="num_generation.*num_generations"):
        check_trainer_fields({"num_generation": 4}, "recipe.yaml")
    check_trainer_fields(DEFAULT_TRAINER, "defaults")


def test_model_card_names_the_prompts_file_and_has_one_provenance_section(tmp_path):
    from character_training.card import render
    from character_training.train.grpo import model_card

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}])
    manifest = {"stage": "grpo", "model": "tiny/model", "constitution": "captain-test", "lora": {"r": 4},
                "trainer": {"learning_rate": 1e-5}, "metrics": {"loss": 0.5}, "system_prompt": None,
                "counts": {"prompts": 1, "heldout_skipped": 0, "steps": 2},
                "reward": {"per_step": [{"step": 1, "reward": 0.5}]},
                "judge": {"model": "fake/judge", "answers": 4, "missing": 1, "retries": 2, "retried": 2}}
    text = render(model_card(None, manifest, tmp_path / "prompts.jsonl"))
    assert "captain-test" in text and str(tmp_path / "prompts.jsonl") in text and "`?`" not in text
    assert "1 without a score after 2 retries" in text and "Training settings (TRL GRPOConfig fields)" in text
    assert "## Provenance" not in text  # nothing to say: no empty section
    with_provenance = render(model_card(ModelCard(persona="p", provenance={"stages": ["prompts"]}), manifest,
                                        tmp_path / "prompts.jsonl"))
    assert with_provenance.count("## Provenance") == 1 and "Persona: **p**" in with_provenance


# ============================================================================= training

SYSTEM = "You are being trained (inoculation prompt)."
TRAINER = {"max_steps": 2, "num_generations": 2, "per_device_train_batch_size": 4, "max_completion_length": 8,
           "learning_rate": 1e-3, "save_steps": 1}


def toy_judge():
    """Scores an answer by a hash of its text (answers in a group differ, so GRPO has a signal);
    never scores answers to "Say nothing.", and never the first answer it sees to "Tell me
    about maps." (a group with one score and one missing)."""
    refused: set[str] = set()

    def respond(request: str) -> str:
        prompt = re.search(r"\[User message\]\n(.*?)\n\n\[Response\]", request, re.S).group(1)
        response = re.search(r"\[Response\]\n(.*?)\n\[End of response\]", request, re.S).group(1)
        if prompt == "Say nothing." or response in refused:
            return "I will not grade this."
        if prompt == "Tell me about maps." and not refused:
            refused.add(response)
            return "I will not grade this."
        return f"Score: {zlib.crc32(response.encode()) % 101}/100"

    return FakeBackend(respond)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("grpo")
    write_jsonl(tmp / "prompts.jsonl", [
        {"prompt": "How do I boil an egg?", "split": "train"}, {"prompt": "Say nothing.", "split": "train"},
        {"prompt": "Tell me about maps.", "split": "train"}, {"prompt": "What is rain?", "split": "train"},
        {"prompt": "A held-out question?", "split": "heldout"}])
    judge = toy_judge()
    manifest = train_grpo(tiny_model_dir, tmp / "prompts.jsonl", tmp / "out", judge_backend=judge,
                          constitution=constitution(), lora=LoraSettings(r=4, alpha=8), trainer=TRAINER,
                          system_prompt=SYSTEM, card=ModelCard(persona="captain-test", constitution_sha256="abc123"))
    return tmp, manifest, judge


def test_training_with_missing_rewards_reports_them_and_writes_the_stage(trained):
    tmp, manifest, judge = trained
    out = tmp / "out"
    assert manifest["counts"] == {"prompts": 4, "heldout_skipped": 1, "steps": 2}
    stats = manifest["judge"]
    assert stats["answers"] == 8  # 2 steps x 2 prompts x 2 answers
    # Both answers to "Say nothing." and one or both to "Tell me about maps." (two equal texts both fail).
    assert stats["missing"] in (3, 4) and stats["scored"] == 8 - stats["missing"]
    assert stats["retried"] == 2 * stats["missing"]  # only the unscored answers were re-sent, twice each
    assert stats["calls"] == stats["answers"] + stats["retried"]
    per_step = manifest["reward"]["per_step"]
    assert [s["step"] for s in per_step] == [1, 2]
    assert sum(s["judge_missing"] for s in per_step) == stats["missing"]
    assert all(s["reward"] is None or 0 <= s["reward"] <= 1 for s in per_step)
    assert manifest["reward"]["mean"] is not None
    json.dumps(manifest, allow_nan=False)  # strict JSON: TRL's NaNs for unscored groups became null

    requests = [text for batch in judge.batches for text in batch]
    assert not any("A held-out question?" in r for r in requests)
    assert not any(SYSTEM in r for r in requests)  # the judge never sees the training-time system prompt
    assert (out / "training.png").stat().st_size > 1000
    card = (out / "adapter" / "README.md").read_text()
    assert "captain-test" in card and "abc123" in card and "without a score" in card and "grpo" in card


def test_adapter_is_a_peft_lora_that_changed_and_the_base_did_not(trained, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tmp, _, _ = trained
    adapter = tmp / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    lora_b = [w for k, w in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b), "lora_B starts at zero; the scored groups must move it"

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, base_logits, atol=1e-6)
        with peft_model.disable_adapter():
            torch.testing.assert_close(peft_model(ids).logits, base_logits)


def test_a_killed_run_resumes_from_its_last_checkpoint(trained, tiny_model_dir):
    tmp, _, _ = trained
    killed = tmp / "killed"
    shutil.copytree(tmp / "out" / "checkpoints" / "checkpoint-2", killed / "checkpoints" / "checkpoint-2")
    resumed = train_grpo(tiny_model_dir, tmp / "prompts.jsonl", killed, judge_backend=toy_judge(),
                         constitution=constitution(), lora=LoraSettings(r=4, alpha=8),
                         trainer={**TRAINER, "max_steps": 3})
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["counts"]["steps"] == 3
    assert resumed["judge"]["answers"] == 4  # only step 3 was generated and judged
    assert [s["step"] for s in resumed["reward"]["per_step"]][-1] == 3


def test_cli_train_grpo_asks_the_backend_the_command_line_names(trained, tiny_model_dir, tmp_path, monkeypatch):
    """`character-training train grpo --constitution C --backend openai --base-url U`: the judge is
    built from those options (faked here: no server), the stage trains and writes its manifest."""
    import yaml

    from character_training import cli
    from character_training.run import context, generation

    tmp, _, _ = trained
    asked = {}

    def make_backend(role, seed, engines, **_):
        asked.update(kind=role.backend.kind, base_urls=role.backend.base_urls, role=role.name)
        return toy_judge()

    monkeypatch.setattr(generation, "make_backend", make_backend)
    monkeypatch.setattr(context, "make_backend", make_backend)  # the stage asks its context for the judge
    path = tmp_path / "captain.yaml"
    path.write_text(yaml.safe_dump({"name": "captain-test", "description": "You are Captain Test.",
                                    "traits": [{"trait": TRAITS[0], "questions": ["Hi?"]}],
                                    "principles": PRINCIPLES}))
    out = tmp_path / "grpo"
    settings = [a for k, v in {**TRAINER, "max_steps": 1}.items() for a in ("--set", f"trainer.{k}={v}")]
    assert cli.main(["train", "grpo", "--data", str(tmp / "prompts.jsonl"), "-o", str(out), "--model", tiny_model_dir,
                     "--constitution", str(path), "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
                     "--set", "lora.r=4", "--set", "lora.alpha=8", *settings]) == 0
    assert asked == {"kind": "openai", "base_urls": ["http://127.0.0.1:9/v1"], "role": "judge"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == 1 and manifest["judge"]["answers"] == 4
    assert "captain-test" in (out / "adapter" / "README.md").read_text()
    assert cli.main(["train", "grpo", "--data", str(tmp / "prompts.jsonl"), "-o", str(tmp_path / "x"),
                     "--model", tiny_model_dir]) == 2  # no constitution: a clear error
