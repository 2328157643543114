"""Recipes: one YAML file per run, validated before anything starts.

Every section is its stage's own settings class (``data_gen.stages.*``, ``train.settings``,
``evaluation.settings``): the class states the defaults and checks its values (``__post_init__``);
this module only reads the file (``yamlio``: duplicate keys, alias bombs, deep nesting and
oversized or non-UTF-8 files refused), builds the classes (unknown keys are errors that name the
key, the file and the nearest valid key, from the right mapping; values are type-checked) and
checks the rules that span sections: the stages (listed once, each after the stages it reads) and
each training stage's TRL config and LoRA, built once as the stage will build them. All of it runs
before any stage starts. CLI ``--set section.key=value`` overrides a value (parsed as YAML); an
error in a value a ``--set`` gave names that ``--set``, not the file. The run's manifest records
the final values.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from character_training.config import yamlio
from character_training.errors import UserError, did_you_mean
from character_training.config.sections import BackendSection, GenSection, ModelsSection, RoleSection, role_backends
from character_training.config.stages import (DEFAULT_STAGES, EVAL_STAGES, GEN_STAGES, READS, STAGES, TABLE,
                                              TRAINING_STAGES)
from character_training.config.sections import LaunchSection
from character_training.config.training import LoraSettings, TrainingSection
from data_gen.backends import Sampling


_HEAD = [  # the recipe's fields that are not a stage's section, before the sections
    ("constitution", str),
    ("run_dir", str),
    ("model", str | None, None),     # the student (models.student.model says the same; give one of them)
    ("seed", int, 0),
    ("stages", list, field(default_factory=lambda: list(DEFAULT_STAGES))),
]
_TAIL = [  # after the sections
    ("backend", BackendSection, field(default_factory=BackendSection)),
    ("models", ModelsSection, field(default_factory=ModelsSection)),  # student, teacher, judge (run/generation.py)
    ("launch", LaunchSection, field(default_factory=LaunchSection)),  # training stages on several processes
    ("path", str | None, field(default=None, metadata={"internal": True})),
]


def _section(self, stage: str) -> dict:
    """A stage's section as the recipe writes it (every value, defaults included)."""
    value = getattr(self, stage)
    return value.as_recipe(GEN_STAGES[stage]) if isinstance(value, GenSection) else dataclasses.asdict(value)


def _to_dict(self) -> dict:
    data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"}
    return {k: self.section(k) if dataclasses.is_dataclass(v) else v for k, v in data.items()}


# A recipe: one field per row of the stage table (config/stages.py), its section with every default.
Recipe = dataclasses.make_dataclass(
    "Recipe",
    [*_HEAD, *((s.name, s.section, field(default_factory=s.default_section)) for s in TABLE), *_TAIL],
    namespace={"section": _section, "to_dict": _to_dict,
               "__doc__": "A recipe file, built and checked (``load_recipe``): one section per stage of the stage "
                          "table, plus the run's own settings.", "__module__": __name__})

