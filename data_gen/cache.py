"""A generation cache that makes every stage resumable.

``CachedBackend`` wraps any backend. Each request is keyed by what determines its answer (model,
adapter, conversation, sampling) and by its occurrence: the n-th identical request of a stage
is a different sample from the first, so repeated requests (best-of-n) keep distinct answers.
Requests go to the backend in chunks; each finished chunk is appended to a JSONL file and
flushed to disk before the next one starts. A stage killed mid-generation and run again
answers everything already generated from the file, sends only the rest, and so neither loses
nor duplicates work. Stages replay their requests in the same order, so the n-th occurrence of
a request maps to the same cached answer on every run, including requests built from earlier
(cached) answers.

Each request's sampling seed comes from its user-side messages and its occurrence (see
data_gen/seeds.py), never from its chunk or batch: a request generated after a resume, alone or
in another chunk, gets the answer it would have got in the first run.

A line cut short by a kill is ignored on reading (it is simply generated again).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

from data_gen.backends import Backend, Completion, Conversation, Sampling
from data_gen.seeds import request_seed

CACHE_FILE = "cache.jsonl"


def request_key(model: str, adapter: str | None, conversation: Conversation, sampling: Sampling) -> str:
    payload = {"model": model, "adapter": adapter, "messages": conversation, "sampling": sampling.to_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class CachedBackend:
    """A backend whose answers persist in ``path`` as they are made (see the module docstring)."""

    def __init__(self, backend: Backend, path: str | Path, chunk_size: int = 256):
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.backend = backend
        self.path = Path(path)
        self.chunk_size = chunk_size
        self._entries: dict[str, Completion] = {}
        self._occurrences: Counter = Counter()
        self.hits = 0
        self.misses = 0
        self.torn_lines = 0
        if self.path.is_file():
            self._load()

    @property
    def model(self) -> str:
        return self.backend.model

    @property
    def seed(self) -> int:
        """The run's seed, which every request's seed is derived from (the backend's; 0 if it has none)."""
        return getattr(self.backend, "seed", None) or 0

    def __getattr__(self, name):  # anything else (close, enable_lora, ...) is the backend's
        return getattr(self.backend, name)

    def _load(self) -> None:
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    self._entries[record["key"]] = Completion(
                        text=record["text"], finish_reason=record["finish_reason"],
                        num_tokens=record["num_tokens"], first_logprobs=record.get("first_logprobs"))
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.torn_lines += 1  # the last line of a killed write

    def _append(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            torn = False
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            # A killed write left a line without its end: close it, so that it alone is lost
            # (counted as torn on the next load) and not the first record written after it.
            text = ("\n" if torn else "") + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling,
             adapter: str | None = None, desc: str = "generating") -> list[Completion]:
        keys, seeds = [], []
        for conversation in conversations:
            base = request_key(self.model, adapter, list(conversation), sampling)
            self._occurrences[base] += 1
            keys.append(f"{base}-{self._occurrences[base]}")
            seeds.append(request_seed(self.seed, conversation, self._occurrences[base]))
        missing = [i for i, k in enumerate(keys) if k not in self._entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing and len(missing) < len(keys):
            print(f"{desc}: {len(keys) - len(missing)} of {len(keys)} answers from the cache ({self.path})",
                  flush=True)
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start:start + self.chunk_size]
            label = desc if len(missing) <= self.chunk_size else (
                f"{desc} [{start + len(chunk)}/{len(missing)}]")
            completions = self.backend.chat([conversations[i] for i in chunk], sampling, adapter=adapter, desc=label,
                                            seeds=[seeds[i] for i in chunk])
            if len(completions) != len(chunk):
                raise RuntimeError(f"backend returned {len(completions)} answers for {len(chunk)} requests")
            records = []
            for i, c in zip(chunk, completions):
                self._entries[keys[i]] = c
                records.append({"key": keys[i], "model": self.model, "text": c.text, "finish_reason": c.finish_reason,
                                "num_tokens": c.num_tokens, "first_logprobs": c.first_logprobs})
            self._append(records)
        return [self._entries[k] for k in keys]

    def stats(self) -> dict:
        return {"cache_hits": self.hits, "generated": self.misses, "torn_lines": self.torn_lines}
