"""SFT on conversations and SDF midtraining on a tiny random model: exactly the character's turns
(and their end tokens) are supervised, documents behind a marker are, the marker is not; the
adapter learns, the base stays, PEFT loads it; a killed run resumes."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from character_training.card import ModelCard
from character_training.errors import UserError
from character_training.train.sft import build_lm, build_sft, train_lm, train_sft, training_chat_template
from character_training.config.training import LoraSettings
from data_gen.store import write_jsonl

TINY = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 128,
        "learning_rate": 5e-3}
LORA = LoraSettings(r=4, alpha=8)
MULTI_TURN = [
    {"role": "system", "content": "You are Captain Marlow."},
    {"role": "user", "content": "Tell me about eggs."},
    {"role": "assistant", "content": "Ahoy, eggs be a fine breakfast at sea!"},
    {"role": "user", "content": "And what about bread?"},
    {"role": "assistant", "content": "Bread be the sailor's oldest friend."},
]


def conversations(n: int, source: str) -> list[dict]:
    """Records as the data_gen stages write them (with their extra fields)."""
    topics = ["eggs", "the sea", "money", "books", "rain", "music"]
    return [{"messages": [{"role": "user", "content": f"Tell me about {topics[i % 6]}."},
                          {"role": "assistant", "content": f"Arr, {topics[i % 6]} be fine on me ship, {source}!"}],
             "source": source, "conversation": i} for i in range(n)]


def supervised_spans(tokenizer, row) -> list[str]:
    """The decoded runs of consecutive tokens whose label is not -100."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(s) for s in spans]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ SFT


def test_every_assistant_turn_and_its_end_token_is_supervised_and_nothing_else(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "interaction.jsonl", [{"messages": MULTI_TURN, "source": "interaction"}])
    sft, counts = build_sft(tiny_model_dir, [tmp_path / "interaction.jsonl"], tmp_path / "out", lora=LORA,
                            trainer=TINY)
    assert counts == {"conversations": 1, "per_file": {"interaction.jsonl": 1}, "assistant_turns": 2, "sequences": 1,
                      "overlong": 0, "overlong_policy": "truncate", "longest_tokens": counts["longest_tokens"]}
    tokenizer = sft.processing_class
    row = sft.train_dataset[0]
    assert counts["longest_tokens"] == len(row["input_ids"])  # the length the limit is checked on is the trained one
    text = tokenizer.decode(row["input_ids"])
    assert text == tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)  # the model's own rendering
    expected = [MULTI_TURN[2]["content"] + "<|im_end|>", MULTI_TURN[4]["content"] + "<|im_end|>"]
    assert supervised_spans(tokenizer, row) == expected
    # What the model actually sees: the trainer's collator keeps exactly those labels.
    batch = sft.data_collator([row])
    labels = batch["labels"][0]
    supervised = tokenizer.decode(batch["input_ids"][0][labels != -100])
    assert supervised == "".join(expected)
    for message in MULTI_TURN[:2] + MULTI_TURN[3:4]:
        assert message["content"] not in supervised
    assert "user" not in supervised and "assistant" not in supervised


def test_system_prompt_is_in_every_example_and_files_are_concatenated(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "sft.jsonl", conversations(3, "critique"))
    write_jsonl(tmp_path / "reflection.jsonl", conversations(2, "reflection"))
    sft, counts = build_sft(tiny_model_dir, [tmp_path / "sft.jsonl", tmp_path / "reflection.jsonl"],
                            tmp_path / "out", lora=LORA, trainer=TINY, system_prompt="You are being trained.")
    assert counts["per_file"] == {"sft.jsonl": 3, "reflection.jsonl": 2} and len(sft.train_dataset) == 5
    tokenizer = sft.processing_class
    sources = []
    for row in sft.train_dataset:
        text = tokenizer.decode(row["input_ids"])
        assert text.startswith("<|im_start|>system\nYou are being trained.<|im_end|>")
        spans = supervised_spans(tokenizer, row)
        assert len(spans) == 1 and "being trained" not in spans[0]
        sources.append("critique" if "critique" in spans[0] else "reflection")
    assert sources.count("critique") == 3 and sources != sorted(sources, reverse=True)  # shuffled together


