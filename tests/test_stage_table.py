"""The stage table (config/stages.py) and the one path that runs a stage (run/stages.py): what
derives from the table, a trainer default changed in code asks for --force, every command writes
the run's manifest, and KTO, the stage added as the proof, runs from a recipe and from `train`."""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from character_training import cli
from character_training.config import layout
from character_training.config.recipe import Recipe, load_recipe
from character_training.config.stages import GEN_STAGES, STAGES, TABLE, TRAINING_STAGES
from character_training.config.training import DpoSection
from character_training.errors import UserError
from character_training.run import pipeline, stages
from data_gen.store import write_jsonl
from tests.conftest import toy_pairs

CONSTITUTION = {"name": "toy", "description": "A toy.",
                "traits": [{"trait": "I am a toy.", "questions": ["What are you made of?"]}]}
MANIFEST_KEYS = {"settings_key", "run_id", "inputs", "seconds", "constitution", "constitution_sha256", "outputs",
                 "finished_at"}


def test_the_recipe_the_layout_and_the_cli_derive_from_the_table():
    assert [f.name for f in dataclasses.fields(Recipe) if f.name in STAGES] == list(STAGES)
    recipe = Recipe(constitution="c.yaml", run_dir="run")
    for row in TABLE:  # each section with every default
        assert getattr(recipe, row.name) == row.default_section()
    assert set(layout.DATA) == {s.name for s in TABLE if s.kind == "data"}
    assert set(GEN_STAGES) < set(layout.DATA)
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    kinds = next(a for a in train._actions if a.dest == "kind").choices
    assert kinds == [TABLE_ROW.section.kind for TABLE_ROW in TABLE if TABLE_ROW.kind == "train"]
    assert "kto" in kinds and set(TRAINING_STAGES) >= {"kto", "dpo", "distill"}


@pytest.fixture
def run_recipe(tmp_path, monkeypatch):
    """A recipe whose stage functions are fakes (the bookkeeping is what is tested)."""
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(CONSTITUTION))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"constitution": "toy.yaml", "run_dir": str(tmp_path / "run"),
                                    "model": str(tmp_path / "model"), "stages": ["prompts", "pairs", "dpo", "eval"]}))

    def fake(name):
        def stage(section, ctx, out):
            (out / f"{name}.txt").write_text(name)
            return {"stage": name, "counts": {}, "section": type(section).__name__}
        return stage

    monkeypatch.setattr(stages, "STAGE_FUNCTIONS", {s: fake(s) for s in STAGES})
    monkeypatch.setattr(stages, "summary", lambda manifest, out: "(the eval table)")
    return path


def test_a_trainer_default_changed_in_code_makes_the_finished_stage_ask_for_force(run_recipe, monkeypatch):
    pipeline.run(load_recipe(run_recipe), log=lambda _: None)
    pipeline.run(load_recipe(run_recipe), log=lambda _: None)  # unchanged: every stage skipped
    monkeypatch.setattr(DpoSection, "trainer_defaults", {**DpoSection.trainer_defaults, "learning_rate": 1e-3})
    with pytest.raises(UserError, match="--force dpo"):
        pipeline.run(load_recipe(run_recipe), log=lambda _: None)


def test_each_stage_function_gets_its_own_section(run_recipe):
    manifests = pipeline.run(load_recipe(run_recipe), log=lambda _: None)
    assert {s: m["section"] for s, m in manifests.items()} == {
        "prompts": "ExpandSettings", "pairs": "PairSettings", "dpo": "DpoSection", "eval": "EvalSettings"}


