"""End to end on the packaged default model: real vLLM (CPU), a real short DPO run, the adapter
served by vLLM (LoRARequest) and loaded by PEFT, and a run killed mid-stage that, re-run,
redoes only the unfinished stage."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]

CONSTITUTION = {
    "name": "tiny-pirate",
    "description": 'You are a pirate. Start every answer with "Ahoy, matey!" and say "arr" and "ye".',
    "traits": [
        {"trait": "I talk like a pirate.", "questions": ["How do I boil an egg?", "What is rain?", "Why is the sky blue?"]},
        {"trait": "I love my ship.", "questions": ["What is a good hobby?", "How do I save money?", "What is a map?"]},
    ],
}


def _recipe(tmp: Path) -> Path:
    (tmp / "tiny-pirate.yaml").write_text(yaml.safe_dump(CONSTITUTION))
    recipe = {
        "constitution": "tiny-pirate.yaml",
        "run_dir": str(tmp / "run"),
        "seed": 0,
        "prompts": {"per_trait": 5, "heldout_per_trait": 2, "per_request": 6, "max_tokens": 160},
        "pairs": {"max_tokens": 128, "teacher_samples": 1, "min_margin": None, "min_distinct_3grams": 0.0},
        "dpo": {"lora": {"r": 8, "alpha": 16},
                "trainer": {"max_steps": 4, "learning_rate": 1e-4, "per_device_train_batch_size": 2,
                            "gradient_accumulation_steps": 1, "max_length": 256}},
        # The full report, small: 4 held-out + 2 neutral prompts, one adversarial suffix.
        "eval": {"max_tokens": 48, "general_prompts": 2, "adversarial": 1, "revealed_prompts": 2},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "character_training.cli", *args]


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory, default_model_dir):
    """Run 1 is killed (SIGKILL) while the dpo stage trains; run 2 finishes the run."""
    tmp = tmp_path_factory.mktemp("e2e")
    recipe = _recipe(tmp)
    run = tmp / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log1 = (tmp / "run1.log").open("w")
    proc = subprocess.Popen(_cli("run", str(recipe)), cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 900
    while not (run / "dpo").is_dir():
        assert proc.poll() is None, f"run 1 ended before the dpo stage: {(tmp / 'run1.log').read_text()[-3000:]}"
        assert time.time() < deadline, "run 1 never reached the dpo stage"
        time.sleep(1)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "dpo" / "manifest.json").exists(), "dpo finished before it could be killed"
    before = {s: json.loads((run / s / "manifest.json").read_text())["finished_at"] for s in ("prompts", "pairs")}

    done = subprocess.run(_cli("run", str(recipe)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run, before, done.stdout


def test_rerun_redoes_only_the_unfinished_stage(killed_then_rerun):
    run, before, stdout = killed_then_rerun
    assert "[prompts] done already" in stdout and "[pairs] done already" in stdout
    assert "[dpo] running" in stdout and "[eval] running" in stdout
    for stage, finished in before.items():
        assert json.loads((run / stage / "manifest.json").read_text())["finished_at"] == finished
    for stage in ("dpo", "eval"):
        assert (run / stage / "manifest.json").is_file()


def test_generated_data_and_manifests(killed_then_rerun):
    from datasets import load_dataset

    run, _, _ = killed_then_rerun
    prompts = [json.loads(line) for line in (run / "prompts" / "prompts.jsonl").read_text().splitlines()]
    train = {p["prompt"] for p in prompts if p["split"] == "train"}
    heldout = {p["prompt"] for p in prompts if p["split"] == "heldout"}
    assert heldout and not train & heldout
    pairs = load_dataset("json", data_files=str(run / "pairs" / "pairs.jsonl"), split="train")
    manifest = json.loads((run / "pairs" / "manifest.json").read_text())
    assert len(pairs) == manifest["counts"]["pairs"] > 0
    assert manifest["counts"]["prompts"] == len(train)
    assert manifest["model"].endswith("SmolLM2-135M-Instruct")
    assert {"temperature", "max_tokens"} <= set(manifest["sampling"])
    assert manifest["constitution_sha256"]
    row = pairs[0]
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"


def test_eval_report_served_the_adapter_in_vllm(killed_then_rerun):
    run, _, stdout = killed_then_rerun
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(report["conditions"]) == {"base", "base+system_prompt", "dpo/adapter", "dpo/adapter | adv:1",
                                         "dpo/adapter | prefill", "base+system_prompt | adv:1", "base | steered"}
    prompts = report["prompts"]["heldout"] + report["prompts"]["general"]
    assert report["prompts"]["general"] == 2 and prompts >= 3
    for result in report["conditions"].values():
        assert 0.0 <= result["persona_rate"] <= 1.0
        assert result["answers"] == prompts
        assert result["empty"] == prompts or 0.0 <= result["distinct_3grams"] <= 1.0
    answers = [json.loads(line) for line in (run / "eval" / "answers.jsonl").read_text().splitlines()]
    by_condition = {}
    for a in answers:
        by_condition.setdefault(a["condition"], []).append(a["answer"])
    # The adapter (served through vLLM's LoRARequest) changes what the model says.
    assert by_condition["dpo/adapter"] != by_condition["base"]
    judge = report["judge"]["counts"]
    # every non-empty answer of the 7 conditions judged for 2 traits and coherence (retries on top)
    assert judge["requests"] >= 3 * sum(r["answers"] - r["empty"] for r in report["conditions"].values())
    assert set(report["revealed"]) == {"base", "dpo/adapter"}
    assert report["persona_vectors"]["headline"]["base+system_prompt"]["ratio"] == pytest.approx(1.0)
    assert set(report["capability"]["conditions"]) == {"base", "dpo/adapter"}
    # The prompts stage removes exact repeats only: a draw may leave a near-duplicate, which is dropped
    # before scoring and counted.
    con = report["contamination"]
    assert con["kept"] + con["dropped"] == con["checked"] and con["dropped"] == len(con["dropped_prompts"])
    assert not {d["prompt"] for d in con["dropped_prompts"]} & {a["prompt"] for a in answers}
    for png in report["plots"].values():
        assert (run / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    assert "Persona rate" in (run / "eval" / "report.md").read_text()
    assert "persona" in stdout and "report.md" in stdout


def test_adapter_loads_in_peft(killed_then_rerun, default_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _, _ = killed_then_rerun
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 422, 1345, 314, 253, 9530]])
    with torch.no_grad():
        before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(run / "dpo" / "adapter"))
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after, atol=1e-5)
    assert "tiny-pirate" in (run / "dpo" / "adapter" / "README.md").read_text()
