"""The data-generation stages beyond teacher-vs-student pairs, as recipe sections and run stages.

    sdf          synthetic documents about the character (text, for midtraining)
    critique     answer -> critique against a principle -> revision (SFT data and pairs)
    rlaif        two answers judged against a principle in both orders (pairs)
    reflection   the character writes about itself (SFT conversations)
    interaction  two instances of the character talk (multi-turn SFT conversations)

A recipe section holds the stage's settings (the fields of its ``*Settings`` dataclass in
``data_gen.stages``) and a ``sampling`` mapping (``temperature``, ``top_p``, ``max_tokens``,
``repetition_penalty``, ``frequency_penalty``); unknown keys are errors. The generation backend is the recipe's
``backend`` section: vLLM in this process (default) or OpenAI-compatible servers.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from character_training.errors import UserError, did_you_mean
from data_gen.backends import Sampling


@dataclass(frozen=True)
class GenStage:
    module: str
    settings_class: str
    function: str
    sampling: Sampling           # the stage's default sampling
    needs_prompts: bool = False  # takes the prompts stage's training prompts (or --prompts)
    takes_judge: bool = False
    takes_adapter: bool = False
    needs_principles: bool = False  # judges or critiques against the constitution's principles
    outputs: tuple[str, ...] = ()

    def load(self):
        module = importlib.import_module(self.module)
        return getattr(module, self.settings_class), getattr(module, self.function)


GEN_STAGES: dict[str, GenStage] = {
    "sdf": GenStage("data_gen.stages.sdf", "SdfSettings", "run_sdf",
                    Sampling(temperature=0.9, max_tokens=400), takes_judge=True, outputs=("documents.jsonl",)),
    "critique": GenStage("data_gen.stages.critique", "CritiqueSettings", "run_critique",
                         Sampling(temperature=0.7, max_tokens=200), needs_prompts=True,
                         needs_principles=True, outputs=("sft.jsonl", "pairs.jsonl")),
    "rlaif": GenStage("data_gen.stages.rlaif", "RlaifSettings", "run_rlaif",
                      Sampling(temperature=0.9, max_tokens=160), needs_prompts=True, takes_judge=True,
                      needs_principles=True, outputs=("pairs.jsonl",)),
    "reflection": GenStage("data_gen.stages.introspection", "ReflectionSettings", "run_reflection",
                           Sampling(temperature=0.8, max_tokens=300), takes_adapter=True,
                           outputs=("reflection.jsonl",)),
    "interaction": GenStage("data_gen.stages.introspection", "InteractionSettings", "run_self_interaction",
                            Sampling(temperature=0.8, max_tokens=160), takes_adapter=True,
                            outputs=("interaction.jsonl",)),
}
SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(Sampling))


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


def check_section(stage: str, section: Any, where: str) -> dict:
    """Validate a generation stage's recipe section against its settings dataclass; returns it."""
    if not section:
        return {}
    if not isinstance(section, dict):
        raise UserError(f"{where}: {stage}: must be a mapping of settings, got {section!r}")
    settings_class, _ = GEN_STAGES[stage].load()
    allowed = [f.name for f in dataclasses.fields(settings_class)] + ["sampling"]
    if GEN_STAGES[stage].takes_adapter:
        allowed.append("adapter")  # a PEFT LoRA directory to generate with, or 'previous': the run's latest
    for key, value in section.items():
        if key not in allowed:
            raise UserError(f"{where}: {stage}.{key}: unknown key{did_you_mean(key, allowed)}; "
                            f"allowed keys: {', '.join(allowed)}")
    sampling = section.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise UserError(f"{where}: {stage}.sampling: must be a mapping such as {{temperature: 0.8, max_tokens: 200}}")
    for key in sampling:
        if key not in SAMPLING_KEYS:
            raise UserError(f"{where}: {stage}.sampling.{key}: unknown key{did_you_mean(key, SAMPLING_KEYS)}; "
                            f"allowed keys: {', '.join(SAMPLING_KEYS)}")
    try:
        build_settings(stage, section)
    except TypeError as exc:
        raise UserError(f"{where}: {stage}: {exc}") from None
    except UserError as exc:
        raise UserError(f"{where}: {stage}: {exc}") from None
    return section


def build_settings(stage: str, section: dict) -> tuple[Any, Sampling]:
    settings_class, _ = GEN_STAGES[stage].load()
    values = {k: v for k, v in section.items() if k not in ("sampling", "adapter")}
    for f in dataclasses.fields(settings_class):  # YAML lists for tuple fields
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    sampling = dataclasses.replace(GEN_STAGES[stage].sampling, **(section.get("sampling") or {}))
    return settings_class(**values), sampling


def make_backend(model: str, section: BackendSection, seed: int, *, enable_lora: bool = False,
                 judge: bool = False):
    """The generation (or, with ``judge``, the judging) backend a recipe asks for."""
    target = (section.judge_model or model) if judge else model
    if section.kind == "vllm":
        from data_gen.backends import vllm_backend

        if judge and section.judge_model:
            from character_training.config.models import resolve_model

            target = resolve_model(section.judge_model)
        kwargs = dict(seed=seed, kv_cache_gib=2)
        if enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=64)
        return vllm_backend(target, **kwargs)
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


def run_generation_stage(stage: str, *, backend, constitution, out: Path, section: dict, seed: int,
                         prompts: list[str] | None = None, judge=None, adapter: str | None = None) -> dict:
    """Run one generation stage behind the stage directory's cache; returns its manifest."""
    from data_gen.cache import CACHE_FILE, CachedBackend

    spec = GEN_STAGES[stage]
    settings, sampling = build_settings(stage, section)
    _, function = spec.load()
    cached = CachedBackend(backend, out / CACHE_FILE)
    kwargs: dict[str, Any] = dict(settings=settings, sampling=sampling, seed=seed)
    if spec.takes_judge:
        kwargs["judge"] = cached if judge is None or judge is backend else CachedBackend(judge, out / f"judge-{CACHE_FILE}")
    if spec.takes_adapter:
        kwargs["adapter"] = adapter or section.get("adapter")
        if kwargs["adapter"] and not (Path(kwargs["adapter"]) / "adapter_config.json").is_file():
            raise UserError(f"{stage}.adapter: {kwargs['adapter']} is not a PEFT adapter directory "
                            "(adapter_config.json missing); give the adapter/ directory a training stage wrote")
    args = (cached, constitution, prompts, out) if spec.needs_prompts else (cached, constitution, out)
    manifest = function(*args, **kwargs)
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

