"""Training benchmark: tokens/s, MFU and peak memory of our SFT, DPO and distill stages over a settings matrix.

The same model, the same variable-length data and the same LoRA (r16), trained by our own stages:
SFT through ``character_training.train.sft.build_sft``, DPO through
``character_training.train.dpo.train_dpo`` (TRL's SFTTrainer and DPOTrainer) and context
distillation through ``character_training.train.distill.build_distill`` (its Trainer), one row of
settings at a time, each in its own process (so its peak memory is its own). The rows
(``--matrix``: all of them for the ``--trainers`` chosen):

  sft-padded / sft-padded-gc             plain batches, each padded to its longest conversation
  sft-padding_free / sft-padding_free-gc the batch's conversations concatenated (TRL ``padding_free``)
  sft-packed                             conversations packed into rows of max_length (TRL bfd)
  sft-padding_free-liger                 padding-free with Liger's kernels (where liger-kernel is installed)
  dpo / dpo-gc / dpo-liger               chosen and rejected answers in one padded batch
  distill                                the pairs' prompt + chosen answer, the student's view trained
                                         against the teacher's (the same model, LoRA off, behind a
                                         system prompt of about 300 tokens, as a constitution is)
  (-gc: TRL's gradient checkpointing on; the other rows have it off)

TRL 1.16's DPOTrainer has no padding-free mode (``padding_free=True`` warns and pads), so no DPO
row has one; the JSON's ``skipped`` says so, and names the Liger rows where liger-kernel is absent.

Warm-up is not timed: the first ``--warmup-steps`` optimizer steps of each row (default 1: the
cold step, with its kernel selection, allocator growth and lazy initialisation) run but are left
out; tokens/s and MFU are over the steps after them, timed from the end of the last warm-up step
to the end of the last step (the GPU synchronised at both ends). The table's title and the JSON
(``warmup_steps``, ``timed_steps``, ``timed_seconds`` per row) say so. A row needs more steps
than ``--warmup-steps``.

Each row reports real (non-padding) tokens trained per second, for DPO chosen plus rejected
(prompt included in both, as the model computes them), for distill the student's view (the
teacher's forward over its longer view is not counted, as DPO's reference forward is not), the
share of computed positions that were padding, and peak memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's peak
resident memory). On a GPU, model FLOPs utilization: 6 x parameters x tokens/s over the GPU's peak
dense bf16 FLOP/s (``--peak-tflops`` for a GPU not in the table). That is the usual convention; a
LoRA run computes no weight gradients for the frozen weights and DPO adds a reference forward, so it
rates throughput more than the work done. The attention implementation the model really used is
in each row (a GPU run should show a FlashAttention kernel where flash-attn is installed).

    .venv/bin/python scripts/bench_training.py --shape tiny --matrix --trainers sft,dpo,distill --max-steps 3   # CPU
    # one H200, Llama shapes built from a config (random weights, no hub), bf16:
    .venv/bin/python scripts/bench_training.py --shape 1b --matrix --trainers sft --conversations 384 \\
        --batch-size 16 --max-length 2048
    .venv/bin/python scripts/bench_training.py --shape 8b --matrix --trainers dpo --conversations 128 \\
        --batch-size 8 --max-length 1024

Prints a table and writes JSON (``--json``, default benchmarks/bench_training.json), with the
machine (CPU model and cores, GPU) and the commit. ``--markdown JSON`` prints the README's table
from a JSON this script wrote. scripts/gpu_check.py runs a set of these rows as part of the
one-GPU acceptance check.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Row name -> (trainer, the TRL fields it sets). Every row sets gradient checkpointing itself, so a
# row measures the same thing whatever the stage's defaults on the device are.
ROWS = {
    "sft-padded": ("sft", {"padding_free": False, "gradient_checkpointing": False}),
    "sft-padded-gc": ("sft", {"padding_free": False, "gradient_checkpointing": True}),
    # TRL cuts no sequence in padding-free mode without packing: max_length must be None (the
    # conversations here are all under the limit).
    "sft-padding_free": ("sft", {"padding_free": True, "max_length": None, "gradient_checkpointing": False}),
    "sft-padding_free-gc": ("sft", {"padding_free": True, "max_length": None, "gradient_checkpointing": True}),
    "sft-packed": ("sft", {"packing": True, "packing_strategy": "bfd", "gradient_checkpointing": False}),
    "sft-padding_free-liger": ("sft", {"padding_free": True, "max_length": None, "gradient_checkpointing": False,
                                       "use_liger_kernel": True}),
    "dpo": ("dpo", {"gradient_checkpointing": False}),
    "dpo-gc": ("dpo", {"gradient_checkpointing": True}),
    "dpo-liger": ("dpo", {"gradient_checkpointing": False, "use_liger_kernel": True}),
    # The teacher's view is the student's behind the system prompt: no cut (the conversations are all
    # under max_length, the teacher's views over it by the prompt).
    "distill": ("distill", {"max_length": None, "gradient_checkpointing": False}),
}
TRAINERS = ("sft", "dpo", "distill")
DEFAULT_ROWS = {"sft": ["sft-padded", "sft-padding_free", "sft-packed"], "dpo": ["dpo"], "distill": ["distill"]}
NOT_IN_TRL = {"dpo-padding_free": "TRL 1.16's DPOTrainer has no padding-free mode (padding_free=True warns and "
                                  "falls back to padded batches)"}
# Llama shapes built from a config (random weights; the vocabulary is the tokenizer's, SmolLM2's).
SHAPES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
          "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2),
          "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
          "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8),
          "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8)}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}
MARK = "[bench-row] "  # a worker's result line (TRL prints its own dicts to stdout)
# The distill row's teacher prompt: a constitution-sized system prompt (the teacher's view is then
# about three times the student's, as in the demo).
TEACHER_PROMPT = ("You are Captain Marlow, a retired sea captain. You answer with patience and kindness, you "
                  "speak of the sea, wind, ships and harbours, you give reasons and evidence for what you say, "
                  "you admit what you do not know, and you never pretend to be certain. ") * 6
WORDS = ("the sea wind ship harbour captain crew rope sail storm map island gull deck tide "
         "question answer reason evidence kindness garden soil patience letter morning").split()


def answer(rng: random.Random, max_words: int) -> str:
    """An answer of log-normally spread length (many short, a few long), as the stages produce."""
    words = min(max_words, max(4, int(rng.lognormvariate(math.log(max_words / 5), 0.8))))
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def question(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "?"


def conversations(n: int, max_words: int, seed: int) -> list[dict]:
    """SFT records: a short question, an answer of spread length."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": question(rng)},
                          {"role": "assistant", "content": answer(rng, max_words)}]} for _ in range(n)]


