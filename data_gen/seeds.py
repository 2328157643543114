"""Per-request seeds: an answer depends on its own request, never on the batch it shares.

vLLM seeded only at the engine draws each answer from one stream shared by every request in a
step, so the same request got another answer when the batch size, the order, a resume or an
earlier stage on the same engine changed what ran beside it. Here every request carries its
own seed (vLLM's ``SamplingParams(seed=...)``; the ``seed`` field of an OpenAI-compatible
request), derived from:

- the run's seed (the recipe's ``seed``),
- the request's messages less its system messages, and
- which sample of that request this is (its occurrence: the n-th identical request of a stage
  is the n-th sample, so best-of-n answers still differ).

The system prompt and the adapter are left out on purpose: the same user message and sample
index get the same seed under every condition of an evaluation (base, base + system prompt,
base + adapter) and for a stage's teacher and student. These are common random numbers: a
comparison between conditions is then paired by prompt and by draw.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Sequence

SEED_BITS = 31  # vLLM and OpenAI-compatible servers take a non-negative 32-bit int


def request_seed(run_seed: int, conversation: Sequence[dict], occurrence: int) -> int:
    """The seed of the ``occurrence``-th (1-based) sample of ``conversation``."""
    said = [{"role": m["role"], "content": m["content"]} for m in conversation if m.get("role") != "system"]
    payload = json.dumps([run_seed, said, occurrence], sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(payload.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & ((1 << SEED_BITS) - 1)


def _same_request(conversation: Sequence[dict], adapter: str | None = None, extra=None) -> str:
    """What makes two requests the same request (whose repeats are further samples): its whole
    conversation, system prompt included, its adapter, and anything else given."""
    payload = {"adapter": adapter, "messages": list(conversation), "extra": extra}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def seeds_for(run_seed: int, conversations: Sequence[Sequence[dict]], adapter: str | None = None,
              seen: Counter | None = None) -> list[int]:
    """One seed per conversation. ``seen`` counts the requests made before (a stage's cache
    keeps it across calls); without it, occurrences count from this call alone, so the same
    call gives the same answers whatever was asked of the engine before it."""
    seen = Counter() if seen is None else seen
    seeds = []
    for conversation in conversations:
        key = _same_request(conversation, adapter)
        seen[key] += 1
        seeds.append(request_seed(run_seed, conversation, seen[key]))
    return seeds
