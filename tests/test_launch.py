"""Training stages launched on several processes from the recipe's ``launch`` section.

The launcher lines for each config (cpu, ddp, zero2, zero3; one machine and several; under
srun), the section's checks, and two real 2-process CPU launches of the DPO stage through the
pipeline (torchrun over gloo, the tiny model, 2 steps): one that trains (adapter, manifest and
world size as complete as a one-process run's) and one whose worker fails (one line naming the
log; the earlier stage's outputs kept).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from character_training.errors import UserError
from character_training.run import launch, pipeline
from character_training.run import stages
from character_training.config.sections import LaunchSection
from character_training.run.launch import launch_command, last_error, srun_command, stage_command
from data_gen.store import write_jsonl
from tests.conftest import toy_pairs

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ["-m", "character_training.run.worker", "runs/r/recipe.json", "dpo", "runs/r/dpo"]


# --- the launcher lines ----------------------------------------------------------------------

def test_cpu_one_machine_is_a_standalone_torchrun_of_this_interpreter():
    line = launch_command(LaunchSection(config="cpu", processes=2), ENTRY, python="/venv/bin/python")
    assert line == ["/venv/bin/python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *ENTRY]


def test_cpu_several_machines_meet_at_the_main_process():
    section = LaunchSection(config="cpu", processes=2, machines=3, machine_rank=2, main_process_ip="10.0.0.1",
                            main_process_port=29600)
    line = launch_command(section, ENTRY, python=None)
    assert line == ["torchrun", "--nnodes", "3", "--node_rank", "2", "--master_addr", "10.0.0.1", "--master_port",
                    "29600", "--nproc_per_node", "2", *ENTRY]


@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3"])
def test_gpu_configs_use_the_shipped_yaml_by_absolute_path(config):
    line = launch_command(LaunchSection(config=config, processes=8), ENTRY, python="/venv/bin/python")
    assert line[:3] == ["/venv/bin/python", "-m", "accelerate.commands.launch"]
    config_file = Path(line[line.index("--config_file") + 1])
    assert config_file == ROOT / "scripts" / "accelerate" / f"{config}.yaml" and config_file.is_file()
    assert line[-len(ENTRY):] == ENTRY
    assert line[line.index("--num_processes"):line.index("--machine_rank") + 2] == [
        "--num_processes", "8", "--num_machines", "1", "--machine_rank", "0"]
    assert "--main_process_ip" not in line
    if config == "ddp":
        assert "--deepspeed_config_file" not in line
    else:  # the yaml names its JSON relative to the root; the line names it so that any directory works
        ds = Path(line[line.index("--deepspeed_config_file") + 1])
        assert ds.is_absolute() and ds == ROOT / "scripts" / "deepspeed" / f"{config}.json" and ds.is_file()


@pytest.mark.parametrize("config", ["ddp", "zero3"])
def test_gpu_several_machines_count_every_process(config):
    section = LaunchSection(config=config, processes=8, machines=2, machine_rank=1, main_process_ip="node0")
    line = launch_command(section, ENTRY, python="/venv/bin/python")
    joined = " ".join(line)
    assert "--num_processes 16 --num_machines 2 --machine_rank 1 --main_process_ip node0 --main_process_port 29500 " \
           "-m character_training.run.worker" in joined


def test_accelerate_reads_the_line_and_takes_the_absolute_deepspeed_file_over_the_yaml():
    from accelerate.commands.launch import launch_command_parser

    line = launch_command(LaunchSection(config="zero2", processes=2), ENTRY, python=sys.executable)
    args = launch_command_parser().parse_args(line[3:])
    assert args.config_file == str(ROOT / "scripts/accelerate/zero2.yaml")
    assert args.deepspeed_config_file == str(ROOT / "scripts/deepspeed/zero2.json")
    assert "deepspeed_config_file" in args.nondefault  # accelerate fills only the others from the yaml
    assert args.num_processes == 2 and args.module and args.training_script == "character_training.run.worker"
    assert args.training_script_args == ENTRY[2:]


def test_srun_starts_one_launcher_per_node_with_that_nodes_rank():
    section = LaunchSection(config="zero2", processes=8, machines=4, main_process_ip="node0", spawn="srun")
    line = stage_command(section, Path("runs/a b/recipe.json"), "sft", Path("runs/a b/sft"))
    assert line[:5] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash"]
    script = line[-1]
    assert '--machine_rank "$SLURM_NODEID"' in script and "--num_processes 32" in script
    assert "'runs/a b/recipe.json' sft 'runs/a b/sft'" in script  # quoted for the node's shell
    words = shlex.split(script.replace('"$SLURM_NODEID"', "3"))
    assert words[0] == "exec" and words[1] == sys.executable and words[words.index("--machine_rank") + 1] == "3"
    subprocess.run(["bash", "-n", "-c", script], check=True)


def test_srun_line_keeps_a_cpu_launch_on_torchrun():
    section = LaunchSection(config="cpu", processes=2, machines=2, main_process_ip="node0", spawn="srun")
    script = srun_command(section, launch_command(section, ENTRY, python="py", machine_rank=launch.SLURM_RANK))[-1]
    assert script.startswith("exec py -m torch.distributed.run --nnodes 2 --node_rank \"$SLURM_NODEID\" ")


# --- the section's checks -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,words", [
    ({"config": "zero9"}, "zero9"),
    ({"config": "cpu", "processes": 0}, "processes: 0"),
    ({"config": "cpu", "machines": 0}, "machines: 0"),
    ({"config": "ddp", "machines": 2, "machine_rank": 2, "main_process_ip": "a"}, "machine_rank: 2"),
    ({"config": "ddp", "machines": 2}, "main_process_ip"),
    ({"config": "ddp", "main_process_port": 0}, "main_process_port"),
    ({"config": "ddp", "spawn": "ssh"}, "spawn: 'ssh'"),
    ({"config": "ddp", "spawn": "srun", "machines": 2, "machine_rank": 1, "main_process_ip": "a"}, "SLURM_NODEID"),
])
def test_bad_sections_are_refused_by_name(kwargs, words):
    with pytest.raises(UserError, match=words.replace("$", r"\$")):
        LaunchSection(**kwargs)


def test_a_recipe_names_the_file_and_key_of_a_bad_launch_value(tmp_path):
    from character_training.config.recipe import load_recipe

    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(CONSTITUTION))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"constitution": "toy.yaml", "run_dir": "runs/x",
                                    "launch": {"config": "cpu", "processes": 0}}))
    with pytest.raises(UserError, match=r"recipe.yaml: launch.processes: 0"):
        load_recipe(path)


def test_more_cpu_processes_than_cores_is_a_warning(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    warning = launch.cpu_oversubscribed(LaunchSection(config="cpu", processes=4))
    assert "4 CPU processes on 2 cores" in warning
    assert launch.cpu_oversubscribed(LaunchSection(config="cpu", processes=2)) is None
    assert launch.cpu_oversubscribed(LaunchSection(config="ddp", processes=8)) is None


def test_the_failure_line_is_the_workers_error_else_the_last_exception(tmp_path):
    log = tmp_path / "launch.log"
    log.write_text("step 1\nTraceback (most recent call last):\nValueError: first\nerror: pairs.jsonl line 3: "
                   "no 'rejected'\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert last_error(log) == "pairs.jsonl line 3: no 'rejected'"
    log.write_text("[rank1]: Traceback\n[rank1]: RuntimeError: gloo: connection closed\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: worker failed\n")
    assert last_error(log) == "RuntimeError: gloo: connection closed"
    log.write_text("killed\n")
    assert last_error(log) is None


# --- scripts ------------------------------------------------------------------------------------

def launch_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "launch.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", **env}, timeout=120)


def test_launch_sh_prints_the_line_the_module_builds():
    result = launch_sh("cpu", "2", "dpo", "--data", "my pairs.jsonl", "-o", "out",
                       NUM_MACHINES="2", MACHINE_RANK="1", MAIN_PROCESS_IP="10.0.0.1")
    assert result.returncode == 0, result.stderr
    section = LaunchSection(config="cpu", processes=2, machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    expected = launch_command(section, ["-m", "character_training.cli", "train", "dpo", "--data", "my pairs.jsonl",
                                        "-o", "out"], absolute=False)
    assert shlex.split(result.stdout) == expected
    bad = launch_sh("cpu", "2", "dpo", NUM_MACHINES="2", MACHINE_RANK="5", MAIN_PROCESS_IP="10.0.0.1")
    assert bad.returncode == 2 and "machine_rank: 5" in bad.stderr


def test_slurm_run_script_is_valid_bash_and_runs_the_recipe_on_the_first_node():
    script = ROOT / "scripts" / "slurm" / "run.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "character_training.cli run" in text and "launch.spawn=srun" in text
    assert "launch.machines=" in text and "launch.main_process_ip=" in text


# --- real launches through the pipeline ---------------------------------------------------------

CONSTITUTION = {"name": "toy", "description": "A toy.",
                "traits": [{"trait": "I am a toy.", "questions": ["What are you made of?"]}]}
DPO = {"trainer": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                   "max_length": 64, "learning_rate": 5e-3}, "lora": {"r": 4, "alpha": 8}}


def write_recipe(tmp_path: Path, model: str, name: str, launched: bool) -> Path:
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(CONSTITUTION))
    recipe = {"constitution": "toy.yaml", "run_dir": str(tmp_path / name), "model": model,
              "stages": ["pairs", "dpo"], "dpo": DPO}
    if launched:
        recipe["launch"] = {"config": "cpu", "processes": 2}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def pairs_stage(monkeypatch):
    """The pairs stage writes given records (generation is not what is tested here); dpo is real."""
    records = {"pairs": toy_pairs(8)}

    def fake_pairs(section, ctx, out):
        write_jsonl(out / "pairs.jsonl", records["pairs"])
        return {"stage": "pairs", "counts": {"pairs": len(records["pairs"])}}

    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "pairs", fake_pairs)
    for name in list(os.environ):  # what an in-process trainer of an earlier test may have left
        if name in launch.LAUNCHER_ENV or name.startswith("ACCELERATE_"):
            monkeypatch.delenv(name)
    return records


def run_recipe(path: Path) -> dict:
    from character_training.config.recipe import load_recipe

    return pipeline.run(load_recipe(path), log=print)


def test_a_recipe_trains_its_dpo_stage_on_two_cpu_processes(tmp_path, tiny_model_dir, pairs_stage, capfd):
    launched = run_recipe(write_recipe(tmp_path, tiny_model_dir, "two", launched=True))["dpo"]
    output = capfd.readouterr().out
    one = run_recipe(write_recipe(tmp_path, tiny_model_dir, "one", launched=False))["dpo"]
    out = tmp_path / "two" / "dpo"

    # streamed to the console and kept in the log; each rank says what it was
    assert "[dpo] rank 0 of 2 (MULTI_CPU) finished" in output and "[dpo] rank 1 of 2 (MULTI_CPU) finished" in output
    log = (out / launch.LAUNCH_LOG).read_text()
    assert "rank 1 of 2 (MULTI_CPU) finished" in log and "torch.distributed.run --standalone" in log
    assert "terminate called" not in log

    assert launched["distributed"] == {"distributed_type": "MULTI_CPU", "world_size": 2}
    assert "distributed" not in one
    assert set(launched) - {"distributed"} == set(one)  # as complete as a one-process run's
    assert launched["counts"] == one["counts"] and launched["counts"]["steps"] == 2
    assert launched["provenance"]["stages"]["pairs"] == one["provenance"]["stages"]["pairs"]
    assert launched["log_history"][-1]["epoch"] == 2 * one["log_history"][-1]["epoch"]  # both ranks took data
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["run_id"] == launched["run_id"] and on_disk["distributed"]["world_size"] == 2
    assert not (out / launch.LAUNCHED_MANIFEST).exists()
    assert launch.LAUNCH_LOG in on_disk["outputs"]

    from tests.test_distributed import check_loads_and_trained

    adapter = out / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == sorted(p.name for p in (tmp_path / "one/dpo/adapter").iterdir())
    check_loads_and_trained(adapter, tmp_path / "one" / "dpo" / "adapter", tiny_model_dir)


def test_a_failed_launched_stage_is_one_line_naming_the_log_and_keeps_earlier_stages(
        tmp_path, tiny_model_dir, pairs_stage):
    pairs_stage["pairs"] = [{"prompt": [{"role": "user", "content": "Hi."}],
                             "chosen": [{"role": "assistant", "content": "Ahoy."}]}] * 4  # no rejected answers
    path = write_recipe(tmp_path, tiny_model_dir, "run", launched=True)
    with pytest.raises(UserError) as failure:
        run_recipe(path)
    message = str(failure.value)
    log = tmp_path / "run" / "dpo" / launch.LAUNCH_LOG
    assert "\n" not in message
    assert message.startswith("dpo: the launched stage failed on 2 processes (cpu, 1 machine) with exit code")
    assert "rejected" in message and str(log) in message and log.is_file()
    pairs = tmp_path / "run" / "pairs"
    assert (pairs / "manifest.json").is_file() and (pairs / "pairs.jsonl").is_file()
    assert not (tmp_path / "run" / "dpo" / "manifest.json").exists()


def test_the_benchmarks_prepared_run_goes_straight_to_the_launched_stage(tmp_path, tiny_model_dir, monkeypatch):
    """scripts/bench_launch.py times `run` on a run directory whose pairs stage it wrote itself: the
    run must accept that stage as finished (or the benchmark would time generation), and both ways
    must train with the same settings."""
    import importlib.util
    from character_training.config.recipe import load_recipe

    spec = importlib.util.spec_from_file_location("bench_launch", ROOT / "scripts" / "bench_launch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.argparse.Namespace(steps=2, batch_size=2, max_length=64, processes=2)
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(CONSTITUTION))
    write_jsonl(tmp_path / "pairs.jsonl", bench.toy_pairs(4))
    recipe_path = bench.prepared_run(args, tmp_path, tiny_model_dir, tmp_path / "pairs.jsonl", 0)
    recipe = load_recipe(recipe_path)
    assert recipe.launch == LaunchSection(config="cpu", processes=2)
    ran = []
    monkeypatch.setattr(launch, "run_launched", lambda section, stage, recipe_file, out: ran.append(stage) or {"stage": stage})
    logs: list[str] = []
    pipeline.run(recipe, log=logs.append)
    assert ran == ["dpo"] and any("[pairs] done already" in line for line in logs)
    hand = set(bench.sets(bench.dpo_section(args))[1::2])
    assert hand == {f"trainer.{k}={v}" for k, v in bench.dpo_section(args)["trainer"].items()} | {
        f"lora.r={recipe.dpo.lora.r}", f"lora.alpha={recipe.dpo.lora.alpha}"}
    # `train dpo --set` builds the same section, so both runs train with the same fields (defaults included)
    from character_training.config.training import DpoSection

    assert recipe.dpo.trainer == DpoSection(trainer=bench.dpo_section(args)["trainer"]).trainer


def test_a_launcher_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    section = LaunchSection(config="cpu", processes=2, machines=2, main_process_ip="node0", spawn="srun")
    with pytest.raises(UserError, match=r"^srun: cannot start the launcher .*SLURM job"):
        launch.run_launched(section, "dpo", tmp_path / "recipe.json", tmp_path)
    assert (tmp_path / launch.LAUNCH_LOG).read_text().startswith("+ srun --nodes=2")
