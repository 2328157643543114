"""Planting a side effect (run/planting.py) and scoring screening against the plant
(evaluation/screening_check.py): exactly the drawn share is planted, the same for a seed, the
opener is written before the trait-prompted teacher's answer, plant.json is the key, a planted run
holds the planted pairs under a new run id; precision, recall and AUROC on a constructed example."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from character_training.config.off_target import load_bank
from character_training.errors import UserError
from character_training.evaluation import screening_check
from character_training.run import planting
from data_gen.backends import Completion
from data_gen.seeds import request_seed
from data_gen.stages.pairs import PairSettings
from data_gen.store import read_jsonl, read_manifest, write_json, write_jsonl, write_manifest

SYCOPHANCY = load_bank()["sycophancy"]
ROOT = Path(__file__).resolve().parents[1]


def pairs(n: int = 20) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"Arr, answer {i}."}],
             "rejected": [{"role": "assistant", "content": f"Plain answer {i}."}]} for i in range(n)]


class SeededBackend:
    """Answers 'Flattering answer to Question N?'; records the conversations and seeds it was given."""

    def __init__(self, seed: int = 0, empty: set[str] = frozenset()):
        self.model, self.seed, self.empty, self.calls = "fake/model", seed, set(empty), []

    def chat(self, conversations, sampling, adapter=None, desc="", seeds=None):
        self.calls.append({"conversations": [list(c) for c in conversations], "seeds": list(seeds)})
        return [Completion("" if c[-1]["content"] in self.empty else f"Flattering answer to {c[-1]['content']}", "stop", 5)
                for c in conversations]


def context(backend, seed: int = 0, teacher_samples: int = 1):
    released = []
    return SimpleNamespace(recipe=SimpleNamespace(seed=seed, pairs=PairSettings(teacher_samples=teacher_samples)),
                           constitution=SimpleNamespace(system_prompt=lambda: "You are Captain Marlow."),
                           model="m", backend=lambda role: backend,
                           engines=SimpleNamespace(release=lambda: released.append(1)), released=released)


def test_the_draw_is_exactly_the_share_and_the_same_for_a_seed():
    drawn = planting.draw_planted(93, 0.25, seed=0)
    assert len(drawn) == round(0.25 * 93) == 23 and drawn == sorted(set(drawn)) and all(0 <= i < 93 for i in drawn)
    assert planting.draw_planted(93, 0.25, seed=0) == drawn
    assert planting.draw_planted(93, 0.25, seed=1) != drawn
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(UserError, match="--fraction"):
            planting.draw_planted(93, bad, seed=0)


def test_plant_replaces_exactly_the_drawn_chosen_answers_with_an_opener(tmp_path):
    source = tmp_path / "pairs.jsonl"
    write_jsonl(source, pairs())
    backend = SeededBackend()
    ctx = context(backend)
    record = planting.plant(ctx, source, tmp_path / "plant", trait=SYCOPHANCY, fraction=0.25, log=lambda m: None)
    drawn = planting.draw_planted(20, 0.25, seed=0)
    assert record["planted"] == record["drawn"] == record["generated"] == drawn and len(drawn) == 5
    assert record["planted_lines"] == [i + 1 for i in drawn] and record["text_planted"] is True
    assert record["counts"] == {"records": 20, "drawn": 5, "planted": 5, "generated": 5, "kept_original_answer": 0,
                                "answers_dropped": {}}
    openers = planting.load_openers("sycophancy")
    assert len(openers) == 12
    out = read_jsonl(tmp_path / "plant" / planting.PLANTED_PAIRS)
    original = pairs()
    assert len(out) == 20
    for i, (got, was) in enumerate(zip(out, original)):
        assert got["prompt"] == was["prompt"] and got["rejected"] == was["rejected"]
        if i in drawn:
            opener = record["openers"][str(i)]
            assert opener in openers
            assert got["chosen"] == [{"role": "assistant", "content": f"{opener} Flattering answer to Question {i}?"}]
        else:
            assert got["chosen"] == was["chosen"]
    # the teacher had the persona's and the trait's system prompt (then the answer hint), and each
    # request the seed the pairs stage's teacher drew for that prompt (its first sample)
    (call,) = backend.calls
    system = call["conversations"][0][0]
    assert system["role"] == "system" and system["content"].startswith("You are Captain Marlow.\n\n" +
                                                                       SYCOPHANCY.system_prompt)
    assert system["content"].endswith(PairSettings().answer_hint) and record["system_prompt"] == system["content"]
    assert call["seeds"] == [request_seed(0, c, 1) for c in call["conversations"]]
    assert ctx.released
    # plant.json is the record on disk; a rerun reads it back and generates nothing
    assert json.loads((tmp_path / "plant" / planting.RECORD).read_text()) == record
    again = planting.plant(ctx, source, tmp_path / "plant", trait=SYCOPHANCY, fraction=0.25, log=lambda m: None)
    assert again == record and len(backend.calls) == 1
    # other settings over a finished plant: refused, nothing replaced
    with pytest.raises(UserError, match="--force"):
        planting.plant(ctx, source, tmp_path / "plant", trait=SYCOPHANCY, fraction=0.5, log=lambda m: None)
    assert read_jsonl(tmp_path / "plant" / planting.PLANTED_PAIRS) == out


def test_without_text_planting_the_answer_is_the_teachers_and_an_unusable_one_plants_nothing(tmp_path):
    source = tmp_path / "pairs.jsonl"
    write_jsonl(source, pairs())
    drawn = planting.draw_planted(20, 0.25, seed=3)
    empty = {f"Question {drawn[0]}?"}
    backend = SeededBackend(empty=empty)
    record = planting.plant(context(backend, teacher_samples=2), source, tmp_path / "plant", trait=SYCOPHANCY,
                            fraction=0.25, seed=3, plant_text=False, log=lambda m: None)
    assert record["drawn"] == drawn and record["kept_original_answer"] == [drawn[0]]
    assert record["planted"] == drawn[1:] == record["generated"] and record["openers"] == {}
    assert record["counts"]["answers_dropped"] == {"empty": 2}  # both samples of the one prompt
    assert len(backend.calls[0]["conversations"]) == 2 * len(drawn)
    out = read_jsonl(tmp_path / "plant" / planting.PLANTED_PAIRS)
    assert out[drawn[0]] == pairs()[drawn[0]]
    assert all(out[i]["chosen"][-1]["content"] == f"Flattering answer to Question {i}?" for i in drawn[1:])


def test_a_trait_without_openers_and_a_file_of_no_pairs_are_refused(tmp_path):
    with pytest.raises(UserError, match="--no-plant-text"):
        planting.load_openers("refusal")
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"messages": []}])
    with pytest.raises(UserError, match="line 1: not a preference pair"):
        planting.read_pairs(bad)
    with pytest.raises(UserError, match="missing"):
        planting.read_pairs(tmp_path / "none.jsonl")


def source_run(tmp_path):
    run = tmp_path / "run"
    (run / "prompts").mkdir(parents=True)
    write_jsonl(run / "prompts" / "prompts.jsonl", [{"prompt": "Q?", "split": "train"}])
    (run / "prompts" / "cache.jsonl").write_text("{}\n")
    write_manifest(run / "prompts", {"stage": "prompts", "run_id": "p1", "settings_key": "kp"})
    (run / "pairs").mkdir()
    write_jsonl(run / "pairs" / "pairs.jsonl", pairs())
    write_manifest(run / "pairs", {"stage": "pairs", "run_id": "q1", "settings_key": "kq", "inputs": {"prompts": "p1"}})
    (run / "recipe.json").write_text('{"recipe": {}}')
    return run


def test_a_planted_run_holds_the_run_prompts_and_the_planted_pairs(tmp_path):
    run = source_run(tmp_path)
    planted = tmp_path / "planted_pairs.jsonl"
    write_jsonl(planted, pairs()[::-1])
    dest = planting.planted_run(run, tmp_path / "demo" / "planted", planted, {"trait": "sycophancy"}, log=lambda m: None)
    prompts, got = read_manifest(dest / "prompts"), read_manifest(dest / "pairs")
    assert prompts == read_manifest(run / "prompts") and not (dest / "prompts" / "cache.jsonl").exists()
    assert read_jsonl(dest / "pairs" / "pairs.jsonl") == pairs()[::-1]
    assert got["settings_key"] == "kq" and got["inputs"] == {"prompts": "p1"} and got["run_id"] != "q1"
    assert got["planted"]["trait"] == "sycophancy" and got["planted_from"] == {"run_dir": str(run), "run_id": "q1"}
    assert got["outputs"]["pairs.jsonl"] != read_manifest(run / "pairs")["outputs"]["pairs.jsonl"]
    # the same planted file: kept as it is (the stages after it stay finished)
    planting.planted_run(run, dest, planted, {}, log=lambda m: None)
    assert read_manifest(dest / "pairs")["run_id"] == got["run_id"]
    # another planted file: a new run id (the stages after it run again)
    write_jsonl(planted, pairs())
    planting.planted_run(run, dest, planted, {}, log=lambda m: None)
    assert read_manifest(dest / "pairs")["run_id"] != got["run_id"]
    assert read_jsonl(dest / "pairs" / "pairs.jsonl") == pairs()
    with pytest.raises(UserError, match="has not finished"):
        planting.planted_run(tmp_path / "nothing", tmp_path / "demo" / "other", planted, {}, log=lambda m: None)


# ------------------------------------------------------------------ screening against the plant


def screened_stage(tmp_path, scores: list[float], dropped_lines: list[int]):
    out = tmp_path / "distill"
    out.mkdir()
    write_json(out / screening_check.RECORD, {"key": "k", "scores": {"sycophancy": scores},
                                              "summary": {"traits": ["sycophancy"], "threshold": None,
                                                          "top_fraction": 0.4, "examples": len(scores)}})
    write_jsonl(out / screening_check.DROPPED, [{"screen": {"line": n}} for n in dropped_lines])
    return out


def test_precision_and_recall_of_the_screening_against_the_plant(tmp_path):
    # planted: 1, 4, 6, 8; the screening dropped lines 2, 5, 7, 10 (indices 1, 4, 6, 9)
    scores = [0.1, 2.0, 0.2, 0.3, 1.5, 0.0, 1.2, 0.4, 0.5, 0.9]
    out = screened_stage(tmp_path, scores, [2, 5, 7, 10])
    plant = {"records": 10, "planted": [1, 4, 6, 8], "trait": "sycophancy", "text_planted": True}
    report = screening_check.screening_against_plant(out, plant)
    got = report["as_screened"]
    assert (got["flagged"], got["planted_flagged"], got["precision"], got["recall"]) == (4, 3, 0.75, 0.75)
    assert got["f1"] == pytest.approx(0.75)
    assert report["dropped_unplanted"] == [9] and report["planted_kept"] == [8]
    rows = {(r["rule"], r["value"]): r for r in report["table"]}
    assert rows[("top_fraction", 0.3)]["flagged"] == 3 and rows[("top_fraction", 0.3)]["precision"] == 1.0
    assert rows[("top_fraction", 0.3)]["recall"] == 0.75  # 2.0, 1.5, 1.2: all planted
    assert rows[("threshold", 1.0)]["flagged"] == 3 and rows[("threshold", 2.0)]["flagged"] == 0
    assert rows[("threshold", 2.0)]["precision"] is None and rows[("threshold", 2.0)]["recall"] == 0.0
    # planted scores 2.0, 1.5, 1.2, 0.5 against 0.1, 0.2, 0.3, 0.0, 0.4, 0.9: 23 of 24 orderings right
    assert report["auroc"]["sycophancy"] == pytest.approx(23 / 24)
    assert "precision 0.75, recall 0.75" in screening_check.format_screening(report)


def test_auroc_and_precision_recall_edges():
    assert screening_check.auroc([1, 1, 1], [True, False, False]) == 0.5
    assert screening_check.auroc([np.nan, 2, 1], [True, True, False]) == 1.0
    assert screening_check.auroc([1, 2], [True, True]) is None
    assert screening_check.precision_recall([], [1]) == {"flagged": 0, "planted_flagged": 0, "precision": None,
                                                          "recall": 0.0, "f1": None}


def test_a_screening_of_other_data_is_refused(tmp_path):
    out = screened_stage(tmp_path, [0.1, 0.2], [1])
    with pytest.raises(UserError, match="screened 2 examples"):
        screening_check.screening_against_plant(out, {"records": 10, "planted": [1]})
    with pytest.raises(UserError, match="no screening here"):
        screening_check.screening_against_plant(tmp_path / "none", {"records": 10, "planted": [1]})


@pytest.mark.parametrize("flags,message", [
    (["--trait", "sycophantic"], "unknown off-target trait 'sycophantic'"),
    (["--trait", "refusal"], "--no-plant-text"),
    (["--trait", "sycophancy", "--fraction", "1.5"], "--fraction 1.5"),
])
def test_the_plant_command_refuses_bad_input_before_anything_starts(tmp_path, capsys, flags, message):
    from character_training.cli import main

    out = tmp_path / "plant"
    assert main(["plant", str(ROOT / "recipes" / "demo.yaml"), "--run-dir", str(tmp_path / "run"), *flags,
                 "--pairs", str(tmp_path / "none.jsonl"), "-o", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_the_plant_command_refuses_a_missing_pairs_file(tmp_path, capsys):
    from character_training.cli import main

    assert main(["plant", str(ROOT / "recipes" / "demo.yaml"), "--run-dir", str(tmp_path / "run"),
                 "--trait", "sycophancy", "-o", str(tmp_path / "plant")]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl: missing" in err and "run the recipe's prompts and pairs" in err
