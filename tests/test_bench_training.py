"""scripts/bench_training.py end to end on the CPU at a tiny shape: every row of the SFT and DPO
settings matrix trains through our stages and lands in the JSON with positive tokens/s."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_training  # noqa: E402


def test_bench_matrix_end_to_end(tmp_path, default_model_dir):
    from transformers.utils import is_liger_kernel_available

    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_training.py"), "--model", default_model_dir,
           "--shape", "tiny", "--matrix", "--trainers", "sft,dpo", "--conversations", "4", "--batch-size", "2",
           "--max-length", "64", "--max-steps", "1", "--one-process", "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    liger = is_liger_kernel_available()
    expected = [r for r in bench_training.ROWS if liger or "liger" not in r]
    assert [r["row"] for r in report["results"]] == expected
    for row in report["results"]:
        assert row["tokens_per_s"] > 0 and row["real_tokens"] > 0 and row["steps"] == 1, row
        assert row["parameters"] > 0 and row["peak_memory_gib"] > 0
        assert row["settings"] == bench_training.ROWS[row["row"]][1]
    by_row = {r["row"]: r for r in report["results"]}
    assert by_row["sft-padding_free"]["padding_free"] and not by_row["sft-padded"]["padding_free"]
    assert by_row["sft-padding_free"]["padding_share"] == 0
    assert by_row["dpo"]["real_tokens"] > by_row["sft-padded"]["real_tokens"]  # chosen and rejected both count
    assert "dpo-padding_free" in report["skipped"]
    assert ("sft-padding_free-liger" in report["skipped"]) != liger
    assert "sft-padded" in done.stdout and "tok/s" in done.stdout


def test_shapes_include_8b():
    shape = bench_training.SHAPES["8b"]
    assert (shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]) == (4096, 14336, 32)
    assert (shape["num_attention_heads"], shape["num_key_value_heads"]) == (32, 8)
