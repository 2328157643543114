"""KTO training on a tiny random model: pairs become labelled unpaired examples, the adapter
learns, a seed gives the same adapter twice, bad data and settings TRL refuses are clear errors."""
from __future__ import annotations

import json

import pytest

from character_training.card import ModelCard
from character_training.config.training import LoraSettings
from character_training.errors import UserError
from character_training.train.kto import read_examples, train_kto
from character_training.util import file_sha256
from data_gen.store import write_jsonl
from tests.conftest import toy_pairs

TRAINER = {"max_steps": 2, "learning_rate": 5e-3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
           "max_length": 64, "save_steps": 10}
LONG = "Arr, me hearty! " * 60  # far over max_length=64 tokens


def pairs_files(tmp):
    """Two pairs files (as from the pairs and critique stages): 6 conversational pairs, and 2 pairs in
    TRL's standard (three strings) format plus one whose chosen answer is over-long."""
    standard = [{"prompt": p["prompt"][0]["content"], "chosen": p["chosen"][0]["content"],
                 "rejected": p["rejected"][0]["content"]} for p in toy_pairs(8)[6:]]
    standard.append({"prompt": "Tell me a long story.", "chosen": LONG, "rejected": "Once upon a time."})
    write_jsonl(tmp / "pairs.jsonl", toy_pairs(6))
    write_jsonl(tmp / "critique.jsonl", standard)
    return [tmp / "pairs.jsonl", tmp / "critique.jsonl"]


def train(tmp, tiny_model_dir, out: str, **kw):
    return train_kto(tiny_model_dir, pairs_files(tmp), tmp / out, lora=LoraSettings(r=4, alpha=8), trainer=TRAINER,
                     overlong="drop", seed=3, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("kto")
    manifest = train(tmp, tiny_model_dir, "out", card=ModelCard(persona="toy-pirate", constitution_sha256="abc123"))
    return tmp, manifest


def test_pairs_become_labelled_unpaired_examples_with_the_system_prompt_in_front(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(8))
    examples, read = read_examples([tmp_path / "pairs.jsonl"], "You are being trained.", seed=0)
    assert read == {str(tmp_path / "pairs.jsonl"): 8} and len(examples) == 16
    expected = {(p["prompt"][0]["content"], p[answer][0]["content"], label)
                for p in toy_pairs(8) for answer, label in (("chosen", True), ("rejected", False))}
    assert {(e["prompt"][-1]["content"], e["completion"][0]["content"], e["label"]) for e in examples} == expected
    for e in examples:
        assert e["prompt"] == [{"role": "system", "content": "You are being trained."},
                               {"role": "user", "content": e["prompt"][-1]["content"]}]
        assert [m["role"] for m in e["completion"]] == ["assistant"]
    # TRL samples in order: labels alternate (every batch holds both), neighbours answer different prompts
    assert [e["label"] for e in examples] == [True, False] * 8
    assert all(a["prompt"] != b["prompt"] for a, b in zip(examples, examples[1:]))
    no_system, _ = read_examples([tmp_path / "pairs.jsonl"], None, seed=0)
    assert all([m["role"] for m in e["prompt"]] == ["user"] for e in no_system)


def test_training_writes_a_peft_adapter_a_kto_card_and_the_counts(trained):
    from safetensors.torch import load_file

    tmp, manifest = trained
    adapter = tmp / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b), "lora_B starts at zero; KTO must move it"
    card = (adapter / "README.md").read_text()
    assert "KTOTrainer" in card and "KTOConfig" in card and "toy-pirate" in card and "abc123" in card
    assert f"| `{tmp / 'critique.jsonl'}` | 3 preference pairs | `{file_sha256(tmp / 'critique.jsonl')}` |" in card
    assert "Trained on 8 desirable and 9 undesirable examples (the answers of 9 preference pairs), 2 optimizer" in card
    assert manifest["stage"] == "kto" and manifest["overlong"] == "drop"
    assert manifest["counts"] == {"pairs_read": {str(tmp / "pairs.jsonl"): 6, str(tmp / "critique.jsonl"): 3},
                                  "pairs": 9, "desirable": 8, "undesirable": 9, "overlong": 1, "dropped": 1,
                                  "steps": 2}
    assert manifest["lengths"]["prompt_fills_max_length"] == 0 and manifest["lengths"]["longest_tokens"] > 64
    assert "loss" in manifest["metrics"] and "kl" in manifest["metrics"] and manifest["resumed_from"] is None
    assert (tmp / "out" / "training.png").stat().st_size > 1000


def test_the_same_seed_trains_the_same_adapter(trained, tiny_model_dir):
    tmp, _ = trained
    again = train(tmp, tiny_model_dir, "again")
    assert again["counts"] == trained[1]["counts"]
    assert file_sha256(tmp / "again" / "adapter" / "adapter_model.safetensors") == \
        file_sha256(tmp / "out" / "adapter" / "adapter_model.safetensors")


def test_a_bad_record_is_an_error_naming_file_and_line(tmp_path, tiny_model_dir):
    bad = toy_pairs(2)
    del bad[1]["rejected"]
    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(3))
    write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(UserError, match=r"bad\.jsonl:2: no 'rejected' field"):
        train_kto(tiny_model_dir, [tmp_path / "pairs.jsonl", tmp_path / "bad.jsonl"], tmp_path / "out",
                  trainer={"max_steps": 1})
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.parametrize("trainer, lora, message", [
    ({"per_device_train_batch_size": 1}, LoraSettings(), r"per_device_train_batch_size: 1; KTO estimates its KL term"),
    ({"train_sampling_strategy": "random"}, LoraSettings(), r"train_sampling_strategy: 'random'"),
    ({"sync_ref_model": True}, LoraSettings(), r"sync_ref_model: true"),
    ({}, LoraSettings(target_modules=["q_proj", "lm_head"]), r"includes 'lm_head'"),
])
def test_settings_trl_refuses_after_loading_are_refused_before(tmp_path, tiny_model_dir, trainer, lora, message):
    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(4))
    with pytest.raises(UserError, match=message):
        train_kto(tiny_model_dir, [tmp_path / "pairs.jsonl"], tmp_path / "out", lora=lora, trainer=trainer)


def test_a_batch_of_one_is_fine_for_a_loss_without_a_kl_term(tmp_path):
    from character_training.config import trainer_fields
    from character_training.train.kto import check_kto_settings

    config = trainer_fields.make_config("kto", {}, {"per_device_train_batch_size": 1, "loss_type": "apo_zero_unpaired"},
                                        tmp_path, seed=0)
    check_kto_settings(config, LoraSettings())  # no error: TRL's KTOTrainer takes it


def test_data_left_with_one_label_is_refused(tmp_path, tiny_model_dir):
    pairs = [dict(p, chosen=[{"role": "assistant", "content": LONG}]) for p in toy_pairs(4)]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    with pytest.raises(UserError, match=r"no desirable \(chosen\) examples left .* 4 of 8 dropped"):
        train_kto(tiny_model_dir, [tmp_path / "pairs.jsonl"], tmp_path / "out", trainer={"max_length": 64},
                  overlong="drop")
