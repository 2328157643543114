"""The evaluation core shared by the quick check (quick.py) and the full report (report.py):
the conditions a model is asked under, how their answers are generated, the persona scorer
(cross-fitted on the evaluation's own base and system-prompted answers), the surface metrics of
a condition's answers, the bootstrap, and the paired differences between conditions.

Also the parts a report keeps between runs (``input_key``, ``kept_part``, ``forget_stale``):
the full report and the algebra report reuse what a killed or repeated run computed already.

The log-likelihood scorer the perplexities come from is in likelihood.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from character_training.config.layout import PARTS
from character_training.config.markers import marker_flags
from character_training.evaluation.paired import paired_difference
from data_gen.backends import Backend, Sampling
from data_gen.filters import distinct_3gram_share

BASE, PROMPTED, ADAPTER, STEERED = "base", "base+system_prompt", "adapter", "base | steered"


@dataclass(frozen=True)
class Condition:
    """One way of asking the model: a system prompt or none, an adapter or none, an
    adversarial suffix on the user's message, or (``prefill``) a conversation whose first
    turn the base model wrote."""
    name: str
    system_prompt: str | None = None
    adapter: str | None = None
    suffix: str | None = None
    prefill: bool = False
    kind: str = "plain"  # plain | adapter | adversarial | prefill | steered

    def conversation(self, prompt: str) -> list[dict]:
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        text = f"{prompt}\n\n{self.suffix}" if self.suffix else prompt
        return head + [{"role": "user", "content": text}]


def bootstrap_interval(values: np.ndarray, seed: int = 0, resamples: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


def surface_metrics(texts: list[str], flags: np.ndarray, nll: list[tuple[float, int]], finished: list[bool],
                    seed: int, samples_per_prompt: int = 1, markers: tuple[str, ...] = ()) -> dict:
    """A condition's persona rate with its 95% interval, and coherence beside it: distinct word
    3-grams over the non-empty answers (an empty answer is counted in ``empty``, not scored as
    perfectly varied), the perplexity of the answers (token-weighted), unfinished answers.

    ``texts`` hold ``samples_per_prompt`` consecutive answers per prompt: the interval resamples
    prompts (the mean flag of each prompt's answers), so that several answers to one prompt
    do not pass for independent evidence.

    With ``markers`` (the constitution's), the share of answers that carry one of them is
    reported beside the persona rate, with its interval (config/markers.py)."""
    flags = np.asarray(flags, dtype=float)
    tokens = sum(n for _, n in nll)
    spoken = [t for t in texts if t]
    out = {**_rate("persona_rate", flags, seed, samples_per_prompt),
           "distinct_3grams": float(np.mean([distinct_3gram_share(t) for t in spoken])) if spoken else float("nan"),
           "perplexity": math.exp(sum(v for v, _ in nll) / tokens) if tokens else float("nan"),
           "unfinished": sum(not f for f in finished), "empty": len(texts) - len(spoken), "answers": len(texts)}
    if markers:
        out.update(_rate("marker_rate", marker_flags(texts, markers).astype(float), seed, samples_per_prompt))
    return out


def _rate(name: str, flags: np.ndarray, seed: int, samples_per_prompt: int) -> dict:
    """{name: the mean, name_ci95: its interval, resampling prompts}."""
    lo, hi = bootstrap_interval(flags.reshape(-1, samples_per_prompt).mean(axis=1), seed=seed)
    return {name: float(flags.mean()) if len(flags) else float("nan"), f"{name}_ci95": [lo, hi]}


def generate_conditions(backend: Backend, conditions: list[Condition], prompts: list[str],
                        sampling: Sampling, samples_per_prompt: int = 1) -> dict[str, dict]:
    """{condition: {"conversations", "completions"}}, one backend request per condition, in
    the conditions' order; prefill conditions come last: each continues a conversation whose
    first assistant turn is the base model's answer to the previous prompt. ``prompts`` hold
    each prompt ``samples_per_prompt`` times in a row: the previous prompt is the one before
    that run."""
    results: dict[str, dict] = {}
    for cond in [c for c in conditions if not c.prefill]:
        conversations = [cond.conversation(p) for p in prompts]
        results[cond.name] = {"conversations": conversations,
                              "completions": backend.chat(conversations, sampling, adapter=cond.adapter,
                                                          desc=f"eval: {cond.name}")}
    prefill = [c for c in conditions if c.prefill]
    if prefill:
        base_answers = [c.text.strip() for c in results[BASE]["completions"]]
        n, k = len(prompts), samples_per_prompt
        conversations = [[{"role": "user", "content": prompts[(i - k) % n]},
                          {"role": "assistant", "content": base_answers[(i - k) % n]},
                          {"role": "user", "content": prompts[i]}] for i in range(n)]
        for cond in prefill:
            results[cond.name] = {"conversations": conversations,
                                  "completions": backend.chat(conversations, sampling, adapter=cond.adapter,
                                                              desc=f"eval: {cond.name}")}
    return results


def answers_of(generated: dict) -> list[str]:
    """A condition's answers, stripped: what is classified, scored and written."""
    return [c.text.strip() for c in generated["completions"]]


# ------------------------------------------------------------------ the scorer and paired differences

FOLDS = 2


def cross_fitted_flags(classifier: Callable, texts: dict[str, list[str]], asked: list[str],
                       prompts: list[str], persona: str = PROMPTED,
                       plain: str = BASE) -> tuple[dict[str, np.ndarray], dict]:
    """({condition: persona flags}, the scorer's summary). Prompt i is in fold i % FOLDS; the
    answers to a fold's prompts are scored by a classifier fitted on the other folds' ``plain``
    (base) and ``persona`` (system-prompted) answers, and its accuracy is measured on this fold's."""
    fold_of = {p: i % FOLDS for i, p in enumerate(prompts)}
    folds = np.array([fold_of[p] for p in asked])
    flags = {name: np.zeros(len(asked)) for name in texts}
    correct, scored, fitted = 0, 0, []
    for fold in range(FOLDS):
        train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        if not len(test):
            continue
        scorer = classifier()
        fitted.append(scorer.fit([texts[persona][i] for i in train], [texts[plain][i] for i in train]))
        for name in texts:
            flags[name][test] = scorer.persona_flags([texts[name][i] for i in test])
        correct += int(flags[persona][test].sum() + (1 - flags[plain][test]).sum())
        scored += 2 * len(test)
    return flags, {"fitted_on": f"this evaluation's {plain} (plain) and {persona} (persona) answers, "
                                f"cross-fitted over {FOLDS} folds of prompts",
                   "heldout_accuracy": correct / scored if scored else None,
                   "train_examples": [f["train_examples"] for f in fitted]}


def answer_metrics(texts: list[str], flags: np.ndarray, markers: tuple[str, ...] = ()) -> dict:
    """One value per answer of each metric the paired differences compare: the persona flag, the
    marker flag (None without markers) and the distinct 3-gram share (an empty answer: 0)."""
    return {"persona_rate": flags,
            "marker_rate": marker_flags(texts, markers).astype(float) if markers else None,
            "distinct_3grams": np.array([distinct_3gram_share(t) if t else 0.0 for t in texts])}


def paired_comparisons(per_answer: dict, idx: np.ndarray, comparisons, k: int, seed: int,
                       adapter: str | None = None) -> dict:
    """Paired differences (first - second) of each comparison, for each metric of ``per_answer``
    ({condition: {metric: one value per answer}}), over the answers ``idx`` (prompt-major, ``k``
    a prompt); whether the scorer measures the persona here (the system prompt's rate above the
    base model's), and then ``adapter``'s rate over the system prompt's."""
    paired = {}
    for a, b in comparisons:
        if a in per_answer and b in per_answer:
            paired[f"{a} - {b}"] = {metric: paired_difference(values[idx], per_answer[b][metric][idx],
                                                              samples_per_prompt=k, seed=seed)
                                    for metric, values in per_answer[a].items() if values is not None}
    out = {"paired": paired}
    reference = paired.get(f"{PROMPTED} - {BASE}", {}).get("persona_rate")
    if reference is not None:
        out["measurable"] = bool(reference["above_zero"])
        if out["measurable"] and adapter in per_answer:
            rate = {n: float(per_answer[n]["persona_rate"][idx].mean()) for n in (adapter, PROMPTED)}
            out["adapter_over_system_prompt"] = rate[adapter] / rate[PROMPTED] if rate[PROMPTED] else None
    return out


# ------------------------------------------------------------------ parts kept between runs



def input_key(*parts) -> str:
    """A short hash of what a part is computed from."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def kept_part(out: Path, name: str, key: str, compute: Callable[[], dict], needs: Path | None = None) -> dict:
    """A part computed outside the generation cache (perplexities, persona vectors, projections),
    kept in OUT/parts/NAME.json with its inputs' key and reused while the key holds. ``needs``: a
    file ``compute`` writes beside the value (persona vectors' tensors); when it is missing, the
    saved value is not reused."""
    from data_gen.store import write_json

    path = Path(out) / PARTS / f"{name}.json"
    if path.is_file() and (needs is None or Path(needs).exists()):
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "value": value})
    return value


def forget_stale(out: Path, inputs: dict, caches: tuple[str, ...], message: str, log) -> None:
    """Caches and parts are keyed by adapter *paths*: an adapter retrained in place (or another
    model) must not be answered from them. ``inputs`` (the model, the adapters' weight hashes) are
    recorded in OUT/parts/inputs.json; when they differ from the last run's, the ``caches`` files
    and the parts go, and ``message`` is logged."""
    from data_gen.store import write_json

    path = Path(out) / PARTS / "inputs.json"
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")) != inputs:
        log(message)
        for name in caches:
            (Path(out) / name).unlink(missing_ok=True)
        shutil.rmtree(Path(out) / PARTS, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, inputs)
