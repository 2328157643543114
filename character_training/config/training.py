"""The training stages' settings: each class is its stage's recipe section (``midtrain``, ``distill``,
``dpo``, ``sft``, ``grpo``, ...) and what ``character-training train --set`` builds.

Each class holds every default of its stage, the TRL trainer's included (``trainer_defaults``,
under the recipe's ``trainer`` fields): what a recipe leaves out is in the section, so the
recipe.json of a run and the stage's settings key see it, and changing a default here makes a
finished stage ask for ``--force``.

Range and choice checks live here, in ``__post_init__`` (a ``UserError`` "FIELD: VALUE; how to
fix", which the recipe loader prefixes with the file and section). The ``trainer`` mapping holds
TRL config fields; it is checked against TRL by ``config.trainer_fields.check_trainer_fields`` when a recipe
is validated, not here: importing this module must not import TRL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from character_training.errors import UserError

STARTS = ("continue", "merge")
OVERLONG = ("truncate", "drop")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"r: {self.r!r}; give the LoRA rank as a whole number of 1 or more (16 is usual)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < float("inf"):
            raise UserError(f"alpha: {self.alpha!r}; give a number above 0 (the LoRA scale is alpha / r; "
                            "twice r is usual)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise UserError(f"dropout: {self.dropout!r}; give a share from 0 up to (not including) 1, e.g. 0.05")
        modules = self.target_modules
        if isinstance(modules, str):
            ok = bool(modules.strip())
        else:
            ok = isinstance(modules, (list, tuple)) and bool(modules) and all(
                isinstance(m, str) and m.strip() for m in modules)
        if not ok:
            raise UserError(f"target_modules: {modules!r}; give 'all-linear' or a list of module names, "
                            "e.g. [q_proj, v_proj]")
        if not isinstance(self.use_rslora, bool):
            raise UserError(f"use_rslora: {self.use_rslora!r}; give true or false")


def check_overlong(overlong: str) -> None:
    """The one check of an ``overlong`` policy (sections, and ``train.common.length_limit``)."""
    if overlong not in OVERLONG:
        raise UserError(f"overlong: '{overlong}'; use 'truncate' (TRL cuts over-long examples to "
                        "trainer.max_length) or 'drop' (leave them out); both are counted")


def check_start(start: str) -> None:
    """The one check of a ``start`` mode (sections, and ``train.common.load_start``)."""
    if start not in STARTS:
        raise UserError(f"start: '{start}'; use 'continue' (train the previous stage's adapter on) or "
                        "'merge' (merge it into the base, train a new one)")


def check_loop_negatives(share: float) -> None:
    """The one check of a ``loop_negatives`` share (sections, and ``train.dpo.add_loop_negatives``)."""
    if not 0 <= share <= 1:
        raise UserError(f"loop_negatives: {share!r}; give a share between 0 and 1 (0.5: half "
                        "of the pairs also train against a looping copy of their chosen answer)")


@dataclass(frozen=True)
class ScreenSettings:
    """``screen:`` of the stages that train on teacher answers (dpo, kto, distill, sft): before
    training, each example is scored by how far its teacher answer lies past the student's
    along each off-target trait (config/off_target.py; run/screening.py), in units of the
    trait's vector (1: as far as the trait's system prompt moves the base model), and dropped
    when past ``threshold`` on any trait, or among the ``top_fraction`` highest on any trait.
    Off unless one of the two is given."""

    traits: list | None = None          # off-target trait names; None: every trait of the bank
    threshold: float | None = None      # drop examples scoring above this on any trait
    top_fraction: float | None = None   # or drop the floor(top_fraction * n) highest on each trait

    @property
    def enabled(self) -> bool:
        return self.threshold is not None or self.top_fraction is not None

    def __post_init__(self):
        from character_training.config.off_target import select_traits

        if self.threshold is not None and self.top_fraction is not None:
            raise UserError(f"threshold: {self.threshold} and top_fraction {self.top_fraction} both given; "
                            "give one (threshold: a score in trait units, e.g. 0.5; top_fraction: a share, e.g. 0.1)")
        if self.traits is not None and not self.enabled:
            raise UserError("traits: given without threshold or top_fraction; add one (e.g. threshold: 0.5 "
                            "or top_fraction: 0.1), or leave screen out")
        if self.threshold is not None and (not _number(self.threshold) or abs(self.threshold) == float("inf")):
            raise UserError(f"threshold: {self.threshold!r}; give a finite number (in trait units: 1 is as "
                            "far as the trait's system prompt moves the base model; 0.5 is a usual start)")
        if self.top_fraction is not None and (not _number(self.top_fraction) or not 0 < self.top_fraction < 1):
            raise UserError(f"top_fraction: {self.top_fraction!r}; give a share above 0 and below 1, e.g. 0.1")
        if self.enabled:
            select_traits(self.traits, "traits")


# The TRL trainer fields of each stage where a recipe's ``trainer`` leaves them out.
#
# SFT: the character's turns are trained, the user's are context.
SFT_TRAINER: dict[str, Any] = {
    "learning_rate": 2e-4,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "max_length": 512,
    "assistant_only_loss": True,  # the character's turns are trained, the user's are context
    "lr_scheduler_type": "cosine",
    "warmup_steps": 2,
    "logging_steps": 1,
    "save_strategy": "steps",     # checkpoints/: a killed run resumes from the last one
    "save_steps": 10,
    "save_total_limit": 2,
    "report_to": "none",
}
# Midtraining: documents are longer than chat turns; "bfd_split" packs a document longer than
# max_length as several pieces instead of cutting its end off (plain "bfd" truncates).
LM_TRAINER: dict[str, Any] = {**{k: v for k, v in SFT_TRAINER.items() if k != "assistant_only_loss"},
                              "max_length": 1024, "packing_strategy": "bfd_split"}
# Distillation: SFT's defaults less its loss mask (the answer tokens are picked from the two views);
# max_length is per view (the teacher's, with the constitution, is the longer one).
DISTILL_TRAINER: dict[str, Any] = {k: v for k, v in SFT_TRAINER.items() if k != "assistant_only_loss"}
# DPO (recipes/demo.yaml sets its own values for most of these). The SFT term beside the DPO loss
# (`loss_type=["sigmoid", "sft"]`, the NLL of the chosen answers) anchors the model to fluent text;
# the learning rate is one at which a small LoRA moves in a few dozen steps. Larger datasets want
# a lower rate.
DPO_TRAINER: dict[str, Any] = {
    "learning_rate": 5e-4,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "beta": 0.1,
    "loss_type": ["sigmoid", "sft"],
    "loss_weights": [1.0, 1.0],
    "max_length": 384,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 2,
    "logging_steps": 1,
    "save_strategy": "steps",   # checkpoints/: a killed run resumes from the last one
    "save_steps": 5,
    "save_total_limit": 1,
    "report_to": "none",
}
# GRPO: a small CPU run (the tiny and 135M models); on a GPU raise num_generations (8-16), the
# batch and max_completion_length, and consider use_vllm for generation.
GRPO_TRAINER: dict[str, Any] = {
    "learning_rate": 1e-5,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "num_generations": 4,             # answers per prompt: a group of 4 per step at batch 4
    "max_completion_length": 64,
    "logging_steps": 1,
    "save_strategy": "steps",         # checkpoints/: a killed run resumes from the last one
    "save_steps": 5,
    "save_total_limit": 1,
    "report_to": "none",
    "use_vllm": False,
}
# KTO (TRL's KTOTrainer): unpaired answers, each labelled desirable or not; a learning rate at which
# a small LoRA moves in a few dozen steps, as DPO's.
KTO_TRAINER: dict[str, Any] = {
    "learning_rate": 5e-4,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "beta": 0.1,
    "max_length": 384,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 2,
    "logging_steps": 1,
    "save_strategy": "steps",   # checkpoints/: a killed run resumes from the last one
    "save_steps": 5,
    "save_total_limit": 1,
    "report_to": "none",
}


def lm_fields(packing: bool, marker: str | None) -> dict:
    """The SFTConfig fields midtraining (``train.sft.train_lm``) sets from its own settings, over the
    recipe's trainer fields. TRL builds the labels before packing, so a marker's -100 labels survive
    packing."""
    return {"packing": packing, "dataset_text_field": "text", "completion_only_loss": bool(marker)}


@dataclass
class TrainingSection:
    """What every training stage's section holds; each stage's class adds its own settings."""

    kind: ClassVar[str]  # TRL config kind (config.trainer_fields.config_class)
    trainer_defaults: ClassVar[dict]  # the TRL fields a recipe's ``trainer`` leaves out
    config_name: ClassVar[str]  # the TRL config class its trainer fields are fields of
    uses_judge: ClassVar[bool] = False  # its reward is a judge's (which may be this process's engine)
    one_data_file: ClassVar[str | None] = None  # `train KIND` takes one --data file of this kind
    needs_constitution: ClassVar[str | None] = None  # `train KIND` needs --constitution, for this reason
    lora: LoraSettings = field(default_factory=LoraSettings)
    trainer: dict = field(default_factory=dict)  # the TRL config's own fields (DPOConfig, SFTConfig, GRPOConfig)
    start: str = "continue"  # from an earlier training stage's adapter: continue it, or merge it and train a new one

    def fixed_trainer_fields(self) -> dict:
        """TRL config fields the stage sets from its own settings, over the recipe's trainer fields."""
        return {}

    def model_problem(self, config: dict) -> str | None:
        """What in this section the model (its config.json) cannot do, as "KEY: problem; fix", or
        None: checked before the run's first stage, not when the stage is reached."""
        return None

    def __post_init__(self):
        check_start(self.start)
        if isinstance(self.trainer, dict):  # a non-mapping is refused, naming the section, by the recipe check
            self.trainer = {**self.trainer_defaults, **self.trainer}
        data = getattr(self, "data", None)
        if data is not None and (not isinstance(data, list) or not data or not all(isinstance(d, str) for d in data)):
            default = type(self).__dataclass_fields__["data"].default_factory()
            raise UserError(f"data: {data!r}; give a non-empty list of the stages whose data it trains on, "
                            f"e.g. {default}")


