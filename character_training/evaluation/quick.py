"""Quick persona check: did the persona take, without the system prompt, on prompts training
never saw? Is the adapter's rate different from the system prompt's by more than the noise?

Three conditions answer the same prompts under vLLM: the base model without a system prompt,
the base model with the constitution as system prompt, and base + adapter without one (more
adapters, e.g. two recipes' adapters, are more conditions of the same check, each compared with
the others as paired differences). Every
(prompt, sample) gets the same sampling seed under every condition (data_gen/seeds.py), so the
conditions are compared as paired differences over prompts (evaluation/paired.py).

Two prompt sets, reported apart:

- ``heldout``: the constitution's held-out prompts (the model's expansions and the seed
  questions the prompts stage set aside, its clean core): does the persona show where its
  traits ask for it?
- ``general``: the shipped general prompts (evaluation/capability.py ``general_prompts``, not
  derived from any constitution): does it show where no trait asked for it?

Both are checked against the run's training texts first (evaluation/contamination.py): a
near-duplicate of a training prompt or document is dropped and counted.

The scorer is a classifier (all-MiniLM-L6-v2 embeddings + logistic regression) fitted on this
evaluation's own base (plain) and system-prompted (persona) answers, cross-fitted over two
folds of prompts: answers to one fold's prompts are scored by the classifier fitted on the
other fold's. It never sees the pairs stage's answers (which the pairs stage's classifier
filtered and the adapter learned), and its accuracy on the held-out fold is reported beside
every rate. The constitution's marker words are counted beside it, as evidence no model
produced. Where the system prompt's persona rate is not above the base model's (the paired
interval does not exclude zero), the scorer does not measure this persona: the report says
so and prints no ratio. Coherence is reported beside the rates (distinct word 3-grams,
perplexity under the base model, unfinished answers).

Writes ``answers.jsonl`` (every answer) and ``eval.json`` (every number).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from character_training.evaluation.contamination import check_contamination
from character_training.evaluation.core import (ADAPTER, BASE, PROMPTED, Condition, answer_metrics, answers_of,
                                                cross_fitted_flags, generate_conditions, paired_comparisons,
                                                surface_metrics)
from character_training.evaluation.likelihood import answer_perplexities
from character_training.config.markers import markers_in
from data_gen.backends import Backend, Sampling
from data_gen.store import write_json, write_jsonl

# The quick check's comparisons, each a paired difference over prompts: first minus second.
def quick_conditions(system_prompt: str, adapter: str, also: dict[str, str] | None = None) -> list[Condition]:
    """The quick check's conditions: base, base + system prompt, the adapter, then each of
    ``also`` ({name: adapter directory}) under its own name."""
    also = also or {}
    taken = {BASE, PROMPTED, ADAPTER} & set(also)
    if taken:
        raise ValueError(f"adapter name {sorted(taken)[0]!r} is taken by a quick-check condition; name it otherwise")
    return [Condition(BASE), Condition(PROMPTED, system_prompt=system_prompt),
            Condition(ADAPTER, adapter=adapter, kind="adapter"),
            *(Condition(name, adapter=path, kind="adapter") for name, path in also.items())]


def comparisons_of(conditions: list[Condition]) -> list[tuple[str, str]]:
    """Which paired differences the check reports: each adapter against the system prompt and
    against base, the system prompt against base, and each adapter against every later one."""
    adapters = [c.name for c in conditions if c.adapter]
    head, rest = adapters[:1], adapters[1:]
    return ([(a, b) for a in head for b in (PROMPTED, BASE)] + [(PROMPTED, BASE)]
            + [(a, b) for a in rest for b in (PROMPTED, BASE)]
            + [(a, b) for i, a in enumerate(adapters) for b in adapters[i + 1:]])


def quick_check(backend: Backend, model_path: str, conditions: list[Condition], prompt_sets: dict[str, list[str]],
                training_texts: list[str], out_dir: Path, *,
                sampling: Sampling = Sampling(temperature=0.7, max_tokens=160), seed: int = 0,
                classifier: Callable | None = None, samples_per_prompt: int = 1,
                markers: tuple[str, ...] = ()) -> dict:
    """``prompt_sets``: {"heldout": [...], "general": [...]} (a set may be empty); each prompt
    is answered ``samples_per_prompt`` times under every condition. ``classifier``: a factory of
    persona classifiers (``fit(persona, plain)``, ``persona_flags(texts)``; default
    data_gen.scoring.PersonaClassifier)."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt: {samples_per_prompt}; give 1 or more")
    if classifier is None:
        from data_gen.scoring import PersonaClassifier as classifier
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = samples_per_prompt
    sets, contamination = {}, {}
    for name, prompts in prompt_sets.items():
        checked = check_contamination(list(dict.fromkeys(prompts)), training_texts)
        sets[name], contamination[name] = checked.kept, {**checked.counts(), "dropped_prompts": checked.dropped}
    prompts = [p for name in sets for p in sets[name]]
    if not prompts:
        raise ValueError("no evaluation prompt is left after the contamination check")
    asked = [p for p in prompts for _ in range(k)]
    names = [c.name for c in conditions]
    comparisons = comparisons_of(conditions)
    generated = {}
    for cond in conditions:  # one condition at a time, in the conditions' order
        generated.update(generate_conditions(backend, [cond], asked, sampling, k))
    texts = {name: answers_of(generated[name]) for name in names}
    flags, scorer = cross_fitted_flags(classifier, texts, asked, prompts)
    per_answer = {name: answer_metrics(texts[name], flags[name], markers) for name in names}
    nll = {name: answer_perplexities(model_path, asked, texts[name], desc=f"perplexity: {name}") for name in names}

    report_sets, records = {}, []
    for set_name, set_prompts in sets.items():
        members = set(set_prompts)
        idx = np.array([i for i, p in enumerate(asked) if p in members], dtype=int)
        if not len(idx):
            continue
        results = {}
        for name in names:
            completions = generated[name]["completions"]
            results[name] = {**surface_metrics([texts[name][i] for i in idx], flags[name][idx], [nll[name][i] for i in idx],
                                               [completions[i].finished for i in idx], seed, k, markers),
                             "mean_tokens": float(np.mean([completions[i].num_tokens for i in idx]))}
        report_sets[set_name] = {"prompts": len(set_prompts), "conditions": results,
                                 **paired_comparisons(per_answer, idx, comparisons, k, seed, adapter=ADAPTER)}
    for name in names:
        completions = generated[name]["completions"]
        records += [{"condition": name, "set": _set_of(p, sets), "prompt": p, "sample": i % k, "answer": t,
                     "persona": bool(f), "finish_reason": c.finish_reason,
                     **({"markers": markers_in(t, markers)} if markers else {})}
                    for i, (p, t, f, c) in enumerate(zip(asked, texts[name], flags[name], completions))]
    write_jsonl(out_dir / "answers.jsonl", records)
    report = {"sets": report_sets, "scorer": scorer, "contamination": contamination, "samples_per_prompt": k,
              "sampling": sampling.to_dict(), "seed": seed, **({"markers": list(markers)} if markers else {})}
    write_json(out_dir / "eval.json", report)
    return report


