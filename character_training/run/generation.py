"""The data-generation stages beyond teacher-vs-student pairs, as recipe sections and run stages.

    sdf          synthetic documents about the character (text, for midtraining)
    critique     answer -> critique against a principle -> revision (SFT data and pairs)
    rlaif        two answers judged against a principle in both orders (pairs)
    reflection   the character writes about itself (SFT conversations)
    interaction  two instances of the character talk (multi-turn SFT conversations)

A recipe section (``GenSection``) holds the stage's settings (its ``*Settings`` dataclass in
``data_gen.stages``, whose fields are written flat in the recipe), a ``sampling`` mapping
(``temperature``, ``top_p``, ``max_tokens``, ``repetition_penalty``, ``frequency_penalty``; keys
left out keep the stage's default) and, for reflection and interaction, the ``adapter`` to
generate with.

Models by role (the recipe's ``models`` section): the ``student`` is the model trained (default:
the recipe's ``model``, the packaged model); the ``teacher`` answers with the constitution (pairs'
chosen answers, critique's critiques and revisions, sdf's documents, the prompts stage's prompts,
reflection and interaction without an adapter; default: the student); the ``judge`` judges (rlaif,
sdf's filter, the eval judge, GRPO's reward; default: the teacher). Each is served by the recipe's
``backend`` section (vLLM in this process, or OpenAI-compatible servers), with the keys its own
``backend`` mapping sets differently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from character_training.config.stages import GEN_STAGES
from character_training.config.sections import ROLE_DEFAULTS, ROLES, BackendSection, GenSection, ModelsSection, role_backends
from character_training.errors import UserError
from data_gen.backends import Engines


@dataclass(frozen=True)
class Role:
    """A resolved role. Two roles are equal when they are one model served one way (the name
    does not count): they then share an engine, a cache and a seed stream."""

    name: str = field(compare=False)
    model: str                   # vllm: a local model directory; openai: the model the servers serve
    backend: BackendSection      # the recipe's backend with the role's own keys over it

    @property
    def served(self) -> str:
        """The model's name as its answers record it."""
        return (self.backend.served_model or self.model) if self.backend.kind == "openai" else self.model


def resolve_roles(recipe_model: str | None, models: ModelsSection, backend: BackendSection,
                  resolve: Callable[..., str] | None = None, *, local_student: bool = True) -> dict[str, Role]:
    """The run's three roles. Local models are found (or fetched) here, before any stage starts;
    the student is unless ``local_student`` is False (``generate`` over HTTP: nothing is trained),
    a role served over HTTP is named as its servers know it."""
    if resolve is None:
        from character_training.config.models import resolve_model as resolve
    if models.student.model and recipe_model and models.student.model != recipe_model:
        raise UserError(f"model: {recipe_model} and models.student.model: {models.student.model} disagree; "
                        "give the student once (models.student.model, or `model` / --model)")
    backends = role_backends(models, backend, lambda data, prefix: BackendSection(**data))
    roles: dict[str, Role] = {}
    for name in ROLES:
        section, kind = getattr(models, name), backends[name].kind
        if name == "student":
            spec = section.model or recipe_model
            local = local_student or kind == "vllm"
            where = "models.student.model" if section.model else "--model"
            roles[name] = Role(name, resolve(spec, where=where) if local else spec or "default", backends[name])
        elif section.model is None:
            roles[name] = Role(name, roles[ROLE_DEFAULTS[name]].model, backends[name])
        else:
            served = section.model if kind == "openai" else resolve(section.model, where=f"models.{name}.model")
            roles[name] = Role(name, served, backends[name])
    return roles


def engine_kwargs(section: BackendSection, seed: int, *, enable_lora: bool = False, max_lora_rank: int = 64) -> dict:
    """The arguments of an in-process vLLM engine (``Engines.vllm``); the engine options only where
    the recipe gives some, so that a recipe without them builds the engine it always did."""
    kwargs: dict[str, Any] = dict(seed=seed, kv_cache_gib=2)
    if enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank)
    if section.engine:
        kwargs["engine"] = section.engine
    return kwargs


