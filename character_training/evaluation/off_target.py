"""Off-target trait vectors (config/off_target.py's bank) and screening scores.

Extraction, per trait: the base model answers the trait's prompts and open questions twice,
with the trait's system prompt and without (one seed per question, from its text alone: the two
sides and every later condition draw with common random numbers). The trait vector, per layer,
is the mean residual-stream activation over the trait-prompted answers' tokens minus the mean
over the plain answers' (persona_vectors.from_activations), on the prompts alone: the open
questions are never fitted on. Both sides are read by the base model with NO system prompt,
[user: question] + answer: the vector says what the answer does, not that a system prompt was
there, and it is read the way an adapter's answers and the training pairs are read later.

A projection is in trait units: an activation minus the plain mean, onto the unit trait
vector at the trait's best layer, over the vector's norm there; the plain answers average 0 on
the prompts and the trait-prompted ones 1.

An extraction is kept in ``cache_dir/NAME-KEY/`` (the vectors, the answers, the base model's
projections), KEY from the model, the trait's text, the sampling, the seed: a second check of
another adapter, or a training stage's screening, reads it back instead of generating again.

Screening (``screening_scores``): an example's score on a trait is the projection of its
teacher answer minus that of its student answer, both read by the base model after the
example's context without system messages, in trait units.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from character_training.config.off_target import Trait
from character_training.evaluation.core import input_key
from character_training.evaluation.persona_vectors import PersonaVectors, from_activations, project
from data_gen.backends import Backend, Sampling
from data_gen.seeds import seeds_for
from data_gen.store import write_json

EXTRACTION = "off-target-1"  # bump when what an extraction holds, or how it is made, changes
PROMPT, OPEN = "prompt", "open_question"
ANSWERS_FILE = "extraction.json"


class ActivationReader(Protocol):
    """Mean hidden state over each answer's tokens, every layer: [L + 1, n, hidden], read by the
    base model (``adapter`` None) or with the adapter, after each conversation."""

    def __call__(self, adapter: str | None, conversations: list[list[dict]], answers: list[str]) -> torch.Tensor: ...


class ModelReader:
    """The ActivationReader of a transformers model (float32): the base model is loaded once, an
    adapter's model when asked and dropped when another is."""

    def __init__(self, model_path: str, batch_size: int = 8):
        self.model_path, self.batch_size, self.loaded = model_path, batch_size, {}

    def __call__(self, adapter, conversations, answers):
        from character_training.evaluation.persona_vectors import load_model, response_activations

        if adapter not in self.loaded:
            self.loaded = {k: v for k, v in self.loaded.items() if k is None}  # keep the base, drop other adapters
            self.loaded[adapter] = load_model(self.model_path, adapter)
        model, tokenizer = self.loaded[adapter]
        return response_activations(model, tokenizer, conversations, answers, batch_size=self.batch_size,
                                    desc=f"off-target activations ({adapter or 'base'})")


def questions(trait: Trait) -> list[tuple[str, str]]:
    """[(kind, question)]: the trait's prompts, then its open questions."""
    return [(PROMPT, q) for q in trait.prompts] + [(OPEN, q) for q in trait.open_questions]


def question_seeds(trait: Trait, seed: int) -> list[int]:
    """One seed per question, from its text alone: the same under every condition."""
    return seeds_for(seed, [[{"role": "user", "content": q}] for _, q in questions(trait)])


def extraction_key(trait: Trait, model: str, sampling: Sampling, seed: int) -> str:
    return input_key(EXTRACTION, model, trait.as_dict(), sampling.to_dict(), seed)


