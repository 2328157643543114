"""DPO training on a tiny random model: the adapter learns, the base stays, PEFT loads it."""
from __future__ import annotations

import json

import pytest
import torch

from character_training.card import ModelCard
from character_training.errors import UserError
from character_training.train.dpo import LoraSettings, check_trainer_fields, train_dpo
from character_training.util import file_sha256
from data_gen.store import write_jsonl
from tests.conftest import toy_pairs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("dpo")
    write_jsonl(tmp / "pairs.jsonl", toy_pairs(8))
    manifest = train_dpo(tiny_model_dir, tmp / "pairs.jsonl", tmp / "out", lora=LoraSettings(r=4, alpha=8),
                         trainer={"max_steps": 3, "learning_rate": 5e-3, "per_device_train_batch_size": 4,
                                  "gradient_accumulation_steps": 1, "max_length": 64},
                         card=ModelCard(persona="toy-pirate", constitution_sha256="abc123"))
    return tmp / "out" / "adapter", manifest


def test_adapter_directory_is_a_peft_lora_with_model_card(trained):
    adapter, manifest = trained
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert (adapter / "adapter_model.safetensors").is_file()
    card = (adapter / "README.md").read_text()
    assert "toy-pirate" in card and "abc123" in card and "learning_rate" in card
    pairs = adapter.parent.parent / "pairs.jsonl"  # the card names the data it was trained on, with its hash
    assert f"| `{pairs}` | 8 preference pairs | `{file_sha256(pairs)}` |" in card
    assert "`?`" not in card and "## Provenance" not in card  # no provenance was given
    assert manifest["counts"] == {"pairs": 8, "pairs_read": 8, "loop_negatives": 0, "steps": 3}
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


def test_training_png_and_checkpoints_are_written(trained):
    adapter, manifest = trained
    out = adapter.parent
    assert (out / "training.png").stat().st_size > 1000
    assert manifest["resumed_from"] is None