def make_backend(role: Role, seed: int, engines: Engines, *, enable_lora: bool = False):
    """A role's backend: an in-process vLLM engine held by ``engines`` (started when first asked,
    one at a time), or its OpenAI-compatible servers."""
    section = role.backend
    if section.kind == "vllm":
        return engines.lazy(role.model, **engine_kwargs(section, seed, enable_lora=enable_lora))
    if not section.base_urls:
        raise UserError(f"models.{role.name}: served over HTTP (backend kind openai) but backend.base_urls is empty; "
                        "give the OpenAI-compatible servers, e.g. base_urls: [http://127.0.0.1:8000/v1] "
                        "(start one with `vllm serve MODEL`)")
    from data_gen.http_backend import OpenAIBackend

    return OpenAIBackend(role.served, list(section.base_urls), api_key_env=section.api_key_env,
                         max_concurrency=section.max_concurrency, timeout_s=section.timeout_s,
                         max_retries=section.max_retries, seed=seed if section.request_seeds else None)

def stage_backends(stage: str, roles: dict[str, Role], seed: int, engines: Engines, *,
                   adapter: str | None = None) -> dict:
    """The backends of a generation stage's roles (``run_generation_stage``'s ``backend``, ``judge``
    and ``student``): the teacher writes (with an adapter: the student, whose adapter it is; rlaif:
    the student's candidates), critique's first answers are the student's, the judge judges. A
    role that is the writing role's model, served the same way, is left None: the same backend."""
    spec = GEN_STAGES[stage]
    role = "student" if adapter else spec.role

    def other(name: str, wanted: bool):
        return make_backend(roles[name], seed, engines) if wanted and roles[name] != roles[role] else None

    return {"backend": make_backend(roles[role], seed, engines, enable_lora=bool(adapter)),
            "judge": other("judge", spec.takes_judge), "student": other("student", spec.takes_student)}


def run_generation_stage(stage: str, *, backend, constitution, out: Path, section: GenSection, seed: int,
                         prompts: list[str] | None = None, judge=None, adapter: str | None = None,
                         student=None) -> dict:
    """Run one generation stage behind the stage directory's cache; returns its manifest.
    ``adapter`` (reflection, interaction) overrides ``section.adapter``; ``judge`` and ``student``
    (critique's first answers): other backends than ``backend`` (None: ``backend`` itself)."""
    from data_gen.cache import CACHE_FILE, CachedBackend

    spec = GEN_STAGES[stage]
    cached = CachedBackend(backend, out / CACHE_FILE)
    kwargs: dict[str, Any] = dict(settings=section.settings, sampling=section.sampling, seed=seed)
    if spec.takes_judge:
        kwargs["judge"] = cached if judge is None or judge is backend else CachedBackend(judge, out / f"judge-{CACHE_FILE}")
    if spec.takes_student and student is not None and student is not backend:
        kwargs["student"] = CachedBackend(student, out / CACHE_FILE)  # answers are keyed by model: one file serves both
    if spec.takes_adapter:
        kwargs["adapter"] = adapter or section.adapter
        if kwargs["adapter"] and not (Path(kwargs["adapter"]) / "adapter_config.json").is_file():
            raise UserError(f"{stage}.adapter: {kwargs['adapter']} is not a PEFT adapter directory "
                            "(adapter_config.json missing); give the adapter/ directory a training stage wrote")
    args = (cached, constitution, prompts, out) if spec.needs_prompts else (cached, constitution, out)
    manifest = spec.run(*args, **kwargs)
    manifest["cache"] = cached.stats()
    return manifest


def read_prompt_file(path: str | Path) -> list[str]:
    """User prompts from a .jsonl file (a "prompt" field per line) or a text file (one per line)."""
    import json

    path = Path(path)
    if path.is_dir():
        raise UserError(f"--prompts {path}: is a directory; give a .jsonl file (a 'prompt' field per line) or a text "
                        "file (one prompt per line)")
    if not path.is_file():
        raise UserError(f"--prompts {path}: prompt file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark an editor wrote is not part of the first prompt
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"--prompts {path}:{line}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if path.suffix != ".jsonl":
        return [line for _, line in lines]
    prompts = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UserError(f"--prompts {path}:{number}: not a JSON object ({exc.msg}); each line of a .jsonl prompt "
                            "file is an object with a 'prompt' field") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise UserError(f"--prompts {path}:{number}: each line must be a JSON object with a non-empty 'prompt' "
                            "text field")
        prompts.append(record["prompt"])
    return prompts
