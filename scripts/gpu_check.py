"""One-GPU acceptance check: does the training path run, and how fast, on the GPU lent for minutes?

Run from the repository root on one H100 or H200 (scripts/gpu_check.sh is the command; it runs
this with the machine's Python). In order:

  wheels    with ``--wheels DIR``: the packages the GPU image lacks (TRL, PEFT, datasets and theirs;
            ``PACKAGES``) installed offline from DIR (``pip install --no-index --find-links DIR
            --no-deps --target .gpu_check/site``), only those missing; the README says how to
            build DIR with ``pip download``
  bench     scripts/bench_training.py's rows at the 1.2B shape (SFT padded, padding-free, padding-
            free with Liger where installed, DPO, distill) and DPO at the 8B shape, Llama shapes
            built from a config with random weights, warm-up steps not timed
  stages    one ``distill`` and one ``dpo`` stage through ``character-training train`` on the
            random-weight 1.2B model, and the distill stage again through the launch path
            (scripts/launch.sh ddp 1: ``accelerate launch`` on one process)
  gpu       bf16 and FlashAttention: what the stages used, or why not

It prints one table (tokens/s, MFU, peak memory, attention kernel, status) and writes JSON
(``--json``, default benchmarks/gpu_check.json). A row that cannot run here (Liger without
liger-kernel, FlashAttention without flash-attn, anything GPU-only on the CPU) is a "skipped: why"
row; a row that fails is "FAILED: why" and the command exits 1 after the others ran.

``--tiny``: the same on the CPU with tiny random-weight models (the 1.2B shape becomes bench's
``tiny``, the 8B shape ``small``, a few short steps; the launch row the same ``accelerate launch``
line with scripts/accelerate/ddp.yaml, which on one process runs on the CPU too);
tests/test_gpu_check.py runs it.

    bash scripts/gpu_check.sh --wheels wheels/           # on the GPU machine, <= 8 minutes
    .venv/bin/python scripts/gpu_check.py --tiny --json /tmp/gpu_check.json   # on the CPU
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_training  # noqa: E402

# import name -> the distribution whose wheel is carried. The GPU image has torch, transformers and
# accelerate (FIELD_NOTES, "One GPU"); these are what the training path needs beyond them.
PACKAGES = {"trl": "trl", "peft": "peft", "datasets": "datasets", "dill": "dill", "multiprocess": "multiprocess",
            "fsspec": "fsspec", "xxhash": "xxhash", "pandas": "pandas", "pyarrow": "pyarrow", "yaml": "pyyaml",
            "jinja2": "jinja2", "matplotlib": "matplotlib", "httpx": "httpx"}
SITE = ROOT / ".gpu_check" / "site"  # where carried wheels go (the image's own site-packages may be read-only)


@dataclass(frozen=True)
class Plan:
    """The sizes of one check: GPU (``FULL``) or the CPU's ``--tiny`` (``TINY``)."""

    small_shape: str      # bench_training.SHAPES key standing for the 1.2B model
    large_shape: str      # ... for the 8B one
    conversations: int
    batch_size: int
    max_length: int
    steps: int            # each row's optimizer steps, warm-up included
    warmup_steps: int
    dpo_8b_batch_size: int
    launch_config: str    # scripts/launch.sh CONFIG for the launch row


FULL = Plan(small_shape="1b", large_shape="8b", conversations=256, batch_size=16, max_length=1024, steps=10,
            warmup_steps=2, dpo_8b_batch_size=8, launch_config="ddp")
TINY = Plan(small_shape="tiny", large_shape="small", conversations=8, batch_size=2, max_length=64, steps=3,
            warmup_steps=1, dpo_8b_batch_size=2, launch_config="ddp")
BENCH_ROWS = ["sft-padded", "sft-padding_free", "sft-padding_free-liger", "dpo", "distill"]
LABEL = {"1b": "1.2B", "8b": "8B", "tiny": "tiny", "small": "small"}
CONSTITUTION = {"name": "captain-marlow", "description": "A retired sea captain who answers with patience.",
                "traits": [{"trait": "I speak of the sea and ships, and I give reasons for what I say.",
                            "questions": ["What do you do on a calm day?"]}]}


# ------------------------------------------------------------------------------------ the wheels


def missing_packages(packages: dict[str, str] = PACKAGES, find=importlib.util.find_spec) -> list[str]:
    """The distributions of ``packages`` whose module this interpreter cannot import."""
    return [dist for module, dist in packages.items() if find(module) is None]


