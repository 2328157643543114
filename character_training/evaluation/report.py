"""The evaluation report: did the persona take, does it hold under pressure, did it change the
model inside? (``character-training eval``, the ``eval`` stage of a recipe.)

Every condition answers the same evaluation prompts: the run's held-out prompts (does the persona
show where its traits ask for it?) and the shipped general prompts (evaluation/capability.py
``general_prompts``, written for this project and derived from no constitution: does it show
where no trait asked for it?), reported apart:

  base                        the base model, no system prompt
  base+system_prompt          the base model with the constitution as its system prompt
  NAME                        each adapter, no system prompt
  NAME | adv:K                each adapter with adversarial suffix K on the user message
  base+system_prompt | adv:K  the system-prompted model under the same pressure (reference)
  NAME | prefill              the base model wrote the first assistant turn (another prompt),
                              the adapter answers the next user message in that conversation
  base | steered              the base model with the persona vector added at one layer

Metrics, per condition: persona rate from the teacher-vs-student classifier with a bootstrap
95% interval, never without coherence beside it (distinct word 3-grams, perplexity of the
answers under the base model, the judge's coherence score); judge trait scores (0-100 per
trait); revealed preferences (Elo per trait, base against each adapter); the projection of the
condition's activations onto the persona vector, per layer; capability (perplexity on neutral
text, multiple-choice accuracy) of the base model and each adapter. A contamination check proves
no evaluation prompt appears in the run's training data (exact or near-duplicate).

Writes ``report.md``, ``report.json`` (every number), ``answers.jsonl``, the PNG plots and
``cache.jsonl`` (every generation and verdict: a killed evaluation resumes from it); the parts
computed outside vLLM (persona vectors, activations, capability) are kept in ``parts/`` and
reused when their inputs are unchanged.

The quick check (quick.py) is this report's first part on three conditions: both use the
conditions, surface metrics, scorer and bootstrap of core.py and likelihood.py. The tables,
plots and Markdown are written by report_output.py.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from character_training.errors import UserError
from character_training.evaluation.core import (BASE, PARTS, PROMPTED, STEERED, Condition, answer_metrics, answers_of,
                                                cross_fitted_flags, forget_stale, generate_conditions, input_key,
                                                kept_part, paired_comparisons, surface_metrics)
from character_training.evaluation.likelihood import answer_perplexities
from character_training.config.markers import markers_in
from character_training.evaluation.report_output import ADVERSARIAL_SUFFIXES, markdown_report, plot_report
from character_training.config.eval_settings import EvalSettings
from data_gen.backends import Sampling
from data_gen.store import write_json, write_jsonl


def conditions_for(system_prompt: str, adapters: dict[str, str], settings: EvalSettings) -> list[Condition]:
    out = [Condition(BASE), Condition(PROMPTED, system_prompt=system_prompt)]
    suffixes = ADVERSARIAL_SUFFIXES[:settings.adversarial]
    for name, path in adapters.items():
        out.append(Condition(name, adapter=path, kind="adapter"))
        out += [Condition(f"{name} | adv:{k + 1}", adapter=path, suffix=s, kind="adversarial")
                for k, s in enumerate(suffixes)]
        if settings.prefill:
            out.append(Condition(f"{name} | prefill", adapter=path, prefill=True, kind="prefill"))
    out += [Condition(f"{PROMPTED} | adv:{k + 1}", system_prompt=system_prompt, suffix=s, kind="adversarial")
            for k, s in enumerate(suffixes)]
    return out


def adapter_names(paths: list[str]) -> dict[str, str]:
    """{name: path} for --adapter values: NAME=PATH, or PATH named by its directory (and its
    parent's, for a run's STAGE/adapter)."""
    named = {}
    for value in paths:
        name, _, path = value.partition("=") if "=" in value else ("", "", value)
        p = Path(path)
        if not (p / "adapter_config.json").is_file():
            raise UserError(f"--adapter {path}: no PEFT adapter here (adapter_config.json missing)")
        if not name:
            name = f"{p.parent.name}/{p.name}" if p.name == "adapter" else p.name
        if name in named or name in (BASE, PROMPTED):
            raise UserError(f"--adapter {value}: the name '{name}' is taken; name it: --adapter NAME={path}")
        named[name] = str(p)
    return named


def _forget_stale(out: Path, model_path: str, adapters: dict[str, str], log) -> dict[str, str]:
    """An adapter retrained in place, or another model, starts the evaluation afresh (core.forget_stale)."""
    inputs = {"model": model_path, "adapters": _adapter_hashes(adapters)}
    forget_stale(out, inputs, ("cache.jsonl", "judge_cache.jsonl"),
                 "[eval] the model or an adapter changed since the last evaluation here: starting afresh", log)
    return inputs["adapters"]


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def evaluate(*, backend, judge, model_path: str, constitution, system_prompt: str,
             adapters: dict[str, str], heldout: list[str], pairs: list[dict], training_texts: dict[str, list[str]],
             out_dir: Path, sampling: Sampling, settings: EvalSettings = EvalSettings(), seed: int = 0,
             classifier=None, release: Callable[[], None] = lambda: None, chunk_size: int = 64,
             log: Callable[[str], None] = print) -> dict:
    """The whole report (see the module docstring).

    ``backend`` generates every condition's answers (LoRA enabled when there are adapters) and
    ``judge`` scores them (None: no judge metrics); either may be given as a zero-argument
    function that starts it, so that the model-side parts that come first (persona vectors,
    steering) have the accelerator to themselves. Both are wrapped in caches under ``out_dir``
    (``chunk_size`` requests are written at a time): a judge or model that fails midway loses
    no finished chunk. ``release`` is called once generation and judging are done (e.g. to
    shut the engines down) before the model-side metrics. ``pairs`` are the run's
    teacher-vs-student pairs: they train the classifier and define the persona vector."""
    from data_gen.cache import CachedBackend
    from data_gen.scoring import PersonaClassifier

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not pairs:
        raise UserError("no teacher-vs-student pairs to train the persona classifier on; run the pairs stage")
    hashes = _forget_stale(out, model_path, adapters, log)  # the adapters' weights, hashed once
    heldout, general = _prompts(heldout, settings)
    contamination = _contamination(heldout + general, training_texts, log)
    clean = set(contamination.pop("kept_prompts"))
    heldout, general = [p for p in heldout if p in clean], [p for p in general if p in clean]
    prompts = heldout + general
    if not prompts:
        raise UserError("no evaluation prompt is left: every one is in the run's training data (report.json, "
                        "contamination); rerun the prompts stage, or raise eval.general_prompts")
    k = settings.samples_per_prompt
    asked = [p for p in prompts for _ in range(k)]  # each prompt k times in a row (answers are sampled)
    report: dict = {"model": model_path, "adapters": adapters, "seed": seed, "sampling": sampling.to_dict(),
                    "settings": asdict(settings), "prompts": {"heldout": len(heldout), "general": len(general),
                                                              "samples_per_prompt": k},
                    "markers": list(constitution.markers),
                    "contamination": contamination}
    classifier = classifier or PersonaClassifier
    conditions = conditions_for(system_prompt, adapters, settings)

    # 1. Model-side parts the generation needs, before any engine holds the accelerator.
    pv, steered = _before_generation(out, model_path, pairs, system_prompt, asked, settings, sampling, seed, log)

    # 2. Generation, judging, revealed preferences: the engines.
    backend = CachedBackend(_started(backend), out / "cache.jsonl", chunk_size=chunk_size)
    generated = generate_conditions(backend, conditions, asked, sampling, k)
    if steered is not None:
        _add_steered(generated, conditions, asked, steered)
    records, flags_of, report["scorer"] = _classify(classifier, conditions, generated, asked, prompts, set(heldout),
                                                    constitution.markers)
    write_jsonl(out / "answers.jsonl", records)
    if judge is not None and (settings.judge or settings.revealed_prompts > 0):
        judge = CachedBackend(_started(judge), out / "judge_cache.jsonl", chunk_size=chunk_size)
        report.update(_judged(out, backend, judge, constitution, records, heldout or prompts, adapters, settings,
                              sampling, seed, log))
    release()
    _free_memory()

    # 3. Model-side metrics on what was generated.
    report["conditions"] = _surface(out, model_path, conditions, generated, asked, set(heldout), flags_of,
                                    records, seed, log, k, constitution.markers)
    report["paired"] = _paired(conditions, generated, asked, set(heldout), flags_of, adapters, k, seed,
                               constitution.markers)
    report.update(_after_generation(out, model_path, pv, conditions, generated, asked, report, adapters, hashes,
                                    settings, seed, log))
    report["plots"] = plot_report(report, out)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown_report(report), encoding="utf-8")
    return report


def _prompts(heldout: list[str], settings: EvalSettings) -> tuple[list[str], list[str]]:
    """(held-out prompts without repeats, the first ``eval.general_prompts`` shipped general prompts
    that are not among them)."""
    from character_training.evaluation import capability

    heldout = list(dict.fromkeys(heldout))
    general = [p for p in capability.general_prompts(settings.general_prompts + len(heldout)) if p not in heldout]
    return heldout, general[:settings.general_prompts]


def _contamination(prompts: list[str], training_texts: dict[str, list[str]], log) -> dict:
    """What was dropped and why (contamination.py), and the prompts not in the training data ("kept_prompts")."""
    from character_training.evaluation.contamination import check_contamination

    log("[eval] contamination check")
    found = check_contamination(prompts, [t for texts in training_texts.values() for t in texts])
    if found.dropped:
        log(f"[eval] {len(found.dropped)} evaluation prompt(s) found in the training data: dropped "
            f"({found.counts()['by_reason']}; listed in report.json, contamination)")
    return {**found.counts(), "clean": not found.dropped, "dropped_prompts": found.dropped, "kept_prompts": found.kept,
            "training_texts": {source: len(texts) for source, texts in training_texts.items()}}


def _before_generation(out: Path, model_path: str, pairs: list[dict], system_prompt: str, prompts: list[str],
                       settings: EvalSettings, sampling: Sampling, seed: int, log) -> tuple[dict | None, list | None]:
    """(persona vectors' summary, the steering baseline's answers), each None when not asked for."""
    pv = None
    if settings.persona_vectors or settings.steering:
        pv = _persona_vectors(out, model_path, pairs, system_prompt, seed, log)
    steered = None
    if settings.steering and pv is not None:
        steered = _steered(out, model_path, pv, prompts, settings, sampling, seed, log)
    _free_memory()
    return pv, steered


def _add_steered(generated: dict, conditions: list[Condition], prompts: list[str], steered: list[str]) -> None:
    from data_gen.backends import Completion

    # HF generate gives texts only: whether an answer hit max_tokens is not known ("stop").
    generated[STEERED] = {"conversations": [[{"role": "user", "content": p}] for p in prompts],
                          "completions": [Completion(text=t, finish_reason="stop", num_tokens=0) for t in steered]}
    conditions.append(Condition(STEERED, kind="steered"))


def _classify(classifier, conditions: list[Condition], generated: dict, asked: list[str], prompts: list[str],
              heldout: set[str], markers: tuple[str, ...] = ()) -> tuple[list[dict], dict[str, np.ndarray], dict]:
    """(one record per answer, {condition: persona flags}, the scorer's summary): the scorer is
    cross-fitted on this evaluation's base and system-prompted answers (core.cross_fitted_flags);
    with markers, each record lists the ones its answer carries."""
    texts_of = {cond.name: answers_of(generated[cond.name]) for cond in conditions}
    flags_of, scorer = cross_fitted_flags(classifier, texts_of, asked, prompts)
    records = []
    for cond in conditions:
        completions = generated[cond.name]["completions"]
        records += [{"condition": cond.name, "prompt": p, "source": "heldout" if p in heldout else "general",
                     "answer": t, "persona": bool(f), "finish_reason": c.finish_reason,
                     **({"markers": markers_in(t, markers)} if markers else {})}
                    for p, t, f, c in zip(asked, texts_of[cond.name], flags_of[cond.name], completions)]
    return records, flags_of, scorer


def _paired(conditions: list[Condition], generated: dict, asked: list[str], heldout: set[str], flags_of: dict,
            adapters: dict[str, str], k: int, seed: int, markers: tuple[str, ...]) -> dict:
    """Each adapter against the system prompt and against base, the system prompt against base,
    and each adapter against each later one (two recipes in one report), as paired differences over
    prompts (core.answer_metrics), on the held-out and on the general prompts apart."""
    per_answer = {cond.name: answer_metrics(answers_of(generated[cond.name]), flags_of[cond.name], markers)
                  for cond in conditions}
    names = list(adapters)
    comparisons = ([(name, other) for name in names for other in (PROMPTED, BASE)] + [(PROMPTED, BASE)]
                   + [(a, b) for i, a in enumerate(names) for b in names[i + 1:]])  # recipe against recipe
    found = {}
    for stratum in ("heldout", "general"):
        idx = np.array([i for i, p in enumerate(asked) if (p in heldout) == (stratum == "heldout")], dtype=int)
        if len(idx):
            found[stratum] = paired_comparisons(per_answer, idx, comparisons, k, seed)
    return found


def _judged(out: Path, backend, judge, constitution, records: list[dict], revealed_on: list[str],
            adapters: dict[str, str], settings: EvalSettings, sampling: Sampling, seed: int, log) -> dict:
    """The judge's trait and coherence scores ("judge") and revealed preferences ("revealed"),
    as asked for."""
    found = {}
    if settings.judge:
        from character_training.evaluation.judge import score_answers

        log("[eval] judge: trait and coherence scores")
        judged = score_answers(judge, constitution, [{k: r[k] for k in ("condition", "prompt", "answer")}
                                                     for r in records], seed=seed)
        write_jsonl(out / "judge_scores.jsonl", judged["scores"])
        found["judge"] = {k: v for k, v in judged.items() if k != "scores"}
    if settings.revealed_prompts > 0 and len(constitution.traits) >= 2:
        found["revealed"] = _revealed(backend, judge, constitution, revealed_on, adapters, settings,
                                      sampling, seed, log)
    return found


def _surface(out: Path, model_path: str, conditions: list[Condition], generated: dict, prompts: list[str],
             heldout: set[str], flags_of: dict, records: list[dict], seed: int, log, samples_per_prompt: int = 1,
             markers: tuple[str, ...] = ()) -> dict:
    """Each condition's surface metrics (core.surface_metrics) and its persona rate on the
    held-out and on the general prompts; the perplexities are kept in parts/answer_nll.json."""
    log("[eval] persona rate and coherence")
    nll_all = kept_part(out, "answer_nll", input_key(model_path, prompts, [r["answer"] for r in records]),
                        lambda: {"nll": {c.name: answer_perplexities(model_path, prompts,
                                                                     [r["answer"] for r in records
                                                                      if r["condition"] == c.name],
                                                                     desc=f"perplexity: {c.name}")
                                         for c in conditions}})["nll"]
    results = {}
    for cond in conditions:
        completions, flags = generated[cond.name]["completions"], flags_of[cond.name]
        results[cond.name] = {"kind": cond.kind, **surface_metrics(answers_of(generated[cond.name]), flags,
                                                                    [tuple(x) for x in nll_all[cond.name]],
                                                                    [c.finished for c in completions], seed,
                                                                    samples_per_prompt, markers)}
        for stratum in ("heldout", "general"):
            idx = [i for i, p in enumerate(prompts) if (p in heldout) == (stratum == "heldout")]
            if idx:
                results[cond.name][f"persona_rate_{stratum}"] = float(flags[idx].mean())
    return results


def _after_generation(out: Path, model_path: str, pv: dict | None, conditions: list[Condition], generated: dict,
                      asked: list[str], report: dict, adapters: dict[str, str], hashes: dict[str, str],
                      settings: EvalSettings, seed: int, log) -> dict:
    """The parts read from the model on what was generated (persona-vector projections,
    capability, lm-evaluation-harness), each condition's cells filled in from them and from
    the judge."""
    from character_training.evaluation import capability

    found, results = {}, report["conditions"]
    if "judge" in report:
        for name, cells in report["judge"]["summary"].items():
            results[name]["judge_coherence"] = cells.get("coherence", {}).get("mean")
    if pv is not None and settings.persona_vectors:
        found["persona_vectors"] = _projections(out, model_path, pv, conditions, generated, asked, seed, log)
        _add_projection_ratios(results, found["persona_vectors"])
    if settings.capability:
        log("[eval] capability: perplexity on neutral text, multiple choice")
        found["capability"] = kept_part(out, "capability", input_key(model_path, hashes),
                                        lambda: capability.capability_report(model_path, adapters))
    if settings.lm_eval_tasks:
        tasks = list(settings.lm_eval_tasks)
        found["lm_eval"] = kept_part(out, "lm_eval", input_key(model_path, hashes, settings.lm_eval_tasks),
                                     lambda: {name: capability.run_lm_eval(model_path, path, tasks)
                                              for name, path in {BASE: None, **adapters}.items()})
    measurable = all(p.get("measurable", True) for p in report.get("paired", {}).values())
    if (ref := results.get(PROMPTED)) and ref["persona_rate"] and measurable:  # no ratio of an unmeasured rate
        for r in results.values():
            r["persona_rate_over_system_prompt"] = r["persona_rate"] / ref["persona_rate"]
    return found


def _add_projection_ratios(results: dict, projections: dict) -> None:
    reading_base = " | reading base answers"
    for name, headline in projections.get("headline", {}).items():
        if name in results:
            results[name]["projection_ratio"] = headline["ratio"]
            results[name]["projection_ratio_ci95"] = headline["ratio_ci95"]
        elif name.endswith(reading_base) and name[:-len(reading_base)] in results:
            results[name[:-len(reading_base)]]["projection_ratio_reading_base"] = headline["ratio"]


def _steered(out: Path, model_path: str, pv: dict, prompts: list[str], settings: EvalSettings,
             sampling: Sampling, seed: int, log) -> list[str]:
    """The steering baseline's answers: the base model, no system prompt, the persona vector
    (x ``steering_coefficient``) added at its best layer while generating."""
    from character_training.evaluation import persona_vectors as pvm

    layer = pv["best_layer"]

    def steer() -> dict:
        log(f"[eval] steering baseline: persona vector x{settings.steering_coefficient:g} at layer {layer}")
        vector = pvm.PersonaVectors.load(out / PARTS / "persona_vectors").vectors[layer]
        return {"texts": pvm.steered_generate(*pvm.load_model(model_path),
                                              [[{"role": "user", "content": p}] for p in prompts], vector, layer,
                                              settings.steering_coefficient, sampling.max_tokens,
                                              temperature=sampling.temperature, seed=seed)}

    return kept_part(out, "steered", input_key(model_path, prompts, pv["key"], settings.steering_coefficient,
                                          sampling.to_dict(), seed), steer)["texts"]


def _started(backend):
    """A backend, or a zero-argument function that starts one."""
    return backend() if callable(backend) and not hasattr(backend, "chat") else backend


def _adapter_hashes(adapters: dict[str, str]) -> dict[str, str]:
    return {n: hashlib.sha256((Path(p) / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]
            if (Path(p) / "adapter_model.safetensors").is_file() else "?" for n, p in adapters.items()}


def _persona_vectors(out: Path, model_path: str, pairs: list[dict], system_prompt: str, seed: int, log) -> dict:
    """Persona vectors from the run's pairs: the teacher's answers with the constitution as system
    prompt against the student's answers without one, on the same (training) prompts."""
    from character_training.evaluation import persona_vectors as pvm

    def user(pair):
        return next(m["content"] for m in pair["prompt"] if m["role"] == "user")

    prompts = [user(p) for p in pairs]
    persona = [p["chosen"][-1]["content"] for p in pairs]
    plain = [p["rejected"][-1]["content"] for p in pairs]
    key = input_key(model_path, prompts, persona, plain, system_prompt)

    def compute():
        log("[eval] persona vectors from the teacher/student pairs")
        model, tokenizer = pvm.load_model(model_path)
        pv = pvm.compute_persona_vectors(model, tokenizer, prompts, persona, plain, system_prompt)
        pv.save(out / PARTS / "persona_vectors")
        return {"best_layer": int(pv.best_layer), "separation": [float(s) for s in pv.separation],
                "norms": [float(v) for v in pv.vectors.norm(dim=-1)], "pairs": len(pairs)}

    value = kept_part(out, "persona_vectors_meta", key, compute, needs=out / PARTS / "persona_vectors")
    return {**value, "key": key}


def _projections(out: Path, model_path: str, pv: dict, conditions: list[Condition], generated: dict,
                 asked: list[str], seed: int, log) -> dict:
    """Each condition's response activations (under its own model: the adapter's for adapter
    conditions) projected onto the persona vector, per layer."""
    from character_training.evaluation import persona_vectors as pvm

    vectors = pvm.PersonaVectors.load(out / PARTS / "persona_vectors")
    wanted = [c for c in conditions if c.kind != "steered"]
    key = input_key(pv["key"], "intervals resample prompts", [(c.name, c.adapter, generated[c.name]["conversations"],
                                 [x.text for x in generated[c.name]["completions"]]) for c in wanted])

    def compute():
        activations, prompts_of = {}, {}
        for adapter in dict.fromkeys(c.adapter for c in wanted):
            model, tokenizer = pvm.load_model(model_path, adapter)
            readings = [(c.name, c.name) for c in wanted if c.adapter == adapter]
            if adapter is not None:  # the control: this adapter reading the base model's answers
                readings.append((f"{_adapter_name(wanted, adapter)} | reading base answers", BASE))
            for name, source in readings:
                convs = generated[source]["conversations"]
                texts = [x.text.strip() for x in generated[source]["completions"]]
                keep = [i for i, t in enumerate(texts) if t]
                if not keep:
                    continue
                log(f"[eval] activations: {name}")
                activations[name] = pvm.response_activations(model, tokenizer, [convs[i] for i in keep],
                                                             [texts[i] for i in keep])
                prompts_of[name] = [asked[i] for i in keep]
            del model
        if PROMPTED not in activations:
            return {"skipped": f"the {PROMPTED} condition gave no answer to project", "best_layer": pv["best_layer"]}
        return pvm.projection_report(activations, vectors, reference=PROMPTED, seed=seed, prompts=prompts_of)

    return kept_part(out, "projections", key, compute)


def _adapter_name(conditions: list[Condition], adapter: str) -> str:
    return next(c.name for c in conditions if c.adapter == adapter and c.kind == "adapter")


def _revealed(backend, judge, constitution, prompts, adapters, settings, sampling, seed, log) -> dict:
    from character_training.evaluation.judge import judge_revealed, revealed_report, revealed_requests

    log("[eval] revealed preferences")
    requests = revealed_requests(constitution, prompts[:settings.revealed_prompts], pairs_per_prompt=2, seed=seed)
    by_condition = {}
    for name, adapter in {BASE: None, **adapters}.items():
        completions = backend.chat([r["conversation"] for r in requests], sampling, adapter=adapter,
                                   desc=f"revealed: {name}")
        answered = [{**r, "answer": c.text.strip()} for r, c in zip(requests, completions)]
        by_condition[name] = judge_revealed(judge, answered)
    return revealed_report(by_condition, seed=seed)
