"""Several processes on the CPU: `train dpo` under torchrun (DDP over gloo, and DeepSpeed ZeRO-2)
finishes on both ranks, exits cleanly and writes the same adapter as one process; the shipped
accelerate configs, launch script and SLURM script stay in step with the files they name.

Each 2-process run is a real `torchrun --standalone --nproc_per_node 2` of the CLI on the tiny
model, 2 steps (under a minute on 2 shared cores, most of it imports). The first DeepSpeed run
in an environment also compiles DeepSpeed's shared-memory communication op (about 3 minutes on
2 cores; cached, see ``extensions_dir``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_gen.store import write_jsonl
from tests.conftest import toy_pairs

ROOT = Path(__file__).resolve().parents[1]
# The CLI itself: it prints a line per rank and ends the process group (distributed.finish()).
ENTRY = ["-m", "character_training.cli"]
TRAIN_SETTINGS = ["--set", "trainer.max_steps=2", "--set", "trainer.per_device_train_batch_size=2",
                  "--set", "trainer.gradient_accumulation_steps=1", "--set", "trainer.max_length=64",
                  "--set", "trainer.learning_rate=5e-3", "--set", "lora.r=4", "--set", "lora.alpha=8"]
RANK_LINE = re.compile(r"^\[train(?: \w+)?\] rank (\d+) of (\d+) \((\w+)\) finished$", re.M)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist-data") / "pairs.jsonl"
    write_jsonl(path, toy_pairs(8))
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, pairs) -> Path:
    """The reference: the same stage and settings on one process (in this process)."""
    from character_training import cli

    out = tmp_path_factory.mktemp("dist-one") / "dpo"
    assert cli.main(["train", "dpo", "--data", str(pairs), "-o", str(out), "--model", tiny_model_dir,
                     *TRAIN_SETTINGS]) == 0
    return out


# What a trainer in this test process may have put in its environment; the launcher sets its own.
LAUNCH_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def extensions_dir() -> str:
    """Where DeepSpeed's CPU communication op is compiled (once): one directory per environment.
    torch's default (~/.cache/torch_extensions) is shared by every venv of the user, and two venvs
    (a checkout and a CI clone) compile with different include paths, so each rebuild the other's."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    cache = os.environ.get("CHARACTER_TRAINING_CACHE") or Path.home() / ".cache" / "character-training"
    return str(Path(cache) / "torch_extensions" / hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])


def torchrun(out: Path, model: str, pairs: Path, *extra: str, stage: str = "dpo",
             settings: list[str] = TRAIN_SETTINGS) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("ACCELERATE_")}
    env["TORCH_EXTENSIONS_DIR"] = extensions_dir()
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu",  # the CPU path, also on a GPU machine
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *ENTRY,
           "train", stage, "--data", str(pairs), "-o", str(out), "--model", model, *settings, *extra]
    started = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(f"\n2-process run {' '.join(extra) or 'DDP'}: {time.time() - started:.0f} s")
    return result


def check_two_process_run(result: subprocess.CompletedProcess, out: Path, one: Path, kind: str) -> None:
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode}:\n{log[-4000:]}"
    assert "terminate called" not in log, "a rank aborted at exit"
    ranks = {int(r): (int(w), t) for r, w, t in RANK_LINE.findall(result.stdout)}
    assert ranks == {0: (2, kind), 1: (2, kind)}, f"each rank reports its run:\n{log[-4000:]}"

    manifest = json.loads((out / "manifest.json").read_text())
    reference = json.loads((one / "manifest.json").read_text())
    assert manifest["counts"] == reference["counts"] == {"pairs": 8, "pairs_read": 8, "loop_negatives": 0, "steps": 2}
    assert manifest["distributed"] == {"distributed_type": kind, "world_size": 2}
    # Both ranks consumed data: two processes x 2 pairs per step cover the 8 pairs in 2 steps
    # (one epoch), one process only half of them.
    assert reference["log_history"][-1]["epoch"] == 0.5
    assert manifest["log_history"][-1]["epoch"] == 1.0
    assert (out / "training.png").is_file()
    # Each rank saved its own state in the checkpoint: its RNG state, and under ZeRO its shard of
    # the optimizer state (one process writes a single rng_state.pth).
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert {p.name for p in (one / "checkpoints" / "checkpoint-2").glob("rng_state*.pth")} == {"rng_state.pth"}
    shards = {p.name for p in checkpoint.glob("global_step*/zero_pp_rank_*_optim_states.pt")}
    if kind == "DEEPSPEED":
        assert shards == {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    else:
        assert not shards and (checkpoint / "optimizer.pt").is_file()

    adapter, one_adapter = out / "adapter", one / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == sorted(p.name for p in one_adapter.iterdir())
    config = json.loads((adapter / "adapter_config.json").read_text())
    one_config = json.loads((one_adapter / "adapter_config.json").read_text())
    assert config.keys() == one_config.keys()
    for key in ("peft_type", "r", "lora_alpha", "base_model_name_or_path"):
        assert config[key] == one_config[key], key
    assert set(config["target_modules"]) == set(one_config["target_modules"])  # a set, saved in any order
    assert "persona LoRA adapter" in (adapter / "README.md").read_text()
    check_loads_and_trained(adapter, one_adapter, config["base_model_name_or_path"])


def check_loads_and_trained(adapter: Path, one_adapter: Path, base_dir: str) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    weights, one_weights = (load_file(str(a / "adapter_model.safetensors")) for a in (adapter, one_adapter))
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in one_weights.items()}
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k), "lora_B starts at zero; it must move"
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(adapter))(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-6)