def pip_command(missing: list[str], wheels: Path, *, python: str = sys.executable, target: Path = SITE) -> list[str]:
    """The offline pip line that installs ``missing`` from the carried wheels: no index, no
    dependencies resolved (each carried wheel is named; torch and the rest are the image's)."""
    return [python, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--no-deps",
            "--target", str(target), *missing]


def use_site(target: Path = SITE) -> None:
    """Make the carried packages importable here and in every process this check starts."""
    if target.is_dir():
        sys.path.insert(0, str(target))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))


def install_wheels(wheels: Path | None) -> dict:
    """Install what is missing from ``wheels``; what it did, for the JSON."""
    use_site()
    missing = missing_packages()
    if not missing:
        return {"missing": [], "installed": []}
    if wheels is None:
        raise SystemExit(f"error: {', '.join(missing)} cannot be imported and no --wheels DIR was given; carry their "
                         "wheels (README, 'GPU acceptance check': pip download ...) and pass --wheels DIR")
    if not wheels.is_dir():
        raise SystemExit(f"error: --wheels {wheels}: no such directory")
    command = pip_command(missing, wheels)
    print("+ " + shlex.join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: pip could not install {', '.join(missing)} from {wheels} (a wheel missing, or built "
                         f"for another Python or platform):\n{done.stderr[-2000:]}")
    use_site()
    importlib.invalidate_caches()
    still = missing_packages()
    if still:
        raise SystemExit(f"error: installed from {wheels} but still not importable: {', '.join(still)}")
    return {"missing": missing, "installed": missing, "command": command}


# ------------------------------------------------------------------------------------ the rows


def row(check: str, status: str = "ok", **fields) -> dict:
    return {"check": check, "status": status, **fields}


def bench_rows(plan: Plan, model: str, shape: str, rows: list[str], batch_size: int, work: Path,
               timeout: float) -> list[dict]:
    """bench_training's rows on ``model`` (one process: start-up once; GPU peaks are reset per row)."""
    out = work / f"bench-{shape}.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_training.py"), "--model", model,
               "--trainers", "sft,dpo,distill", "--rows", ",".join(rows), "--conversations", str(plan.conversations),
               "--batch-size", str(batch_size), "--max-length", str(plan.max_length), "--max-steps", str(plan.steps),
               "--warmup-steps", str(plan.warmup_steps), "--one-process", "--json", str(out)]
    label = LABEL[shape]
    wanted = set(rows)
    code, tail, seconds, _ = run(command, work / f"bench-{shape}.log", timeout)
    if code != 0:
        return [row(f"bench {label} {r}", f"FAILED: {tail}", seconds=seconds) for r in rows]
    report = json.loads(out.read_text())
    found = [row(f"bench {label} {r['row']}", steps=r["steps"], timed_steps=r["timed_steps"],
                 tokens_per_s=r["tokens_per_s"], mfu=r.get("mfu"), peak_memory_gib=r["peak_memory_gib"],
                 attention=r["attn_implementation"], dtype=r.get("dtype"), seconds=r["seconds"], device=r["device"])
             for r in report["results"]]
    found += [row(f"bench {label} {r}", f"skipped: {why}") for r, why in report["skipped"].items() if r in wanted]
    order = {f"bench {label} {r}": i for i, r in enumerate(rows)}
    return sorted(found, key=lambda r: order.get(r["check"], len(order)))


def stage_args(plan: Plan, kind: str, model: str, data: Path, constitution: Path, out: Path) -> list[str]:
    sets = {"max_steps": plan.steps, "per_device_train_batch_size": plan.batch_size, "logging_steps": 1,
            "gradient_accumulation_steps": 1, "max_length": plan.max_length + (400 if kind == "distill" else 0)}
    words = [kind, "--data", str(data), "-o", str(out), "--model", model]
    if kind == "distill":
        words += ["--constitution", str(constitution)]
    return words + [w for k, v in sets.items() for w in ("--set", f"trainer.{k}={v}")]


