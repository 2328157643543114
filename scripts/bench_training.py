"""Training benchmark: SFT with packing and padding-free batching against plain padded batches.

The same model, the same variable-length conversations and the same LoRA, trained for one epoch
by our SFT stage (``character_training.train.sft.build_sft``, TRL's SFTTrainer) in three ways:
  padded        plain batches, each padded to its longest conversation
  padding_free  the batch's conversations concatenated, no padding (TRL ``padding_free``)
  packed        conversations packed into rows of ``max_length`` tokens (TRL ``packing``, bfd)
Each runs in its own process (so peak memory is its own): real (non-padding) tokens trained per
second over the epoch, the share of computed positions that were padding, and peak memory (CPU:
the process's peak resident memory; GPU: ``torch.cuda.max_memory_allocated``). On a GPU it also
reports model FLOPs utilization: 6 x parameters x tokens/s over the GPU's peak dense bf16 FLOP/s
(the usual convention; a LoRA run does less work than that for the frozen weights, so this
overstates the work done, and MFU here compares the modes more than it rates the hardware).

    .venv/bin/python scripts/bench_training.py                      # the default model on the CPU
    .venv/bin/python scripts/bench_training.py --conversations 32 --max-length 256   # quicker
    # a GPU, a model of realistic shape built from a config (random weights, no hub), bf16:
    .venv/bin/python scripts/bench_training.py --shape 1b --conversations 512 --batch-size 16 --max-length 2048

Prints a table and writes JSON (``--json``, default benchmarks/bench_training.json).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = {"padded": {"packing": False, "padding_free": False},
         # TRL does not cut sequences in padding-free mode without packing: max_length must be None
         # (the conversations here are all under the limit; the stage counts over-long ones).
         "padding_free": {"packing": False, "padding_free": True, "max_length": None},
         "packed": {"packing": True, "packing_strategy": "bfd"}}
# Llama shapes built from a config for the GPU run (random weights; the tokenizer is SmolLM2's).
SHAPES = {"1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
          "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8)}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
WORDS = ("the sea wind ship harbour captain crew rope sail storm map island gull deck tide "
         "question answer reason evidence kindness garden soil patience letter morning").split()


def conversations(n: int, max_words: int, seed: int) -> list[dict]:
    """Variable-length conversations: a short question, an answer of log-normally spread length
    (many short, a few long), as the critique and introspection stages produce."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        words = min(max_words, max(4, int(rng.lognormvariate(math.log(max_words / 5), 0.8))))
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "?"
        answer = " ".join(rng.choice(WORDS) for _ in range(words)) + "."
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
    return records


def build_shape(shape: str, tokenizer_dir: str, work: Path) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = work / f"llama-{shape}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def worker(args) -> dict:
    import torch

    from character_training.train.sft import build_sft
    from character_training.train.settings import LoraSettings

    gpu = torch.cuda.is_available()
    trainer = {"per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
               "max_length": args.max_length, "num_train_epochs": 1, "learning_rate": 1e-4, "warmup_steps": 0,
               "save_strategy": "no", "logging_steps": 1000, "dataloader_num_workers": 0, "bf16": gpu,
               "use_cpu": not gpu, **MODES[args.mode]}
    sft, counts = build_sft(args.model, [Path(args.data)], Path(args.work) / args.mode, trainer=trainer,
                            lora=LoraSettings(r=16, alpha=32))
    # What each mode computes: real tokens are the same in every mode; padding is what a batch adds.
    real = sum(len(r["input_ids"]) for r in sft.train_dataset)
    computed = 0
    for batch in sft.get_train_dataloader():
        computed += int(batch["input_ids"].numel())
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = sft.train()
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in sft.model.parameters())
    record = {"mode": args.mode, "sequences": len(sft.train_dataset), "steps": sft.state.global_step,
              "real_tokens": real, "computed_positions": computed, "padding_share": 1 - real / computed,
              "seconds": seconds, "tokens_per_s": real / seconds, "loss": result.training_loss,
              "parameters": params, "device": torch.cuda.get_device_name() if gpu else "cpu",
              "conversations": counts["conversations"], "overlong": counts["overlong"]}
    if gpu:
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            record["mfu"] = 6 * params * record["tokens_per_s"] / (peak * 1e12)
    else:
        record["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return record


def run_worker(mode: str, args, model: str, data: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", model, "--data", str(data), "--work", str(work),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{mode}: the worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="GPU: a Llama of this shape built from a config")
    parser.add_argument("--conversations", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/bench_training.json")
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.mode = args.worker
        print(json.dumps(worker(args)))
        return 0

    from character_training.config.models import resolve_model
    from data_gen.store import write_jsonl

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        work = Path(tmp)
        model = resolve_model(args.model)
        if args.shape:
            model = build_shape(args.shape, model, work)
        data = work / "conversations.jsonl"
        # ~1.3 tokens a word here: answers up to about the length limit, most far shorter.
        write_jsonl(data, conversations(args.conversations, int(args.max_length / 1.6), args.seed))
        rows = []
        for mode in modes:
            print(f"[bench] {mode} ...", flush=True)
            rows.append(run_worker(mode, args, model, data, work))
    base = next((r for r in rows if r["mode"] == "padded"), None)
    header = f"{'mode':<13} {'seqs':>5} {'steps':>5} {'real tok':>9} {'padding':>8} {'tok/s':>8} {'speed-up':>8} " \
             f"{'peak GiB':>9} {'MFU':>6}"
    print(f"\nSFT, one epoch of {args.conversations} conversations, batch {args.batch_size}, max_length "
          f"{args.max_length}, {rows[0]['parameters'] / 1e6:.0f}M parameters, {rows[0]['device']}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        r["speedup_over_padded"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        up = f"{r['speedup_over_padded']:.2f}x" if base else "-"
        print(f"{r['mode']:<13} {r['sequences']:>5} {r['steps']:>5} {r['real_tokens']:>9} {r['padding_share']:>7.1%} "
              f"{r['tokens_per_s']:>8.1f} {up:>8} {r['peak_memory_gib']:>9.2f} {mfu:>6}")
    report = {"settings": {k: getattr(args, k) for k in ("model", "shape", "conversations", "max_length",
                                                          "batch_size", "seed")}, "results": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
