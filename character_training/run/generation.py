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
generate with. The generation backend is the recipe's ``backend`` section: vLLM in this process
(default) or OpenAI-compatible servers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from character_training.errors import UserError
from data_gen.backends import Engines, Sampling
from data_gen.stages.critique import SAMPLING as CRITIQUE_SAMPLING, CritiqueSettings, run_critique
from data_gen.stages.introspection import (INTERACTION_SAMPLING, REFLECTION_SAMPLING, InteractionSettings,
                                           ReflectionSettings, run_reflection, run_self_interaction)
from data_gen.stages.rlaif import SAMPLING as RLAIF_SAMPLING, RlaifSettings, run_rlaif
from data_gen.stages.sdf import SAMPLING as SDF_SAMPLING, SdfSettings, run_sdf


@dataclass(frozen=True)
class GenStage:
    run: Callable[..., dict]     # the stage's function in data_gen.stages
    settings: type               # the stage's settings dataclass: its recipe section's flat keys
    sampling: Sampling           # the stage's default sampling
    needs_prompts: bool = False  # takes the prompts stage's training prompts (or --prompts)
    takes_judge: bool = False
    takes_adapter: bool = False
    needs_principles: bool = False  # judges or critiques against the constitution's principles


GEN_STAGES: dict[str, GenStage] = {
    "sdf": GenStage(run_sdf, SdfSettings, SDF_SAMPLING, takes_judge=True),
    "critique": GenStage(run_critique, CritiqueSettings, CRITIQUE_SAMPLING, needs_prompts=True, needs_principles=True),
    "rlaif": GenStage(run_rlaif, RlaifSettings, RLAIF_SAMPLING, needs_prompts=True, takes_judge=True,
                      needs_principles=True),
    "reflection": GenStage(run_reflection, ReflectionSettings, REFLECTION_SAMPLING, takes_adapter=True),
    "interaction": GenStage(run_self_interaction, InteractionSettings, INTERACTION_SAMPLING, takes_adapter=True),
}


@dataclass(frozen=True)
class GenSection:
    """A generation stage's recipe section. In the recipe the settings' fields are written flat,
    beside ``sampling`` and ``adapter``; ``recipe.gen_section`` builds it, ``as_recipe`` writes it
    back in that shape."""

    settings: Any                # the stage's settings dataclass (GEN_STAGES[stage].settings)
    sampling: Sampling           # keys the recipe leaves out keep the stage's default (GEN_STAGES[stage].sampling)
    adapter: str | None = None   # reflection, interaction: a PEFT LoRA directory, or 'previous': the run's latest

    @classmethod
    def default(cls, stage: str) -> GenSection:
        spec = GEN_STAGES[stage]
        return cls(settings=spec.settings(), sampling=spec.sampling)

    def as_recipe(self, stage: str) -> dict:
        """The section as a recipe writes it (every value, defaults included)."""
        data = {**dataclasses.asdict(self.settings), "sampling": dataclasses.asdict(self.sampling)}
        if GEN_STAGES[stage].takes_adapter:
            data["adapter"] = self.adapter
        return data


@dataclass
class BackendSection:
    kind: str = "vllm"           # vllm: the offline engine in this process; openai: HTTP servers
    base_urls: list = field(default_factory=list)  # openai: e.g. [http://127.0.0.1:8000/v1, ...]
    served_model: str | None = None  # openai: the model name the servers serve (default: the recipe's model)
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never written anywhere
    max_concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 4
    judge_model: str | None = None  # judging stages (rlaif, sdf's filter): another model; null: the same one
    # openai: send a per-request seed derived from the recipe's seed (reproducible samples). Off by
    # default: vLLM's CPU server can crash on seeded requests whose prefill is chunked.
    request_seeds: bool = False

    def __post_init__(self):
        if self.kind not in ("vllm", "openai"):
            raise UserError(f"kind: '{self.kind}' is not a backend; use 'vllm' or 'openai'")
        if not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in self.base_urls):
            raise UserError("base_urls: each must be a server's URL starting with http:// or https://, "
                            "e.g. [http://127.0.0.1:8000/v1]")
        if self.max_concurrency < 1:
            raise UserError(f"max_concurrency: {self.max_concurrency}; give 1 or more (requests in flight)")
        if not self.timeout_s > 0:
            raise UserError(f"timeout_s: {self.timeout_s}; give a number of seconds above 0 (120 is usual)")
        if self.max_retries < 0:
            raise UserError(f"max_retries: {self.max_retries}; give 0 or more")


def make_backend(model: str, section: BackendSection, seed: int, engines: Engines, *, enable_lora: bool = False,
                 judge: bool = False):
    """The generation (or, with ``judge``, the judging) backend a recipe asks for; an in-process
    vLLM engine is held by ``engines``, which releases it."""
    target = (section.judge_model or model) if judge else model
    if section.kind == "vllm":
        if judge and section.judge_model:
            from character_training.config.models import resolve_model

            target = resolve_model(section.judge_model)
        kwargs = dict(seed=seed, kv_cache_gib=2)
        if enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=64)
        return engines.vllm(target, **kwargs)
    if section.kind == "openai":
        if not section.base_urls:
            raise UserError("backend.base_urls: empty; give the OpenAI-compatible servers, e.g. "
                            "base_urls: [http://127.0.0.1:8000/v1] (start one with `vllm serve MODEL`)")
        from data_gen.http_backend import OpenAIBackend

        name = (section.judge_model if judge and section.judge_model else section.served_model) or target
        return OpenAIBackend(name, list(section.base_urls), api_key_env=section.api_key_env,
                             max_concurrency=section.max_concurrency, timeout_s=section.timeout_s,
                             max_retries=section.max_retries, seed=seed if section.request_seeds else None)
    raise UserError(f"backend.kind: '{section.kind}' is not a backend; use 'vllm' or 'openai'")


def run_generation_stage(stage: str, *, backend, constitution, out: Path, section: GenSection, seed: int,
                         prompts: list[str] | None = None, judge=None, adapter: str | None = None) -> dict:
    """Run one generation stage behind the stage directory's cache; returns its manifest.
    ``adapter`` (reflection, interaction) overrides ``section.adapter``."""
    from data_gen.cache import CACHE_FILE, CachedBackend

    spec = GEN_STAGES[stage]
    cached = CachedBackend(backend, out / CACHE_FILE)
    kwargs: dict[str, Any] = dict(settings=section.settings, sampling=section.sampling, seed=seed)
    if spec.takes_judge:
        kwargs["judge"] = cached if judge is None or judge is backend else CachedBackend(judge, out / f"judge-{CACHE_FILE}")
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
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompt file not found")
    if path.suffix == ".jsonl":
        from data_gen.store import read_jsonl

        try:
            return [r["prompt"] for r in read_jsonl(path)]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: each line must be a JSON object with a 'prompt' field ({exc})") from None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

