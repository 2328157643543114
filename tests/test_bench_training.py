"""scripts/bench_training.py end to end on the CPU at a tiny shape: every row of the SFT, DPO and
distill settings matrix trains through our stages and lands in the JSON with positive tokens/s,
timed over the steps after the warm-up ones; the timed window on its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_training  # noqa: E402
import pytest  # noqa: E402


def test_bench_matrix_end_to_end(tmp_path, default_model_dir):
    from transformers.utils import is_liger_kernel_available

    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_training.py"), "--model", default_model_dir,
           "--shape", "tiny", "--matrix", "--trainers", "sft,dpo,distill", "--conversations", "6", "--batch-size", "2",
           "--max-length", "64", "--max-steps", "2", "--warmup-steps", "1", "--one-process", "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    liger = is_liger_kernel_available()
    expected = [r for r in bench_training.ROWS if liger or "liger" not in r]
    assert [r["row"] for r in report["results"]] == expected
    for row in report["results"]:
        assert row["tokens_per_s"] > 0 and row["real_tokens"] > 0 and row["steps"] == 2, row
        # the first step ran but is not in the timing
        assert row["warmup_steps"] == 1 and row["timed_steps"] == 1, row
        assert 0 < row["timed_real_tokens"] < row["real_tokens"] and 0 < row["timed_seconds"] < row["seconds"], row
        assert row["tokens_per_s"] == pytest.approx(row["timed_real_tokens"] / row["timed_seconds"])
        assert row["parameters"] > 0 and row["peak_memory_gib"] > 0
        assert row["settings"] == bench_training.ROWS[row["row"]][1]
    by_row = {r["row"]: r for r in report["results"]}
    assert by_row["sft-padding_free"]["padding_free"] and not by_row["sft-padded"]["padding_free"]
    assert by_row["sft-padding_free"]["padding_share"] == 0
    assert by_row["dpo"]["real_tokens"] > by_row["sft-padded"]["real_tokens"]  # chosen and rejected both count
    assert by_row["distill"]["teacher_tokens"] > by_row["distill"]["real_tokens"]  # the teacher's view is longer
    assert "warm-up" in report["timing"] and report["settings"]["warmup_steps"] == 1
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"] and report["commit"]
    assert "dpo-padding_free" in report["skipped"]
    assert ("sft-padding_free-liger" in report["skipped"]) != liger
    assert "sft-padded" in done.stdout and "tok/s" in done.stdout and "warm-up, not timed" in done.stdout
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_training.py"), "--markdown", str(out)],
                           capture_output=True, text=True, check=True).stdout
    assert all(f"| `{r}` |" in table for r in by_row) and "warm-up, not timed" in table


def test_the_timed_window_leaves_out_the_warmup_steps():
    # (clock, real tokens so far, positions so far): at the start, then after each of 4 steps
    marks = [(0.0, 0, 0), (30.0, 100, 150), (31.0, 200, 250), (32.5, 300, 350), (34.0, 400, 450)]
    window = bench_training.timed_window(marks, 1)
    assert window == {"warmup_steps": 1, "timed_steps": 3, "timed_seconds": 4.0, "timed_real_tokens": 300,
                      "timed_positions": 300}
    assert bench_training.timed_window(marks, 2)["timed_seconds"] == 3.0
    assert bench_training.timed_window(marks, 0) == {"warmup_steps": 0, "timed_steps": 4, "timed_seconds": 34.0,
                                                     "timed_real_tokens": 400, "timed_positions": 450}


def test_a_row_with_no_step_after_warmup_is_refused():
    with pytest.raises(ValueError, match="none is left to time"):
        bench_training.timed_window([(0.0, 0, 0), (1.0, 10, 10)], 1)
    with pytest.raises(SystemExit):
        bench_training.main(["--max-steps", "1", "--warmup-steps", "1"])


def test_shapes_include_8b():
    shape = bench_training.SHAPES["8b"]
    assert (shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]) == (4096, 14336, 32)
    assert (shape["num_attention_heads"], shape["num_key_value_heads"]) == (32, 8)
