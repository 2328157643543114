"""One source of truth for settings: each stage's settings class is its recipe section.

Walks every shipped recipe and every stage's settings class: each recipe loads, each field a
stage reads exists in its section, the stage gets the section itself, and each default is
stated once (no class mirrors another; a stage function's defaults are its section's).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import shutil
import typing
from pathlib import Path

import pytest
import yaml

from character_training.config.stages import STAGES
from character_training.config.recipe import Recipe, build, gen_section, load_recipe
from character_training.errors import UserError
from character_training.config.stages import GEN_STAGES
from character_training.config.sections import GenSection
from data_gen.backends import Engines, Sampling

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))
CONSTITUTION = ROOT / "constitutions" / "captain-marlow.yaml"
HINTS = typing.get_type_hints(Recipe)
SECTIONS = {stage: HINTS[stage] for stage in STAGES if stage in HINTS and HINTS[stage] is not GenSection}


def _recipe(tmp_path: Path, body: str) -> Path:
    shutil.copy(CONSTITUTION, tmp_path / "char.yaml")
    path = tmp_path / "recipe.yaml"
    path.write_text("constitution: char.yaml\nrun_dir: runs/test\n" + body, encoding="utf-8")
    return path


def _section_class(stage: str):
    return GEN_STAGES[stage].settings if stage in GEN_STAGES else SECTIONS[stage]


def _names(cls) -> set[str]:
    """Fields, properties and methods: what code may read off an instance."""
    return {f.name for f in dataclasses.fields(cls)} | {n for n in dir(cls) if not n.startswith("_")}


# ----------------------------------------------------------------------------- every shipped recipe


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_loads_into_the_stages_own_classes(path):
    recipe = load_recipe(path)
    for stage in STAGES:
        section = getattr(recipe, stage)
        if stage in GEN_STAGES:
            assert isinstance(section, GenSection)
            assert type(section.settings) is GEN_STAGES[stage].settings and isinstance(section.sampling, Sampling)
        else:
            assert type(section) is SECTIONS[stage], stage


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_a_recipe_written_back_loads_to_the_same_values(path, tmp_path):
    """``to_dict`` writes each section in the recipe's own shape (what the run's recipe.json holds)."""
    recipe = load_recipe(path)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(recipe.to_dict()), encoding="utf-8")
    reloaded = load_recipe(again)
    for stage in STAGES:
        assert getattr(reloaded, stage) == getattr(recipe, stage), stage


# ----------------------------------------------------------------------------- fields a stage reads

# The modules that read each section, and the name they read it by.
READERS = [
    ("data_gen.stages.prompts", "settings", ["prompts"]),
    ("data_gen.stages.pairs", "settings", ["pairs"]),
    ("data_gen.stages.critique", "settings", ["critique"]),
    ("data_gen.stages.rlaif", "settings", ["rlaif"]),
    ("data_gen.stages.sdf", "settings", ["sdf"]),
    ("data_gen.stages.introspection", "settings", ["reflection", "interaction"]),
    ("character_training.evaluation.report", "settings", ["eval"]),
]


@pytest.mark.parametrize("module, name, stages", READERS, ids=[m.rsplit(".", 1)[1] for m, _, _ in READERS])
def test_each_field_a_stage_reads_is_in_its_section(module, name, stages):
    source = inspect.getsource(importlib.import_module(module))
    read = set(re.findall(rf"\b{name}\.(\w+)", source))
    assert read, f"{module} reads nothing from {name}: the test no longer sees the stage"
    known = set().union(*(_names(_section_class(s)) for s in stages))
    assert read <= known, f"{module} reads {sorted(read - known)}, not in the {'/'.join(stages)} section"


def test_each_field_the_pipeline_reads_is_in_its_section():
    from character_training.run import context, pipeline, stages, training

    source = "".join(inspect.getsource(m) for m in (pipeline, stages, training, context))
    read = re.findall(r"recipe\.(\w+)\.(\w+)", source)
    assert read
    for stage, key in read:
        if stage in GEN_STAGES:
            assert key in _names(GenSection), (stage, key)
        elif stage in SECTIONS or stage == "backend":
            assert key in _names(HINTS[stage]), (stage, key)


# ----------------------------------------------------------------------------- defaults stated once


def _settings_classes() -> dict[str, type]:
    classes = {f"{c.__module__}.{c.__qualname__}": c for c in SECTIONS.values()}
    classes.update({f"{s.settings.__module__}.{s.settings.__qualname__}": s.settings for s in GEN_STAGES.values()})
    from character_training.config.sections import BackendSection
    from character_training.config.training import LoraSettings

    for c in (BackendSection, LoraSettings, Sampling):
        classes[f"{c.__module__}.{c.__qualname__}"] = c
    return classes


def _own_defaults(cls) -> dict:
    """The fields a class declares itself (not inherited), with their defaults."""
    own = cls.__dict__.get("__annotations__", {})
    return {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls) if f.name in own}


def test_no_settings_class_mirrors_another():
    """Three or more settings declared again, with the same defaults, by another class: a copy
    whose defaults can drift. Sampling keys are left out: each stage samples its own way (the
    pairs, prompts and eval sections write theirs flat, by the recipe format)."""
    sampling_keys = {f.name for f in dataclasses.fields(Sampling)}
    classes = {name: _own_defaults(c) for name, c in _settings_classes().items() if c is not Sampling}
    for a, da in classes.items():
        for b, db in classes.items():
            same = [k for k in da if k in db and k not in sampling_keys and da[k] == db[k]]
            assert a == b or len(same) < 3, f"{a} and {b} both declare {same}"


@pytest.mark.parametrize("stage", list(GEN_STAGES))
def test_a_stage_functions_defaults_are_its_sections(stage):
    spec = GEN_STAGES[stage]
    params = inspect.signature(spec.run).parameters
    assert params["settings"].default == spec.settings()
    assert params["sampling"].default == spec.sampling


@pytest.mark.parametrize("stage, function", [("prompts", "data_gen.stages.prompts:expand_prompts"),
                                             ("pairs", "data_gen.stages.pairs:generate_pairs")])
def test_prompts_and_pairs_take_their_sampling_from_their_section(stage, function):
    module, name = function.split(":")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    assert params["settings"].default == SECTIONS[stage]()
    assert params["sampling"].default is None  # None: the section's own sampling


def test_the_recipe_defaults_are_the_ones_users_ran():
    """Where the pairs stage's and the recipe's defaults differed, the recipe's were kept."""
    pairs = Recipe(constitution="c", run_dir="r").pairs
    assert (pairs.teacher_samples, pairs.min_distinct_3grams, pairs.unfinished) == (2, 0.75, "trim")
    assert pairs.sampling == Sampling(temperature=0.7, top_p=0.95, max_tokens=160)
    assert Recipe(constitution="c", run_dir="r").prompts.sampling == Sampling(temperature=1.0, max_tokens=256)


