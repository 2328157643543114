"""DPO training on a tiny random model: the adapter learns, the base stays, PEFT loads it."""
from __future__ import annotations

import json

import pytest
import torch

from character_training.errors import UserError
from character_training.train_dpo import LoraSettings, check_trainer_fields, train_dpo
from data_gen.store import write_jsonl
from tests.conftest import toy_pairs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("dpo")
    write_jsonl(tmp / "pairs.jsonl", toy_pairs(8))
    manifest = train_dpo(tiny_model_dir, tmp / "pairs.jsonl", tmp / "out", lora=LoraSettings(r=4, alpha=8),
                         trainer={"max_steps": 3, "learning_rate": 5e-3, "per_device_train_batch_size": 4,
                                  "gradient_accumulation_steps": 1, "max_length": 64},
                         card={"persona": "toy-pirate", "constitution_sha256": "abc123"})
    return tmp / "out" / "adapter", manifest


def test_adapter_directory_is_a_peft_lora_with_model_card(trained):
    adapter, manifest = trained
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert (adapter / "adapter_model.safetensors").is_file()
    card = (adapter / "README.md").read_text()
    assert "toy-pirate" in card and "abc123" in card and "learning_rate" in card
    assert manifest["counts"] == {"pairs": 8, "steps": 3}
    assert "loss" in manifest["metrics"] and "rewards/margins" in manifest["metrics"]


def test_adapter_changed_and_base_did_not(trained, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter, _ = trained
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b), "lora_B starts at zero; training must move it"

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        base_logits = base(ids).logits
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    with torch.no_grad():
        adapted = peft_model(ids).logits
        with peft_model.disable_adapter():
            disabled = peft_model(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-6)
    torch.testing.assert_close(disabled, base_logits)
    merged = peft_model.merge_and_unload()
    assert any(not torch.equal(merged.state_dict()[k], reference[k]) for k in reference if k in merged.state_dict())


def test_empty_pairs_dataset_is_a_clear_error(tmp_path, tiny_model_dir):
    (tmp_path / "pairs.jsonl").write_text("")
    with pytest.raises(UserError, match="empty|no pairs"):
        train_dpo(tiny_model_dir, tmp_path / "pairs.jsonl", tmp_path / "out", trainer={"max_steps": 1})


def test_unknown_trainer_field_names_the_key():
    with pytest.raises(UserError, match="learning_rat.*learning_rate"):
        check_trainer_fields({"learning_rat": 1e-4}, "recipe.yaml")