@dataclass
class MidtrainSection(TrainingSection):
    kind: ClassVar[str] = "lm"  # causal-LM training on documents (SFTConfig)
    one_data_file: ClassVar[str | None] = "documents file (a 'text' field per line)"
    trainer_defaults: ClassVar[dict] = LM_TRAINER
    config_name: ClassVar[str] = "SFTConfig"
    data: list = field(default_factory=lambda: ["sdf"])
    packing: bool = True
    marker: str | None = None  # prefixed to every document and masked from the loss
    chat_ratio: float = 0.0  # share of chat examples (from the sft data stages that ran) mixed in

    def fixed_trainer_fields(self) -> dict:
        return lm_fields(self.packing, self.marker)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.chat_ratio < 1.0:
            raise UserError(f"chat_ratio: {self.chat_ratio!r}; give a share from 0 (documents only) up to, "
                            "not including, 1")


@dataclass
class PairsSection(TrainingSection):
    """What the training stages on preference pairs (DPO, KTO) share."""

    data: list = field(default_factory=lambda: ["pairs"])  # stages whose pairs.jsonl it trains on: pairs, critique, rlaif
    system_prompt: str | None = None  # training-time system prompt (inoculation-style), absent at evaluation
    overlong: str = "truncate"  # examples over trainer.max_length: "truncate" (TRL cuts them) or "drop"; counted
    screen: ScreenSettings = field(default_factory=ScreenSettings)  # drop pairs that pull toward off-target traits

    def __post_init__(self):
        super().__post_init__()
        check_overlong(self.overlong)