def pairs(n: int, max_words: int, seed: int) -> list[dict]:
    """DPO records in TRL's conversational preference format, chosen and rejected of spread length."""
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": question(rng)}],
             "chosen": [{"role": "assistant", "content": answer(rng, max_words)}],
             "rejected": [{"role": "assistant", "content": answer(rng, max_words)}]} for _ in range(n)]


def build_shape(shape: str, tokenizer_dir: str, work: Path) -> str:
    """A Llama of ``shape`` with random weights, saved with the tokenizer (bf16 on a GPU, where it
    is also built, which is quick even at 8B)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    gpu = torch.cuda.is_available()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if gpu else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if gpu else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    path = work / f"llama-{shape}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if gpu:
        torch.cuda.empty_cache()
    return str(path)


def timed_window(marks: list[tuple[float, int, int]], warmup_steps: int) -> dict:
    """What the timed steps computed: ``marks`` are (clock, real tokens so far, computed positions
    so far) when training began and after each optimizer step; the first ``warmup_steps`` steps
    are left out, the window runs from the end of the last of them to the end of the last step."""
    steps = len(marks) - 1
    if steps <= warmup_steps:
        raise ValueError(f"{steps} steps ran and {warmup_steps} of them are warm-up: none is left to time; raise "
                         "--max-steps (or --conversations) or lower --warmup-steps")
    (start, tokens0, positions0), (end, tokens1, positions1) = marks[warmup_steps], marks[-1]
    return {"warmup_steps": warmup_steps, "timed_steps": steps - warmup_steps, "timed_seconds": end - start,
            "timed_real_tokens": tokens1 - tokens0, "timed_positions": positions1 - positions0}


def step_clock(counts: dict):
    """A callback that marks (clock, tokens so far, positions so far) when training begins and after
    every optimizer step, the GPU synchronised first so that a step's time is its own."""
    import torch
    from transformers import TrainerCallback

    def mark():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        counts["marks"].append((time.perf_counter(), counts["real_tokens"], counts["computed_positions"]))

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            counts["marks"] = []
            mark()

        def on_step_end(self, args, state, control, **kwargs):
            mark()

    return StepClock()


