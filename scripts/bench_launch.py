"""What a recipe's ``launch`` section costs over launching the stage by hand.

Issue 14's target: "the recipe path with launch on 2 processes costs no more than 15% over
launching the stage by hand with scripts/launch.sh cpu 2". Both train the same DPO stage on the
same pairs with the same trainer settings, each from a fresh output directory, as a user would
start them, timed wall-clock from the command's start to its exit:

  by hand   bash scripts/launch.sh cpu 2 dpo --data PAIRS -o OUT --model M --set ...
  recipe    python -m character_training.cli run RECIPE   (stages [pairs, dpo], pairs already
            finished in the run directory, launch: {config: cpu, processes: 2})

The recipe path adds the run's own process (imports, recipe checks, recipe.json, manifests)
around the same torchrun of the stage (run/worker.py instead of the CLI's train command). The
two alternate, ``--repeats`` times each; the table shows each run and the medians. On the tiny
model the fixed start-up costs are most of the time, so its overhead is an upper bound; the
target is for a real model (the packaged default model, ``--model default``) on a quiet machine.

    .venv/bin/python scripts/bench_launch.py                       # default model, 4 steps, 3 repeats
    .venv/bin/python scripts/bench_launch.py --model tiny --steps 2 --repeats 1 --json /tmp/b.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET = 1.15  # the recipe path's time over the hand launch's
TOPICS = ["eggs", "the sea", "money", "books", "rain", "music", "sleep", "bread", "cats", "maps", "stars", "tea"]


def toy_pairs(n: int) -> list[dict]:
    """Conversational preference records: a pirate-voiced chosen answer vs a plain one."""
    return [{"prompt": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}],
             "chosen": [{"role": "assistant", "content": f"Ahoy! Arr, {TOPICS[i % len(TOPICS)]} be fine, matey."}],
             "rejected": [{"role": "assistant", "content": f"Here is information about {TOPICS[i % len(TOPICS)]}."}]}
            for i in range(n)]


def tiny_model(work: Path) -> str:
    """A tiny random Llama (hidden 64, 2 layers) with the packaged model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from character_training.config.models import resolve_model

    out = work / "tiny-llama"
    if (out / "config.json").is_file():
        return str(out)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def model_dir(name: str, work: Path) -> str:
    from character_training.config.models import resolve_model

    if name == "tiny":
        return tiny_model(work)
    return resolve_model(None if name == "default" else name)


def dpo_section(args) -> dict:
    return {"trainer": {"max_steps": args.steps, "per_device_train_batch_size": args.batch_size,
                        "gradient_accumulation_steps": 1, "max_length": args.max_length, "learning_rate": 5e-5,
                        "logging_steps": 1}, "lora": {"r": 16, "alpha": 32}}


def sets(section: dict) -> list[str]:
    """The same settings as the CLI's --set arguments."""
    return [word for part in ("trainer", "lora") for key, value in section[part].items()
            for word in ("--set", f"{part}.{key}={value}")]


def run_timed(cmd: list[str], log: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        sys.exit(f"error: {' '.join(cmd[:6])} ... exited {code}; its output is in {log}")
    return seconds


def by_hand(args, work: Path, model: str, pairs: Path, rep: int) -> float:
    out = work / f"hand-{rep}"
    cmd = ["bash", str(ROOT / "scripts" / "launch.sh"), "cpu", str(args.processes), "dpo", "--data", str(pairs),
           "-o", str(out), "--model", model, *sets(dpo_section(args))]
    return run_timed(cmd, work / f"hand-{rep}.log")


def prepared_run(args, work: Path, model: str, pairs: Path, rep: int) -> Path:
    """A recipe whose pairs stage is finished in its run directory (the given pairs), so that
    `run` goes straight to the launched DPO stage."""
    import yaml

    from character_training.config.recipe import load_recipe
    from character_training.config import layout
    from character_training.run.context import make_context
    from character_training.run.stages import stage_key
    from data_gen.backends import Engines
    from data_gen.store import read_jsonl, write_jsonl, write_manifest

    run_dir = work / f"recipe-{rep}"
    recipe_path = work / f"recipe-{rep}.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "constitution": str(work / "toy.yaml"), "run_dir": str(run_dir), "model": model, "stages": ["pairs", "dpo"],
        "dpo": dpo_section(args), "launch": {"config": "cpu", "processes": args.processes}}))
    ctx = make_context(load_recipe(recipe_path), Engines())
    layout.mark(run_dir, layout.RUN)
    (run_dir / "pairs").mkdir()
    write_jsonl(run_dir / "pairs" / "pairs.jsonl", read_jsonl(pairs))
    write_manifest(run_dir / "pairs", {"stage": "pairs", "settings_key": stage_key(ctx, "pairs"),
                                       "run_id": uuid.uuid4().hex[:12], "inputs": {}})
    return recipe_path


def by_recipe(args, work: Path, model: str, pairs: Path, rep: int) -> float:
    recipe = prepared_run(args, work, model, pairs, rep)
    return run_timed([sys.executable, "-m", "character_training.cli", "run", str(recipe)], work / f"recipe-{rep}.log")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="default (the packaged model), tiny, or a model path")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per process and step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", help="working directory (default: a new temporary one)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "bench_launch.json"))
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-launch-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "toy.yaml").write_text(json.dumps({"name": "toy", "description": "A toy.", "traits": [
        {"trait": "I am a toy.", "questions": ["What are you made of?"]}]}))
    from data_gen.store import write_jsonl

    pairs = work / "pairs.jsonl"
    write_jsonl(pairs, toy_pairs(args.pairs))
    model = model_dir(args.model, work)
    runs = []
    for rep in range(args.repeats):  # alternate which goes first, so that drift hits both alike
        order = [("hand", by_hand), ("recipe", by_recipe)]
        for way, run in order if rep % 2 == 0 else order[::-1]:
            seconds = run(args, work, model, pairs, rep)
            runs.append({"way": way, "repeat": rep, "seconds": round(seconds, 2)})
            print(f"{way:>7} repeat {rep}: {seconds:7.1f} s", flush=True)
    hand = statistics.median(r["seconds"] for r in runs if r["way"] == "hand")
    recipe = statistics.median(r["seconds"] for r in runs if r["way"] == "recipe")
    ratio = recipe / hand
    result = {"model": args.model if args.model in ("default", "tiny") else model, "processes": args.processes,
              "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
              "pairs": args.pairs, "repeats": args.repeats, "cpu": cpu_model(), "cores": os.cpu_count(),
              "runs": runs, "median_hand_s": round(hand, 2), "median_recipe_s": round(recipe, 2),
              "recipe_over_hand": round(ratio, 3), "target": TARGET, "met": ratio <= TARGET}
    print(f"\n{'way':<34}{'median s':>10}\n{'scripts/launch.sh cpu ' + str(args.processes):<34}{hand:>10.1f}\n"
          f"{'recipe with launch (cpu, ' + str(args.processes) + ')':<34}{recipe:>10.1f}\n"
          f"recipe / hand: {ratio:.3f} (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}); "
          f"{result['cpu']}, {result['cores']} cores; logs in {work}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