@dataclass
class DpoSection(PairsSection):
    kind: ClassVar[str] = "dpo"
    trainer_defaults: ClassVar[dict] = DPO_TRAINER
    config_name: ClassVar[str] = "DPOConfig"
    loop_negatives: float = 0.0  # share of pairs that also get a looping copy of their chosen answer as rejected

    def __post_init__(self):
        super().__post_init__()
        check_loop_negatives(self.loop_negatives)


@dataclass
class KtoSection(PairsSection):
    """KTO (``train.kto``): each pair's chosen answer is a desirable example and its rejected one an
    undesirable example, trained unpaired (TRL's KTOTrainer; its fields are KTOConfig's)."""

    kind: ClassVar[str] = "kto"
    trainer_defaults: ClassVar[dict] = KTO_TRAINER
    config_name: ClassVar[str] = "KTOConfig"


@dataclass
class SftSection(TrainingSection):
    kind: ClassVar[str] = "sft"
    trainer_defaults: ClassVar[dict] = SFT_TRAINER
    config_name: ClassVar[str] = "SFTConfig"
    data: list = field(default_factory=lambda: ["critique", "reflection", "interaction"])  # those that ran
    system_prompt: str | None = None
    overlong: str = "truncate"
    screen: ScreenSettings = field(default_factory=ScreenSettings)  # drop conversations that pull off-target

    def __post_init__(self):
        super().__post_init__()
        check_overlong(self.overlong)