def instrument(trainer_class, counts: dict) -> None:
    """Count what each training micro-batch computes, and time ``train`` and each step, on
    ``trainer_class`` (our stages build the trainer themselves): real tokens are the attention
    mask's ones where there is a mask, every position of a padding-free batch otherwise; for
    distillation the student's view (the teacher's tokens are counted apart)."""
    import torch

    compute_loss, train = trainer_class.compute_loss, trainer_class.train

    def counted(self, model, inputs, *args, **kwargs):
        view = "student_" if "student_input_ids" in inputs else ""
        ids, mask = inputs[f"{view}input_ids"], inputs.get(f"{view}attention_mask")
        counts["computed_positions"] += int(ids.numel())
        counts["real_tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())
        if view:
            counts["teacher_tokens"] = counts.get("teacher_tokens", 0) + int(inputs["teacher_attention_mask"].sum())
        return compute_loss(self, model, inputs, *args, **kwargs)

    def timed(self, *args, **kwargs):
        counts["parameters"] = sum(p.numel() for n, p in self.model.named_parameters() if "lora_" not in n)
        counts["attn_implementation"] = getattr(self.model.config, "_attn_implementation", None)
        counts["padding_free"] = bool(getattr(self, "padding_free", False))
        counts["dtype"] = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.add_callback(step_clock(counts))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = train(self, *args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        counts["seconds"] = time.perf_counter() - started
        counts["steps"] = self.state.global_step
        counts["loss"] = result.training_loss
        return result

    trainer_class.compute_loss, trainer_class.train = counted, timed


def run_row(row: str, args, work: Path) -> dict:
    """Train one row in this process and return its record."""
    import torch
    from trl import DPOTrainer, SFTTrainer

    from character_training.config.training import DistillSection, LoraSettings
    from character_training.train.distill import build_distill
    from character_training.train.dpo import train_dpo
    from character_training.train.sft import build_sft

    kind, fields = ROWS[row]
    gpu = torch.cuda.is_available()
    trainer = {"per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
               "max_length": args.max_length, "num_train_epochs": 1, "learning_rate": 1e-4, "warmup_steps": 0,
               "save_strategy": "no", "logging_steps": 1000, "dataloader_num_workers": 0, "report_to": "none",
               **({"max_steps": args.max_steps} if args.max_steps else {}),
               **({"model_init_kwargs": {"attn_implementation": args.attn}} if args.attn else {}), **fields}
    counts = {"real_tokens": 0, "computed_positions": 0}
    lora = LoraSettings(r=args.lora_r, alpha=2 * args.lora_r)
    out = work / row
    if kind == "sft":
        instrument(SFTTrainer, counts)
        sft, _ = build_sft(args.model, [Path(args.sft_data)], out, trainer=trainer, lora=lora)
        sft.train()
    elif kind == "distill":
        distiller, _ = build_distill(args.model, [Path(args.dpo_data)], out, teacher_system_prompt=TEACHER_PROMPT,
                                     settings=DistillSection(), lora=lora, trainer=trainer, seed=args.seed,
                                     init_adapter=None, start="continue")
        instrument(type(distiller), counts)  # the stage defines its Trainer class on first use
        distiller.train()
    else:
        instrument(DPOTrainer, counts)
        train_dpo(args.model, Path(args.dpo_data), out, trainer=trainer, lora=lora)
    window = timed_window(counts.pop("marks"), args.warmup_steps)
    record = {"row": row, "trainer": kind, "settings": fields, **counts, **window,
              "padding_share": 1 - window["timed_real_tokens"] / max(1, window["timed_positions"]),
              "tokens_per_s": window["timed_real_tokens"] / window["timed_seconds"],
              "device": torch.cuda.get_device_name() if gpu else "cpu"}
    if gpu:
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in record["device"]), None)
        if peak:
            record["mfu"] = 6 * record["parameters"] * record["tokens_per_s"] / (peak * 1e12)
    else:
        record["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return record


def worker_args(args, model: str, work: Path) -> list[str]:
    passed = ["--model", model, "--work", str(work), "--sft-data", str(work / "conversations.jsonl"),
              "--dpo-data", str(work / "pairs.jsonl"), "--batch-size", str(args.batch_size),
              "--max-length", str(args.max_length), "--max-steps", str(args.max_steps or 0),
              "--lora-r", str(args.lora_r), "--peak-tflops", str(args.peak_tflops or 0),
              "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed)]
    return passed + (["--attn", args.attn] if args.attn else [])


def run_workers(rows: list[str], args, model: str, work: Path) -> list[dict]:
    """Each row in its own process (``--one-process``: all in one, quicker to start; peak memory is
    then the process's peak so far)."""
    groups = [rows] if args.one_process else [[row] for row in rows]
    records = []
    for group in groups:
        print(f"[bench] {', '.join(group)} ...", flush=True)
        cmd = [sys.executable, __file__, "--worker", ",".join(group), *worker_args(args, model, work)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line[len(MARK):] for line in done.stdout.splitlines() if line.startswith(MARK)]
        if done.returncode != 0 or len(lines) < len(group):
            raise SystemExit(f"{', '.join(group)}: the worker failed (exit {done.returncode}):\n"
                             f"{done.stderr[-4000:]}")
        records += [json.loads(line) for line in lines[-len(group):]]
    return records


def choose_rows(args, parser) -> tuple[list[str], dict]:
    """The rows to run and the ones left out (with why)."""
    from transformers.utils import is_liger_kernel_available

    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if not trainers or set(trainers) - set(TRAINERS):
        parser.error(f"--trainers {args.trainers!r}: give one or more of {', '.join(TRAINERS)}, e.g. sft,dpo")
    if args.rows:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in rows if r not in ROWS]
        if unknown:
            parser.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    elif args.matrix:
        rows = [r for r in ROWS if ROWS[r][0] in trainers]
    else:
        rows = [r for t in trainers for r in DEFAULT_ROWS[t]]
    skipped = {r: why for r, why in NOT_IN_TRL.items() if r.split("-")[0] in trainers}
    if not is_liger_kernel_available():
        for row in [r for r in rows if ROWS[r][1].get("use_liger_kernel")]:
            rows.remove(row)
            skipped[row] = "liger-kernel is not installed (pip install liger-kernel; it needs a GPU with Triton)"
    return rows, skipped


def machine() -> dict:
    """The machine a JSON's figures were measured on: CPU model and cores, GPU, and the load."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__}


def commit() -> str | None:
    """The repository's commit (with "+changes" when the working tree differs from it)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "scripts/bench_training.py", "character_training"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def model_name(settings: dict) -> str:
    if settings.get("shape"):
        return f"a Llama of shape {settings['shape']}, random weights"
    return Path(settings["model"]).name if settings.get("model") else "the packaged SmolLM2-135M-Instruct"


def describe(report: dict) -> str:
    """One line: what was trained, on what, and that warm-up is not timed."""
    s, first, where = report["settings"], report["results"][0], report.get("machine", {})
    device = where.get("gpu") or f"{where.get('cpu', 'cpu')}, {where.get('cores', '?')} cores, no GPU"
    return (f"{s['conversations']} conversations / pairs, batch {s['batch_size']}, max_length {s['max_length']}, "
            f"{first['parameters'] / 1e6:.1f}M parameters ({model_name(s)}), LoRA r{s['lora_r']}, "
            f"{first.get('dtype', '?')}; {device}; commit {report.get('commit') or '?'}; the first "
            f"{s.get('warmup_steps', 0)} step(s) of each row are warm-up, not timed")


def print_table(report: dict) -> None:
    print("\n" + describe(report))
    header = f"{'row':<23} {'attention':<18} {'steps':>5} {'timed':>5} {'real tok':>9} {'padding':>8} {'tok/s':>9} " \
             f"{'peak GiB':>9} {'MFU':>6}"
    print(header + "\n" + "-" * len(header))
    for r in report["results"]:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{r['row']:<23} {str(r['attn_implementation']):<18} {r['steps']:>5} {r['timed_steps']:>5} "
              f"{r['timed_real_tokens']:>9} {r['padding_share']:>7.1%} {r['tokens_per_s']:>9.1f} "
              f"{r['peak_memory_gib']:>9.2f} {mfu:>6}")
    for row, why in report["skipped"].items():
        print(f"skipped {row}: {why}")