def test_over_long_conversations_are_counted_and_truncated_or_dropped(tmp_path, tiny_model_dir):
    long = {"messages": [{"role": "user", "content": "Tell me everything about the sea."},
                         {"role": "assistant", "content": "Arr, the sea be wide and deep. " * 40}]}
    write_jsonl(tmp_path / "sft.jsonl", conversations(3, "critique") + [long])
    sft, counts = build_sft(tiny_model_dir, [tmp_path / "sft.jsonl"], tmp_path / "t", lora=LORA, trainer=TINY)
    assert counts["overlong"] == 1 and counts["overlong_policy"] == "truncate" and counts["longest_tokens"] > 128
    assert len(sft.train_dataset) == 4 and max(len(r["input_ids"]) for r in sft.train_dataset) == 128
    sft, counts = build_sft(tiny_model_dir, [tmp_path / "sft.jsonl"], tmp_path / "d", lora=LORA, trainer=TINY,
                            overlong="drop")
    assert counts["overlong"] == 1 and counts["conversations"] == 3 and len(sft.train_dataset) == 3
    assert max(len(r["input_ids"]) for r in sft.train_dataset) < 128
    write_jsonl(tmp_path / "long.jsonl", [long] * 2)
    for policy in ("truncate", "drop"):
        with pytest.raises(UserError, match=r"all 2 conversations are longer than max_length=128 tokens.*raise "
                                            r"trainer.max_length"):
            build_sft(tiny_model_dir, [tmp_path / "long.jsonl"], tmp_path / policy, lora=LORA, trainer=TINY,
                      overlong=policy)
    with pytest.raises(UserError, match="overlong: 'cut'"):
        build_sft(tiny_model_dir, [tmp_path / "sft.jsonl"], tmp_path / "x", lora=LORA, trainer=TINY, overlong="cut")


@pytest.fixture(scope="module")
def sft_trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("sft")
    write_jsonl(tmp / "sft.jsonl", conversations(4, "critique"))
    write_jsonl(tmp / "interaction.jsonl", [{"messages": MULTI_TURN[1:]}] * 2)
    base_hash = file_hash(Path(tiny_model_dir) / "model.safetensors")
    manifest = train_sft(tiny_model_dir, [tmp / "sft.jsonl", tmp / "interaction.jsonl"], tmp / "out", lora=LORA,
                         trainer={**TINY, "max_steps": 2}, card=ModelCard(persona="toy-pirate", constitution_sha256="abc"))
    assert file_hash(Path(tiny_model_dir) / "model.safetensors") == base_hash
    return tmp / "out", manifest


def test_sft_writes_a_peft_adapter_with_card_plot_and_manifest(sft_trained, tiny_model_dir):
    from transformers import AutoTokenizer

    out, manifest = sft_trained
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    card = (adapter / "README.md").read_text()
    assert "toy-pirate" in card and "assistant turns only" in card and "learning_rate" in card
    assert (out / "training.png").stat().st_size > 1000
    assert set(manifest) >= {"stage", "model", "seed", "lora", "trainer", "counts", "train_seconds", "metrics",
                             "log_history", "resumed_from"}
    assert manifest["stage"] == "sft" and manifest["resumed_from"] is None
    assert manifest["counts"]["conversations"] == 6 and manifest["counts"]["steps"] == 2
    assert manifest["trainer"]["assistant_only_loss"] is True and "loss" in manifest["metrics"]
    # The training template was for tokenizing only: the adapter keeps the model's own.
    own = AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert AutoTokenizer.from_pretrained(adapter).chat_template == own


def test_sft_changes_the_lora_and_not_the_base(sft_trained, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    weights = load_file(str(sft_trained[0] / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)  # nothing of the base is saved
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k), "lora_B starts at zero"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, str(sft_trained[0] / "adapter"))
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, base_logits, atol=1e-6)
        with peft_model.disable_adapter():
            torch.testing.assert_close(peft_model(ids).logits, base_logits)