@dataclass
class GrpoSection(TrainingSection):
    kind: ClassVar[str] = "grpo"
    trainer_defaults: ClassVar[dict] = GRPO_TRAINER
    config_name: ClassVar[str] = "GRPOConfig"
    uses_judge: ClassVar[bool] = True
    one_data_file: ClassVar[str | None] = "prompts file (a 'prompt' field per line; the prompts stage's prompts.jsonl)"
    needs_constitution: ClassVar[str | None] = "the judge scores answers against its traits and principles"
    data: list = field(default_factory=lambda: ["prompts"])  # its training prompts
    system_prompt: str | None = None
    judge_retries: int = 2  # a failed or unparseable verdict is asked again, then counted as missing
    judge_max_tokens: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.judge_retries < 0:
            raise UserError(f"judge_retries: {self.judge_retries}; give 0 or more (times a failed verdict is asked again)")
        if self.judge_max_tokens < 1:
            raise UserError(f"judge_max_tokens: {self.judge_max_tokens}; give 1 or more (the judge answers with a "
                            "score; 8 leaves room for it)")


DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd")
ACTIVATION_LOSSES = ("mse", "cosine")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass
class DistillSection(TrainingSection):
    """Context distillation (``train.distill``): the student (no system prompt) matches the teacher
    (the same model, LoRA disabled, the constitution as system prompt) on the teacher's answers."""

    kind: ClassVar[str] = "distill"  # its trainer fields are TRL's SFTConfig fields (a TrainingArguments)
    trainer_defaults: ClassVar[dict] = DISTILL_TRAINER
    config_name: ClassVar[str] = "SFTConfig"
    needs_constitution: ClassVar[str | None] = ("the teacher is the model with its system prompt; the student learns "
                                                "to answer as it does without one")
    data: list = field(default_factory=lambda: ["pairs"])  # the pairs' chosen answers, or conversation stages
    student_system_prompt: str | None = None  # None: the chat template's default (the model as it is used)
    overlong: str = "truncate"  # conversations over trainer.max_length: "truncate" or "drop"; counted
    loss: str = "forward_kl"  # "forward_kl" KL(teacher||student), "reverse_kl" KL(student||teacher), "jsd"
    beta: float = 0.5  # GKD's generalized JSD interpolation, for loss "jsd" (0: forward KL, 1: reverse KL)
    top_k: int | None = None  # the teacher's k most likely tokens (both renormalized), None: full vocabulary
    temperature: float = 1.0
    lmbda: float = 0.0  # GKD's share of on-policy batches (the student samples the first turn's answer)
    activation_weight: float = 0.0  # weight of the activation-consistency term; 0: off
    layers: list | str = "best"  # hidden_states layers (1..L) for it, or the persona vectors' best layer
    activation_loss: str = "mse"  # "mse" (normalized by the teacher's mean squared norm) or "cosine"
    screen: ScreenSettings = field(default_factory=ScreenSettings)  # drop examples that pull off-target
    # The teacher's targets of each example (answer logits, or their top-k, and activation targets),
    # kept in memory after their first computation and reused in later epochs, when all of them fit
    # in this many GiB per process; 0: the teacher runs on every batch. It changes the time, not what
    # is learned (not part of the stage's key).
    teacher_cache_gib: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        check_overlong(self.overlong)
        if not _number(self.teacher_cache_gib) or not 0 <= self.teacher_cache_gib < float("inf"):
            raise UserError(f"teacher_cache_gib: {self.teacher_cache_gib!r}; give the memory in GiB (per process) "
                            "the teacher's targets may take to be computed once and reused across epochs, e.g. 4, "
                            "or 0 to run the teacher on every batch")
        if self.loss not in DISTILL_LOSSES:
            raise UserError(f"loss: {self.loss!r}; use 'forward_kl' (mode-covering, the usual one), 'reverse_kl' "
                            "(mode-seeking) or 'jsd' (GKD's generalized JSD, set beta)")
        if not _number(self.beta) or not 0 <= self.beta <= 1:
            raise UserError(f"beta: {self.beta!r}; give a number from 0 (forward KL) to 1 (reverse KL); 0.5 is "
                            "the symmetric JSD")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 2):
            raise UserError(f"top_k: {self.top_k!r}; give a whole number of 2 or more (the teacher's most likely "
                            "tokens the loss compares), or leave it out for the full vocabulary")
        if not _number(self.temperature) or not 0 < self.temperature < float("inf"):
            raise UserError(f"temperature: {self.temperature!r}; give a number above 0 (1: the distributions as "
                            "they are; above 1 softens both)")
        if not _number(self.lmbda) or not 0 <= self.lmbda <= 1:
            raise UserError(f"lmbda: {self.lmbda!r}; give a share from 0 (the teacher's answers only) to 1")
        if not _number(self.activation_weight) or not 0 <= self.activation_weight < float("inf"):
            raise UserError(f"activation_weight: {self.activation_weight!r}; give 0 (off) or a positive weight "
                            "for the activation-consistency term, e.g. 0.1")
        self._check_layers()
        if self.activation_loss not in ACTIVATION_LOSSES:
            raise UserError(f"activation_loss: {self.activation_loss!r}; use 'mse' (normalized per layer) or "
                            "'cosine'")

    def model_problem(self, config: dict) -> str | None:
        layers, count = self.layers, config.get("num_hidden_layers")
        if not self.activation_weight or not isinstance(layers, list) or not isinstance(count, int):
            return None
        wrong = [layer for layer in layers if layer > count]
        if wrong:
            return (f"layers: {wrong}; the model has {count} layers (its config.json): give layer numbers from 1 to "
                    f"{count}, or 'best' (the persona vector's best layer)")
        return None

    def _check_layers(self):
        layers = self.layers
        ok = layers == "best" or (isinstance(layers, list) and bool(layers) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in layers))
        if not ok:
            raise UserError(f"layers: {layers!r}; give 'best' (the persona vector's best layer) or a list of layer "
                            "numbers of 1 or more, e.g. [6, 12] (hidden_states indices; 0 is the embeddings)")
