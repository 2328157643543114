"""The run's bookkeeping: stages in order, manifests last, skip when finished, --force, stale
settings refused. The stage functions are replaced by fakes: this tests our logic only."""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from character_training.config.recipe import load_recipe
from character_training.errors import UserError
from character_training.run import pipeline
from character_training.run import stages
from data_gen.backends import Engines

CONSTITUTION = {"name": "toy", "description": "A toy.",
                "traits": [{"trait": "I am a toy.", "questions": ["What are you made of?"]}]}


@pytest.fixture
def recipe_path(tmp_path):
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(CONSTITUTION))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"constitution": "toy.yaml", "run_dir": str(tmp_path / "run"),
                                    "model": str(tmp_path / "model")}))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return path


@pytest.fixture
def calls(monkeypatch):
    calls: list[str] = []

    def fake(name):
        def stage(section, ctx, out):
            calls.append(name)
            (out / f"{name}.txt").write_text(name)
            if name == "pairs" and getattr(ctx.recipe, "_fail_pairs", False):
                raise RuntimeError("killed")
            return {"stage": name}
        return stage

    monkeypatch.setattr(stages, "STAGE_FUNCTIONS", {s: fake(s) for s in pipeline.STAGES})
    return calls


def test_stages_run_in_order_and_write_manifests_last(recipe_path, calls):
    manifests = pipeline.run(load_recipe(recipe_path), log=lambda _: None)
    assert calls == ["prompts", "pairs", "dpo", "eval"]
    run = recipe_path.parent / "run"
    for stage in calls:
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and f"{stage}.txt" in manifest["outputs"]
        assert manifest["constitution_sha256"] == manifests[stage]["constitution_sha256"]
    assert json.loads((run / "recipe.json").read_text())["recipe"]["run_dir"] == str(run)


def test_finished_stages_are_skipped_and_force_redoes_the_rest(recipe_path, calls):
    pipeline.run(load_recipe(recipe_path), log=lambda _: None)
    calls.clear()
    pipeline.run(load_recipe(recipe_path), log=lambda _: None)
    assert calls == []
    pipeline.run(load_recipe(recipe_path), force=["dpo"], log=lambda _: None)
    assert calls == ["dpo", "eval"]


def test_a_stage_whose_inputs_were_remade_by_a_narrower_run_runs_again(recipe_path, calls):
    pipeline.run(load_recipe(recipe_path), log=lambda _: None)
    calls.clear()
    narrow = load_recipe(recipe_path, ["stages=[prompts,pairs,dpo]"])
    pipeline.run(narrow, force=["dpo"], log=lambda _: None)
    assert calls == ["dpo"]  # eval's manifest, from the old adapter, is still there
    calls.clear()
    logs: list[str] = []
    pipeline.run(load_recipe(recipe_path), log=logs.append)
    assert calls == ["eval"]
    assert any("[eval] finished before, but an earlier stage was remade since (dpo;" in line for line in logs)
    calls.clear()
    pipeline.run(load_recipe(recipe_path), log=lambda _: None)
    assert calls == []


def test_a_manifest_from_before_input_tracking_counts_as_current():
    assert pipeline.stale_inputs({"stage": "eval"}, {"dpo": "abc"}) == []
    assert pipeline.stale_inputs({"inputs": {"dpo": "abc"}}, {"dpo": "abc", "sft": "new"}) == []
    assert pipeline.stale_inputs({"inputs": {"dpo": "abc"}}, {"dpo": "def"}) == ["dpo"]


def test_an_unfinished_stage_is_redone_from_clean(recipe_path, calls):
    recipe = load_recipe(recipe_path)
    recipe._fail_pairs = True
    with pytest.raises(RuntimeError):
        pipeline.run(recipe, log=lambda _: None)
    run = recipe_path.parent / "run"
    assert (run / "prompts" / "manifest.json").exists() and not (run / "pairs" / "manifest.json").exists()
    (run / "pairs" / "partial.jsonl").write_text("half a record")
    calls.clear()
    pipeline.run(load_recipe(recipe_path), log=lambda _: None)
    assert calls == ["pairs", "dpo", "eval"]
    assert not (run / "pairs" / "partial.jsonl").exists()


def test_changed_settings_of_a_finished_stage_are_refused(recipe_path, calls):
    pipeline.run(load_recipe(recipe_path), log=lambda _: None)
    with pytest.raises(UserError, match="--force pairs"):
        pipeline.run(load_recipe(recipe_path, ["pairs.max_tokens=7"]), log=lambda _: None)


def test_unknown_forced_stage_is_an_error(recipe_path, calls):
    with pytest.raises(UserError, match="--force bogus: unknown stage"):
        pipeline.run(load_recipe(recipe_path), force=["bogus"], log=lambda _: None)
    with pytest.raises(UserError, match="--force sft: not one of this recipe's stages"):
        pipeline.run(load_recipe(recipe_path), force=["sft"], log=lambda _: None)


def test_a_stage_that_needs_principles_stops_the_run_before_any_stage(recipe_path, calls):
    """critique judges against principles; the toy constitution has none: nothing runs at all."""
    data = yaml.safe_load(recipe_path.read_text())
    data["stages"] = ["prompts", "critique", "sft"]
    recipe_path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=r"toy.*no principles.*critique"):
        pipeline.run(load_recipe(recipe_path), log=lambda _: None)
    assert calls == [] and not (recipe_path.parent / "run").exists()


def test_generate_needs_principles_before_the_engine_starts(tmp_path, monkeypatch, capsys):
    from character_training import cli
    from character_training.run import generation

    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(CONSTITUTION))
    monkeypatch.setattr(generation, "make_backend", lambda *a, **k: pytest.fail("an engine was started"))
    assert cli.main(["generate", "rlaif", "--constitution", str(tmp_path / "toy.yaml"), "-o", str(tmp_path / "o")]) == 2
    assert "no principles" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_the_eval_engine_lora_rank_covers_every_adapter_and_rank_pattern():
    from character_training.adapters.io import lora_rank_for_vllm

    assert lora_rank_for_vllm([{"r": 4}]) == 8
    assert lora_rank_for_vllm([{"r": 8, "rank_pattern": {}}]) == 8
    assert lora_rank_for_vllm([{"r": 16}, {"r": 8, "rank_pattern": {"q_proj": 24}}]) == 32
    assert lora_rank_for_vllm([{"r": 64, "rank_pattern": None}]) == 64


def test_prompts_stage_passes_max_rounds_and_warns_about_a_trait_left_short(recipe_path, tmp_path, monkeypatch, capsys):
    from data_gen.backends import Completion
    from tests.fakes import FakeBackend

    backend = FakeBackend(lambda conv: Completion("- Hi", "stop", 2))  # nothing usable
    monkeypatch.setattr(stages, "_generation_backend", lambda ctx, out: backend)
    recipe = load_recipe(recipe_path)
    recipe.prompts = dataclasses.replace(recipe.prompts, max_rounds=2)
    from character_training.run.context import make_context

    ctx = make_context(recipe, Engines())
    out = tmp_path / "run" / "prompts"
    manifest = stages.stage_prompts(recipe.prompts, ctx, out)
    assert len(backend.calls) == 2 and manifest["rounds"] == 2
    warning = capsys.readouterr().out
    assert "[prompts] warning: trait 'I am a toy.': 1 training and 0 held-out prompts" in warning
    assert f"(asked for {recipe.prompts.per_trait} and {recipe.prompts.heldout_per_trait}) after 2 rounds" in warning
    assert "prompts.max_rounds" in warning