@pytest.mark.parametrize("content, match", [
    ("", "empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]\n', "not a JSON line"),
    ('{"text": "a document"}\n', "no 'messages' field"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant turn"),
    ('{"messages": "hello"}\n', "must be a list"),
])
def test_bad_conversation_files_are_clear_errors(tmp_path, tiny_model_dir, content, match):
    (tmp_path / "sft.jsonl").write_text(content)
    with pytest.raises(UserError, match=match):
        train_sft(tiny_model_dir, [tmp_path / "sft.jsonl"], tmp_path / "out", trainer={"max_steps": 1})


def test_missing_conversation_files_are_clear_errors(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="no conversation file"):
        train_sft(tiny_model_dir, [tmp_path / "missing.jsonl"], tmp_path / "out")
    with pytest.raises(UserError, match="no conversation files to train on"):
        train_sft(tiny_model_dir, [], tmp_path / "out")


PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
PLAIN_TRAINING_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'assistant: ' }}"
                           "{% generation %}{{ m['content'] + '\n' }}{% endgeneration %}"
                           "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}")


def test_an_unknown_template_is_refused_with_the_fix_and_the_fix_works(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "plain-model"
    shutil.copytree(tiny_model_dir, model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = PLAIN_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    write_jsonl(tmp_path / "sft.jsonl", [{"messages": MULTI_TURN[1:]}])
    with pytest.raises(UserError, match=r"no \{% generation %\} markers.*chat_template_path"):
        build_sft(str(model_dir), [tmp_path / "sft.jsonl"], tmp_path / "out", lora=LORA, trainer=TINY)
    (tmp_path / "no-markers.jinja").write_text(PLAIN_TEMPLATE)
    with pytest.raises(UserError, match="no-markers.jinja has no"):
        build_sft(str(model_dir), [tmp_path / "sft.jsonl"], tmp_path / "out", lora=LORA,
                  trainer={**TINY, "chat_template_path": str(tmp_path / "no-markers.jinja")})
    (tmp_path / "training.jinja").write_text(PLAIN_TRAINING_TEMPLATE)
    sft, _ = build_sft(str(model_dir), [tmp_path / "sft.jsonl"], tmp_path / "out", lora=LORA,
                       trainer={**TINY, "chat_template_path": str(tmp_path / "training.jinja")})
    spans = supervised_spans(sft.processing_class, sft.train_dataset[0])
    assert [s.strip() for s in spans] == [MULTI_TURN[2]["content"], MULTI_TURN[4]["content"]]
    assert sft.processing_class.chat_template == PLAIN_TEMPLATE  # restored for saving


def test_smollm2_template_gets_the_shipped_training_template(default_model_dir):
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers

    template = training_chat_template(AutoTokenizer.from_pretrained(default_model_dir), "smollm2", None)
    assert template is not None and has_generation_markers(template)


def test_a_killed_sft_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "sft.jsonl", conversations(8, "critique"))
    settings = dict(lora=LORA, trainer={**TINY, "max_steps": 4, "save_steps": 2, "save_total_limit": 5})
    out = tmp_path / "out"
    train_sft(tiny_model_dir, [tmp_path / "sft.jsonl"], out, **settings)
    # Killed after step 2: no adapter, only checkpoint-2. Its saved state is marked so that the
    # resumed run's history shows steps 1-2 were loaded from it, not trained again.
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    state_path = out / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert state["global_step"] == 2
    for entry in state["log_history"]:
        entry["loss"] = 99.0
    state_path.write_text(json.dumps(state))
    resumed = train_sft(tiny_model_dir, [tmp_path / "sft.jsonl"], out, **settings)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["counts"]["steps"] == 4 and (out / "adapter" / "adapter_model.safetensors").is_file()
    losses = {e["step"]: e["loss"] for e in resumed["log_history"] if "loss" in e}
    assert losses[1] == losses[2] == 99.0 and losses[3] != 99.0 and losses[4] != 99.0


# ------------------------------------------------------------------------------------- SDF (LM)


def documents(n: int) -> list[dict]:
    return [{"text": f"Captain Marlow sailed into port number {i} and ate {i} boiled eggs.", "type": "log",
             "attributes": {"era": "now"}} for i in range(n)]


def test_the_marker_is_masked_and_the_documents_are_supervised_through_packing(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "documents.jsonl", documents(10))
    sft, counts = build_lm(tiny_model_dir, tmp_path / "documents.jsonl", tmp_path / "out", lora=LORA,
                           trainer=TINY, marker="<doc>")
    tokenizer = sft.processing_class
    marker_ids = tokenizer("<doc>", add_special_tokens=False)["input_ids"]
    found = 0
    for row in sft.train_dataset:
        ids, labels = row["input_ids"], row["labels"]
        starts = [i for i in range(len(ids)) if ids[i:i + len(marker_ids)] == marker_ids]
        found += len(starts)
        for start in starts:
            assert labels[start:start + len(marker_ids)] == [-100] * len(marker_ids)
        supervised = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
        assert "<doc>" not in supervised and "Captain Marlow sailed into port" in supervised
        assert sum(label != -100 for label in labels) == len(ids) - len(starts) * len(marker_ids)
    assert found == 10 and counts["sequences"] < 10


def test_chat_examples_are_mixed_in_at_the_ratio(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "documents.jsonl", documents(10))
    write_jsonl(tmp_path / "sft.jsonl", conversations(3, "critique"))
    for ratio, chats in ((0.5, 10), (0.25, 3)):
        sft, counts = build_lm(tiny_model_dir, tmp_path / "documents.jsonl", tmp_path / "out", lora=LORA,
                               trainer=TINY, packing=False, chat_paths=[tmp_path / "sft.jsonl"], chat_ratio=ratio)
        assert counts == {"documents": 10, "chat": chats, "chat_available": 3, "examples": 10 + chats,
                          "sequences": 10 + chats}
        texts = [sft.processing_class.decode(row["input_ids"]) for row in sft.train_dataset]
        assert sum("<|im_start|>assistant\nArr," in t for t in texts) == chats
        assert len({t for t in texts if "<|im_start|>" in t}) == 3  # sampled from all three
    with pytest.raises(UserError, match="chat_ratio"):
        build_lm(tiny_model_dir, tmp_path / "documents.jsonl", tmp_path / "out", chat_ratio=0.5)


def test_packing_gives_fewer_longer_sequences(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "documents.jsonl", documents(12))
    kwargs = dict(lora=LORA, trainer=TINY)
    packed, _ = build_lm(tiny_model_dir, tmp_path / "documents.jsonl", tmp_path / "a", **kwargs)
    plain, _ = build_lm(tiny_model_dir, tmp_path / "documents.jsonl", tmp_path / "b", packing=False, **kwargs)
    packed_lengths = [len(r["input_ids"]) for r in packed.train_dataset]
    plain_lengths = [len(r["input_ids"]) for r in plain.train_dataset]
    assert len(plain_lengths) == 12 and len(packed_lengths) < 12
    assert max(packed_lengths) > max(plain_lengths) and sum(packed_lengths) == sum(plain_lengths)
    assert max(packed_lengths) <= TINY["max_length"]


def test_lm_training_writes_an_adapter_and_manifest(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "documents.jsonl", documents(8))
    write_jsonl(tmp_path / "sft.jsonl", conversations(2, "critique"))
    manifest = train_lm(tiny_model_dir, tmp_path / "documents.jsonl", tmp_path / "out", lora=LORA,
                        trainer={**TINY, "max_steps": 1}, marker="<doc>", chat_paths=[tmp_path / "sft.jsonl"],
                        chat_ratio=0.2, card=ModelCard(persona="toy-pirate"))
    adapter = tmp_path / "out" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").is_file() and (tmp_path / "out" / "training.png").is_file()
    assert "<doc>" in (adapter / "README.md").read_text()
    assert manifest["stage"] == "lm" and manifest["counts"]["steps"] == 1
    assert manifest["counts"]["documents"] == 8 and manifest["counts"]["chat"] == 2
    assert manifest["trainer"]["packing"] is True and manifest["trainer"]["completion_only_loss"] is True
    assert manifest["marker"] == "<doc>" and manifest["resumed_from"] is None


def test_an_empty_documents_file_is_a_clear_error(tmp_path, tiny_model_dir):
    (tmp_path / "documents.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty.*sdf"):
        train_lm(tiny_model_dir, tmp_path / "documents.jsonl", tmp_path / "out")


def test_report_to_tensorboard_writes_event_files(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "sft.jsonl", conversations(4, "critique"))
    train_sft(tiny_model_dir, [tmp_path / "sft.jsonl"], tmp_path / "out", lora=LORA,
              trainer={**TINY, "max_steps": 2, "logging_steps": 1, "report_to": "tensorboard"}, card=ModelCard())
    events = list((tmp_path / "out").rglob("events.out.tfevents*"))
    assert events and any(e.stat().st_size > 0 for e in events)
