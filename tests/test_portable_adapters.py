"""Portable adapters (issue 23): a trained adapter names its base model as a user on another
machine loads it (a hub id, not this machine's directory), its card the same with the local
directory beside it, no pickles in the adapter folder; copied elsewhere it loads with PEFT's
``AutoPeftModelForCausalLM`` alone. And ``resolve_model`` names where a bad model path came from."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from character_training.card import ModelCard
from character_training.config import models
from character_training.config.models import (DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_NAME, portable_model_name,
                                              resolve_model)
from character_training.errors import UserError
from character_training.train.dpo import LoraSettings, train_dpo
from data_gen.store import write_jsonl
from tests.conftest import toy_pairs

HUB_ID = "tiny-org/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def named_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model in a local directory whose config.json records the hub id it came from
    (``_name_or_path``, as configs saved by older transformers versions do)."""
    path = tmp_path_factory.mktemp("named") / "tiny-llama"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "_name_or_path": HUB_ID}, indent=2))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, named_model):
    tmp = tmp_path_factory.mktemp("portable")
    write_jsonl(tmp / "pairs.jsonl", toy_pairs(8))
    manifest = train_dpo(str(named_model), tmp / "pairs.jsonl", tmp / "out", lora=LoraSettings(r=4, alpha=8),
                         trainer={"max_steps": 2, "learning_rate": 5e-3, "per_device_train_batch_size": 4,
                                  "gradient_accumulation_steps": 1, "max_length": 64},
                         card=ModelCard(persona="toy-pirate"))
    return tmp / "out" / "adapter", manifest


def another_machines_hub_cache(root: Path, model: Path) -> Path:
    """A hub cache holding ``HUB_ID`` as the hub client lays it out, as on a machine that
    downloaded the base model (offline: nothing is fetched)."""
    repo = root / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return root


def test_the_adapter_names_its_base_portably_and_the_card_keeps_the_local_directory(trained, named_model):
    adapter, manifest = trained
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID
    card = (adapter / "README.md").read_text()
    assert card.startswith(f"---\nlibrary_name: peft\nbase_model: {HUB_ID}\n")
    assert f"Base model: `{HUB_ID}`" in card
    assert f"Base model loaded from: `{named_model}`" in card
    assert manifest["model"] == str(named_model)  # the run's own record keeps the directory it used
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not [p.name for p in adapter.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


def test_the_adapter_copied_elsewhere_loads_by_its_base_name(trained, named_model, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    adapter, _ = trained
    copy = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(adapter, copy)
    hub = another_machines_hub_cache(tmp_path / "hub", named_model)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(copy), cache_dir=str(hub)).eval()
    # Loaded by its name (no such local path; offline: from the hub cache).
    assert loaded.get_base_model().config._name_or_path == HUB_ID and not Path(HUB_ID).exists()

    base = AutoModelForCausalLM.from_pretrained(str(named_model), dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        base_logits = base(ids).logits
        here = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
        there = loaded(ids).logits
    torch.testing.assert_close(there, here)
    assert not torch.allclose(there, base_logits, atol=1e-6), "the loaded adapter changes the model"


def test_a_start_merge_composes_an_adapter_that_names_its_base_by_the_old_local_directory(trained, named_model,
                                                                                          tmp_path):
    """An adapter written before adapters named their base portably (its config names this
    machine's directory) is the same base as a new delta's hub id: they compose, and the result
    names the portable base."""
    from character_training.adapters.io import load_adapter
    from character_training.train.common import fold_merged

    adapter, _ = trained
    old = tmp_path / "old-adapter"
    shutil.copytree(adapter, old)
    config = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(named_model)}))
    out = tmp_path / "stage"
    shutil.copytree(adapter, out / "adapter")
    fold_merged(old, out, ModelCard(persona="toy-pirate"), model_path=str(named_model))
    composed = load_adapter(out / "adapter")
    assert composed.base_model == HUB_ID
    card = (out / "adapter" / "README.md").read_text()
    assert f"base_model: {HUB_ID}\n" in card and f"Base model loaded from: `{named_model}`" in card
    for name, f in composed.modules.items():
        torch.testing.assert_close(f.dense(), 2 * load_adapter(adapter).modules[name].dense(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ the name mapping

def test_the_packaged_models_directory_is_the_hub_id_it_was_converted_from(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARACTER_TRAINING_CACHE", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "models" / DEFAULT_MODEL_NAME
    converted.mkdir(parents=True)
    (converted / "config.json").write_text(json.dumps({"_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2"}))
    assert portable_model_name(str(converted)) == DEFAULT_MODEL_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    link = tmp_path / "link"
    link.symlink_to(converted)
    assert portable_model_name(str(link)) == DEFAULT_MODEL_HUB_ID  # the same directory by another path
    # Another cache: the directory is no longer the packaged model's, only a local directory.
    monkeypatch.setenv("CHARACTER_TRAINING_CACHE", str(tmp_path / "other-cache"))
    assert portable_model_name(str(converted)) == str(converted)


def test_a_hub_id_is_itself_and_a_hub_snapshot_is_its_hub_id(tmp_path):
    assert portable_model_name("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert portable_model_name(str(snapshot)) == "Qwen/Qwen2.5-0.5B-Instruct"


def test_a_plain_local_directory_is_the_hub_id_its_config_records_or_itself(tmp_path):
    plain = tmp_path / "my-model"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert portable_model_name(str(plain)) == str(plain)
    (plain / "config.json").write_text(json.dumps({"_name_or_path": "org/base-model"}))
    assert portable_model_name(str(plain)) == "org/base-model"
    # A recorded local path (absolute, or relative and existing) is not a hub id: the path as given.
    (plain / "config.json").write_text(json.dumps({"_name_or_path": "/home/someone/checkpoints/run-3"}))
    assert portable_model_name(str(plain)) == str(plain)
    (tmp_path / "org" / "local-model").mkdir(parents=True)
    (plain / "config.json").write_text(json.dumps({"_name_or_path": "org/local-model"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert portable_model_name(str(plain)) == str(plain)
    (plain / "config.json").write_text("not json")
    assert portable_model_name(str(plain)) == str(plain)
    (plain / "config.json").unlink()
    assert portable_model_name(str(plain)) == str(plain)


# ------------------------------------------------------------------- where a bad model path came from

def test_a_missing_model_path_names_the_key_it_came_from(tmp_path):
    missing = str(tmp_path / "teacher-model")
    with pytest.raises(UserError) as error:
        resolve_model(missing, where="models.teacher.model")
    assert str(error.value) == (f"models.teacher.model {missing}: no such directory, and not a hub id of the form "
                                "'org/name'")
    with pytest.raises(UserError, match=r"^--model .*: no such directory"):
        resolve_model(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^models\.judge\.model .*empty: directory has no config\.json"):
        resolve_model(str(tmp_path / "empty"), where="models.judge.model")


def test_a_hub_id_that_cannot_be_fetched_names_the_key_and_offers_no_flag_it_did_not_use(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as error:
        resolve_model("no-org/no-model", where="models.teacher.model")
    assert str(error.value).startswith("models.teacher.model no-org/no-model: cannot fetch it from the model hub")
    assert "--model" not in str(error.value)
    with pytest.raises(UserError, match="omit --model to use the packaged default model"):
        resolve_model("no-org/no-model")
    assert models.looks_like_hub_id("~/model") is False  # a home path is not sent to the hub