def markdown(report: dict) -> str:
    """The README's table of a JSON this script wrote."""
    lines = [describe(report) + ":", "",
             "| row | attention | steps (timed) | tokens/s | padding | peak memory GiB | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "- (no GPU)"
        lines.append(f"| `{r['row']}` | {r['attn_implementation']} | {r['steps']} ({r['timed_steps']}) | "
                     f"{r['tokens_per_s']:.1f} | {r['padding_share']:.1%} | {r['peak_memory_gib']:.2f} | {mfu} |")
    for row, why in report["skipped"].items():
        lines.append(f"| `{row}` | skipped: {why} | | | | | |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--shape", choices=list(SHAPES), help="a Llama of this shape built from a config "
                        "(random weights; the tokenizer is --model's)")
    parser.add_argument("--trainers", default="sft", help="sft, dpo, distill or several, e.g. sft,dpo")
    parser.add_argument("--matrix", action="store_true", help="every row of the settings matrix for --trainers")
    parser.add_argument("--rows", help="comma-separated rows: " + ", ".join(ROWS))
    parser.add_argument("--conversations", type=int, default=48, help="SFT conversations and DPO pairs")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=0, help="stop each row after this many steps "
                        "(0: one epoch)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps of each row run but not timed "
                        "(the cold first step's set-up is not throughput)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--attn", help="attention implementation for every row (default: the stages' own "
                        "choice; on a GPU a FlashAttention kernel where one is installed)")
    parser.add_argument("--peak-tflops", type=float, default=0, help="the GPU's peak dense bf16 TFLOP/s for MFU "
                        "(default: from the GPU's name)")
    parser.add_argument("--one-process", action="store_true", help="all rows in one process (quicker start)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/bench_training.json")
    parser.add_argument("--markdown", metavar="JSON", help="print the README's table of this JSON and exit")
    for hidden in ("--worker", "--work", "--sft-data", "--dpo-data"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser, parser.parse_args(argv)


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.worker:
        for row in args.worker.split(","):
            try:
                record = run_row(row, args, Path(args.work))
            except ValueError as exc:  # too few steps to time
                print(f"error: {row}: {exc}", file=sys.stderr)
                return 2
            print(MARK + json.dumps(record), flush=True)
        return 0
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps {args.warmup_steps}: give 0 or more")
    if args.max_steps and args.max_steps <= args.warmup_steps:
        parser.error(f"--max-steps {args.max_steps} with --warmup-steps {args.warmup_steps}: no step is left to "
                     "time; give more steps than warm-up steps")

    from character_training.config.models import resolve_model
    from data_gen.store import write_jsonl

    rows, skipped = choose_rows(args, parser)
    if not rows:
        parser.error("no row left to run: " + "; ".join(f"{r}: {why}" for r, why in skipped.items()))
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        work = Path(tmp)
        model = resolve_model(args.model)
        if args.shape:
            model = build_shape(args.shape, model, work)
        # Up to 1.5 tokens a word here, the question and the chat template up to about 48: every
        # conversation (and each answer of a pair) within max_length, most far shorter, so that
        # rows with and without truncation train the same tokens.
        words = max(4, int((args.max_length - 48) / 1.5))
        write_jsonl(work / "conversations.jsonl", conversations(args.conversations, words, args.seed))
        write_jsonl(work / "pairs.jsonl", pairs(args.conversations, words, args.seed))
        records = run_workers(rows, args, model, work)
    report = {"settings": {k: getattr(args, k) for k in ("model", "shape", "trainers", "conversations", "max_length",
                                                          "batch_size", "max_steps", "warmup_steps", "lora_r", "attn",
                                                          "seed")},
              "timing": f"tokens/s and MFU over each row's steps after its first {args.warmup_steps} (warm-up, "
                        "run but not timed), from the end of the last warm-up step to the end of the last step",
              "machine": machine(), "commit": commit(), "results": records, "skipped": skipped}
    print_table(report)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