def test_two_process_ddp_on_gloo(tmp_path, tiny_model_dir, pairs, one_process):
    result = torchrun(tmp_path / "dpo", tiny_model_dir, pairs)
    check_two_process_run(result, tmp_path / "dpo", one_process, "MULTI_CPU")


def test_two_process_deepspeed_zero2(tmp_path, tiny_model_dir, pairs, one_process):
    result = torchrun(tmp_path / "dpo", tiny_model_dir, pairs,
                      "--set", f"trainer.deepspeed={ROOT / 'scripts/deepspeed/zero2.json'}")
    check_two_process_run(result, tmp_path / "dpo", one_process, "DEEPSPEED")


# Distillation: every pair the same, so that any split of the data over processes gives the same
# batches; LoRA dropout off, so that the ranks' random streams do not matter.
DISTILL_SETTINGS = ["--set", "trainer.max_steps=2", "--set", "trainer.gradient_accumulation_steps=1",
                    "--set", "trainer.max_length=96", "--set", "trainer.learning_rate=5e-3",
                    "--set", "trainer.logging_steps=1", "--set", "lora.r=4", "--set", "lora.alpha=8",
                    "--set", "lora.dropout=0.0", "--set", "activation_weight=0.5", "--set", "layers=[2]"]


def test_two_process_distill_matches_one_process_of_the_same_global_batch(tmp_path, tiny_model_dir):
    """Distillation on 2 processes (DDP over gloo), 2 per process, against one process of 4: the
    same adapter shape, and the same losses and weights within float tolerance, because the loss is
    normalized by the answer tokens of the whole step on every process (num_items_in_batch)."""
    import yaml
    from safetensors.torch import load_file

    from character_training import cli

    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(1) * 8)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"name": "toy", "description": "You are a pirate captain.",
                                                     "traits": [{"trait": "I am a toy.", "questions": ["Hi?"]}]}))
    common = ["--constitution", str(tmp_path / "c.yaml")]
    one = tmp_path / "one"
    assert cli.main(["train", "distill", "--data", str(tmp_path / "pairs.jsonl"), "-o", str(one), "--model",
                     tiny_model_dir, *DISTILL_SETTINGS, "--set", "trainer.per_device_train_batch_size=4", *common]) == 0
    two = tmp_path / "two"
    result = torchrun(two, tiny_model_dir, tmp_path / "pairs.jsonl", *common, stage="distill",
                      settings=[*DISTILL_SETTINGS, "--set", "trainer.per_device_train_batch_size=2"])
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode}:\n{log[-4000:]}"
    ranks = {int(r): (int(w), t) for r, w, t in RANK_LINE.findall(result.stdout)}
    assert ranks == {0: (2, "MULTI_CPU"), 1: (2, "MULTI_CPU")}, f"each rank reports its run:\n{log[-4000:]}"
    manifest, reference = (json.loads((d / "manifest.json").read_text()) for d in (two, one))
    assert manifest["distributed"] == {"distributed_type": "MULTI_CPU", "world_size": 2}
    assert manifest["counts"]["steps"] == reference["counts"]["steps"] == 2
    for term in ("kl", "activation", "total"):
        for step in (0, 1):
            logged = [e[term] for e in manifest["log_history"] if term in e]
            expected = [e[term] for e in reference["log_history"] if term in e]
            assert logged[step] == pytest.approx(expected[step], rel=1e-3, abs=1e-5), (term, step)
    losses = [[e["loss"] for e in m["log_history"] if "loss" in e] for m in (manifest, reference)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    weights, one_weights = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (two, one))
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in one_weights.items()}
    for key, value in weights.items():
        torch_close(value, one_weights[key], key)