def _set_of(prompt: str, sets: dict[str, list[str]]) -> str:
    return next(name for name, prompts in sets.items() if prompt in prompts)


def format_table(report: dict) -> str:
    """Each set's conditions, then the paired differences and the scorer."""
    marked = bool(report.get("markers"))
    k = report.get("samples_per_prompt", 1)
    rows = []
    for set_name, found in report["sets"].items():
        rows.append(f"[{set_name}] {found['prompts']} prompts x {k} answers")
        rows.append(f"{'condition':<22} {'persona rate':>12} {'95% CI':>15} "
                    + (f"{'markers':>8} {'95% CI':>15} " if marked else "")
                    + f"{'distinct-3':>10} {'perplexity':>10} {'unfinished':>10}")
        for name, r in found["conditions"].items():
            lo, hi = r["persona_rate_ci95"]
            cells = ""
            if marked:
                mlo, mhi = r["marker_rate_ci95"]
                cells = f"{r['marker_rate']:>8.3f} {f'[{mlo:.2f}, {mhi:.2f}]':>15} "
            rows.append(f"{name:<22} {r['persona_rate']:>12.3f} {f'[{lo:.2f}, {hi:.2f}]':>15} {cells}"
                        f"{r['distinct_3grams']:>10.3f} {r['perplexity']:>10.2f} {r['unfinished']:>6}/{r['answers']}")
        rows.append(f"paired differences over prompts (95% CI; mde: the smallest difference {found['prompts']} "
                    "prompts detect):")
        for comparison, metrics in found["paired"].items():
            cells = "; ".join(f"{metric.replace('_rate', '')} {d['difference']:+.3f} "
                              f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]{_mark(d)} mde {d['mde']:.2f}"
                              for metric, d in metrics.items())
            rows.append(f"  {comparison:<32} {cells}")
        if not found.get("measurable", True):
            rows.append("  the scorer does not separate base from the system prompt on these prompts (their paired "
                        "difference is not above zero): this persona's rate is not measurable with it; no ratio")
        elif found.get("adapter_over_system_prompt") is not None:
            rows.append(f"  adapter persona rate / system-prompted rate: {found['adapter_over_system_prompt']:.2f}")
    scorer = report["scorer"]
    if scorer.get("heldout_accuracy") is not None:
        rows.append(f"scorer: {scorer['fitted_on']}; accuracy on the held-out fold {scorer['heldout_accuracy']:.3f}")
    dropped = {name: c["dropped"] for name, c in report["contamination"].items()}
    rows.append("contamination: " + ", ".join(f"{name} {n} dropped of {report['contamination'][name]['checked']}"
                                              for name, n in dropped.items()))
    return "\n".join(rows)


def _mark(d: dict) -> str:
    """'*' where the interval excludes zero."""
    return "*" if d["above_zero"] or d["below_zero"] else ""
