"""Inference backends: one small interface over the engines that generate data.

``Backend.chat`` takes a batch of conversations (lists of ``{"role", "content"}`` messages)
and returns one ``Completion`` per conversation, in order. ``VLLMBackend`` runs vLLM offline
in this process (batching, prefix caching, engine-level seed, LoRA adapters).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, Sequence

from data_gen.errors import UserError

Message = dict[str, str]
Conversation = list[Message]


@dataclass(frozen=True)
class Sampling:
    """Sampling settings recorded in every manifest."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 192
    repetition_penalty: float = 1.0
    # Lowers a token's logit by this much for each time it already appears in the answer (the
    # answer's own tokens only, not the prompt's: unlike repetition_penalty, it leaves the words
    # of a persona's system prompt alone). Counters a small model's loops.
    frequency_penalty: float = 0.0
    logprobs: int = 0  # >0: return this many top alternatives for the first generated token

    def __post_init__(self):
        """vLLM's own ranges, checked when the settings are built (a recipe is refused before any
        engine starts, not after a 90-second engine start)."""
        check_sampling(self)

    def to_dict(self) -> dict:
        return asdict(self)


MAX_LOGPROBS = 20  # vLLM's default max_logprobs: engines here are built with it


def check_sampling(s) -> None:
    """The one check of sampling values (``Sampling``, and sections whose sampling keys are flat:
    ``pairs``, ``prompts``, ``eval``). A UserError "FIELD: VALUE; how to fix"."""
    import math

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    checks = (
        ("temperature", lambda v: number(v) and v >= 0, "give 0 or more (0: always the likeliest token; 0.7 is usual)"),
        ("top_p", lambda v: number(v) and 0 < v <= 1, "give a share above 0 and at most 1 (1: off)"),
        ("max_tokens", lambda v: whole(v) and v >= 1, "give a whole number of 1 or more (tokens per answer)"),
        ("repetition_penalty", lambda v: number(v) and v > 0, "give a number above 0 (1: off)"),
        ("frequency_penalty", lambda v: number(v) and -2 <= v <= 2, "give a number between -2 and 2 (vLLM's range; 0: off)"),
        ("logprobs", lambda v: whole(v) and 0 <= v <= MAX_LOGPROBS,
         f"give a whole number from 0 (off) to {MAX_LOGPROBS} (vLLM's max_logprobs)"),
    )
    for name, ok, fix in checks:
        if hasattr(s, name) and not ok(getattr(s, name)):
            raise UserError(f"{name}: {getattr(s, name)!r}; {fix}")


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" when the model ended its answer, "length" when cut off
    num_tokens: int
    # With ``Sampling.logprobs``: the first generated token's top alternatives, text -> logprob
    # (what a judge's choice token is read from). None when not asked for or not given.
    first_logprobs: dict[str, float] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason == "stop"


class Backend(Protocol):
    model: str

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling,
             adapter: str | None = None, desc: str = "generating") -> list[Completion]:
        """One completion per conversation; ``adapter`` is a PEFT LoRA directory or None."""
        ...