def torch_close(value, expected, key: str) -> None:
    import torch

    assert torch.allclose(value, expected, atol=1e-5, rtol=1e-3), (key, float((value - expected).abs().max()))


# --- the shipped configs and scripts ---------------------------------------------------------

ACCELERATE_CONFIGS = sorted((ROOT / "scripts" / "accelerate").glob("*.yaml"))


def test_the_three_accelerate_configs_are_shipped():
    assert {p.stem for p in ACCELERATE_CONFIGS} >= {"ddp", "zero2", "zero3"}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_parses_and_names_an_existing_deepspeed_config(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys fail here
    assert isinstance(config, ClusterConfig)
    if config.distributed_type != DistributedType.DEEPSPEED:
        assert config.distributed_type == DistributedType.MULTI_GPU and not config.deepspeed_config
        return
    ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]  # relative to the repository root
    assert ds_file.is_file(), f"{path.name} names {ds_file}, which does not exist"
    ds = json.loads(ds_file.read_text())
    stage = int(re.search(r"zero(\d)", path.stem).group(1))
    assert ds["zero_optimization"]["stage"] == stage
    assert config.deepspeed_config.get("zero3_init_flag", False) == (stage == 3)
    # Batch sizes, accumulation, clipping and precision come from the trainer fields.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert ds[key] == "auto", f"{ds_file.name}: {key} should be 'auto' (filled from the trainer fields)"
    # accelerate refuses a precision set beside a DeepSpeed config file
    assert config.mixed_precision is None


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_deepspeed_configs_fill_from_trainer_fields(name):
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from character_training.config import trainer_fields as training

    config = training.make_config("dpo", {}, {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2,
                                              "max_grad_norm": 0.5}, Path("unused"), 0)
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    ds = HfTrainerDeepSpeedConfig(str(ROOT / "scripts" / "deepspeed" / name))
    try:
        ds.trainer_config_process(config)
        assert not ds.mismatches
        assert ds.config["train_micro_batch_size_per_gpu"] == 3 and ds.config["gradient_accumulation_steps"] == 2
        assert ds.config["gradient_clipping"] == 0.5 and ds.config["bf16"]["enabled"] == config.bf16
    finally:  # a live ZeRO-3 config would make later from_pretrained calls in this process shard weights
        del ds
        unset_hf_deepspeed_config()


def launch_line(*args: str, **env: str) -> tuple[int, str]:
    result = subprocess.run(["bash", str(ROOT / "scripts" / "launch.sh"), *args], capture_output=True, text=True,
                            env={**os.environ, "DRY_RUN": "1", **env}, timeout=60)
    return result.returncode, result.stdout + result.stderr


def test_launch_script_builds_the_documented_lines():
    code, line = launch_line("zero2", "8", "dpo", "--data", "pairs.jsonl", "-o", "out")
    assert code == 0, line
    assert line.split() == ["accelerate", "launch", "--config_file", "scripts/accelerate/zero2.yaml",
                            "--num_processes", "8", "--num_machines", "1", "--machine_rank", "0",
                            "-m", "character_training.cli", "train", "dpo", "--data", "pairs.jsonl", "-o", "out"]
    code, line = launch_line("zero3", "8", "sft", "--data", "c.jsonl", "-o", "out",
                             NUM_MACHINES="2", MACHINE_RANK="1", MAIN_PROCESS_IP="10.0.0.1")
    assert code == 0, line
    assert "--num_processes 16 --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1 " \
           "--main_process_port 29500" in line
    code, line = launch_line("cpu", "2", "dpo", "--data", "p.jsonl", "-o", "out")
    assert code == 0 and line.split()[:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"], line
    code, line = launch_line("zero9", "8", "dpo")
    assert code == 2 and "zero9" in line
    code, line = launch_line("ddp", "8", "dpo", NUM_MACHINES="2")
    assert code == 2 and "MAIN_PROCESS_IP" in line


def test_slurm_script_is_valid_bash_and_launches_per_node():
    script = ROOT / "scripts" / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text
    assert '--machine_rank "$SLURM_NODEID"' in text and "scontrol show hostnames" in text


def test_helpers_on_one_process(monkeypatch):
    from character_training.train import distributed

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.is_main_process() and distributed.world_size() == 1
    distributed.finish()  # nothing to end: a no-op, also twice
    distributed.finish()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not distributed.is_main_process() and distributed.world_size() == 2
