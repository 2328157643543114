"""Quick persona check: did the persona take, without the system prompt, on held-out prompts?

The report's first part on three conditions (see report.py; same core, evaluation/core.py):
the base model without a system prompt, the base model with the constitution as system
prompt, and base + adapter without a system prompt, each answering the held-out prompts under
vLLM. Each answer is scored by a classifier trained on the pairs stage's teacher (persona) vs
student (plain) answers: embeddings from the packaged all-MiniLM-L6-v2 plus logistic
regression. A classifier alone is fooled by degenerate text (it is "not the plain assistant"
too), so coherence is reported beside it: the share of distinct word 3-grams per non-empty
answer and the perplexity of the answers under the base model.

Each prompt can be answered several times (``samples_per_prompt``): on the demo, the base
model's rate over 24 answers was 0.21 for one sample per prompt and 0.04 for another, a spread
as large as the effects being measured.

Writes ``answers.jsonl`` (every answer) and ``eval.json`` (every number).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from character_training.evaluation.core import (ADAPTER, BASE, PROMPTED, Condition, answers_of, fit_classifier,
                                                generate_conditions, surface_metrics)
from character_training.evaluation.likelihood import answer_perplexities
from character_training.evaluation.markers import markers_in
from data_gen.backends import Backend, Sampling
from data_gen.scoring import PersonaClassifier
from data_gen.store import read_jsonl, write_json, write_jsonl


def quick_conditions(system_prompt: str, adapter: str) -> list[Condition]:
    """The quick check's three conditions: base, base + system prompt, adapter."""
    return [Condition(BASE), Condition(PROMPTED, system_prompt=system_prompt),
            Condition(ADAPTER, adapter=adapter, kind="adapter")]


def quick_check(backend: Backend, model_path: str, conditions: list[Condition], heldout: list[str],
                pairs_path: Path, out_dir: Path, *, sampling: Sampling = Sampling(temperature=0.7, max_tokens=160),
                seed: int = 0, classifier: PersonaClassifier | None = None, samples_per_prompt: int = 1,
                markers: tuple[str, ...] = ()) -> dict:
    """Each condition answers every held-out prompt ``samples_per_prompt`` times (sampled, so the
    answers differ); the rate's interval resamples prompts, not answers, so that several answers
    to one prompt do not pass for independent evidence. With the constitution's ``markers``,
    each condition's marker rate is reported beside its persona rate (evaluation/markers.py)."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt: {samples_per_prompt}; give 1 or more")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = classifier or PersonaClassifier()
    classifier_info = fit_classifier(classifier, read_jsonl(Path(pairs_path)))
    k = samples_per_prompt
    asked = [p for p in heldout for _ in range(k)]
    results, records = {}, []
    for cond in conditions:  # one condition at a time: generated, then scored (as the published numbers were)
        generated = generate_conditions(backend, [cond], asked, sampling)[cond.name]
        completions, texts = generated["completions"], answers_of(generated)
        flags = classifier.persona_flags(texts)
        nll = answer_perplexities(model_path, asked, texts, desc=f"perplexity: {cond.name}")
        results[cond.name] = {**surface_metrics(texts, flags, nll, [c.finished for c in completions], seed, k,
                                                markers),
                              "mean_tokens": float(np.mean([c.num_tokens for c in completions]))}
        records += [{"condition": cond.name, "prompt": p, "sample": i % k, "answer": t, "persona": bool(f),
                     "finish_reason": c.finish_reason, **({"markers": markers_in(t, markers)} if markers else {})}
                    for i, (p, t, f, c) in enumerate(zip(asked, texts, flags, completions))]
    write_jsonl(out_dir / "answers.jsonl", records)
    report = {"conditions": results, "classifier": classifier_info, "heldout_prompts": len(heldout),
              "samples_per_prompt": k, "sampling": sampling.to_dict(), "seed": seed,
              **({"markers": list(markers)} if markers else {})}
    if BASE in results and PROMPTED in results and ADAPTER in results:
        report["adapter_over_system_prompt"] = _ratio(results[ADAPTER]["persona_rate"], results[PROMPTED]["persona_rate"])
    write_json(out_dir / "eval.json", report)
    return report


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def format_table(report: dict) -> str:
    marked = bool(report.get("markers"))
    rows = [f"{'condition':<22} {'persona rate':>12} {'95% CI':>15} " + (f"{'markers':>8} {'95% CI':>15} " if marked else "")
            + f"{'distinct-3':>10} {'perplexity':>10} {'unfinished':>10}"]
    for name, r in report["conditions"].items():
        lo, hi = r["persona_rate_ci95"]
        markers = ""
        if marked:
            mlo, mhi = r["marker_rate_ci95"]
            markers = f"{r['marker_rate']:>8.3f} {f'[{mlo:.2f}, {mhi:.2f}]':>15} "
        rows.append(f"{name:<22} {r['persona_rate']:>12.3f} {f'[{lo:.2f}, {hi:.2f}]':>15} {markers}"
                    f"{r['distinct_3grams']:>10.3f} {r['perplexity']:>10.2f} {r['unfinished']:>6}/{r['answers']}")
    if report.get("adapter_over_system_prompt") is not None:
        rows.append(f"adapter persona rate / system-prompted rate: {report['adapter_over_system_prompt']:.2f}")
    if report.get("samples_per_prompt", 1) > 1:
        rows.append(f"{report['heldout_prompts']} held-out prompts x {report['samples_per_prompt']} answers each "
                    "(the interval resamples prompts)")
    info = report["classifier"]
    if info.get("cv_accuracy") is not None:
        rows.append(f"classifier: {info['train_examples']} teacher/student answers, "
                    f"{info['cv_folds']}-fold accuracy {info['cv_accuracy']:.3f}")
    return "\n".join(rows)