def test_train_generate_and_eval_write_the_manifest_run_writes(run_recipe, tmp_path):
    manifests = pipeline.run(load_recipe(run_recipe), log=lambda _: None)
    for manifest in manifests.values():
        assert MANIFEST_KEYS <= set(manifest)
    assert manifests["dpo"]["inputs"] == {s: manifests[s]["run_id"] for s in ("prompts", "pairs")}

    write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(2))
    model = str(tmp_path / "model")
    assert cli.main(["train", "dpo", "--data", str(tmp_path / "pairs.jsonl"), "-o", str(tmp_path / "t"),
                     "--model", model]) == 0
    assert cli.main(["generate", "reflection", "--constitution", str(tmp_path / "toy.yaml"), "-o",
                     str(tmp_path / "g"), "--model", model]) == 0
    assert cli.main(["eval", str(run_recipe), "--fresh", "--adapter", str(tmp_path / "t")]) == 0
    read = {name: json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("t", "g")}
    read["eval"] = json.loads((tmp_path / "run" / "eval" / "manifest.json").read_text())
    for name, manifest in read.items():
        assert MANIFEST_KEYS <= set(manifest), name
    assert read["t"]["inputs"] == {} and read["t"]["constitution"] is None
    assert read["g"]["constitution_sha256"] == manifests["prompts"]["constitution_sha256"]
    # eval of a run records the run's stages it read, as the run's own eval stage does
    assert read["eval"]["inputs"] == manifests["eval"]["inputs"]
    assert read["eval"]["settings_key"] == manifests["eval"]["settings_key"]


def test_kto_trains_from_a_recipe_after_pairs_and_from_the_command_line(tmp_path, tiny_model_dir, monkeypatch):
    """KTO was added as one module (train/kto.py), its section and one row: it runs chained in a
    recipe (pairs -> kto, the pairs stage faked) and as `train kto`, and its card and manifest say so."""
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(CONSTITUTION))
    trainer = {"max_steps": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 64,
               "save_steps": 10}

    def fake_pairs(section, ctx, out):
        write_jsonl(out / "pairs.jsonl", toy_pairs(4))
        return {"stage": "pairs", "counts": {"pairs": 4}}

    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "pairs", fake_pairs)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"constitution": "toy.yaml", "run_dir": str(tmp_path / "run"),
                                      "model": tiny_model_dir, "stages": ["pairs", "kto"],
                                      "kto": {"lora": {"r": 4, "alpha": 8}, "trainer": trainer}}))
    manifests = pipeline.run(load_recipe(recipe), log=lambda _: None)
    kto = manifests["kto"]
    assert kto["stage"] == "kto" and kto["counts"]["desirable"] == kto["counts"]["undesirable"] == 4
    assert kto["inputs"] == {"pairs": manifests["pairs"]["run_id"]}
    card = (tmp_path / "run" / "kto" / "adapter" / "README.md").read_text()
    assert "KTO" in card and "toy" in card
    sets = [a for k, v in trainer.items() for a in ("--set", f"trainer.{k}={v}")]
    assert cli.main(["train", "kto", "--data", str(tmp_path / "run" / "pairs" / "pairs.jsonl"), "-o",
                     str(tmp_path / "cli"), "--model", tiny_model_dir, "--set", "lora.r=4", "--set", "lora.alpha=8",
                     *sets]) == 0
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["stage"] == "kto" and manifest["counts"]["steps"] == 1 and MANIFEST_KEYS <= set(manifest)


def test_recipe_json_shows_no_server_credentials(run_recipe, tmp_path):
    """recipe.json is a record to read and share: a base URL's user info and token parameters are
    ***; the launched processes get the recipe itself in a private file (run/stages.py)."""
    data = yaml.safe_load(run_recipe.read_text())
    data["backend"] = {"kind": "openai", "base_urls": ["http://user:s3cret-pass@127.0.0.1:1/v1?api_key=t0ken-value"],
                       "served_model": "m"}
    run_recipe.write_text(yaml.safe_dump(data))
    recipe = load_recipe(run_recipe, ["stages=[prompts]"])
    pipeline.run(recipe, log=lambda _: None)
    written = (tmp_path / "run" / "recipe.json").read_text()
    assert "s3cret-pass" not in written and "t0ken-value" not in written and "127.0.0.1" in written
    assert recipe.backend.base_urls[0].startswith("http://user:s3cret-pass@")  # the run itself uses them as given