class VLLMBackend:
    """vLLM's offline engine. Build it through ``Engines``, which shares and releases it.

    The seed is given to the engine, not per request: per-request seeds with prefix caching
    crash vLLM's CPU build ("CPU Generator does not use offset").
    """

    def __init__(self, model: str, *, seed: int = 0, max_model_len: int = 2048,
                 enable_lora: bool = False, max_lora_rank: int = 64, dtype: str = "auto",
                 kv_cache_gib: int | None = None, gpu_memory_utilization: float = 0.85,
                 prefix_caching: bool = True):
        try:
            import vllm
        except ImportError as exc:
            raise RuntimeError("vLLM is not installed: run `bash scripts/setup.sh` (CPU) or install "
                               "requirements/gpu.txt on a GPU machine") from exc
        import torch

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            _cpu_defaults(kv_cache_gib)
        if dtype == "auto":
            # bf16 on a CPU without AVX512-BF16/AMX falls back to slow kernels (measured here:
            # under 1 token/s vs 83 in fp32); fp32 is the safe CPU default.
            dtype = "bfloat16" if on_gpu or _cpu_has_bf16() else "float32"
        self.model = model
        self.enable_lora = enable_lora
        self._adapter_ids: dict[str, int] = {}
        kwargs = dict(model=model, seed=seed, max_model_len=max_model_len, dtype=dtype,
                      enable_prefix_caching=prefix_caching, enable_lora=enable_lora)
        if enable_lora:
            kwargs["max_lora_rank"] = max_lora_rank
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # torch.compile on a small CPU costs minutes at start and gained nothing here.
            kwargs["enforce_eager"] = True
        self.llm = vllm.LLM(**kwargs)

    def close(self) -> None:
        """Stop the engine's processes now (dropping the object alone left the CPU worker
        running and spinning, which starved training in the same run)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # shutting down is best effort; a failure must not hide results
            print(f"warning: vLLM engine shutdown: {exc}")
        self.llm = None

    def _lora_request(self, adapter: str | None):
        if adapter is None:
            return None
        if not self.enable_lora:
            raise ValueError("this engine was built without enable_lora=True; cannot serve an adapter")
        from vllm.lora.request import LoRARequest

        path = str(Path(adapter).resolve())
        lora_id = self._adapter_ids.setdefault(path, len(self._adapter_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, path)

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling,
             adapter: str | None = None, desc: str = "generating") -> list[Completion]:
        from vllm import SamplingParams

        if not conversations:
            return []
        params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens,
                                repetition_penalty=sampling.repetition_penalty,
                                frequency_penalty=sampling.frequency_penalty,
                                logprobs=sampling.logprobs or None)
        try:
            outputs = self.llm.chat(list(conversations), params, use_tqdm=_progress(desc) if desc else False,
                                    lora_request=self._lora_request(adapter))
        except Exception as exc:
            if type(exc).__name__ != "EngineDeadError":
                raise
            raise UserError(
                f"vLLM's engine process for {self.model} died while generating ({desc}); the cause is in its "
                "log above (on a CPU most often memory: lower VLLM_CPU_KVCACHE_SPACE or the backend's "
                "max_model_len, or stop other jobs). Answers already generated are kept in the stage's "
                "generation cache (cache.jsonl) where it has one: run the same command again to go on "
                "from there") from exc
        return [Completion(text=o.outputs[0].text, finish_reason=o.outputs[0].finish_reason or "length",
                           num_tokens=len(o.outputs[0].token_ids),
                           first_logprobs=_first_logprobs(o.outputs[0]) if sampling.logprobs else None)
                for o in outputs]


def _first_logprobs(output) -> dict[str, float] | None:
    """vLLM's per-position {token_id: Logprob} for the first token, as {text: logprob}."""
    if not output.logprobs:
        return None
    found: dict[str, float] = {}
    for token_id, lp in output.logprobs[0].items():
        text = lp.decoded_token if lp.decoded_token is not None else str(token_id)
        found[text] = max(found.get(text, float("-inf")), float(lp.logprob))
    return found


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_defaults(kv_cache_gib: int | None) -> None:
    """vLLM's CPU build keeps one core for the front end by default; on a small machine the
    engine is the only thing working during generation, so let it use every core (1.6x here)."""
    if kv_cache_gib is not None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    cores = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if cores > 1 else "0")


def _progress(desc: str):
    from tqdm.auto import tqdm

    def bar(*args, **kwargs):
        kwargs["desc"] = desc
        return tqdm(*args, **kwargs)

    return bar


class Engines:
    """The vLLM engines of a run (or of one command): built on first use, one per model and
    settings, and released together when the holder is done or fails.

        with Engines() as engines:
            backend = engines.vllm(model, seed=0)   # the same object on every call with these arguments
            ...
            engines.release()                       # before training needs the memory and cores

    The generation stages of a run share an engine rather than each building its own: vLLM
    seeds the engine, not the request, so one engine's sample stream runs on from one stage to
    the next (a run's samples depend on it), and a CPU engine costs about 30 s to start.
    """

    def __init__(self):
        self._engines: dict[tuple, VLLMBackend] = {}

    def vllm(self, model: str, **kwargs) -> VLLMBackend:
        key = (model, tuple(sorted(kwargs.items())))
        if key not in self._engines:
            self._engines[key] = VLLMBackend(model, **kwargs)
        return self._engines[key]

    def release(self) -> None:
        """Stop every engine now (their engine processes exit), freeing memory and cores."""
        import gc

        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.close()
        gc.collect()

    def __enter__(self) -> "Engines":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
