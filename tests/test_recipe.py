"""Recipes: shipped files, validation errors naming key and file, --set overrides, paths."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from character_training.cli import main
from character_training.errors import UserError
from character_training.config.stages import STAGES
from character_training.config.recipe import Recipe, load_recipe
from character_training.config.training import DpoSection
from data_gen.stages.pairs import PairSettings
from data_gen.stages.prompts import ExpandSettings

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
CONSTITUTION = ROOT / "constitutions" / "captain-marlow.yaml"


def _recipe(tmp_path: Path, body: str, name: str = "recipe.yaml") -> Path:
    """A recipe in tmp_path whose constitution (copied beside it) is referenced relatively."""
    shutil.copy(CONSTITUTION, tmp_path / "char.yaml")
    path = tmp_path / name
    path.write_text("constitution: char.yaml\nrun_dir: runs/test\n" + body, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- shipped recipes


def test_there_are_shipped_recipes():
    assert len(SHIPPED) >= 1


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.path == str(path)
    assert Path(recipe.constitution).is_absolute()
    assert Path(recipe.constitution).is_file(), recipe.constitution
    assert recipe.stages and all(s in STAGES for s in recipe.stages)
    assert isinstance(recipe.prompts, ExpandSettings)
    assert isinstance(recipe.pairs, PairSettings)
    assert isinstance(recipe.dpo, DpoSection)
    assert isinstance(recipe.dpo.trainer, dict)
    # Numeric trainer settings must be real numbers, not strings YAML left unparsed.
    for key in ("learning_rate", "beta"):
        if key in recipe.dpo.trainer:
            assert isinstance(recipe.dpo.trainer[key], float), (key, recipe.dpo.trainer[key])


def test_demo_recipe_values():
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    assert recipe.constitution == str(CONSTITUTION.resolve())
    assert recipe.prompts.per_trait == 24 and recipe.prompts.heldout_per_trait == 13 and recipe.prompts.heldout_seeds == 2
    assert recipe.eval.samples_per_prompt == 2 and recipe.eval.general_prompts == 24
    assert recipe.pairs.teacher_samples == 2 and recipe.pairs.min_margin == 0.0
    assert recipe.dpo.lora.r == 16 and recipe.dpo.lora.target_modules == "all-linear"
    # parsed as a number (PyYAML's YAML 1.1 alone would leave "5.0e-4"-style values as text)
    assert isinstance(recipe.dpo.trainer["learning_rate"], float) and 0 < recipe.dpo.trainer["learning_rate"] < 1e-2
    assert recipe.stages == ["prompts", "pairs", "distill", "eval"]
    assert recipe.distill.activation_weight == 0.1 and recipe.distill.layers == "best"
    assert recipe.distill.trainer["max_length"] == 448 and recipe.distill.lora == recipe.dpo.lora
    assert recipe.backend.engine == {"dtype": "float32"}  # the same samples on every CPU
    assert recipe.dpo.loop_negatives == 0.5 and recipe.dpo.trainer["ld_alpha"] == 0.5
    assert recipe.pairs.frequency_penalty == 0.5
    assert recipe.pairs.unfinished == "trim" and recipe.eval.samples_per_prompt == 2


def test_defaults_fill_missing_sections(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, ""))
    assert recipe.prompts == ExpandSettings()
    assert recipe.pairs == PairSettings()
    assert recipe.dpo == DpoSection()
    assert recipe.stages == ["prompts", "pairs", "dpo", "eval"]
    assert recipe.model is None and recipe.seed == 0


def test_to_dict_has_no_internal_path(tmp_path):
    data = load_recipe(_recipe(tmp_path, "seed: 3\n")).to_dict()
    assert "path" not in data
    assert data["seed"] == 3 and data["pairs"]["max_tokens"] == PairSettings().max_tokens


# ----------------------------------------------------------------------------- bad recipes

BAD = [
    # id, recipe body (after constitution/run_dir), text the error must name
    ("unknown_top_level_key", "sed: 1\n", "sed"),
    ("unknown_section_key", "pairs:\n  max_tokenz: 100\n", "pairs.max_tokenz"),
    ("unknown_nested_section_key", "dpo:\n  lora:\n    rank: 8\n", "dpo.lora.rank"),
    ("unknown_trl_trainer_field", "dpo:\n  trainer:\n    learning_rat: 1.0e-4\n", "dpo.trainer.learning_rat"),
    ("wrong_type_int", "pairs:\n  max_tokens: many\n", "pairs.max_tokens"),
    ("wrong_type_float_for_int", "prompts:\n  per_trait: 2.5\n", "prompts.per_trait"),
    ("wrong_type_bool_for_int", "seed: true\n", "seed"),
    ("wrong_type_number", "eval:\n  temperature: hot\n", "eval.temperature"),
    ("wrong_type_optional", "pairs:\n  min_margin: lots\n", "pairs.min_margin"),
    ("section_not_a_mapping", "pairs: 3\n", "pairs"),
    ("stages_not_a_list", "stages: prompts\n", "stages"),
    ("unknown_stage", "stages: [prompts, trian]\n", "trian"),
    ("loop_negatives_over_one", "dpo:\n  loop_negatives: 2\n", "dpo.loop_negatives"),
    ("max_rounds_zero", "prompts:\n  max_rounds: 0\n", "prompts.max_rounds"),
    ("frequency_penalty_out_of_range", "pairs:\n  frequency_penalty: 3\n", "pairs.frequency_penalty"),
    ("unfinished_not_a_choice", "pairs:\n  unfinished: keep\n", "pairs.unfinished"),
    ("samples_per_prompt_zero", "eval:\n  samples_per_prompt: 0\n", "eval.samples_per_prompt"),
]


@pytest.mark.parametrize("body, key", [(b, k) for _, b, k in BAD], ids=[i for i, _, _ in BAD])
def test_bad_recipe_raises_user_error_naming_key_and_file(tmp_path, body, key):
    path = _recipe(tmp_path, body)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message.replace(str(path), "")
    assert "\n" not in message


def test_missing_constitution_key(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("run_dir: runs/x\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "constitution" in str(info.value)
    assert "missing" in str(info.value)


def test_missing_run_dir_key(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"constitution: {CONSTITUTION}\n", encoding="utf-8")
    with pytest.raises(UserError, match="run_dir"):
        load_recipe(path)


def test_unknown_key_suggests_close_match(tmp_path):
    path = _recipe(tmp_path, "pairs:\n  max_tokenz: 100\n")
    with pytest.raises(UserError, match=r"did you mean 'max_tokens'"):
        load_recipe(path)


@pytest.mark.parametrize("text", ["", "constitution: [unclosed\n", "- a\n- b\n"],
                         ids=["empty", "bad_yaml", "list"])
def test_unusable_recipe_file_is_user_error(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_missing_recipe_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- overrides


def test_overrides_take_effect_with_correct_types(tmp_path):
    path = _recipe(tmp_path, "pairs:\n  max_tokens: 50\n")
    recipe = load_recipe(path, ["pairs.max_tokens=99", "dpo.trainer.learning_rate=5e-5"])
    assert recipe.pairs.max_tokens == 99
    assert isinstance(recipe.pairs.max_tokens, int)
    lr = recipe.dpo.trainer["learning_rate"]
    # The CLI's own example (`--set dpo.trainer.learning_rate=5e-5`) must give a number.
    assert isinstance(lr, float), f"learning_rate is {lr!r} ({type(lr).__name__})"
    assert lr == pytest.approx(5e-5)


def test_overrides_of_section_values(tmp_path):
    path = _recipe(tmp_path, "pairs:\n  max_tokens: 50\n")
    recipe = load_recipe(path, ["pairs.max_tokens=99", "pairs.min_margin=null", "prompts.temperature=1",
                                "stages=[prompts, pairs]", "dpo.trainer.beta=0.25", "dpo.lora.r=8",
                                "model=some/model"])
    assert recipe.pairs.max_tokens == 99 and type(recipe.pairs.max_tokens) is int
    assert recipe.pairs.min_margin is None
    assert recipe.prompts.temperature == 1.0 and type(recipe.prompts.temperature) is float
    assert recipe.stages == ["prompts", "pairs"]
    assert recipe.dpo.trainer["beta"] == 0.25  # over the section's trainer defaults, which it holds
    assert recipe.dpo.trainer["learning_rate"] == DpoSection.trainer_defaults["learning_rate"]
    assert recipe.dpo.lora.r == 8
    assert recipe.model == "some/model"
    # The file itself is untouched.
    assert load_recipe(path).pairs.max_tokens == 50


@pytest.mark.parametrize("override, key", [
    ("pairs.max_tokenz=3", "pairs.max_tokenz"),
    ("pairs.max_tokens=many", "pairs.max_tokens"),
    ("dpo.trainer.not_a_field=1", "dpo.trainer.not_a_field"),
    ("stages=[prompts, bogus]", "bogus"),
], ids=["unknown_key", "wrong_type", "unknown_trainer_field", "unknown_stage"])
def test_bad_overrides_are_user_errors(tmp_path, override, key):
    with pytest.raises(UserError) as info:
        load_recipe(_recipe(tmp_path, ""), [override])
    assert key in str(info.value)


@pytest.mark.parametrize("override", ["pairs.max_tokens", "seed.x=1"], ids=["no_equals", "not_a_section"])
def test_malformed_overrides_are_user_errors(tmp_path, override):
    with pytest.raises(UserError) as info:
        load_recipe(_recipe(tmp_path, "seed: 1\n"), [override])
    assert override.split("=")[0].split(".")[0] in str(info.value)


# ----------------------------------------------------------------------------- paths


def test_constitution_path_is_relative_to_the_recipe_file(tmp_path, monkeypatch):
    (tmp_path / "constitutions").mkdir()
    (tmp_path / "recipes").mkdir()
    shutil.copy(CONSTITUTION, tmp_path / "constitutions" / "mine.yaml")
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text("constitution: ../constitutions/mine.yaml\nrun_dir: runs/x\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for given in (path, Path("..") / "recipes" / "r.yaml"):
        recipe = load_recipe(given)
        assert recipe.constitution == str((tmp_path / "constitutions" / "mine.yaml").resolve())
        assert Path(recipe.constitution).is_file()


def test_absolute_constitution_path_is_kept(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"constitution: {CONSTITUTION}\nrun_dir: runs/x\n", encoding="utf-8")
    assert load_recipe(path).constitution == str(CONSTITUTION)


# ----------------------------------------------------------------------------- CLI


def test_cli_run_rejects_unknown_recipe_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _recipe(tmp_path, "pairs:\n  max_tokenz: 100\n")
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert str(path) in lines[0] and "pairs.max_tokenz" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_cli_run_rejects_bad_set_override(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _recipe(tmp_path, "")
    capsys.readouterr()
    assert main(["run", str(path), "--set", "pairs.max_tokens=lots"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pairs.max_tokens" in err
    assert not (tmp_path / "runs").exists()


def test_generation_section_unknown_key_names_stage_and_suggests(tmp_path):
    path = _recipe(tmp_path, "critique:\n  round: 2\n")
    with pytest.raises(UserError, match=r"recipe.yaml: critique.round: unknown key \(did you mean 'rounds'\?\)"):
        load_recipe(path)


def test_generation_sampling_unknown_key(tmp_path):
    path = _recipe(tmp_path, "sdf:\n  sampling: {temprature: 0.5}\n")
    with pytest.raises(UserError, match=r"sdf.sampling.temprature: unknown key \(did you mean 'temperature'\?\)"):
        load_recipe(path)


def test_generation_section_bad_value_names_the_file(tmp_path):
    path = _recipe(tmp_path, "sdf:\n  num_types: 0\n")
    with pytest.raises(UserError, match=r"recipe.yaml: sdf"):
        load_recipe(path)


def test_unknown_backend_kind(tmp_path):
    path = _recipe(tmp_path, "backend:\n  kind: tgi\n")
    with pytest.raises(UserError, match="backend.kind: 'tgi'"):
        load_recipe(path)