@dataclass
class TraitExtraction:
    trait: Trait
    key: str
    vectors: PersonaVectors
    plain: list[str]                 # the base model's answers, no system prompt (questions' order)
    prompted: list[str]              # ... with the trait's system prompt
    unfinished: dict[str, int]
    plain_projection: list           # the base model on its plain answers, trait units (None: empty answer)
    prompted_projection: list

    @property
    def layer(self) -> int:
        return self.vectors.best_layer

    @property
    def norm(self) -> float:
        return float(self.vectors.vectors[self.layer].norm())

    def projection(self, activations: torch.Tensor) -> np.ndarray:
        """[n]: each activation's projection at the best layer, in trait units."""
        return project(activations, self.vectors)[self.layer].numpy().astype(np.float64) / max(self.norm, 1e-12)

    def summary(self) -> dict:
        sep = self.vectors.separation[self.layer]
        return {"key": self.key, "best_layer": self.layer, "separation": None if math.isnan(sep) else sep,
                "vector_norm": self.norm, "counts": self.vectors.counts, "unfinished": self.unfinished}


def conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def projections(reader: ActivationReader, adapter: str | None, conversations: list[list[dict]], answers: list[str],
                measure: Callable[[torch.Tensor], np.ndarray] | list) -> list:
    """Each answer's value by ``measure`` (or each of several measures, as a list per measure) of
    its activations; None for an empty answer (nothing to read)."""
    kept = [i for i, a in enumerate(answers) if a.strip()]
    measures = measure if isinstance(measure, list) else [measure]
    acts = reader(adapter, [conversations[i] for i in kept], [answers[i] for i in kept]) if kept else None
    out = []
    for m in measures:
        values = [None] * len(answers)
        for i, v in zip(kept, m(acts) if kept else []):
            values[i] = float(v)
        out.append(values)
    return out if isinstance(measure, list) else out[0]


# ------------------------------------------------------------------ extraction, kept between checks


def cached(trait: Trait, key: str, cache_dir: Path) -> TraitExtraction | None:
    path = Path(cache_dir) / f"{trait.name}-{key}"
    try:
        saved = json.loads((path / ANSWERS_FILE).read_text(encoding="utf-8"))
        vectors = PersonaVectors.load(path)
    except (OSError, ValueError):
        return None
    if saved.get("key") != key:
        return None
    return TraitExtraction(trait, key, vectors, saved["plain"], saved["prompted"], saved["unfinished"],
                           saved["plain_projection"], saved["prompted_projection"])


def ask_traits(backend: Backend, traits: list[Trait], sampling: Sampling, seed: int) -> dict[str, dict]:
    """{trait: {"plain": completions, "prompted": completions}}: two backend requests for all the
    traits (every question without a system prompt; every question with its trait's)."""
    plain = [conversation(q) for t in traits for _, q in questions(t)]
    prompted = [[{"role": "system", "content": t.system_prompt}, *conversation(q)] for t in traits for _, q in questions(t)]
    seeds = [s for t in traits for s in question_seeds(t, seed)]
    got = {side: backend.chat(convs, sampling, desc=f"off-target: {side}", seeds=seeds)
           for side, convs in (("plain", plain), ("prompted", prompted))}
    out, start = {}, 0
    for t in traits:
        n = len(questions(t))
        out[t.name] = {side: got[side][start:start + n] for side in got}
        start += n
    return out


def extract(trait: Trait, key: str, answers: dict, reader: ActivationReader, cache_dir: Path | None) -> TraitExtraction:
    """The trait's vectors from its answers (``ask_traits``), saved under ``cache_dir``."""
    kinds = [k for k, _ in questions(trait)]
    convs = [conversation(q) for _, q in questions(trait)]
    texts = {side: [c.text.strip() for c in answers[side]] for side in ("plain", "prompted")}
    fitted = {i for i, k in enumerate(kinds) if k == PROMPT}
    sides, read = {}, {}
    for side, text in texts.items():  # each side read once: the prompts' answers make the vector
        kept = [i for i in range(len(text)) if text[i]]
        if len([i for i in kept if i in fitted]) < 2:
            raise RuntimeError(f"off-target trait {trait.name}: {len(fitted) - len(set(kept) & fitted)} of "
                               f"{len(fitted)} {side} answers are empty; raise eval.max_tokens or check the model")
        read[side] = (kept, reader(None, [convs[i] for i in kept], [text[i] for i in kept]))
        sides[side] = read[side][1][:, [j for j, i in enumerate(kept) if i in fitted]]
    counts = {"prompts": len(fitted), "prompted": sides["prompted"].shape[1], "plain": sides["plain"].shape[1]}
    vectors = from_activations(sides["prompted"], sides["plain"], counts)
    made = TraitExtraction(trait, key, vectors, texts["plain"], texts["prompted"],
                           {side: sum(not c.finished for c in answers[side]) for side in texts}, [], [])
    for side, (kept, acts) in read.items():
        values = [None] * len(texts[side])
        for i, v in zip(kept, made.projection(acts)):
            values[i] = float(v)
        setattr(made, f"{side}_projection", values)
    if cache_dir is not None:
        path = Path(cache_dir) / f"{trait.name}-{key}"
        vectors.save(path)
        write_json(path / ANSWERS_FILE, {"key": key, "trait": trait.as_dict(), "plain": made.plain,
                                         "prompted": made.prompted, "unfinished": made.unfinished,
                                         "plain_projection": made.plain_projection,
                                         "prompted_projection": made.prompted_projection})
    return made


