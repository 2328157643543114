"""scripts/gpu_check.py: the one-GPU acceptance check, run scaled down on the CPU (``--tiny``) end
to end, and the decision of which carried wheels to install (without running pip)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


def test_tiny_check_end_to_end_on_the_cpu(tmp_path):
    from transformers.utils import is_liger_kernel_available

    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--tiny", "--json", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    plan = gpu_check.TINY
    rows = {r["check"]: r for r in report["rows"]}
    bench = [f"bench tiny {r}" for r in gpu_check.BENCH_ROWS] + ["bench small dpo"]
    stages = ["train distill (tiny)", "train dpo (tiny)", "launch.sh ddp 1 distill (accelerate)"]
    assert list(rows) == bench + stages + ["gpu bf16", "gpu FlashAttention"]
    for name in bench:
        if "liger" in name and not is_liger_kernel_available():
            continue
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["steps"] == plan.steps and r["timed_steps"] == plan.steps - plan.warmup_steps, r
        assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 and r["attention"] and r["dtype"] == "float32"
    for name in stages:
        assert rows[name]["status"] == "ok" and rows[name]["steps"] == plan.steps and rows[name]["adapter"], rows[name]
    skipped = [r for r in report["rows"] if r["status"] != "ok"]
    assert all(r["status"].startswith("skipped: ") and len(r["status"]) > 30 for r in skipped), skipped
    assert "no CUDA device" in rows["gpu bf16"]["status"] and "no CUDA device" in rows["gpu FlashAttention"]["status"]
    if not is_liger_kernel_available():
        assert "liger-kernel is not installed" in rows["bench tiny sft-padding_free-liger"]["status"]
    assert report["machine"]["cores"] >= 1 and report["machine"]["gpu"] is None and report["commit"]
    # one table, every row in it
    assert "tok/s" in done.stdout and "MFU" in done.stdout and "attention" in done.stdout
    assert all(name in done.stdout for name in rows)


# --- the carried wheels ---------------------------------------------------------------------

def test_only_the_missing_packages_are_installed_offline_from_the_wheels():
    importable = {"torch", "transformers", "accelerate", "pandas", "pyarrow", "yaml", "jinja2", "matplotlib", "httpx",
                  "fsspec"}
    missing = gpu_check.missing_packages(find=lambda module: object() if module in importable else None)
    assert missing == ["trl", "peft", "datasets", "dill", "multiprocess", "xxhash"]
    command = gpu_check.pip_command(missing, Path("/carried/wheels"), python="/usr/bin/python3",
                                    target=Path("/repo/.gpu_check/site"))
    assert command == ["/usr/bin/python3", "-m", "pip", "install", "--no-index", "--find-links", "/carried/wheels",
                       "--no-deps", "--target", "/repo/.gpu_check/site", "trl", "peft", "datasets", "dill",
                       "multiprocess", "xxhash"]


def test_nothing_missing_runs_no_pip(monkeypatch):
    monkeypatch.setattr(gpu_check, "missing_packages", lambda: [])
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: pytest.fail("pip ran with nothing missing"))
    assert gpu_check.install_wheels(None) == {"missing": [], "installed": []}


def test_missing_packages_without_wheels_say_how_to_carry_them(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "missing_packages", lambda: ["trl", "peft"])
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    with pytest.raises(SystemExit, match=r"trl, peft cannot be imported and no --wheels DIR"):
        gpu_check.install_wheels(None)
    with pytest.raises(SystemExit, match="no such directory"):
        gpu_check.install_wheels(tmp_path / "absent")


def test_the_pip_line_runs_with_the_missing_ones_and_a_failure_names_them(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(gpu_check, "missing_packages", lambda: ["trl"])
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda command, **k: ran.append(command) or
                        subprocess.CompletedProcess(command, 1, "", "No matching distribution found for trl"))
    with pytest.raises(SystemExit, match=r"(?s)pip could not install trl from .*No matching distribution"):
        gpu_check.install_wheels(tmp_path)
    assert ran == [gpu_check.pip_command(["trl"], tmp_path)]
