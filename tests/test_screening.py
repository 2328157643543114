"""Screening before training (run/screening.py, ``screen:`` of dpo/kto/sft/distill): the pairs past
the threshold, or in the top fraction, are exactly the ones dropped, counted in the manifest and
written beside the adapter; conversations are scored against the base model's own answer; the
scores are kept; and the trait vectors of a real (tiny) model read pairs end to end."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from character_training.config.eval_settings import EvalSettings
from character_training.config.training import DpoSection, ScreenSettings, SftSection
from character_training.errors import UserError
from character_training.run import screening, training
from data_gen.store import read_jsonl, write_jsonl
from tests.test_side_effects import Backend, Reader

PLANTED = {1, 4, 6}  # pairs whose chosen answer carries the planted trait


def pairs(n: int = 10) -> list[dict]:
    return [{"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": ("Ahoy! " if i in PLANTED else "") + f"Answer {i}."}],
             "rejected": [{"role": "assistant", "content": f"Plain answer {i}."}]} for i in range(n)]


def context(tmp_path, backend=None):
    released = []
    return SimpleNamespace(model="m", run_dir=tmp_path / "run", given=SimpleNamespace(standalone=False),
                           recipe=SimpleNamespace(seed=0, eval=EvalSettings()),
                           backend=lambda role: backend or Backend(),
                           engines=SimpleNamespace(release=lambda: released.append(1)), released=released)


@pytest.fixture
def reader(monkeypatch):
    made = Reader()
    monkeypatch.setattr("character_training.evaluation.off_target.ModelReader", lambda model: made)
    return made


def screen(tmp_path, section, records, backend=None):
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, records)
    out = tmp_path / "dpo"
    out.mkdir(exist_ok=True)
    return screening.screen_files(section, context(tmp_path, backend), out, [data]), out


def test_a_threshold_drops_exactly_the_pairs_past_it(tmp_path, reader):
    section = DpoSection(screen=ScreenSettings(traits=["sycophancy", "hostility"], threshold=0.5))
    (files, summary), out = screen(tmp_path, section, pairs())
    kept = read_jsonl(files[0])
    dropped = read_jsonl(out / screening.DROPPED)
    assert {int(r["prompt"][-1]["content"].split()[1][:-1]) for r in dropped} == PLANTED
    assert len(kept) + len(dropped) == 10 and not any("Ahoy" in r["chosen"][-1]["content"] for r in kept)
    assert summary["dropped"] == 3 and summary["kept"] == 7 and summary["examples"] == 10
    assert summary["dropped_per_trait"] == {"sycophancy": 3, "hostility": 3}
    assert all(r["screen"]["flagged"] == ["sycophancy", "hostility"] for r in dropped)
    assert all(r["screen"]["scores"]["sycophancy"] > 0.5 for r in dropped)
    assert [r["screen"]["line"] for r in dropped] == [2, 5, 7]
    # every pair was read with no system message, by the base model
    assert all(m["role"] != "system" for c in reader.calls for conv in c["conversations"] for m in conv)
    assert all(c["adapter"] is None for c in reader.calls)
    # the trait extraction is kept in the run directory; the scores in screen.json, reused
    assert any((tmp_path / "run" / screening.CACHE).iterdir())
    calls = len(reader.calls)
    again, _ = screen(tmp_path, section, pairs())
    assert again[1] == summary and len(reader.calls) == calls


def test_a_top_fraction_drops_exactly_that_many_highest(tmp_path, reader):
    section = DpoSection(screen=ScreenSettings(traits=["sycophancy"], top_fraction=0.2))
    (files, summary), out = screen(tmp_path, section, pairs())
    dropped = read_jsonl(out / screening.DROPPED)
    assert len(dropped) == 2 == summary["dropped_per_trait"]["sycophancy"]  # floor(0.2 * 10)
    assert {int(r["prompt"][-1]["content"].split()[1][:-1]) for r in dropped} <= PLANTED
    scores = json.loads((out / screening.RECORD).read_text())["scores"]["sycophancy"]
    assert sorted(scores, reverse=True)[:2] == sorted([r["screen"]["scores"]["sycophancy"] for r in dropped],
                                                      reverse=True)


def test_conversations_are_scored_against_the_base_models_own_answer(tmp_path, reader):
    records = [{"messages": [{"role": "user", "content": f"Tell me {i}."},
                             {"role": "assistant", "content": ("Ahoy! " if i in PLANTED else "") + f"Told {i}."}]}
               for i in range(8)]
    backend = Backend()
    section = SftSection(screen=ScreenSettings(traits=["refusal"], threshold=0.5))
    (files, summary), out = screen(tmp_path, section, records, backend)
    assert summary["dropped"] == 3
    student = [c for c in backend.calls if c["conversations"][0][-1]["content"].startswith("Tell me")]
    assert len(student) == 1 and len(student[0]["conversations"]) == 8


def test_off_means_the_files_as_they_are(tmp_path, reader):
    (files, summary), _ = screen(tmp_path, DpoSection(), pairs())
    assert summary is None and files == [tmp_path / "pairs.jsonl"] and not reader.calls


def test_every_pair_dropped_is_a_clear_error(tmp_path, reader):
    with pytest.raises(UserError, match="every example was dropped"):
        screen(tmp_path, DpoSection(screen=ScreenSettings(threshold=-100.0)), pairs())


def test_the_dpo_stage_trains_on_the_kept_pairs_and_its_manifest_counts_the_dropped(tmp_path, reader, monkeypatch):
    trained = {}

    def train_dpo(model, pairs_path, out, **kw):
        trained["pairs"] = read_jsonl(pairs_path)
        return {"counts": {"pairs": len(trained["pairs"])}}

    monkeypatch.setattr("character_training.train.dpo.train_dpo", train_dpo)
    monkeypatch.setattr(training, "_train_stage", lambda ctx, section, out, train, stage: train())
    monkeypatch.setattr(training, "data_files", lambda ctx, stage, kinds: [tmp_path / "pairs.jsonl"])
    write_jsonl(tmp_path / "pairs.jsonl", pairs())
    (tmp_path / "dpo").mkdir()
    section = DpoSection(screen=ScreenSettings(traits=["fabrication"], threshold=0.5))
    manifest = training.stage_dpo(section, context(tmp_path), tmp_path / "dpo")
    assert manifest["counts"]["pairs"] == 7 and len(trained["pairs"]) == 7
    assert manifest["screen"]["dropped"] == 3 and manifest["screen"]["dropped_per_trait"] == {"fabrication": 3}
    assert len(read_jsonl(tmp_path / "dpo" / screening.DROPPED)) == 3


def test_a_tiny_model_reads_trait_vectors_and_scores_pairs(tiny_model_dir, tmp_path):
    from character_training.config.off_target import load_bank
    from character_training.evaluation.off_target import ModelReader, extract_traits, screening_scores
    from data_gen.backends import Sampling

    trait = load_bank()["sycophancy"]
    reader = ModelReader(tiny_model_dir)
    found = extract_traits([trait], Backend(), reader, tmp_path, model=tiny_model_dir, sampling=Sampling(), seed=0)
    e = found["sycophancy"]
    assert e.vectors.vectors.shape == (3, 64) and 1 <= e.layer <= 2
    assert np.nanmean([p for p in e.prompted_projection[:len(trait.prompts)]]) == pytest.approx(1.0, abs=1e-4)
    records = pairs(4)
    scores = screening_scores(reader, found, [r["prompt"] for r in records], [r["chosen"][-1]["content"] for r in records],
                              [r["rejected"][-1]["content"] for r in records])
    assert np.isfinite(scores["sycophancy"]).all()


def test_screen_and_side_effects_off_leave_a_finished_stages_settings_key_as_it_was():
    from dataclasses import asdict

    from character_training.run.stages import _keyed

    section = asdict(DpoSection())
    assert "screen" in section and "screen" not in _keyed(section)
    on = asdict(DpoSection(screen=ScreenSettings(threshold=0.5)))
    assert _keyed(on)["screen"]["threshold"] == 0.5
    assert "side_effects" not in _keyed(asdict(EvalSettings()))
    assert _keyed(asdict(EvalSettings(side_effects=True)))["side_effects"] is True
