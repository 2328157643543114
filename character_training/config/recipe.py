"""Recipes: one YAML file per run, validated before anything starts.

Every section is a dataclass; unknown keys are errors that name the key and the file. CLI
``--set section.key=value`` overrides a value (parsed as YAML), and the run's manifest records
the final values.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from character_training.config import yamlio
from character_training.errors import UserError, did_you_mean
from character_training.run.generation import GEN_STAGES, BackendSection, check_section


@dataclass
class PromptsSection:
    per_trait: int = 40
    heldout_per_trait: int = 8
    per_request: int = 10
    max_rounds: int = 3  # a trait short of prompts after a round is asked again, this many rounds in all
    temperature: float = 1.0
    max_tokens: int = 256


@dataclass
class PairsSection:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 160
    repetition_penalty: float = 1.0  # vLLM applies it to the prompt too: >1 penalizes the persona's own words
    frequency_penalty: float = 0.0  # per earlier use of a token in the same answer (not the prompt): against loops
    teacher_samples: int = 2  # the most in-character of these (by the persona classifier) is chosen
    min_margin: float | None = 0.0  # drop pairs whose chosen answer is not more in character (null: keep all)
    max_answer_chars: int = 2000
    min_distinct_3grams: float = 0.75  # answers that loop on themselves are dropped
    answer_hint: str | None = "Keep your answer short: at most three sentences."  # appended to both system prompts
    unfinished: str = "trim"  # an answer cut off at max_tokens: "trim" it to its last full sentence, or "drop" it


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"
    use_rslora: bool = False


@dataclass
class DpoSection:
    lora: LoraSection = field(default_factory=LoraSection)
    trainer: dict = field(default_factory=dict)  # TRL DPOConfig fields
    data: list = field(default_factory=lambda: ["pairs"])  # stages whose pairs.jsonl it trains on (pairs, critique, rlaif)
    start: str = "continue"  # from an earlier training stage's adapter: continue it, or merge it and train a new one
    system_prompt: str | None = None  # training-time system prompt (inoculation-style), absent at evaluation
    overlong: str = "truncate"  # examples over trainer.max_length: "truncate" (TRL cuts them) or "drop"; counted
    loop_negatives: float = 0.0  # share of pairs that also get a looping copy of their chosen answer as rejected


@dataclass
class SftSection:
    lora: LoraSection = field(default_factory=LoraSection)
    trainer: dict = field(default_factory=dict)  # TRL SFTConfig fields
    data: list = field(default_factory=lambda: ["critique", "reflection", "interaction"])  # those that ran
    start: str = "continue"
    system_prompt: str | None = None
    overlong: str = "truncate"  # examples over trainer.max_length: "truncate" (TRL cuts them) or "drop"; counted


@dataclass
class GrpoSection:
    lora: LoraSection = field(default_factory=LoraSection)
    trainer: dict = field(default_factory=dict)  # TRL GRPOConfig fields
    data: list = field(default_factory=lambda: ["prompts"])  # its training prompts
    start: str = "continue"
    system_prompt: str | None = None
    judge_retries: int = 2  # a failed or unparseable verdict is asked again, then counted as missing
    judge_max_tokens: int = 8


@dataclass
class MidtrainSection:
    lora: LoraSection = field(default_factory=LoraSection)
    trainer: dict = field(default_factory=dict)  # TRL SFTConfig fields (causal-LM training on documents)
    data: list = field(default_factory=lambda: ["sdf"])
    packing: bool = True
    marker: str | None = None  # prefixed to every document and masked from the loss
    chat_ratio: float = 0.0  # share of chat examples (from the sft data stages that ran) mixed in
    start: str = "continue"


@dataclass
class EvalSection:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 160
    report: str = "full"                # "full": the report (character_training/report.py); "quick": 3 conditions
    samples_per_prompt: int = 1         # quick check: answers per held-out prompt and condition (sampled)
    neutral_prompts: int = 12           # shipped neutral prompts added to the held-out ones
    adversarial: int = 2                # shipped adversarial suffixes applied to each adapter (0: none)
    prefill: bool = True                # the base model writes the first turn, the adapter continues
    steering: bool = True               # baseline: the persona vector added at the best layer
    steering_coefficient: float = 2.0       # x the persona vector (1 moves the plain mean onto the persona mean)
    judge: bool = True                  # trait and coherence scores (backend.judge_model, or the base model)
    revealed_prompts: int = 8           # revealed preferences on this many prompts (0: skip)
    persona_vectors: bool = True
    capability: bool = True             # perplexity on neutral text, multiple-choice accuracy
    lm_eval_tasks: list = field(default_factory=list)  # lm-evaluation-harness tasks (needs lm-eval + its data)


@dataclass
class Recipe:
    constitution: str
    run_dir: str
    model: str | None = None
    seed: int = 0
    stages: list = field(default_factory=lambda: ["prompts", "pairs", "dpo", "eval"])
    prompts: PromptsSection = field(default_factory=PromptsSection)
    pairs: PairsSection = field(default_factory=PairsSection)
    midtrain: MidtrainSection = field(default_factory=MidtrainSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    sft: SftSection = field(default_factory=SftSection)
    grpo: GrpoSection = field(default_factory=GrpoSection)
    eval: EvalSection = field(default_factory=EvalSection)
    backend: BackendSection = field(default_factory=BackendSection)
    # Generation stages beyond pairs: their data_gen settings plus a 'sampling' mapping
    # (character_training/generation.py lists them; unknown keys are errors).
    sdf: dict = field(default_factory=dict)
    critique: dict = field(default_factory=dict)
    rlaif: dict = field(default_factory=dict)
    reflection: dict = field(default_factory=dict)
    interaction: dict = field(default_factory=dict)
    path: str | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("path")
        return data


STAGES = ("prompts", "pairs", "sdf", "critique", "rlaif", "reflection", "interaction",
          "midtrain", "dpo", "sft", "grpo", "eval")
TRAINING_STAGES = {"midtrain": "lm", "dpo": "dpo", "sft": "sft", "grpo": "grpo"}  # stage -> TRL config kind


def _build(cls, data: Any, where: str, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or '<top level>'}: must be a mapping, got a {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"{where}: {prefix}{key}: unknown key{did_you_mean(key, fields)}"
                            f"; allowed keys: {', '.join(fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(value, hint, where, f"{prefix}{key}")
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{where}: {prefix}{name}: missing (required)")
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, where: str, key: str) -> Any:
    simple = {int: "an integer", float: "a number", bool: "true or false", str: "text", list: "a list", dict: "a mapping"}
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (hint,)
    origin_options = [typing.get_origin(o) or o for o in options]
    if value is None and type(None) in origin_options:
        return value
    for o in origin_options:
        if o is Any:
            return value
        if o is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if o is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if o in (str, bool, list, dict) and isinstance(value, o):
            return value
    wanted = " or ".join(simple.get(o, getattr(o, "__name__", str(o))) for o in origin_options if o is not type(None))
    raise UserError(f"{where}: {key}: must be {wanted}, got {value!r}")


def apply_overrides(data: dict, overrides: list[str], where: str) -> dict:
    """``section.key=value`` pairs (value parsed as YAML) applied to the raw recipe mapping."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. --set dpo.trainer.learning_rate=5e-5")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item}: {part} is not a section")
        node[parts[-1]] = yamlio.load(raw)
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    where = str(path)
    try:
        data = yamlio.load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: recipe not found; shipped recipes are in recipes/") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        loc, problem = yamlio.describe_error(exc)
        raise UserError(f"{path}{loc}: not valid YAML: {problem}") from None
    if overrides and isinstance(data, (dict, type(None))):
        data = apply_overrides(data or {}, overrides, where)
    if data is None:
        raise UserError(f"{path}: the recipe is empty; it needs at least 'constitution' and 'run_dir'")
    recipe = _build(Recipe, data, where, "")
    for stage in recipe.stages:
        if stage not in STAGES:
            raise UserError(f"{where}: stages: unknown stage '{stage}'; stages are {', '.join(STAGES)}")
    for stage in GEN_STAGES:
        check_section(stage, getattr(recipe, stage), where)
    if recipe.backend.kind not in ("vllm", "openai"):
        raise UserError(f"{where}: backend.kind: '{recipe.backend.kind}' is not a backend; use 'vllm' or 'openai'")
    recipe.path = where
    # Paths in a recipe are relative to the recipe file, so a recipe runs from any directory.
    base = path.resolve().parent
    recipe.constitution = str((base / recipe.constitution).resolve()) if not Path(recipe.constitution).is_absolute() else recipe.constitution
    from character_training.train.common import check_trainer_fields

    for stage, kind in TRAINING_STAGES.items():
        section = getattr(recipe, stage)
        check_trainer_fields(section.trainer, where, kind, stage)
        if section.start not in ("continue", "merge"):
            raise UserError(f"{where}: {stage}.start: '{section.start}'; use 'continue' (train the previous "
                            "stage's adapter on) or 'merge' (merge it into the base, train a new one)")
        if getattr(section, "overlong", "truncate") not in ("truncate", "drop"):
            raise UserError(f"{where}: {stage}.overlong: '{section.overlong}'; use 'truncate' (TRL cuts over-long "
                            "examples to trainer.max_length) or 'drop' (leave them out); both are counted")
        loops = getattr(section, "loop_negatives", 0.0)  # a number: typed with every field when parsed
        if not 0 <= loops <= 1:
            raise UserError(f"{where}: {stage}.loop_negatives: {loops!r}; give a share between 0 and 1 (0.5: half "
                            "of the pairs also train against a looping copy of their chosen answer)")
        for data_stage in section.data:
            if data_stage not in STAGES:
                raise UserError(f"{where}: {stage}.data: '{data_stage}' is not a stage; stages are {', '.join(STAGES)}")
    if recipe.eval.samples_per_prompt < 1:
        raise UserError(f"{where}: eval.samples_per_prompt: {recipe.eval.samples_per_prompt}; give 1 or more "
                        "(answers per held-out prompt and condition in the quick check)")
    from data_gen.stages.pairs import UNFINISHED

    if recipe.pairs.unfinished not in UNFINISHED:
        raise UserError(f"{where}: pairs.unfinished: '{recipe.pairs.unfinished}'; use 'trim' (an answer cut off at "
                        "pairs.max_tokens is cut back to its last full sentence) or 'drop' (leave it out); both are counted")
    if recipe.prompts.max_rounds < 1:
        raise UserError(f"{where}: prompts.max_rounds: {recipe.prompts.max_rounds}; give 1 or more (rounds of "
                        "requests for a trait still short of prompts)")
    if not -2 <= recipe.pairs.frequency_penalty <= 2:
        raise UserError(f"{where}: pairs.frequency_penalty: {recipe.pairs.frequency_penalty!r}; give a number between "
                        "-2 and 2 (vLLM's range; 0: off; the demo's 0.5 keeps the teacher out of loops)")
    if recipe.eval.report not in ("full", "quick"):
        raise UserError(f"{where}: eval.report: '{recipe.eval.report}'; use 'full' (the report: adversarial, prefill, "
                        "steering, judge, persona vectors, capability) or 'quick' (three conditions)")
    order = [s for s in recipe.stages]
    for stage in TRAINING_STAGES:
        if stage in order:
            needed = [d for d in getattr(recipe, stage).data if d in order]
            if not needed:
                raise UserError(f"{where}: {stage}: none of its data stages {getattr(recipe, stage).data} is in "
                                f"'stages'; add one (e.g. {getattr(recipe, stage).data[0]}) or set {stage}.data")
            late = [d for d in needed if order.index(d) > order.index(stage)]
            if late:
                raise UserError(f"{where}: stages: {stage} comes before its data stage {late[0]}; reorder 'stages'")
    return recipe