def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_at_the_same_step(tmp_path, tiny_model_dir, capsys):
    import shutil

    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(8))
    settings = dict(lora=LoraSettings(r=4, alpha=8),
                    trainer={"max_steps": 4, "save_steps": 2, "save_total_limit": 5, "learning_rate": 5e-3,
                             "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 64})
    full = train_dpo(tiny_model_dir, tmp_path / "pairs.jsonl", tmp_path / "full", **settings)
    # A run killed after step 2, while writing checkpoint-4: checkpoint-2 survives, checkpoint-4 has
    # its weights but not trainer_state.json (the last file written).
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-2", killed / "checkpoints" / "checkpoint-2")
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-4", killed / "checkpoints" / "checkpoint-4")
    (killed / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    capsys.readouterr()
    resumed = train_dpo(tiny_model_dir, tmp_path / "pairs.jsonl", killed, **settings)
    assert ("[dpo] warning: checkpoints/checkpoint-4 is incomplete (no trainer_state.json: a write was killed); "
            "resuming from checkpoint-2\n") in capsys.readouterr().out
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["counts"]["steps"] == full["counts"]["steps"] == 4
    steps_logged = [e["step"] for e in resumed["log_history"] if "loss" in e]
    assert steps_logged[-1] == 4
    assert (killed / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()  # written again, whole


def test_an_incomplete_checkpoint_is_passed_over_with_one_warning_line(tmp_path, capsys):
    from character_training.train.common import last_checkpoint

    checkpoints = tmp_path / "checkpoints"

    def checkpoint(step: int, complete: bool) -> None:
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        (checkpoints / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"partial")
        if complete:
            (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")

    assert last_checkpoint(tmp_path, "dpo") is None and capsys.readouterr().out == ""
    checkpoint(10, complete=False)
    assert last_checkpoint(tmp_path, "dpo") is None
    assert capsys.readouterr().out == ("[dpo] warning: checkpoints/checkpoint-10 is incomplete (no trainer_state.json: "
                                       "a write was killed); starting from step 0\n")
    checkpoint(5, complete=True)
    assert last_checkpoint(tmp_path, "sft") == str(checkpoints / "checkpoint-5")
    assert capsys.readouterr().out == ("[sft] warning: checkpoints/checkpoint-10 is incomplete (no trainer_state.json: "
                                       "a write was killed); resuming from checkpoint-5\n")
    checkpoint(15, complete=True)  # newer than the incomplete one: nothing was passed over
    (checkpoints / "checkpoint-notes").mkdir()
    assert last_checkpoint(tmp_path, "dpo") == str(checkpoints / "checkpoint-15")
    assert capsys.readouterr().out == ""


def test_training_continues_on_a_previous_adapter_and_takes_a_system_prompt(trained, tmp_path, tiny_model_dir):
    adapter, _ = trained
    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(4))
    manifest = train_dpo(tiny_model_dir, tmp_path / "pairs.jsonl", tmp_path / "out", init_adapter=adapter,
                         system_prompt="You are being trained.",
                         trainer={"max_steps": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                                  "max_length": 64})
    assert manifest["start"] == {"init_adapter": str(adapter), "mode": "continue"}
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4  # the same LoRA trained on
    assert "training-time system prompt" in (tmp_path / "out" / "adapter" / "README.md").read_text()


def test_a_non_lora_adapter_is_refused_by_name(tmp_path, tiny_model_dir):
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(4))
    with pytest.raises(UserError, match="IA3"):
        train_dpo(tiny_model_dir, tmp_path / "pairs.jsonl", tmp_path / "out", init_adapter=tmp_path / "ia3",
                  trainer={"max_steps": 1})


def test_cli_train_merge_start_writes_one_lora_on_the_original_base(trained, tmp_path, tiny_model_dir):
    """`train dpo --init-adapter PREV --start merge`: a new LoRA trains on the base with PREV merged
    in; the stage's adapter/ is one LoRA on the original base whose delta is PREV's plus the new one's."""
    from character_training import cli
    from character_training.adapters.io import load_adapter

    previous, _ = trained
    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(4))
    out = tmp_path / "chained"
    assert cli.main(["train", "dpo", "--data", str(tmp_path / "pairs.jsonl"), "-o", str(out), "--model", tiny_model_dir,
                     "--init-adapter", str(previous), "--start", "merge", "--set", "trainer.max_steps=1",
                     "--set", "trainer.per_device_train_batch_size=4", "--set", "trainer.gradient_accumulation_steps=1",
                     "--set", "trainer.max_length=64", "--set", "trainer.learning_rate=5e-3",
                     "--set", "lora.r=2", "--set", "lora.alpha=4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["composed"]["delta"] == str(out / "adapter-delta")
    chained, prev, delta = (load_adapter(p) for p in (out / "adapter", previous, out / "adapter-delta"))
    assert chained.config["base_model_name_or_path"] == prev.config["base_model_name_or_path"]
    for name, f in chained.modules.items():
        expected = sum(a.modules[name].dense() for a in (prev, delta) if name in a.modules)
        torch.testing.assert_close(f.dense(), expected, rtol=1e-5, atol=1e-6)


def test_a_merged_start_is_folded_into_one_lora_whose_card_keeps_the_caller_part(trained, tmp_path):
    """fold_merged (what a ``start: merge`` stage ends with): out/adapter becomes adapter-delta, and
    the composed out/adapter's card names both inputs with their hashes, the persona, the provenance."""
    import shutil

    from character_training.adapters.io import load_adapter
    from character_training.train.common import fold_merged

    previous, _ = trained
    out = tmp_path / "stage"
    shutil.copytree(previous, out / "adapter")
    card = ModelCard(persona="toy-pirate", provenance={"stages": {"pairs": {"outputs": {"pairs.jsonl": "feed"}}}})
    composed = fold_merged(previous, out, card)
    assert composed == {"previous": str(previous), "delta": str(out / "adapter-delta"), "adapter": str(out / "adapter")}
    text = (out / "adapter" / "README.md").read_text()
    sha = load_adapter(previous).sha256
    assert f"| {previous} | 1.0 | `{sha}` |" in text and f"| {out / 'adapter-delta'} | 1.0 | `{sha}` |" in text
    assert "# toy-pirate: composed persona LoRA adapter" in text and "Operation: `compose`" in text
    assert text.count("## Provenance") == 1 and '"pairs.jsonl": "feed"' in text


def test_over_long_pairs_are_counted_dropped_and_all_over_long_is_an_error(tmp_path, tiny_model_dir):
    long = dict(toy_pairs(1)[0], chosen=[{"role": "assistant", "content": "Arr, me hearty! " * 60}])
    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(4) + [long])
    manifest = train_dpo(tiny_model_dir, tmp_path / "pairs.jsonl", tmp_path / "out", lora=LoraSettings(r=2, alpha=4),
                         trainer={"max_steps": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                                  "max_length": 64}, overlong="drop")
    assert manifest["counts"]["pairs"] == 4
    assert manifest["lengths"]["overlong"] == 1 and manifest["overlong"] == "drop"
    write_jsonl(tmp_path / "long.jsonl", [long] * 3)
    with pytest.raises(UserError, match=r"all 3 pairs are longer than max_length=64 tokens"):
        train_dpo(tiny_model_dir, tmp_path / "long.jsonl", tmp_path / "out2", trainer={"max_length": 64})


def test_a_training_process_killed_with_sigkill_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    """The real thing, not a copied checkpoint: `character-training train dpo` is SIGKILLed once a
    checkpoint is on disk; the same command again resumes there and ends at the same step."""
    import os
    import signal
    import subprocess
    import sys
    import time

    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(8))
    out = tmp_path / "out"
    steps = 40
    cmd = [sys.executable, "-m", "character_training.cli", "train", "dpo", "--data", str(tmp_path / "pairs.jsonl"),
           "-o", str(out), "--model", tiny_model_dir, "--set", "lora.r=4", "--set", "lora.alpha=8",
           *[f"--set=trainer.{k}={v}" for k, v in {
               "max_steps": steps, "save_steps": 4, "save_total_limit": 2, "learning_rate": 1e-3,
               "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 64,
               "logging_steps": 1}.items()]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 3600  # the event is the checkpoint on disk; this only ends a hung run
        while not list((out / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within an hour"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    killed_at = max(int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    assert killed_at < steps

    # No fixed time limit on the resumed run (it timed out at 600 s on a loaded 2-core machine): the
    # event waited on is its exit; the guard is only there to end a hung run.
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from"] is not None and int(manifest["resumed_from"].rsplit("-", 1)[1]) >= killed_at
    assert manifest["counts"]["steps"] == steps
    # The history restored from the checkpoint plus the resumed steps: every step once, none lost.
    assert [e["step"] for e in manifest["log_history"] if "loss" in e] == list(range(1, steps + 1))


def test_loop_negatives_pair_the_chosen_answer_with_a_looping_copy_of_it():
    import random

    from datasets import Dataset

    from data_gen.filters import distinct_3gram_share
    from character_training.train.dpo import add_loop_negatives, looped

    assert looped("Too short to loop.", random.Random(0)) is None
    pairs = [{**p, "chosen": [{"role": "assistant", "content": f"Ahoy, matey! Arr, the {i} be a fine thing on me ship "
                                                                "when the wind blows from the west. Fair winds!"}]}
             for i, p in enumerate(toy_pairs(8))]
    dataset, added = add_loop_negatives(Dataset.from_list(pairs), 0.5, seed=0)
    assert added == 4 and len(dataset) == 12
    originals = {r["prompt"][0]["content"]: r for r in pairs}
    for row in dataset.select(range(8, 12)):
        chosen = row["chosen"][-1]["content"]
        loop = row["rejected"][-1]["content"]
        assert row["chosen"] == originals[row["prompt"][0]["content"]]["chosen"]
        assert loop.split()[:4] == chosen.split()[:4]          # the same opening ...
        assert len(loop.split()) >= len(chosen.split())        # ... then a loop as long as the answer
        assert distinct_3gram_share(loop) < 0.7 < distinct_3gram_share(chosen)
    assert add_loop_negatives(Dataset.from_list(pairs), 0.0, seed=0)[1] == 0
    with pytest.raises(UserError, match="loop_negatives"):
        add_loop_negatives(Dataset.from_list(pairs), 1.5, seed=0)