def stage_row(check: str, command: list[str], out: Path, work: Path, timeout: float, gpu: bool) -> dict:
    """A stage run as a user runs it; its manifest says how many steps and how long training took."""
    code, tail, seconds, peak = run(command, work / f"{out.name}.log", timeout, sample_gpu=gpu)
    if code != 0:
        return row(check, f"FAILED: {tail}", seconds=seconds)
    manifest = json.loads((out / "manifest.json").read_text())
    steps = manifest.get("counts", {}).get("steps")
    distributed = manifest.get("distributed")
    return row(check, steps=steps, seconds=seconds, train_seconds=manifest.get("train_seconds"),
               peak_memory_gib=peak, attention=expected_attention(gpu) + "*", distributed=distributed,
               adapter=(out / "adapter" / "adapter_config.json").is_file())


def expected_attention(gpu: bool) -> str:
    """The kernel the stages load the model with (config/devices.py: FlashAttention on a GPU where
    installed, else transformers' default, sdpa)."""
    from character_training.config.devices import varlen_attention

    return (varlen_attention() if gpu else None) or "sdpa"


def gpu_rows(gpu: bool, bench: list[dict]) -> list[dict]:
    """bf16 and FlashAttention: what the bench rows ran with, or why they did not."""
    if not gpu:
        why = "no CUDA device: on the CPU the stages train in fp32 with sdpa (config/devices.py CPU_DEFAULTS)"
        return [row("gpu bf16", f"skipped: {why}"), row("gpu FlashAttention", f"skipped: {why}")]
    import torch

    ran = [r for r in bench if r["status"] == "ok"]
    dtypes = sorted({str(r.get("dtype")) for r in ran})
    kernels = sorted({str(r.get("attention")) for r in ran})
    bf16 = (row("gpu bf16", dtype=", ".join(dtypes)) if dtypes == ["bfloat16"] else
            row("gpu bf16", f"FAILED: the bench rows trained in {', '.join(dtypes) or 'nothing'}, not bfloat16"
                f" (bf16 supported here: {torch.cuda.is_bf16_supported()})"))
    if expected_attention(True) == "sdpa":
        flash = row("gpu FlashAttention", "skipped: flash-attn is not installed (build it against this torch: pip "
                    "install flash-attn --no-build-isolation); the rows used sdpa, padding-free SFT with one "
                    "block-diagonal mask", attention=", ".join(kernels))
    else:
        flash = row("gpu FlashAttention", attention=", ".join(kernels))
    return [bf16, flash]


# ------------------------------------------------------------------------------------ running


