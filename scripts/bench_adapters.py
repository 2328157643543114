"""Adapter algebra benchmark: our compose against PEFT's ``add_weighted_adapter`` (``cat``, ``svd``).

Three random LoRA adapters of realistic shape (rank 64 on every linear module of a Llama built
from a config; unequal alphas, one rsLoRA) are combined with weights 1.0, 0.5, -0.3 by:
  ours exact        compose(...)                  the weighted sum, rank 3 x 64 (concatenation)
  ours --rank K     compose(..., rank=K)          best rank-K approximation (QR + small SVD)
  peft cat          add_weighted_adapter("cat")   needs the base model loaded
  peft svd          add_weighted_adapter("svd", svd_rank=K, svd_full_matrices=False)
  peft cat, rsLoRA adapter listed first           (PEFT copies the first adapter's use_rslora)
Each runs in its own process, timed from reading the adapters to the written result (PEFT's
base model is built first, untimed, from the config, with zero weights), with its peak
resident memory. The relative error of each result against the dense weighted sum is measured
afterwards, module by module, in float64; for rank-K results also the error of the best rank-K
approximation (the floor any rank-K adapter has). Prints a table and writes JSON.

    .venv/bin/python scripts/bench_adapters.py            # hidden 4096 (8B-like), 2 layers, rank 64
    .venv/bin/python scripts/bench_adapters.py --layers 4 --output benchmarks/bench_adapters.json
    .venv/bin/python scripts/bench_adapters.py --hidden 1024 --intermediate 2816 --heads 16 --kv-heads 4  # quick
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from character_training.adapters import algebra as alg  # noqa: E402
from character_training.adapters import io as adapter_io  # noqa: E402

WEIGHTS = [1.0, 0.5, -0.3]
# Unequal alphas; the third uses rsLoRA (scaling alpha / sqrt(r)).
ADAPTERS = [dict(name="a", alpha=128, rslora=False), dict(name="b", alpha=32, rslora=False),
            dict(name="c", alpha=16, rslora=True)]


def module_shapes(args) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} for every linear module of the Llama the config describes."""
    head_dim = args.hidden // args.heads
    kv = args.kv_heads * head_dim
    per_layer = {"self_attn.q_proj": (args.hidden, args.hidden), "self_attn.k_proj": (kv, args.hidden),
                 "self_attn.v_proj": (kv, args.hidden), "self_attn.o_proj": (args.hidden, args.hidden),
                 "mlp.gate_proj": (args.intermediate, args.hidden), "mlp.up_proj": (args.intermediate, args.hidden),
                 "mlp.down_proj": (args.hidden, args.intermediate)}
    return {f"model.layers.{i}.{m}": shape for i in range(args.layers) for m, shape in per_layer.items()}


def write_random_adapters(args, work: Path) -> list[Path]:
    from safetensors.torch import save_file

    shapes = module_shapes(args)
    paths = []
    for i, spec in enumerate(ADAPTERS):
        gen = torch.Generator().manual_seed(i)
        tensors = {}
        for name, (out_dim, in_dim) in shapes.items():
            a = torch.randn(args.rank, in_dim, generator=gen) / math.sqrt(in_dim)
            tensors[f"{adapter_io.PREFIX}{name}.lora_A.weight"] = a
            tensors[f"{adapter_io.PREFIX}{name}.lora_B.weight"] = torch.randn(out_dim, args.rank, generator=gen) * 0.01
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "bench-llama",
                  "r": args.rank, "lora_alpha": spec["alpha"], "use_rslora": spec["rslora"], "lora_dropout": 0.0,
                  "target_modules": sorted({n.rsplit(".", 1)[-1] for n in shapes}), "bias": "none",
                  "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True}
        path = work / spec["name"]
        path.mkdir(parents=True)
        save_file(tensors, str(path / adapter_io.WEIGHTS_FILE), metadata={"format": "pt"})
        (path / adapter_io.CONFIG_FILE).write_text(json.dumps(config, indent=2))
        paths.append(path)
    return paths


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


# ----------------------------------------------------------------------------- workers