# ----------------------------------------------------------------------------- generation sections


def test_generation_sampling_keys_left_out_keep_that_stages_default(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, "critique:\n  sampling: {max_tokens: 50}\nsdf: {num_types: 3}\n"))
    assert recipe.critique.sampling == dataclasses.replace(GEN_STAGES["critique"].sampling, max_tokens=50)
    assert recipe.sdf.sampling == GEN_STAGES["sdf"].sampling and recipe.sdf.settings.num_types == 3
    assert recipe.reflection == GenSection.default(GEN_STAGES["reflection"])


def test_generation_section_lists_become_tuples_and_adapter_is_kept(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, "interaction:\n  openers: [Hi there., Hello you.]\n  adapter: previous\n"))
    assert recipe.interaction.settings.openers == ("Hi there.", "Hello you.")
    assert recipe.interaction.adapter == "previous"


def test_adapter_is_only_a_key_of_stages_that_generate_with_one(tmp_path):
    with pytest.raises(UserError, match=r"recipe.yaml: critique.adapter: unknown key"):
        load_recipe(_recipe(tmp_path, "critique:\n  adapter: some/dir\n"))


@pytest.mark.parametrize("body, message", [
    ("reflection:\n  samples_per_prompt: 0\n", "recipe.yaml: reflection.samples_per_prompt: 0; give a whole number >= 1"),
    ("critique:\n  rounds: 0\n", "recipe.yaml: critique.rounds: 0; give at least 1"),
    ("interaction:\n  turns: 3\n  min_exchanges: 4\n", "recipe.yaml: interaction.min_exchanges: 4 is more than turns (3)"),
    ("dpo:\n  start: resume\n", "recipe.yaml: dpo.start: 'resume'; use 'continue'"),
    ("sft:\n  overlong: cut\n", "recipe.yaml: sft.overlong: 'cut'; use 'truncate'"),
    ("critique:\n  sampling: {max_tokens: lots}\n", "recipe.yaml: critique.sampling.max_tokens: must be an integer"),
], ids=["reflection", "critique", "interaction", "dpo_start", "sft_overlong", "sampling_type"])
def test_a_class_check_names_the_file_and_the_section(tmp_path, body, message):
    with pytest.raises(UserError) as info:
        load_recipe(_recipe(tmp_path, body))
    assert message in str(info.value)


def test_a_section_checked_by_its_stage_is_not_prefixed_twice(tmp_path):
    with pytest.raises(UserError) as info:
        load_recipe(_recipe(tmp_path, "sdf:\n  num_types: 0\n"))
    assert "sdf.num_types" in str(info.value) and "sdf.sdf." not in str(info.value)


# ----------------------------------------------------------------------------- the stage gets its section