def extract_traits(traits: list[Trait], backend: Backend, reader: ActivationReader, cache_dir: Path | None, *,
                   model: str, sampling: Sampling, seed: int, release: Callable[[], None] | None = None,
                   log: Callable[[str], None] = print) -> dict[str, TraitExtraction]:
    """{trait: its extraction}, read from ``cache_dir`` where kept, else generated (``backend``;
    ``release`` frees the engine after) and read (``reader``)."""
    keys = {t.name: extraction_key(t, model, sampling, seed) for t in traits}
    found = {t.name: cached(t, keys[t.name], cache_dir) if cache_dir is not None else None for t in traits}
    missing = [t for t in traits if found[t.name] is None]
    if missing:
        log(f"[off-target] extracting {', '.join(t.name for t in missing)}"
            + (f" (kept: {', '.join(n for n, f in found.items() if f)})" if len(missing) < len(traits) else ""))
        answers = ask_traits(backend, missing, sampling, seed)
        if release is not None:
            release()
        found.update({t.name: extract(t, keys[t.name], answers[t.name], reader, cache_dir) for t in missing})
    return {t.name: found[t.name] for t in traits}


# ------------------------------------------------------------------ screening


def screening_scores(reader: ActivationReader, extractions: dict[str, TraitExtraction], contexts: list[list[dict]],
                     teacher: list[str], student: list[str]) -> dict[str, np.ndarray]:
    """{trait: [n]}: each example's teacher-minus-student projection in trait units (NaN where
    either answer is empty). ``contexts``: what precedes the answers; system messages are left out."""
    contexts = [[m for m in c if m.get("role") != "system"] for c in contexts]
    measures = [e.projection for e in extractions.values()]
    sides = [projections(reader, None, contexts, answers, measures) for answers in (teacher, student)]
    out = {}
    for j, name in enumerate(extractions):
        t, s = sides[0][j], sides[1][j]
        out[name] = np.array([a - b if a is not None and b is not None else np.nan for a, b in zip(t, s)])
    return out


def screened(scores: dict[str, np.ndarray], *, threshold: float | None = None,
             top_fraction: float | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """(the examples to drop [n] bool, {trait: how many it flags}). With ``threshold``: an example
    whose score on a trait is above it; with ``top_fraction``: one among the floor(top_fraction * n)
    highest scores on a trait (ties broken by order). Either way, flagged on any trait: dropped.
    An unscored (NaN) example is never flagged."""
    if (threshold is None) == (top_fraction is None):
        raise ValueError("give threshold or top_fraction")
    n = len(next(iter(scores.values()))) if scores else 0
    drop, per_trait = np.zeros(n, dtype=bool), {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=float)
        if threshold is not None:
            flagged = np.nan_to_num(values, nan=-np.inf) > threshold
        else:
            flagged = np.zeros(n, dtype=bool)
            k = math.floor(top_fraction * n + 1e-9)
            order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")
            flagged[[i for i in order[:k] if not np.isnan(values[i])]] = True
        per_trait[name] = int(flagged.sum())
        drop |= flagged
    return drop, per_trait
