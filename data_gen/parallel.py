"""Data-parallel generation over the GPUs of a node: one vLLM engine per GPU set.

The installed vLLM's offline ``LLM`` refuses ``data_parallel_size`` > 1 in one process ("not
supported for single-process usage and may hang"); its offline pattern is one process per rank,
each seeing its own devices. ``DataParallelBackend`` does that: N worker processes (spawned, so
none inherits a CUDA context), worker i sees only its GPU set through ``CUDA_VISIBLE_DEVICES``
and builds its own engine (seed + i), and ``chat`` splits a batch into N contiguous shards and returns the
answers in the batch's order. Each request's seed is fixed before the split (data_gen/seeds.py),
so an answer does not depend on which engine drew it. ``close`` stops the workers and their engines.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
from contextlib import contextmanager, suppress
from typing import Sequence

from data_gen.errors import UserError


class DataParallelBackend:
    """``replicas`` engines of ``model``, each on ``devices_per_engine`` GPUs (tensor x pipeline
    parallel size). ``build(model, **kwargs)`` makes a worker's engine (data_gen.backends passes
    its VLLMBackend: this module imports nothing of backends);
    ``devices``: the GPUs to share out (default: the ones this process sees)."""

    def __init__(self, model: str, *, replicas: int, build, devices_per_engine: int = 1, seed: int = 0,
                 devices: Sequence[str] | None = None, **kwargs):
        self.model = model
        self.seed = seed
        self.enable_lora = bool(kwargs.get("enable_lora", False))
        sets = gpu_sets(list(devices) if devices is not None else visible_gpus(), replicas, devices_per_engine)
        spawn = multiprocessing.get_context("spawn")  # a forked child would inherit the parent's CUDA state
        self._workers: list | None = []
        atexit.register(self.close)  # before multiprocessing's own exit handler joins the workers
        for i, gpus in enumerate(sets):
            ours, theirs = spawn.Pipe()
            process = spawn.Process(target=_serve, args=(theirs, build, model, dict(kwargs, seed=seed + i)),
                                    name=f"vllm-replica-{i}")
            with _visible(gpus):  # the child sees only its own GPU set from its first instruction
                process.start()
            theirs.close()
            self._workers.append((process, ours))
        print(f"[engines] {model}: {replicas} data-parallel engines on GPU sets {sets}")
        try:
            self._replies()  # every engine started, or the first failure raised
        except BaseException:
            self.close()
            raise

    def chat(self, conversations, sampling, adapter: str | None = None, desc: str = "generating",
             seeds=None) -> list:
        from data_gen.seeds import seeds_for

        if not conversations:
            return []
        if self._workers is None:
            raise RuntimeError(f"the data-parallel engines of {self.model} were closed and then asked to generate; "
                               "ask Engines for them again (or hold an Engines.lazy backend)")
        # The seeds are fixed here, before sharding: an answer does not depend on its engine.
        seeds = list(seeds) if seeds is not None else seeds_for(self.seed, conversations, adapter)
        shards = contiguous_shards(list(zip(conversations, seeds)), len(self._workers))
        asked = []
        for i, ((_, conn), shard) in enumerate(zip(self._workers, shards)):
            if shard:  # the first shard's progress bar stands for all (N bars would interleave)
                conn.send(("chat", [c for c, _ in shard], sampling, adapter, desc if i == 0 else "",
                           [s for _, s in shard]))
                asked.append(i)
        return [c for shard in self._replies(asked) for c in shard]

    def _replies(self, which: list[int] | None = None) -> list:
        """One reply from each asked worker, in worker order; every reply is read before a
        failure is raised, so the workers stay in step for the next batch."""
        which = range(len(self._workers)) if which is None else which
        replies = []
        for i in which:
            process, conn = self._workers[i]
            try:
                replies.append(conn.recv())
            except EOFError:
                replies.append(("error", RuntimeError(
                    f"data-parallel engine {i} of {self.model} exited (code {process.exitcode}); its log is above")))
        failed = [value for kind, value in replies if kind == "error"]
        if failed:
            raise failed[0]
        return [value for _, value in replies]

    def close(self) -> None:
        """Stop every worker (each closes its engine first); a worker that does not stop in a
        minute is terminated."""
        workers, self._workers = self._workers, None
        atexit.unregister(self.close)
        for process, conn in workers or []:
            with suppress(BrokenPipeError, OSError):  # a worker already gone needs no message
                conn.send(("close",))
        for process, conn in workers or []:
            process.join(60)
            if process.is_alive():
                print(f"warning: {process.name} did not stop in 60 s; terminating it")
                process.terminate()
                process.join(10)
            conn.close()


def contiguous_shards(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` contiguous runs as even as possible (the first ones one longer);
    joined in order they give ``items`` back."""
    size, extra = divmod(len(items), parts)
    shards, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        shards.append(items[start:end])
        start = end
    return shards


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries, or every GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_sets(devices: list[str], replicas: int, per_engine: int) -> list[list[str]]:
    """``replicas`` disjoint runs of ``per_engine`` devices, in order."""
    needed = replicas * per_engine
    if needed > len(devices):
        raise UserError(f"data_parallel_size {replicas} x {per_engine} GPUs per engine (tensor_parallel_size x "
                        f"pipeline_parallel_size) needs {needed} GPUs; this process sees {len(devices)} "
                        f"({','.join(devices) or 'none'}); lower data_parallel_size, or set CUDA_VISIBLE_DEVICES "
                        "to more GPUs")
    return [devices[i * per_engine:(i + 1) * per_engine] for i in range(replicas)]


@contextmanager
def _visible(gpus: list[str]):
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _serve(conn, build, model: str, kwargs: dict) -> None:
    """A worker: build the engine, say "ready" (or send the failure), then answer shards until
    told to close or the parent is gone."""
    try:
        engine = build(model, **kwargs)
    except BaseException as exc:
        conn.send(("error", _portable(exc)))
        return
    conn.send(("ready", None))
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                break  # the parent is gone
            if message[0] == "close":
                break
            _, shard, sampling, adapter, desc, seeds = message
            try:
                conn.send(("ok", engine.chat(shard, sampling, adapter=adapter, desc=desc, seeds=seeds)))
            except Exception as exc:
                conn.send(("error", _portable(exc)))
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()


def _portable(exc: BaseException) -> BaseException:
    """The exception itself where it survives pickling (a UserError keeps its one line), else a
    RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