def test_prompts_and_pairs_stages_get_the_section_itself(tmp_path, monkeypatch):
    import data_gen.stages.pairs
    import data_gen.stages.prompts
    from character_training.run import stages

    got = {}

    def fake(name):
        def stage(*args, **kwargs):
            got[name] = kwargs
            return {"counts": {"pairs": 1}, "short_traits": []}
        return stage

    monkeypatch.setattr(data_gen.stages.prompts, "expand_prompts", fake("prompts"))
    monkeypatch.setattr(data_gen.stages.pairs, "generate_pairs", fake("pairs"))
    monkeypatch.setattr(stages, "_generation_backend", lambda ctx, out: None)
    monkeypatch.setattr(stages.Context, "prompts", lambda self, split: ["a question?"])
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    from character_training.run.context import make_context

    ctx = make_context(recipe, Engines())
    stages.stage_prompts(recipe.prompts, ctx, tmp_path)
    stages.stage_pairs(recipe.pairs, ctx, tmp_path)
    assert got["prompts"]["settings"] is recipe.prompts
    assert got["prompts"]["sampling"] == Sampling(temperature=1.0, max_tokens=256)
    assert got["pairs"]["settings"] is recipe.pairs
    assert got["pairs"]["sampling"] == Sampling(temperature=0.7, top_p=0.95, max_tokens=160, frequency_penalty=0.5)


def test_a_generation_stage_gets_its_sections_settings_and_sampling(tmp_path, monkeypatch):
    from character_training.run import generation

    got = {}
    spec = dataclasses.replace(GEN_STAGES["reflection"], run=lambda *args, **kwargs: got.update(kwargs) or {})
    monkeypatch.setitem(generation.GEN_STAGES, "reflection", spec)
    section = gen_section("reflection", {"min_words": 5, "sampling": {"max_tokens": 99}}, "--set", "")
    generation.run_generation_stage("reflection", backend=None, constitution=None, out=tmp_path, section=section,
                                    seed=3)
    assert got["settings"] is section.settings and got["settings"].min_words == 5
    assert got["sampling"] == dataclasses.replace(GEN_STAGES["reflection"].sampling, max_tokens=99)
    assert got["seed"] == 3 and got["adapter"] is None


# ----------------------------------------------------------------------------- the CLI builds the same classes


def test_generate_set_builds_what_the_recipe_builds(tmp_path):
    from_cli = gen_section("critique", {"rounds": 2, "sampling": {"temperature": 0.5}}, "--set", "")
    from_recipe = load_recipe(_recipe(tmp_path, "critique:\n  rounds: 2\n  sampling: {temperature: 0.5}\n")).critique
    assert from_cli == from_recipe
    with pytest.raises(UserError, match=r"^--set: round: unknown key \(did you mean 'rounds'\?\)"):
        gen_section("critique", {"round": 2}, "--set", "")


def test_train_set_and_flags_build_the_stages_section():
    from character_training.cli import build_parser, train_section
    from character_training.config.training import DpoSection, LoraSettings, MidtrainSection

    parse = build_parser().parse_args
    args = parse(["train", "dpo", "--data", "p.jsonl", "-o", "out", "--set", "lora.r=4", "--set", "trainer.beta=0.2",
                  "--loop-negatives", "0.5", "--start", "merge"])
    assert train_section(args) == DpoSection(lora=LoraSettings(r=4), trainer={"beta": 0.2}, loop_negatives=0.5,
                                             start="merge")
    assert train_section(parse(["train", "lm", "--data", "d.jsonl", "-o", "out"])) == MidtrainSection()
    with pytest.raises(UserError, match=r"--set lora.alpah=4: lora.alpah: unknown key \(did you mean 'alpha'\?\)"):
        train_section(parse(["train", "sft", "--data", "c.jsonl", "-o", "out", "--set", "lora.alpah=4"]))
    with pytest.raises(UserError, match=r"--set: loop_negatives: 2.0; give a share between 0 and 1"):
        train_section(parse(["train", "dpo", "--data", "p.jsonl", "-o", "out", "--loop-negatives", "2"]))


# ----------------------------------------------------------------------------- the settings key


def test_the_settings_key_is_a_stable_hash_of_the_sections_values(tmp_path):
    from character_training.run import stages

    from character_training.config.constitution import load_constitution

    constitution = load_constitution(CONSTITUTION)

    def key(body: str, stage: str) -> str:
        ctx = stages.Context(recipe=load_recipe(_recipe(tmp_path, body)), constitution=constitution,
                               model="some/model", run_dir=tmp_path / "run")
        return stages.stage_key(ctx, stage)

    assert key("", "pairs") == key("", "pairs")
    assert key("", "pairs") == key("pairs: {teacher_samples: 2}\n", "pairs")  # a default written out: same values
    assert key("", "pairs") != key("pairs: {teacher_samples: 3}\n", "pairs")
    assert key("", "sdf") == key("sdf: {sampling: {temperature: 0.9}}\n", "sdf")
    assert key("", "sdf") != key("sdf: {sampling: {temperature: 0.5}}\n", "sdf")


def test_build_checks_types_and_unknown_keys_of_any_section():
    assert build(Sampling, {"max_tokens": 7}, "f.yaml", "x.", base=Sampling(temperature=0.1)) == \
        Sampling(temperature=0.1, max_tokens=7)
    with pytest.raises(UserError, match=r"^f.yaml: x.top_k: unknown key"):
        build(Sampling, {"top_k": 7}, "f.yaml", "x.")