def build(cls, data: Any, where: str, prefix: str, base: Any = None):
    """``cls`` from a recipe mapping: unknown keys and wrong types are errors naming ``where``
    (the file) and the key; nested sections are built the same way; the class checks its own
    values. ``base``: an instance whose values the mapping's keys override (a stage's default
    sampling)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or '<top level>'}: must be a mapping, got a {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    _check_keys(data, fields, where, prefix, cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if hint is RoleSection and (value is None or isinstance(value, str)):  # `teacher: MODEL` for {model: MODEL}
            value = {"model": value}
        if hint is GenSection:
            kwargs[key] = gen_section(key, value, where, f"{prefix}{key}.")
        elif dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(value, hint, where, f"{prefix}{key}")
    if base is None:
        for name, f in fields.items():
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{where}: {prefix}{name}: missing (required)")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except UserError as exc:  # the class's own check: "FIELD: VALUE; how to fix"
        message = str(exc)
        raise UserError(f"{where}: {message if message.startswith(prefix) else prefix + message}") from None


def _check_keys(data: dict, allowed, where: str, prefix: str, cls: type | None = None) -> None:
    for key in data:
        if key not in allowed:
            raise UserError(f"{where}: {prefix}{key}: unknown key{_key_hint(cls, key, prefix) or did_you_mean(key, allowed)}"
                            f"; allowed keys: {', '.join(map(str, allowed))}")


def _key_hint(cls: type | None, key: Any, prefix: str) -> str:
    """Where an unknown key belongs when that is another mapping of the same section (a LoRA
    setting written in the training section or its trainer, a TRL field written in the section):
    the suggestion from the right place, not the nearest spelling (``lora_rank`` is not ``local_rank``)."""
    from character_training.config.trainer_fields import LORA_KEYS

    if key == "neutral_prompts" and getattr(cls, "__name__", "") == "EvalSettings":
        return (" (the evaluations' second prompt set is the 247 shipped general prompts now, not the 48 neutral "
                f"ones: set '{prefix}general_prompts')")
    if cls is BackendSection and key == "judge_model":
        return " (the judge is a role now: set models.judge: MODEL)"
    if cls is LoraSettings and str(key) in LORA_KEYS:
        return f" (did you mean '{prefix}{LORA_KEYS[str(key)]}'?)"
    if isinstance(cls, type) and issubclass(cls, TrainingSection):
        if str(key) in LORA_KEYS:
            return f" (a LoRA setting: did you mean '{prefix}lora.{LORA_KEYS[str(key)]}'?)"
        from character_training.config.trainer_fields import config_fields

        if str(key) in config_fields(cls.kind):
            return f" (a TRL trainer field: did you mean '{prefix}trainer.{key}'?)"
    return ""


def gen_section(stage: str, data: Any, where: str, prefix: str) -> GenSection:
    """A generation stage's section from its flat recipe mapping: the settings' fields,
    ``sampling`` (over the stage's default) and, where the stage takes one, ``adapter``."""
    spec = GEN_STAGES[stage]
    if not isinstance(data, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or stage}: must be a mapping of settings, got {yamlio.shown(data)}")
    extra = ["sampling", "adapter"] if spec.takes_adapter else ["sampling"]
    _check_keys(data, [f.name for f in dataclasses.fields(spec.settings)] + extra, where, prefix)
    settings = build(spec.settings, {k: v for k, v in data.items() if k not in extra}, where, prefix)
    sampling = build(Sampling, data.get("sampling") or {}, where, f"{prefix}sampling.",
                     base=spec.sampling)
    adapter = _check_type(data.get("adapter"), str | None, where, f"{prefix}adapter")
    return GenSection(settings=settings, sampling=sampling, adapter=adapter)


def _check_type(value: Any, hint: Any, where: str, key: str) -> Any:
    simple = {int: "an integer", float: "a number", bool: "true or false", str: "text", list: "a list",
              dict: "a mapping", tuple: "a list"}
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    origin_options = [typing.get_origin(o) or o for o in (typing.get_args(hint) if union else (hint,))]
    if value is None and type(None) in origin_options:
        return value
    for o in origin_options:
        if o is Any:
            return value
        if o is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if o is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if o is tuple and isinstance(value, (list, tuple)):  # YAML lists for tuple fields
            return tuple(value)
        if o in (str, bool, list, dict) and isinstance(value, o):
            return value
    wanted = " or ".join(simple.get(o, getattr(o, "__name__", str(o))) for o in origin_options if o is not type(None))
    raise UserError(f"{where}: {key}: must be {wanted}, got {yamlio.shown(value)}")


def apply_overrides(data: dict, overrides: list[str], where: str) -> dict:
    """``section.key=value`` pairs (value parsed as YAML) applied to the raw recipe mapping."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set dpo.trainer.learning_rate=5e-5")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise UserError(f"--set {item}: '{key}' is not a key; write SECTION.KEY=VALUE, "
                            "e.g. --set dpo.trainer.learning_rate=5e-5")
        try:
            value = yamlio.load(raw)
        except yaml.YAMLError as exc:
            _, problem = yamlio.describe_error(exc)
            raise UserError(f"--set {item}: the value is not valid YAML ({problem}); quote it, e.g. "
                            f"--set '{key}=\"...\"', or fix its brackets") from None
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section ('pairs:' with nothing under it)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UserError(f"--set {item}: {part} is not a section; set a key of a section, "
                                "e.g. --set pairs.temperature=0.7")
        node[parts[-1]] = value
    return data


def locate_override(exc: UserError, where: str, overrides: list[str] | None) -> UserError:
    """An error about a value a ``--set`` gave, reported at that ``--set`` argument instead of at
    ``where`` (the recipe file, or '--set' for commands without a recipe: ``generate``, ``train``).
    Messages have the form 'WHERE: KEY.PATH: problem'; the last --set whose key is that path, or
    above or below it, wins."""
    message = str(exc)
    head = f"{where}: "
    if not overrides or not message.startswith(head):
        return exc
    rest = message[len(head):]
    path = rest.split(":", 1)[0].strip()
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        if key and (path == key or path.startswith(key + ".") or key.startswith(path + ".")
                    or path.endswith("." + key)):  # commands without a recipe name the section first
            return type(exc)(f"--set {item}: {rest}")
    return exc


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    where = str(path)
    text = yamlio.read_text(path, "recipe", "shipped recipes are in recipes/")
    try:
        data = yamlio.load(text)
    except yaml.YAMLError as exc:
        loc, problem = yamlio.describe_error(exc)
        raise UserError(f"{path}{loc}: not valid YAML: {problem}") from None
    if overrides and isinstance(data, (dict, type(None))):
        data = apply_overrides(data or {}, overrides, where)
    if data is None:
        raise UserError(f"{path}: the recipe is empty; it needs at least 'constitution' and 'run_dir'")
    try:
        recipe = build(Recipe, data, where, "")
        check_stages(recipe, where)
    except UserError as exc:
        raise locate_override(exc, where, overrides) from None
    recipe.path = where
    # Paths in a recipe are relative to the recipe file, so a recipe runs from any directory.
    if not Path(recipe.constitution).is_absolute():
        recipe.constitution = str((path.resolve().parent / recipe.constitution).resolve())
    return recipe


def check_stages(recipe: Recipe, where: str) -> None:
    """The rules that span sections: known stages, each listed once, in an order in which every
    stage runs after the stages it reads (prompts before pairs, training before eval, a training
    stage's data stages before it); each training stage's trainer fields (TRL's config) and LoRA."""
    from character_training.config.trainer_fields import check_lora, check_trainer_fields

    order = recipe.stages
    if not order:
        raise UserError(f"{where}: stages: empty, so nothing would run; list the stages to run in order, "
                        "e.g. stages: [prompts, pairs, dpo, eval]")
    for i, stage in enumerate(order):
        if not isinstance(stage, str) or stage not in STAGES:
            raise UserError(f"{where}: stages: unknown stage '{stage}'{did_you_mean(stage, STAGES)}; "
                            f"stages are {', '.join(STAGES)}")
        if stage in order[:i]:
            raise UserError(f"{where}: stages: '{stage}' is listed twice; list each stage once (a stage's "
                            "outputs are in one directory; --force STAGE runs it again)")
    for stage in order:
        for read in READS.get(stage, ()):
            if read in order and order.index(read) > order.index(stage):
                raise UserError(f"{where}: stages: {stage} comes before {read}, whose output it reads; "
                                f"put {read} before {stage}")
    trained = [s for s in order if s in TRAINING_STAGES]
    for stage in (s for s in EVAL_STAGES if s in order):
        if trained and order.index(trained[-1]) > order.index(stage):
            raise UserError(f"{where}: stages: {stage} comes before the training stage {trained[-1]}, so it would "
                            f"evaluate an adapter not trained yet; put {stage} after {trained[-1]}")
    for stage in (s for s, spec in GEN_STAGES.items() if spec.takes_adapter):
        if stage in order and getattr(recipe, stage).adapter == "previous" and not any(
                s in TRAINING_STAGES for s in order[:order.index(stage)]):
            raise UserError(f"{where}: {stage}.adapter: 'previous' but no training stage comes before {stage} "
                            f"in 'stages'; put a training stage (e.g. dpo) before it, or set {stage}.adapter: null")
    backends = role_backends(recipe.models, recipe.backend,
                             lambda data, prefix: build(BackendSection, data, where, prefix), where)
    judged = [s for s in order if s in TRAINING_STAGES and getattr(recipe, s).uses_judge]
    if recipe.launch.enabled and judged and backends["judge"].kind == "vllm":
        raise UserError(f"{where}: launch: {judged[0]} is judged by an in-process vLLM engine, and under launch every "
                        f"process would start its own judge engine (not supported yet); serve the judge over HTTP "
                        "(models.judge: {model: M, backend: {kind: openai, base_urls: [...]}}) or remove launch")
    for stage, kind in TRAINING_STAGES.items():
        section = getattr(recipe, stage)
        check_trainer_fields(section.trainer, where, kind, stage, build=stage in order,
                             extra=section.fixed_trainer_fields() or None)
        check_lora(section.lora, where, stage)
        for data_stage in section.data:
            if data_stage not in STAGES:
                raise UserError(f"{where}: {stage}.data: '{data_stage}' is not a stage; stages are {', '.join(STAGES)}")
        if stage not in order:
            continue
        needed = [d for d in section.data if d in order]
        if not needed:
            raise UserError(f"{where}: {stage}: none of its data stages {section.data} is in "
                            f"'stages'; add one (e.g. {section.data[0]}) or set {stage}.data")
        late = [d for d in needed if order.index(d) > order.index(stage)]
        if late:
            raise UserError(f"{where}: stages: {stage} comes before its data stage {late[0]}; reorder 'stages'")
