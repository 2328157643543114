"""Inference backends: one small interface over the engines that generate data.

``Backend.chat`` takes a batch of conversations (lists of ``{"role", "content"}`` messages)
and returns one ``Completion`` per conversation, in order. ``VLLMBackend`` runs vLLM offline
in this process (batching, prefix caching, a seed per request, LoRA adapters).

Every request carries its own seed (data_gen/seeds.py), given as ``seeds`` (a stage's cache
derives them) or derived here: an answer never depends on which requests shared its batch.
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
             adapter: str | None = None, desc: str = "generating",
             seeds: Sequence[int] | None = None) -> list[Completion]:
        """One completion per conversation; ``adapter`` is a PEFT LoRA directory or None;
        ``seeds``: one sampling seed per conversation (None: derived from each request)."""
        ...


class VLLMBackend:
    """vLLM's offline engine. Build it through ``Engines``, which shares and releases it.

    Each request is sampled with its own seed (``SamplingParams(seed=...)``, data_gen/seeds.py):
    with the engine's seed alone, which requests shared a step decided each answer's draws, and
    the same call gave other answers on a repeat. ``engine``: vLLM's own engine
    options (``EngineArgs`` fields, checked by ``check_engine_options``), given over the
    defaults set here; on the CPU the ones with no meaning there are left out with a note.
    """

    def __init__(self, model: str, *, seed: int = 0, max_model_len: int = 2048,
                 enable_lora: bool = False, max_lora_rank: int = 64, dtype: str = "auto",
                 kv_cache_gib: int | None = None, gpu_memory_utilization: float = 0.85,
                 prefix_caching: bool = True, engine: dict | None = None):
        try:
            import vllm
        except ImportError as exc:
            raise RuntimeError("vLLM is not installed: run `bash scripts/setup.sh` (CPU) or install "
                               "requirements/gpu.txt on a GPU machine") from exc
        import torch

        options = check_engine_options(engine or {})
        if options.get("data_parallel_size", 1) > 1:
            raise UserError(f"data_parallel_size: {options['data_parallel_size']} asks for several engines, and "
                            "a VLLMBackend is one; build it with Engines().vllm(model, engine=...), which starts one "
                            "engine per GPU set (data_gen/parallel.py)")
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            _cpu_defaults(kv_cache_gib)
        dtype = options.pop("dtype", dtype)  # "auto" in a recipe means this class's choice, below
        if dtype == "auto":
            # On the CPU, fp32: bf16 without AVX512-BF16/AMX falls back to slow kernels (measured:
            # under 1 token/s vs 83 in fp32), and with them it is faster but draws other samples, so
            # the same recipe gave other prompts, pairs and results on such a CPU. fp32 gives the
            # same numbers on every CPU measured; ask for bf16 with backend.engine.dtype.
            dtype = "bfloat16" if on_gpu else "float32"
        self.model = model
        self.seed = seed
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
            options = _applicable_on_cpu(options)
        kwargs.update(options)  # the recipe's engine options win over the defaults above
        if not on_gpu:
            # A prefill split over steps makes vLLM discard that step's draw and rewind the request's
            # generator, which the CPU generator cannot do ("CPU Generator does not use offset": seeded
            # requests crashed the engine). The GPU rewinds its Philox offset: chunked prefill stays on.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(kwargs.get("max_num_batched_tokens") or 2048, kwargs["max_model_len"])
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
             adapter: str | None = None, desc: str = "generating",
             seeds: Sequence[int] | None = None) -> list[Completion]:
        from vllm import SamplingParams

        from data_gen.seeds import seeds_for

        if not conversations:
            return []
        if getattr(self, "llm", None) is None:
            raise RuntimeError(
                f"the vLLM engine of {self.model} was closed (Engines releases an engine when another one starts, "
                "and before training) and then asked to generate; hold the backend as engines.lazy(model, ...), "
                "which starts the engine again when it is asked, or ask engines.vllm(...) again after a release")
        if seeds is None:
            seeds = seeds_for(self.seed, conversations, adapter)
        if len(seeds) != len(conversations):
            raise ValueError(f"{len(seeds)} seeds for {len(conversations)} conversations")
        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_tokens,
                                 repetition_penalty=sampling.repetition_penalty,
                                 frequency_penalty=sampling.frequency_penalty,
                                 logprobs=sampling.logprobs or None, seed=int(seed))
                  for seed in seeds]
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


def _cpu_defaults(kv_cache_gib: int | None) -> None:
    """vLLM's CPU build keeps one core for the front end by default; on a small machine the
    engine is the only thing working during generation, so let it use every core (1.6x here).
    One engine step may take minutes on a small CPU shared with other work (measured: a LoRA step
    of the algebra report beside a DPO run passed vLLM's 300 s and the engine was declared dead),
    so the step timeout is 30 minutes unless set."""
    if kv_cache_gib is not None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    cores = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if cores > 1 else "0")
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "1800")


def _progress(desc: str):
    from tqdm.auto import tqdm

    def bar(*args, **kwargs):
        kwargs["desc"] = desc
        return tqdm(*args, **kwargs)

    return bar


# EngineArgs fields this framework sets itself, and the recipe setting that sets each.
_DATA_PARALLEL_RANKS = ("each data-parallel engine is started by this framework on its own GPU set: give "
                        "data_parallel_size only (several nodes: serve the model with `vllm serve` on each and "
                        "list the servers in backend.base_urls)")
SET_BY_FRAMEWORK = {
    "model": "the model is the recipe's `models.<role>` (or `model`)",
    "tokenizer": "the tokenizer is the model's own: set the model with `models.<role>` (or `model`)",
    "seed": "the recipe's `seed` seeds every engine",
    "enable_lora": "LoRA is turned on by the stage that serves adapters",
    **{name: _DATA_PARALLEL_RANKS for name in ("data_parallel_rank", "data_parallel_start_rank",
                                               "data_parallel_size_local", "data_parallel_address",
                                               "data_parallel_rpc_port", "data_parallel_backend")},
}
# The obvious ranges of the options the recipes use most (vLLM checks the rest when it starts).
ENGINE_RANGES = {
    "tensor_parallel_size": (lambda v: v >= 1, "give 1 or more (GPUs per engine)"),
    "pipeline_parallel_size": (lambda v: v >= 1, "give 1 or more (pipeline stages per engine)"),
    "data_parallel_size": (lambda v: v >= 1, "give 1 or more (engines, each on its own GPUs)"),
    "gpu_memory_utilization": (lambda v: 0 < v <= 1, "give a share above 0 and at most 1 (0.9 is usual)"),
    "max_model_len": (lambda v: v >= 1, "give 1 or more (tokens of prompt plus answer)"),
    "max_num_seqs": (lambda v: v >= 1, "give 1 or more (sequences in one batch)"),
    "max_lora_rank": (lambda v: v >= 1, "give 1 or more (at least the largest adapter's rank)"),
}


def check_engine_options(options: dict, where: str = "backend.engine") -> dict:
    """A recipe's vLLM engine options, checked against vLLM's own ``EngineArgs`` fields (as the
    ``trainer:`` sections are against TRL's), before any engine starts: unknown keys, keys this
    framework sets itself, simple types and the obvious ranges. Returns a copy."""
    if not options:
        return {}
    if not isinstance(options, dict):
        raise UserError(f"{where}: {options!r} is not a mapping; give vLLM engine options as key: value pairs, "
                        "e.g. {tensor_parallel_size: 2, max_num_seqs: 256}")
    fields = _engine_fields()
    for key, value in options.items():
        if key in SET_BY_FRAMEWORK:
            raise UserError(f"{where}.{key}: set by this framework, not by engine options ({SET_BY_FRAMEWORK[key]}); "
                            "remove it from the engine options")
        if key not in fields:
            import difflib

            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise UserError(f"{where}.{key}: not a vLLM engine option (vLLM's EngineArgs has no such field); {hint}"
                            "fix the name or remove it (the options are EngineArgs fields, e.g. tensor_parallel_size, "
                            "gpu_memory_utilization, max_model_len, max_num_seqs)")
        _check_engine_value(f"{where}.{key}", key, value, fields[key])
    return dict(options)


def _engine_fields() -> dict:
    """{name: (annotation, default)} of vLLM's EngineArgs, imported only here (importing vLLM
    takes seconds)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return {f.name: (f.type, f.default) for f in dataclasses.fields(EngineArgs) if not f.name.startswith("_")}


def _check_engine_value(name: str, key: str, value, field: tuple) -> None:
    annotation, default = field
    if value is None and default is None:
        return  # vLLM's own "not set"
    if key in ENGINE_RANGES and _is(value, float):  # the range first: "give 1 or more" says more than a type
        ok, fix = ENGINE_RANGES[key]
        if not ok(value):
            raise UserError(f"{name}: {value!r}; {fix}")
    allowed = _simple_types(annotation)
    if allowed is not None and not any(_is(value, t) for t in allowed):
        raise UserError(f"{name}: {value!r} is not {' or '.join(map(_described, allowed))} (vLLM's EngineArgs.{key}); "
                        "fix the value")


def _simple_types(annotation) -> list | None:
    """The simple types (int, float, bool, str, None, a Literal) an annotation allows; None when
    it allows anything else too (lists, configs, classes: vLLM checks those itself)."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [annotation]
    if origin in (typing.Union, types.UnionType):
        parts = [_simple_types(a) for a in typing.get_args(annotation)]
        return None if any(p is None for p in parts) else [t for p in parts for t in p]
    if annotation in (int, float, bool, str, type(None)):
        return [annotation]
    return None


def _is(value, simple) -> bool:
    import typing

    if typing.get_origin(simple) is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(simple))
    if simple is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if simple is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, simple)


def _described(simple) -> str:
    import typing

    if typing.get_origin(simple) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(simple)))
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}[simple]


# Options that vLLM's CPU build ignores or overrides (vllm/platforms/cpu.py check_and_update_config,
# vllm/v1/worker/cpu_worker.py), and why: left out there, so one recipe runs on both.
CPU_IGNORED = {
    "gpu_memory_utilization": "a GPU memory share (the CPU engine reads it as a share of the machine's memory; "
                              "its KV cache is VLLM_CPU_KVCACHE_SPACE)",
    "cudagraph_capture_sizes": "CUDA graphs", "max_cudagraph_capture_size": "CUDA graphs",
    "async_scheduling": "turned off on the CPU", "enable_dbo": "turned off on the CPU",
    "disable_custom_all_reduce": "always on on the CPU",
    "enable_chunked_prefill": "off on the CPU: a split prefill rewinds a seeded request's generator, which the CPU "
                              "generator cannot do",
}


def _applicable_on_cpu(options: dict) -> dict:
    """The options less those with no meaning on the CPU, with one line naming them."""
    ignored = dict(CPU_IGNORED)
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        ignored["kv_cache_memory_bytes"] = "VLLM_CPU_KVCACHE_SPACE sets the CPU KV cache and takes precedence"
    left_out = [k for k in options if k in ignored]
    if left_out:
        print("note: vLLM on the CPU: engine options left out: "
              + "; ".join(f"{k} ({ignored[k]})" for k in left_out))
    return {k: v for k, v in options.items() if k not in ignored}


class Engines:
    """The vLLM engines of a run (or of one command): built on first use, one at a time, and
    released when another is asked for, when the holder is done, or when it fails.

        with Engines() as engines:
            backend = engines.vllm(model, seed=0)   # the same object on every call with these arguments
            teacher = engines.lazy(teacher_model, seed=0)  # starts its engine when it generates
            ...
            engines.release()                       # before training needs the memory and cores

    The generation stages of a run share an engine rather than each building its own (a CPU
    engine costs about 30 s to start); each request carries its own seed, so what an earlier
    stage asked of the engine does not change a later stage's answers. Asking
    for another engine (another model or settings) first releases the held one, so a teacher, a
    student and a judge never hold the devices together.
    """

    def __init__(self):
        self._engines: dict[tuple, VLLMBackend] = {}

    def vllm(self, model: str, **kwargs) -> VLLMBackend:
        """The engine for ``model`` with these ``VLLMBackend`` settings (``engine``: vLLM's engine
        options; ``data_parallel_size`` > 1 starts one engine per GPU set)."""
        key = (model, _frozen(kwargs))
        if key not in self._engines:
            for held_model, held_kwargs in self._engines:
                print(f"[engines] releasing the vLLM engine of {held_model}{_differing(held_kwargs, key[1])} "
                      f"to start one for {model}{_differing(key[1], held_kwargs)}")
            self.release()
            self._engines[key] = _start_engine(model, kwargs)
        return self._engines[key]

    def lazy(self, model: str, **kwargs) -> "LazyEngine":
        """A backend that asks ``vllm(model, **kwargs)`` for its engine at each ``chat``: a stage
        can hold a teacher's and a student's backend, and the engines swap only when the model
        asked for changes. Engine options are checked now, not when the engine starts."""
        check_engine_options(kwargs.get("engine") or {})
        return LazyEngine(self, model, kwargs)

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


class LazyEngine:
    """A Backend whose vLLM engine is asked of ``Engines`` at each ``chat`` (see ``Engines.lazy``)."""

    def __init__(self, engines: Engines, model: str, kwargs: dict):
        self.engines, self.model, self.kwargs = engines, model, dict(kwargs)
        self.seed = kwargs.get("seed", 0)
        self.enable_lora = bool(kwargs.get("enable_lora", False))

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling,
             adapter: str | None = None, desc: str = "generating",
             seeds: Sequence[int] | None = None) -> list[Completion]:
        if not conversations:
            return []  # no engine started for nothing
        engine = self.engines.vllm(self.model, **self.kwargs)
        return engine.chat(conversations, sampling, adapter=adapter, desc=desc, seeds=seeds)


def _start_engine(model: str, kwargs: dict):
    """A VLLMBackend, or with ``engine: {data_parallel_size: N > 1}`` one engine per GPU set."""
    options = check_engine_options(kwargs.get("engine") or {})
    replicas = options.pop("data_parallel_size", 1)
    if replicas == 1:
        return VLLMBackend(model, **kwargs)
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"data_parallel_size: {replicas} on a machine without a GPU; one vLLM engine already "
                        "uses every CPU core, so more engines would only share them: remove data_parallel_size "
                        "(or set it to 1) for CPU runs")
    from data_gen.parallel import DataParallelBackend

    per_engine = options.get("tensor_parallel_size", 1) * options.get("pipeline_parallel_size", 1)
    return DataParallelBackend(model, replicas=replicas, build=VLLMBackend, devices_per_engine=per_engine,
                               **dict(kwargs, engine=options))


def _frozen(value):
    """A hashable copy of settings (engine options are dicts, some of their values lists)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set)):
        return tuple(_frozen(v) for v in value)
    return value


def _differing(held: tuple, asked: tuple) -> str:
    """" (enable_lora=False)": the settings of one engine that the other does not share."""
    other = dict(asked)
    diff = [f"{k}={v!r}" for k, v in held if k not in other or other[k] != v]
    return f" ({', '.join(diff)})" if diff else ""