def worker(args) -> dict:
    """One method in this process; prints its figures as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = [Path(p) for p in args.inputs]
    out = Path(args.out)
    method = args.worker
    if method.startswith("ours"):
        baseline = rss_gib()
        started = time.perf_counter()
        alg.compose(list(zip(inputs, WEIGHTS)), out, rank=args.rank if method == "ours-rank" else None)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "rss_after_imports_gib": baseline}

    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    import_rss = rss_gib()
    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, tie_word_embeddings=False)
    built = time.perf_counter()
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    base = base.to_empty(device="cpu").float()
    with torch.no_grad():  # zeros, not random (PEFT's merging never reads base values), but resident as a real base is
        for param in base.parameters():
            param.zero_()
    base_seconds = time.perf_counter() - built
    baseline = rss_gib()
    order = [2, 0, 1] if method == "peft-cat-rslora-first" else [0, 1, 2]
    names = [ADAPTERS[i]["name"] for i in order]
    started = time.perf_counter()
    model = PeftModel.from_pretrained(base, str(inputs[order[0]]), adapter_name=names[0])
    for i, name in zip(order[1:], names[1:]):
        model.load_adapter(str(inputs[i]), adapter_name=name)
    loaded = time.perf_counter()
    kind = "svd" if method == "peft-svd" else "cat"
    extra = {"svd_rank": args.rank, "svd_full_matrices": False} if kind == "svd" else {}
    model.add_weighted_adapter(names, [WEIGHTS[i] for i in order], "combined", combination_type=kind, **extra)
    combined = time.perf_counter()
    model.save_pretrained(str(out), selected_adapters=["combined"])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "load_seconds": loaded - started, "combine_seconds": combined - loaded,
            "peak_rss_gib": peak_rss_gib(), "rss_after_imports_gib": import_rss, "rss_with_base_gib": baseline,
            "base_build_seconds": base_seconds, "output_dir": str(out / "combined")}


def run_worker(method: str, inputs: list[Path], out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--out", str(out), "--inputs", *map(str, inputs),
           "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--layers", str(args.layers),
           "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--rank", str(args.rank),
           "--threads", str(args.threads)]
    print(f"[{method}] running ...", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.setdefault("output_dir", str(out))
    print(f"[{method}] {result['seconds']:.2f} s, peak {result['peak_rss_gib']:.2f} GiB", flush=True)
    return result


# ----------------------------------------------------------------------------- errors

def relative_errors(output: Path, inputs: list[Path], k: int) -> dict:
    """||result - dense sum|| / ||dense sum|| over all modules (float64), and the best rank-k
    approximation's error for comparison."""
    ins = [adapter_io.load_adapter(p) for p in inputs]
    result = adapter_io.load_adapter(output)
    err_sq = ref_sq = floor_sq = 0.0
    for name in sorted(ins[0].modules):
        reference = sum(w * a.modules[name].dense() for a, w in zip(ins, WEIGHTS))
        got = result.modules[name].dense() if name in result.modules else torch.zeros_like(reference)
        err_sq += float((got - reference).norm() ** 2)
        ref_sq += float(reference.norm() ** 2)
        _, s, _ = alg.svd_factors(alg.concatenate((a.modules[name], w) for a, w in zip(ins, WEIGHTS)))
        floor_sq += float((s[k:] ** 2).sum())
        del reference, got
    return {"relative_error": math.sqrt(err_sq / ref_sq), "best_rank_k_error": math.sqrt(floor_sq / ref_sq),
            "max_rank": max(f.rank for f in result.modules.values()),
            "use_rslora": bool(result.config.get("use_rslora"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The shape: a Llama with hidden size 4096 (8B-like: intermediate 14336, 32 heads, 8 KV heads).
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64, help="each adapter's rank, and K for the rank-K methods")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every method's process (default: torch's own choice); on a "
                             "machine busy with other work, 1 avoids threads waiting on busy cores")
    parser.add_argument("--skip-peft-svd", action="store_true", help="PEFT's svd is the slow one")
    parser.add_argument("--output", default="benchmarks/bench_adapters.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    try:
        inputs = write_random_adapters(args, work / "in")
        shapes = module_shapes(args)
        size_gib = sum(p.joinpath(adapter_io.WEIGHTS_FILE).stat().st_size for p in inputs) / 2 ** 30
        methods = ["ours-exact", "ours-rank", "peft-cat", "peft-cat-rslora-first"]
        if not args.skip_peft_svd:
            methods.append("peft-svd")
        results = {"config": {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "kv_heads", "layers",
                                                             "rank")},
                   "modules": len(shapes), "adapters_gib": size_gib, "weights": WEIGHTS,
                   "torch_threads": args.threads or torch.get_num_threads(), "methods": {}}
        for method in methods:
            out = work / "out" / method
            result = run_worker(method, inputs, out, args)
            result.update(relative_errors(Path(result["output_dir"]), inputs, args.rank))
            results["methods"][method] = result
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    m = results["methods"]
    ours = m["ours-rank"]["seconds"]
    if "peft-svd" in m:
        results["speedup_rank_k_vs_peft_svd"] = m["peft-svd"]["seconds"] / ours
        results["speedup_exact_vs_peft_svd"] = m["peft-svd"]["seconds"] / m["ours-exact"]["seconds"]
    print(f"\n{len(shapes)} modules ({args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}), "
          f"3 adapters of rank {args.rank} ({size_gib:.2f} GiB), weights {WEIGHTS}, {results['torch_threads']} threads")
    base_gib = m["peft-cat"]["rss_with_base_gib"] - m["peft-cat"]["rss_after_imports_gib"]
    results["peft_base_model_gib"] = base_gib
    print(f"{'method':<22} {'rank':>5} {'seconds':>9} {'peak GiB':>9} {'above imports':>14} {'rel. error':>11} "
          f"{'best rank-K':>12}")
    for name, r in m.items():
        floor = f"{r['best_rank_k_error']:.3g}" if r["max_rank"] <= args.rank else "-"
        r["peak_above_imports_gib"] = r["peak_rss_gib"] - r["rss_after_imports_gib"]
        print(f"{name:<22} {r['max_rank']:>5} {r['seconds']:>9.2f} {r['peak_rss_gib']:>9.2f} "
              f"{r['peak_above_imports_gib']:>14.2f} {r['relative_error']:>11.3g} {floor:>12}")
    print("peak GiB: the process's peak resident memory; above imports: less python + torch (+ peft) alone. "
          f"PEFT's includes its base model: {base_gib:.2f} GiB")
    if "peft-svd" in m:
        print(f"speed-up over PEFT svd: {results['speedup_rank_k_vs_peft_svd']:.1f}x (ours --rank {args.rank}), "
              f"{results['speedup_exact_vs_peft_svd']:.1f}x (ours exact); goal >= 10x, error <= 1e-5")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
