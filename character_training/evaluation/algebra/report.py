"""Persona algebra, shown on behaviour: do composed, negated, scaled and orthogonalized persona
adapters act as their algebra says? (``character-training algebra``)

Two personas, A and B, each from its own run: its constitution (system prompt, markers), its
pairs (the teacher's persona answers against the student's plain ones) and its trained adapter.
The conditions (conditions.py: base, each system prompt, each adapter, A+B, scaled,
negated, orthogonalized, PEFT's sums, re-compressed) all answer the same prompts: both runs'
held-out prompts and the shipped general prompts, none of them in either run's training data
(the contamination check leaves out any that is, and says so). vLLM engines with LoRA, one per
adapter rank (``rank_groups``), answer every condition through the generation cache, so a killed
run resumes.

Per condition and persona: the persona rate by that persona's own classifier and the share of
answers with its markers, each with a 95% interval resampling
prompts; per condition, coherence (distinct 3-grams, perplexity under the base model); and the
projection of the condition's activations onto each persona's vector at its best layer, as a
ratio to that persona's system-prompt condition. ``analyses`` turns these into the report's
answers (additivity, interference, orthogonalization, negation, dose-response, exactness), each
with a paired bootstrap interval over prompts.

Writes OUT/algebra.json (every number), algebra.md, heatmap.png, dose_response.png and
answers.jsonl; OUT/cache.jsonl (every generation) and OUT/parts/ (persona vectors, perplexities,
projections) are reused by a rerun; OUT/adapters/ holds the built adapters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from character_training.errors import UserError
from character_training.evaluation.algebra.conditions import (PERSONAS, Spec, algebra_specs, build_adapters,
                                                              weight_check)
from character_training.evaluation.algebra.output import analyses, markdown_report, plot_report
from character_training.evaluation.core import (PARTS, Condition, answers_of, cross_fitted_flags, forget_stale,
                                                generate_conditions, input_key, kept_part, surface_metrics)
from character_training.evaluation.likelihood import answer_perplexities
from character_training.config.markers import markers_in
from character_training.config.eval_settings import EvalSettings
from character_training.util import file_sha256
from data_gen.backends import Backend, Sampling
from data_gen.store import write_json, write_jsonl

CACHE = "cache.jsonl"


@dataclass
class Persona:
    """One side of the algebra, as its run left it."""
    key: str                     # "A" or "B"
    name: str                    # the constitution's name
    system_prompt: str           # the teacher's: the constitution (and the run's answer hint)
    adapter: str                 # the run's final adapter
    pairs: list[dict]            # the run's teacher-vs-student pairs: its persona vector
    heldout: list[str]           # the run's held-out prompts
    markers: tuple[str, ...] = ()
    training_texts: dict[str, list[str]] = field(default_factory=dict)  # capability.training_texts_of_run
    recipe: str | None = None
    run_dir: str | None = None


def algebra_report(*, engine: Callable[[list[str]], Backend], model_path: str, personas: list[Persona],
                   out_dir: Path, sampling: Sampling, settings: EvalSettings = EvalSettings(), seed: int = 0,
                   classifier_factory: Callable[[], object] | None = None, release: Callable[[], None] = lambda: None,
                   chunk_size: int = 64, log: Callable[[str], None] = print) -> dict:
    """The whole report (see the module docstring). ``engine(adapter_dirs)`` gives a backend that
    serves those adapters (LoRA enabled at their rank), started when it is first asked, so that the
    persona vectors, computed before, have the memory to themselves; it is asked once per rank
    group and may release the engine it gave before. ``release`` is called once generation is
    done, before the model-side metrics."""
    from data_gen.cache import CachedBackend

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if [p.key for p in personas] != list(PERSONAS):
        raise ValueError(f"personas: give exactly {PERSONAS}, in that order")
    for p in personas:
        if not p.pairs:
            raise UserError(f"persona {p.key} ({p.name}): no teacher-vs-student pairs to take its persona vector "
                            f"from; run its recipe's pairs stage ({p.recipe or 'its recipe'})")
    prompts, sources, contamination = evaluation_prompts(personas, settings.general_prompts, log)
    _forget_stale(out, model_path, personas, log)
    specs = algebra_specs()
    adapters, operations, skipped = build_adapters(specs, {p.key: p.adapter for p in personas}, out / "adapters",
                                                   model_path, log)
    specs = [s for s in specs if s.name not in skipped]
    conditions = [_condition(s, personas, adapters) for s in specs]
    k = settings.samples_per_prompt
    asked = [p for p in prompts for _ in range(k)]  # each prompt k times in a row (answers are sampled)
    vectors = _persona_vectors(out, model_path, personas, log) if settings.persona_vectors else {}

    groups = rank_groups(conditions)
    log(f"[algebra] generating: {len(conditions)} conditions x {len(prompts)} prompts x {k}, in "
        + ", then ".join(f"{len(g)} at LoRA rank {r}" for r, g in groups))
    generated = {}
    for _, group in groups:  # one engine per rank: each LoRA token costs vLLM's CPU build in proportion to it
        backend = CachedBackend(engine(sorted({c.adapter for c in group if c.adapter})), out / CACHE,
                                chunk_size=chunk_size)  # started only if something is not in the cache
        generated.update(generate_conditions(backend, group, asked, sampling, k))
    release()

    texts = {c.name: answers_of(generated[c.name]) for c in conditions}
    flags, classifier_info = _cross_fitted(classifier_factory or _persona_classifier, texts, asked, prompts, personas)
    nll = kept_part(out, "answer_nll", input_key(model_path, asked, texts),
                    lambda: {name: answer_perplexities(model_path, asked, t, desc=f"perplexity: {name}")
                             for name, t in texts.items()})
    cells = _cells(specs, generated, texts, flags, nll, personas, adapters, seed, k)
    report = {"model": model_path, "seed": seed, "sampling": sampling.to_dict(),
              "settings": {"samples_per_prompt": k, "general_prompts": settings.general_prompts,
                           "persona_vectors": settings.persona_vectors},
              "personas": {p.key: {"name": p.name, "adapter": p.adapter, "recipe": p.recipe, "run_dir": p.run_dir,
                                   "markers": list(p.markers), "pairs": len(p.pairs), "heldout": len(p.heldout),
                                   "classifier": classifier_info[p.key]} for p in personas},
              "prompts": {"total": len(prompts), "general": sum(s == "general" for s in sources.values()),
                          "heldout": sum(s != "general" for s in sources.values()), "samples_per_prompt": k},
              "contamination": contamination, "skipped": skipped, "operations": operations,
              "weights": weight_check(specs, adapters), "conditions": cells}
    if vectors:
        report["projections"] = _projections(out, model_path, conditions, generated, vectors, seed, log)
        _add_projection_ratios(cells, report["projections"])
    per_prompt = _per_prompt(flags, texts, personas, k)
    report["analyses"] = analyses(cells, per_prompt, seed)
    write_jsonl(out / "answers.jsonl", _records(conditions, generated, asked, sources, texts, flags, personas, k))
    report["plots"] = plot_report(report, out)
    write_json(out / "algebra.json", report)
    (out / "algebra.md").write_text(markdown_report(report), encoding="utf-8")
    return report


def _persona_classifier():
    from data_gen.scoring import PersonaClassifier

    return PersonaClassifier()


def _cross_fitted(classifier_factory, texts: dict[str, list[str]], asked: list[str], prompts: list[str],
                  personas: list[Persona]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict]]:
    """({condition: {persona: flags}}, {persona: its scorer's summary}). Each persona's scorer is
    fitted on this report's own answers, base (plain) against that persona's system prompt
    (persona), cross-fitted over two folds of prompts (core.cross_fitted_flags): never on the
    run's pairs, which its pairs stage selected and its adapter learned."""
    flags: dict[str, dict[str, np.ndarray]] = {name: {} for name in texts}
    info = {}
    for p in personas:
        found, info[p.key] = cross_fitted_flags(classifier_factory, texts, asked, prompts,
                                                persona=f"{p.key} prompt", plain="base")
        for name, f in found.items():
            flags[name][p.key] = np.asarray(f, dtype=float)
    return flags, info


# ----------------------------------------------------------------------------------- prompts

def evaluation_prompts(personas: list[Persona], general: int, log) -> tuple[list[str], dict[str, str], dict]:
    """(the prompts every condition answers, {prompt: where it comes from}, the contamination check):
    both runs' held-out prompts, then up to ``general`` shipped general prompts. A prompt found in
    either run's training data (a near-duplicate or a quote: contamination.check_contamination) is left out."""
    from character_training.evaluation.capability import general_prompts
    from character_training.evaluation.contamination import check_contamination

    heldout: dict[str, list[str]] = {}
    for p in personas:
        for prompt in dict.fromkeys(p.heldout):
            heldout.setdefault(prompt, []).append(p.key)
    shipped = [q for q in general_prompts(general + len(heldout)) if q not in heldout]
    training = {f"{p.key} ({p.name}) {source}": texts for p in personas for source, texts in p.training_texts.items()}
    log("[algebra] contamination check: evaluation prompts against both runs' training data")
    found = check_contamination(list(heldout) + shipped, [t for texts in training.values() for t in texts])
    bad = {d["prompt"] for d in found.dropped}
    left_out = [q for q in heldout if q in bad]
    general_kept: list[str] = []
    for q in shipped:  # the first ``general`` clean ones; a contaminated one is replaced by the next
        if len(general_kept) == general:
            break
        (left_out if q in bad else general_kept).append(q)
    if left_out:
        log(f"[algebra] WARNING: {len(left_out)} evaluation prompt(s) appear in a run's training data (exactly or "
            "nearly): left out of the evaluation (listed in algebra.json, contamination.left_out)")
    kept = [q for q in heldout if q not in bad] + general_kept
    if not kept:
        raise UserError("no evaluation prompt is left: every held-out prompt of both runs is in a run's training "
                        "data and no general prompt was asked for; raise --set eval.general_prompts=48, or rerun a "
                        "run's prompts stage so that its held-out prompts are new")
    sources = {q: ("heldout " + "+".join(heldout[q]) if q in heldout else "general") for q in kept}
    matches = [d for d in found.dropped if d["prompt"] in set(left_out)]
    return kept, sources, {"clean": not left_out, "left_out": left_out, "matches": matches,
                           "checked": len(heldout) + len(shipped),
                           "training_texts": {source: len(texts) for source, texts in training.items()}}


# ------------------------------------------------------------------------------- conditions

def _condition(spec: Spec, personas: list[Persona], adapters: dict[str, str]) -> Condition:
    if spec.kind == "base":
        return Condition(spec.name)
    if spec.kind == "prompt":
        return Condition(spec.name, system_prompt=next(p.system_prompt for p in personas if p.key == spec.persona))
    return Condition(spec.name, adapter=adapters[spec.name], kind="adapter")


def rank_groups(conditions: list[Condition]) -> list[tuple[int, list[Condition]]]:
    """[(max_lora_rank, its conditions)], smallest rank first; the conditions without an adapter go
    with the first. vLLM serves every LoRA of an engine at the engine's max_lora_rank, and its CPU
    build gathers each token's (out x rank) LoRA factors: measured on 2 cores, a rank-16 adapter
    generated 2.7x faster in an engine of rank 16 than of rank 64, so the one rank-48 condition
    ((A+B)-B) gets an engine of its own rather than slowing the other twenty."""
    from character_training.adapters.io import read_config
    from character_training.adapters.io import lora_rank_for_vllm

    ranks = {c.adapter: lora_rank_for_vllm([read_config(c.adapter)]) for c in conditions if c.adapter}
    first = min(ranks.values(), default=8)
    groups: dict[int, list[Condition]] = {}
    for c in conditions:
        groups.setdefault(ranks.get(c.adapter, first), []).append(c)
    return sorted(groups.items())


def _cells(specs, generated, texts, flags, nll, personas, adapters, seed, k) -> dict:
    """{condition: its kind, adapter, weight, coherence, and per persona the rates with intervals}."""
    cells = {}
    for spec in specs:
        completions = generated[spec.name]["completions"]
        cell = {"kind": spec.kind, "adapter": adapters.get(spec.name), "persona": spec.persona, "weight": spec.weight}
        rates = {}
        for p in personas:
            metrics = surface_metrics(texts[spec.name], flags[spec.name][p.key], [tuple(x) for x in nll[spec.name]],
                                      [c.finished for c in completions], seed, k, p.markers)
            rates[p.key] = {key: v for key, v in metrics.items() if key.startswith(("persona_rate", "marker_rate"))}
        cell.update({key: metrics[key] for key in ("distinct_3grams", "perplexity", "unfinished", "empty", "answers")})
        cell["rates"] = rates
        cells[spec.name] = cell
    return cells


def _per_prompt(flags: dict, texts: dict, personas: list[Persona], k: int) -> dict:
    """{measure: {condition: {persona: mean per prompt}}}: what the analyses' paired bootstrap resamples."""
    from character_training.config.markers import marker_flags

    out = {"persona_rate": {name: {p: f.reshape(-1, k).mean(axis=1) for p, f in by.items()}
                            for name, by in flags.items()}}
    if all(p.markers for p in personas):
        out["marker_rate"] = {name: {p.key: marker_flags(t, p.markers).astype(float).reshape(-1, k).mean(axis=1)
                                     for p in personas} for name, t in texts.items()}
    return out


def _records(conditions, generated, asked, sources, texts, flags, personas, k) -> list[dict]:
    records = []
    for c in conditions:
        for i, (prompt, text, completion) in enumerate(zip(asked, texts[c.name], generated[c.name]["completions"])):
            records.append({"condition": c.name, "prompt": prompt, "source": sources[prompt], "sample": i % k,
                            "answer": text, "finish_reason": completion.finish_reason,
                            "persona": {p.key: bool(flags[c.name][p.key][i]) for p in personas},
                            "markers": {p.key: markers_in(text, p.markers) for p in personas}})
    return records


# --------------------------------------------------------------------- parts kept between runs

def _forget_stale(out: Path, model_path: str, personas: list[Persona], log) -> None:
    """A persona's adapter retrained in place, or another model, starts the report afresh."""
    from character_training.adapters.io import WEIGHTS_FILE

    inputs = {"model": model_path, "adapters": {p.key: file_sha256(Path(p.adapter) / WEIGHTS_FILE) for p in personas}}
    forget_stale(out, inputs, (CACHE,), "[algebra] the model or a persona's adapter changed since the last report "
                                        "here: generating afresh", log)


# --------------------------------------------------------------------------- persona vectors

def _user_turn(pair: dict) -> str:
    return next(m["content"] for m in pair["prompt"] if m["role"] == "user")


def _persona_vectors(out: Path, model_path: str, personas: list[Persona], log) -> dict[str, dict]:
    """{persona: its vector's summary and where it is saved}: the teacher's answers with that
    persona's system prompt against the student's plain ones, on its own pairs, from the base model."""
    from character_training.evaluation import persona_vectors as pvm

    held: dict = {}
    found = {}
    for p in personas:
        prompts, persona, plain = ([_user_turn(x) for x in p.pairs], [x["chosen"][-1]["content"] for x in p.pairs],
                                   [x["rejected"][-1]["content"] for x in p.pairs])
        key = input_key(model_path, prompts, persona, plain, p.system_prompt)
        where = out / PARTS / f"persona_vectors_{p.key}"

        def compute(p=p, prompts=prompts, persona=persona, plain=plain, where=where):
            log(f"[algebra] persona vector of {p.key} ({p.name}) from its {len(p.pairs)} pairs")
            if "model" not in held:
                held["model"] = pvm.load_model(model_path)
            pv = pvm.compute_persona_vectors(*held["model"], prompts, persona, plain, p.system_prompt)
            pv.save(where)
            return {"best_layer": int(pv.best_layer), "separation": [float(s) for s in pv.separation],
                    "pairs": len(p.pairs)}

        value = kept_part(out, f"persona_vectors_{p.key}_meta", key, compute, needs=where / pvm.TENSORS_FILE)
        found[p.key] = {**value, "key": key, "path": str(where)}
    return found


def _projections(out: Path, model_path: str, conditions: list[Condition], generated: dict, vectors: dict,
                 seed: int, log) -> dict:
    """{persona: persona_vectors.projection_report}: every condition's response activations (under its
    own model: the adapter's for adapter conditions) projected onto that persona's vector, relative
    to that persona's system-prompt condition."""
    from character_training.evaluation import persona_vectors as pvm

    key = input_key({p: v["key"] for p, v in vectors.items()},
                    [(c.name, c.adapter, generated[c.name]["conversations"], answers_of(generated[c.name]))
                     for c in conditions])

    def compute():
        activations = {}
        for adapter in dict.fromkeys(c.adapter for c in conditions):
            model, tokenizer = pvm.load_model(model_path, adapter)
            for c in (c for c in conditions if c.adapter == adapter):
                texts = answers_of(generated[c.name])
                keep = [i for i, t in enumerate(texts) if t]
                if keep:
                    activations[c.name] = pvm.response_activations(
                        model, tokenizer, [generated[c.name]["conversations"][i] for i in keep],
                        [texts[i] for i in keep], desc=f"activations: {c.name}")
            del model
        found = {}
        for persona, summary in vectors.items():
            reference = f"{persona} prompt"
            if reference not in activations:
                found[persona] = {"skipped": f"the {reference} condition gave no answer to project"}
                continue
            found[persona] = pvm.projection_report(activations, pvm.PersonaVectors.load(summary["path"]),
                                                   reference=reference, seed=seed)
        return found

    log("[algebra] projections onto each persona's vector")
    return kept_part(out, "projections", key, compute)


def _add_projection_ratios(cells: dict, projections: dict) -> None:
    for persona, found in projections.items():
        for name, headline in found.get("headline", {}).items():
            if name in cells:
                cells[name]["rates"][persona]["projection_ratio"] = headline["ratio"]
                cells[name]["rates"][persona]["projection_ratio_ci95"] = headline["ratio_ci95"]
