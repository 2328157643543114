"""The stage table: every stage of a recipe, declared once, in the order a recipe runs them.

A row says what a stage is: its name (the recipe's section and the stage's directory), its kind
(``data``: generates training data; ``train``: trains a LoRA; ``eval``: evaluates one), its
recipe section's class (every default in it, a training stage's TRL trainer defaults included, so
a stage's settings key sees them), the stages whose outputs it reads, and what it writes for
later stages, by kind of record (user prompts, preference pairs, conversations, documents:
data_gen/store.py; a training stage writes ``adapter/``). Everything that lists stages derives from here: the recipe's stage
vocabulary and sections (config/recipe.py), the order checks, the run layout (config/layout.py),
the CLI's ``train`` and ``generate`` commands and their help, the model card and the manifest.

This is the declarative half. The function that runs each stage is in run/stages.py
(``STAGE_FUNCTIONS``); tests/test_architecture.py checks that both halves hold the same stages.
A new stage is its own module (its function, e.g. train/kto.py), its section class and one row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from character_training.config.eval_settings import EvalSettings
from character_training.config.sections import GenSection, GenStage
from character_training.config.training import (DistillSection, DpoSection, GrpoSection, KtoSection, MidtrainSection,
                                                SftSection, TrainingSection)
from data_gen.stages import critique, introspection, pairs, prompts, rlaif, sdf

DATA, TRAIN, EVAL = "data", "train", "eval"
ADAPTER = "adapter"  # a training stage's output directory inside its stage directory


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str                                 # DATA | TRAIN | EVAL
    section: type                             # its recipe section's class
    summary: str                              # one line: the CLI's help and the card
    reads: tuple[str, ...] = ()               # stages whose outputs it reads (a training stage: also its `data`)
    writes: dict[str, str] = field(default_factory=dict)  # kind of record -> file, for later stages
    gen: GenStage | None = None               # a generation stage's spec (run/generation.py runs it)

    def default_section(self) -> Any:
        return GenSection.default(self.gen) if self.gen else self.section()

    @property
    def trainer(self) -> str | None:
        """A training stage's TRL config kind (``train KIND``; config/trainer_fields.py)."""
        return self.section.kind if self.kind == TRAIN else None


TABLE: tuple[Stage, ...] = (
    Stage("prompts", DATA, prompts.ExpandSettings, "the constitution's seed questions expanded into user prompts "
          "(training and held-out)", writes=prompts.OUTPUTS),
    Stage("pairs", DATA, pairs.PairSettings, "teacher (constitution as system prompt) vs student answers: "
          "preference pairs", reads=("prompts",), writes=pairs.OUTPUTS),
    Stage("sdf", DATA, GenSection, "synthetic documents about the character (midtraining data)", writes=sdf.OUTPUTS,
          gen=GenStage(sdf.run_sdf, sdf.SdfSettings, sdf.SAMPLING, takes_judge=True)),
    Stage("critique", DATA, GenSection, "answer -> critique against a principle -> revision (SFT data and pairs)",
          reads=("prompts",), writes=critique.OUTPUTS,
          gen=GenStage(critique.run_critique, critique.CritiqueSettings, critique.SAMPLING, needs_prompts=True,
                       needs_principles=True, takes_student=True)),
    Stage("rlaif", DATA, GenSection, "two answers judged against a principle in both orders (pairs)",
          reads=("prompts",), writes=rlaif.OUTPUTS,
          gen=GenStage(rlaif.run_rlaif, rlaif.RlaifSettings, rlaif.SAMPLING, needs_prompts=True, takes_judge=True,
                       needs_principles=True, role="student")),
    Stage("reflection", DATA, GenSection, "the character writes about itself (SFT conversations)",
          writes=introspection.REFLECTION_OUTPUTS,
          gen=GenStage(introspection.run_reflection, introspection.ReflectionSettings,
                       introspection.REFLECTION_SAMPLING, takes_adapter=True)),
    Stage("interaction", DATA, GenSection, "two instances of the character talk (multi-turn SFT conversations)",
          writes=introspection.INTERACTION_OUTPUTS,
          gen=GenStage(introspection.run_self_interaction, introspection.InteractionSettings,
                       introspection.INTERACTION_SAMPLING, takes_adapter=True)),
    Stage("midtrain", TRAIN, MidtrainSection, "documents (SDF midtraining; causal LM, packed)",
          writes={ADAPTER: ADAPTER}),
    Stage("distill", TRAIN, DistillSection, "context distillation: the model without the constitution learns the "
          "model with it, on pairs' chosen answers or conversations", writes={ADAPTER: ADAPTER}),
    Stage("dpo", TRAIN, DpoSection, "preference pairs (prompt/chosen/rejected)", writes={ADAPTER: ADAPTER}),
    Stage("kto", TRAIN, KtoSection, "unpaired answers: each pair's chosen answer desirable, its rejected one "
          "undesirable", writes={ADAPTER: ADAPTER}),
    Stage("sft", TRAIN, SftSection, "conversations (the assistant turns trained)", writes={ADAPTER: ADAPTER}),
    Stage("grpo", TRAIN, GrpoSection, "prompts, rewarded by a judge against the constitution", reads=("prompts",),
          writes={ADAPTER: ADAPTER}),
    Stage("eval", EVAL, EvalSettings, "did the persona take: the quick check or the full report",
          reads=("prompts", "pairs")),
)

DEFAULT_STAGES = ("prompts", "pairs", "dpo", "eval")  # a recipe that lists none

BY_NAME: dict[str, Stage] = {s.name: s for s in TABLE}
STAGES: tuple[str, ...] = tuple(BY_NAME)
DATA_STAGES: tuple[str, ...] = tuple(s.name for s in TABLE if s.kind == DATA)
TRAINING_STAGES: dict[str, str] = {s.name: s.trainer for s in TABLE if s.kind == TRAIN}  # stage -> TRL config kind
TRAINING_SECTIONS: dict[str, type[TrainingSection]] = {s.name: s.section for s in TABLE if s.kind == TRAIN}
GEN_STAGES: dict[str, GenStage] = {s.name: s.gen for s in TABLE if s.gen}
READS: dict[str, tuple[str, ...]] = {s.name: s.reads for s in TABLE if s.reads}
# Each TRL config kind's section class (``train`` KIND; config/trainer_fields.py's check and build).
TRAINER_KINDS: dict[str, type[TrainingSection]] = {s.trainer: s.section for s in TABLE if s.kind == TRAIN}
EVAL_STAGES: tuple[str, ...] = tuple(s.name for s in TABLE if s.kind == EVAL)
EVAL_STAGE = EVAL_STAGES[0]  # what `character-training eval` runs


def writers(record: str) -> dict[str, str]:
    """{stage: file} of the stages that write records of this kind (data_gen.store's USER_PROMPTS,
    PREFERENCES, CONVERSATIONS, DOCUMENTS)."""
    return {s.name: s.writes[record] for s in TABLE if record in s.writes and s.kind == DATA}
