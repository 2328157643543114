"""Every generation stage on the packaged default model through real vLLM (CPU), run from the
CLI with small counts; each output loads with `datasets` and TRL's trainers take it (one step
each on the tiny model)."""
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

# A small character: two traits of two questions make four training prompts.
CONSTITUTION = {
    "name": "tiny-pirate",
    "description": 'You are a pirate. Start every answer with "Ahoy, matey!" and say "arr" and "ye".',
    "traits": [{"trait": "I talk like a pirate.", "questions": ["What is rain?", "Why is the sky blue?"]},
               {"trait": "I love my ship.", "questions": ["What is a good hobby?", "What is a map?"]}],
    "principles": ["Choose the response that sounds more like a pirate.",
                   "Choose the response that answers the question."],
    "facts": ["The pirate's ship is called the Salty Gull."],
}
OVERRIDES = [
    "prompts.per_trait=2", "prompts.heldout_per_trait=1", "prompts.max_tokens=160",
    "sdf.num_types=2", "sdf.brainstorm_requests=1", "sdf.ideas_per_type=2", "sdf.min_words=10",
    "sdf.sampling={temperature: 0.9, max_tokens: 320}",
    "critique.sampling={temperature: 0.7, max_tokens: 256}",
    "rlaif.min_margin=0.0", "rlaif.sampling={temperature: 0.9, max_tokens: 256}",
    "reflection.min_words=5", "reflection.sampling={temperature: 0.8, max_tokens: 256}",
    "interaction.conversations=2", "interaction.turns=3", "interaction.min_words=1",
    "interaction.min_distinct_3grams=0.0", "interaction.sampling={temperature: 0.8, max_tokens: 256}",
]


def cache_keys(path: Path) -> list[str]:
    """The request keys of a stage's cache, in order (a line torn by the kill is not a record)."""
    keys = []
    for line in path.read_text().splitlines():
        try:
            keys.append(json.loads(line)["key"])
        except (json.JSONDecodeError, KeyError):
            pass
    return keys


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate-all")
    prompts = tmp / "reflection.yaml"
    prompts.write_text(yaml.safe_dump({"values": "What do you value most, and why?",
                                       "voice": "Describe the way you talk, in your own words."}))
    (tmp / "tiny-pirate.yaml").write_text(yaml.safe_dump(CONSTITUTION))
    run = tmp / "run"
    overrides = [*OVERRIDES, f"reflection.prompts_file={prompts}", f"constitution={tmp / 'tiny-pirate.yaml'}"]
    args = [sys.executable, "-m", "character_training.cli", "run", str(ROOT / "recipes" / "generate-all.yaml"),
            "--run-dir", str(run)] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # First attempt: killed with SIGKILL (the whole process group, vLLM's engine process too) as
    # soon as the sdf stage has its first answers on disk, in the middle of that stage.
    cache = run / "sdf" / "cache.jsonl"
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and first.poll() is None and not (cache.is_file() and cache.stat().st_size > 0):
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert cache.is_file() and not (run / "sdf" / "manifest.json").exists(), "the kill must land inside sdf"
    killed_keys = cache_keys(cache)
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run / "killed_keys.json").write_text(json.dumps(killed_keys))
    return run


def test_a_stage_killed_with_sigkill_resumes_with_nothing_lost_or_duplicated(generated):
    killed_keys = json.loads((generated / "killed_keys.json").read_text())
    manifest = json.loads((generated / "sdf" / "manifest.json").read_text())
    keys = cache_keys(generated / "sdf" / "cache.jsonl")
    assert killed_keys and set(killed_keys) <= set(keys)      # nothing made before the kill was lost
    assert len(keys) == len(set(keys))                         # no request answered twice
    assert manifest["cache"]["cache_hits"] >= len(killed_keys)  # ... and it was answered from the cache
    assert manifest["cache"]["generated"] == len(keys) - len(killed_keys)


# Each output file and the manifest count of its records.
STAGE_FILES = {"sdf": {"documents.jsonl": "documents_kept"}, "critique": {"sft.jsonl": "sft", "pairs.jsonl": "pairs"},
               "rlaif": {"pairs.jsonl": "pairs"}, "reflection": {"reflection.jsonl": "records"},
               "interaction": {"interaction.jsonl": "records"}}
EXPECTED_COLUMNS = {"documents.jsonl": {"text"}, "pairs.jsonl": {"prompt", "chosen", "rejected"}}


@pytest.mark.parametrize("stage", list(STAGE_FILES))
def test_stage_finished_and_its_records_are_counted_and_load(generated, stage):
    """What every draw guarantees: the stage finished, every output is listed, its records are
    the manifest's count, and an output with records loads with `datasets` in TRL's format. A
    135M model's answers can all be cut off or loop on one machine's draw, so an output may be
    empty; then its records went somewhere the manifest counts (drops). That TRL trains on each
    stage's output is tested on outputs that cannot be empty (tests/test_stage_outputs_train.py)."""
    from datasets import load_dataset

    manifest = json.loads((generated / stage / "manifest.json").read_text())
    assert manifest["stage"] == stage and "drops" in manifest and manifest["cache"]["generated"] > 0
    for name, count in STAGE_FILES[stage].items():
        path = generated / stage / name
        assert name in manifest["outputs"]
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(lines) == manifest["counts"][count]
        if not lines:
            assert manifest["drops"], f"{stage}/{name} is empty and the manifest counts no drop"
            continue
        ds = load_dataset("json", data_files=str(path), split="train")
        assert EXPECTED_COLUMNS.get(name, {"messages"}) <= set(ds.column_names)
        assert ds.num_rows == len(lines)