def run(command: list[str], log: Path, timeout: float, sample_gpu: bool = False) -> tuple[int, str, float, float | None]:
    """(exit code, the reason in one line when it failed, seconds, peak memory GiB): on the CPU the
    process tree's peak resident memory; on a GPU the device memory in use, sampled."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"[gpu_check] {shlex.join(command[:8])} ...", flush=True)
    started = time.perf_counter()
    sampler = GpuSampler() if sample_gpu else None
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
            if sampler:
                sampler.stop()
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    peak = sampler.peak_gib if sampler else usage.ru_maxrss / 2 ** 20
    if process.returncode == 0:
        return 0, "", seconds, peak
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
    if process.returncode < 0:
        reason = f"killed after {timeout:.0f} s (--timeout-s)"
    return process.returncode, f"exit {process.returncode}: {reason[:300]} (log: {log})", seconds, peak


class GpuSampler:
    """Device memory in use beyond what it was at the start, sampled every 0.2 s (a stage's process
    cannot be asked for its own peak from outside)."""

    def __init__(self):
        import torch

        free, total = torch.cuda.mem_get_info()
        self.base, self.peak_gib, self._stop = total - free, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        import torch

        while not self._stop.wait(0.2):
            free, total = torch.cuda.mem_get_info()
            self.peak_gib = max(self.peak_gib, (total - free - self.base) / 2 ** 30)

    def stop(self):
        self._stop.set()
        self._thread.join()


def print_table(report: dict) -> None:
    where = report["machine"]
    print(f"\nGPU acceptance check ({report['mode']}): {where['gpu'] or 'no GPU'}; {where['cpu']}, {where['cores']} "
          f"cores; commit {report['commit']}; {report['total_seconds']:.0f} s; bench rows: the first "
          f"{report['plan']['warmup_steps']} step(s) warm-up, not timed")
    header = f"{'check':<44} {'steps':>5} {'tok/s':>10} {'MFU':>6} {'peak GiB':>9} {'attention':<19} {'seconds':>8}  status"
    print(header + "\n" + "-" * len(header))
    for r in report["rows"]:
        tps = f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_memory_gib']:.2f}" if r.get("peak_memory_gib") is not None else "-"
        secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
        print(f"{r['check']:<44} {str(r.get('steps') or '-'):>5} {tps:>10} {mfu:>6} {peak:>9} "
              f"{str(r.get('attention') or '-'):<19} {secs:>8}  {r['status']}")
    print("* the kernel the stage loads the model with (config/devices.py), not read from its process; stage rows "
          "time the whole command (start-up, loading, warm-up); their speed is the bench rows'")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="on the CPU with tiny random-weight models (the tests)")
    parser.add_argument("--wheels", type=Path, help="a folder of carried wheels to install the missing packages from")
    parser.add_argument("--tokenizer", help="a tokenizer directory for the random-weight models (default: the "
                        ".gpu_check/tokenizer folder where there is one, else the packaged default model's)")
    parser.add_argument("--save-tokenizer", type=Path, metavar="DIR", help="save the packaged default model's "
                        "tokenizer to DIR (to carry to a machine without the model) and exit")
    parser.add_argument("--skip-8b", action="store_true", help="leave out DPO at the 8B shape")
    parser.add_argument("--timeout-s", type=float, default=300, help="the longest one step may run")
    parser.add_argument("--work", type=Path, help="working directory (default: a new temporary one)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "gpu_check.json")
    return parser.parse_args(argv)


def tokenizer_dir(given: str | None) -> str:
    if given:
        return given
    carried = ROOT / ".gpu_check" / "tokenizer"
    if (carried / "tokenizer_config.json").is_file():
        return str(carried)
    from character_training.config.models import resolve_model

    return resolve_model(None)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    wheels = install_wheels(args.wheels)
    if args.save_tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir(args.tokenizer)).save_pretrained(args.save_tokenizer)
        print(f"wrote {args.save_tokenizer}")
        return 0
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.tiny:
        raise SystemExit("error: no CUDA device here; on the CPU run the scaled-down check with --tiny")
    plan = TINY if args.tiny else FULL
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from data_gen.store import write_jsonl

    tokenizer = tokenizer_dir(args.tokenizer)
    small = bench_training.build_shape(plan.small_shape, tokenizer, work)
    pairs = work / "pairs.jsonl"
    write_jsonl(pairs, bench_training.pairs(plan.conversations, max(4, int((plan.max_length - 48) / 1.5)), 0))
    constitution = work / "constitution.yaml"
    constitution.write_text(json.dumps(CONSTITUTION))

    rows = bench_rows(plan, small, plan.small_shape, BENCH_ROWS, plan.batch_size, work, args.timeout_s)
    if args.skip_8b:
        rows.append(row(f"bench {LABEL[plan.large_shape]} dpo", "skipped: --skip-8b"))
    else:
        large = bench_training.build_shape(plan.large_shape, tokenizer, work)
        rows += bench_rows(plan, large, plan.large_shape, ["dpo"], plan.dpo_8b_batch_size, work, args.timeout_s)
        import shutil

        shutil.rmtree(large, ignore_errors=True)  # 16 GB at 8B
    cli = [sys.executable, "-m", "character_training.cli", "train"]
    for kind in ("distill", "dpo"):
        out = work / f"train-{kind}"
        rows.append(stage_row(f"train {kind} ({LABEL[plan.small_shape]})",
                              cli + stage_args(plan, kind, small, pairs, constitution, out), out, work,
                              args.timeout_s, gpu))
    out = work / "launch-distill"
    rows.append(stage_row(f"launch.sh {plan.launch_config} 1 distill (accelerate)",
                          ["bash", str(ROOT / "scripts" / "launch.sh"), plan.launch_config, "1",
                           *stage_args(plan, "distill", small, pairs, constitution, out)], out, work,
                          args.timeout_s, gpu))
    rows += gpu_rows(gpu, [r for r in rows if r["check"].startswith("bench")])

    report = {"mode": "tiny (CPU)" if args.tiny else "one GPU", "machine": bench_training.machine(),
              "commit": bench_training.commit(), "plan": plan.__dict__, "wheels": wheels,
              "total_seconds": time.perf_counter() - started, "rows": rows,
              "timing": "bench rows: tokens/s and MFU over the steps after the warm-up ones; stage rows: the whole "
                        "command, wall-clock"}
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json} (work: {work})")
    failed = [r["check"] for r in rows if r["status"].startswith("FAILED")]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
