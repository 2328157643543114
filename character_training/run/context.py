"""What every stage sees: the recipe (its section among them), the constitution, the models by
role, the vLLM engines, and its inputs: in a run, the earlier stages' files in the run directory;
run as a command of its own (``train``, ``generate``), what the command line names (``Given``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from character_training.config.constitution import Constitution, load_constitution
from character_training.config.recipe import Recipe
from character_training.errors import UserError
from character_training.config import layout
from character_training.run.generation import Role, make_backend, resolve_roles
from data_gen.backends import Engines
from data_gen.store import USER_PROMPTS, read_jsonl

# The student answers with a plain assistant prompt and the teacher with the constitution; both
# get the same answer-length hint so that the pair differs in character, not in length (and so
# that a small model finishes its answers instead of being cut off and dropped).
STUDENT_SYSTEM_PROMPT = "You are a helpful AI assistant."


@dataclass
class Given:
    """The inputs a command names on its command line. ``standalone``: the stage runs outside a run
    (``train``, ``generate``), so nothing is read from a run directory: its data, prompts and
    starting adapter are these."""

    standalone: bool = False
    data: list[Path] | None = None   # train: --data (the files it trains on)
    chat_data: list[Path] = field(default_factory=list)  # train lm: --chat-data
    prompts: list[str] | None = None  # generate: --prompts, or the constitution's seed questions
    init_adapter: str | None = None  # train: --init-adapter
    adapter: str | None = None       # eval: --adapter (instead of the run's final adapter)
    also: list[str] = field(default_factory=list)  # eval: --also NAME=PATH
    persona: str | None = None       # train: --persona (the model card's name)


@dataclass
class Context:
    recipe: Recipe
    constitution: Constitution | None  # None: a standalone training stage that needs none (dpo, sft, lm)
    model: str                   # the student: the model trained and evaluated (a local directory)
    run_dir: Path
    engines: Engines = field(default_factory=Engines)  # the run's vLLM engines (see data_gen.backends.Engines)
    roles: dict[str, Role] = field(default_factory=dict)  # student, teacher, judge (run/generation.py)
    worker: bool = False         # one of the processes a launched training stage runs on (run/worker.py)
    given: Given = field(default_factory=Given)

    def stage_dir(self, stage: str) -> Path:
        return layout.stage_dir(self.run_dir, stage)

    def teacher_prompt(self) -> str:
        """The constitution as system prompt, with the pairs stage's answer hint (a standalone stage
        has no pairs stage: the constitution's own)."""
        if self.given.standalone:
            return self.constitution.system_prompt()
        return _with_hint(self.constitution.system_prompt(), self.recipe.pairs.answer_hint)

    def student_prompt(self) -> str:
        return _with_hint(STUDENT_SYSTEM_PROMPT, self.recipe.pairs.answer_hint)

    def prompts(self, split: str) -> list[str]:
        if self.given.prompts is not None:
            return list(self.given.prompts)
        path = self.stage_dir(prompts_stage()) / layout.PROMPTS
        if not path.is_file():
            raise UserError(f"{path}: missing; the prompts stage has not run in {self.run_dir}")
        return [r["prompt"] for r in read_jsonl(path) if r["split"] == split]

    def role(self, name: str) -> Role:
        return self.roles.get(name) or Role(name, self.model, self.recipe.backend)

    def backend(self, role: str, *, enable_lora: bool = False):
        """The generation backend of a role (student, teacher, judge). In-process vLLM engines
        start when the backend is first asked, one at a time (``Engines``)."""
        return make_backend(self.role(role), self.recipe.seed, self.engines, enable_lora=enable_lora)

    def same(self, role: str, other: str) -> bool:
        """The two roles are one model served one way (so they share an engine and a cache)."""
        return self.role(role) == self.role(other)

    def other_models(self) -> dict[str, str]:
        """The teacher's and judge's models where they are not the student's (for settings keys
        and manifests: a run whose roles are all the student records nothing more)."""
        return {name: self.role(name).served for name in ("teacher", "judge") if not self.same(name, "student")}


def _with_hint(system_prompt: str, hint: str | None) -> str:
    return f"{system_prompt}\n\n{hint}" if hint else system_prompt


def prompts_stage() -> str:
    """The stage that writes the user prompts."""
    from character_training.config.stages import writers

    return next(iter(writers(USER_PROMPTS)))


def data_files(ctx: Context, stage: str, files: dict[str, str]) -> list[Path]:
    """The data files a training stage trains on: those the command named, or the run's files
    of its ``data`` stages (``files``: the file each stage writes of the kind it takes)."""
    if ctx.given.data is not None:
        return list(ctx.given.data)
    section = getattr(ctx.recipe, stage)
    wrong = [d for d in section.data if d not in files]
    if wrong:
        raise UserError(f"{stage}.data: '{wrong[0]}' makes no data {stage} can train on; use some of "
                        f"{', '.join(files)}")
    paths = [ctx.stage_dir(d) / files[d] for d in section.data if d in ctx.recipe.stages]
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: missing; the {path.parent.name} stage has not finished in {ctx.run_dir}")
    usable = [p for p in paths if p.stat().st_size > 0]
    if not usable:
        raise UserError(f"{stage}: every data file is empty ({', '.join(map(str, paths))}); every record was "
                        "dropped (see those stages' manifests) - raise their max_tokens or counts")
    return usable


def previous_adapter(ctx: Context, stage: str) -> Path | None:
    """The adapter of the nearest earlier training stage of the recipe: where this one starts (a
    standalone stage: --init-adapter)."""
    from character_training.config.stages import TRAINING_STAGES

    if ctx.given.standalone:
        return Path(ctx.given.init_adapter) if ctx.given.init_adapter else None
    earlier = [s for s in ctx.recipe.stages[:ctx.recipe.stages.index(stage)] if s in TRAINING_STAGES]
    return layout.adapter_dir(ctx.run_dir, earlier[-1]) if earlier else None


def final_adapter(ctx: Context) -> Path | None:
    from character_training.config.stages import TRAINING_STAGES

    trained = [s for s in ctx.recipe.stages if s in TRAINING_STAGES]
    return layout.adapter_dir(ctx.run_dir, trained[-1]) if trained else None


def make_context(recipe: Recipe, engines: Engines, given: Given | None = None, *,
                 local_student: bool = True) -> Context:
    """A run's (or a command's) context; every role's model is found (or fetched) here, before any
    stage starts. A recipe without a constitution (``train dpo`` without --constitution) has none."""
    constitution = load_constitution(recipe.constitution) if recipe.constitution else None
    roles = resolve_roles(recipe.model, recipe.models, recipe.backend, local_student=local_student)
    return Context(recipe=recipe, constitution=constitution, model=roles["student"].model,
                   run_dir=Path(recipe.run_dir), engines=engines, roles=roles, given=given or Given())
