"""Persistence over turns: does the persona last through a conversation, or fade after a few
turns? (issue 27, item 1)

Every condition (the base model, the base model with the constitution as system prompt, the
adapter, the adapter with the system prompt present, ...) holds the same conversations of
``turns`` user turns. The user turns come from the evaluation prompts: conversation i asks
prompts[i], prompts[i+1], ... in turn, wrapping around at the end of the list, so every
conversation asks a different sequence. The assistant turns are the condition's OWN earlier
answers: turn t's request is the conversation so far (its system prompt, if the condition has
one, at the head at every turn) plus the next user turn. An adapter condition gets a system
prompt only where its Condition has one.

Conditions are paired by common random numbers: a request's seed (data_gen/seeds.py) is derived
from the run's seed and the conversation's USER turns so far (and the occurrence of that
sequence), not from the assistant turns, which differ between conditions; so every condition
draws with the same seed at the same conversation and turn, and a rerun draws the same answers.

Scoring, per turn: the persona rate (the quick check's classifier, fitted on this check's own
``plain`` and ``persona`` answers, cross-fitted over two folds of conversations: the answers of
one fold's conversations, at every turn, are scored by a classifier fitted on the other fold's)
and, given the constitution's markers, the share of answers carrying one (config/markers.py).
Each rate has a 95% interval clustered by conversation; each condition is compared with
``persona`` and with ``plain`` turn by turn as a paired difference over conversations
(evaluation/paired.py), and over all turns (a conversation's turns averaged first). A
condition's ``last_minus_first`` (its last turn against its first, paired by conversation) says
whether its persona faded.

Writes ``persistence.json`` (every number and the per-turn series), ``persistence_answers.jsonl``
(every answer) and ``persistence.png`` (rate against turn, one line per condition, with its
interval band).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from character_training.config.markers import marker_flags, markers_in
from character_training.errors import UserError
from character_training.evaluation.core import BASE, FOLDS, PROMPTED, Condition
from character_training.evaluation.paired import clustered_interval, paired_difference
from data_gen.backends import Backend, Sampling
from data_gen.seeds import seeds_for
from data_gen.store import write_json, write_jsonl

ANSWERS, REPORT, PLOT = "persistence_answers.jsonl", "persistence.json", "persistence.png"


def persistence_check(backend: Backend, conditions: list[Condition], prompts: list[str], out_dir: Path, *,
                      turns: int = 8, sampling: Sampling = Sampling(temperature=0.7, max_tokens=160), seed: int = 0,
                      classifier_factory: Callable | None = None, markers: tuple[str, ...] = (),
                      plain: str = BASE, persona: str = PROMPTED) -> dict:
    """Runs the conversations of every condition, scores them turn by turn and writes the three
    files under ``out_dir``; returns the report (the dict written to persistence.json).

    ``prompts``: the evaluation prompts (repeats are dropped); there are as many conversations
    as prompts, conversation i asking prompts[i], prompts[i+1], ... (wrapping around).
    ``classifier_factory``: makes persona classifiers (``fit(persona, plain)``,
    ``persona_flags(texts)``; default data_gen.scoring.PersonaClassifier). ``plain`` and
    ``persona``: the conditions the classifier is fitted on, and that every other condition is
    compared with."""
    prompts = list(dict.fromkeys(prompts))
    _check(conditions, prompts, turns, plain, persona)
    if classifier_factory is None:
        from data_gen.scoring import PersonaClassifier as classifier_factory
    markers = tuple(markers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    asked = user_turns(prompts, turns)
    seeds = turn_seeds(asked, seed)

    answers = {c.name: converse(backend, c, asked, sampling, seeds) for c in conditions}
    texts = {name: [[c.text.strip() for c in row] for row in got] for name, got in answers.items()}
    flags, scorer = _cross_fitted(classifier_factory, texts, plain, persona)
    values = {name: {"persona_rate": flags[name],
                     **({"marker_rate": _marker_grid(texts[name], markers)} if markers else {})} for name in texts}

    report = {"turns": turns, "conversations": len(prompts), "plain": plain, "persona": persona,
              "conditions": {c.name: _condition_summary(c, values[c.name], answers[c.name], seed)
                             for c in conditions},
              "paired": {f"{a} - {b}": _paired(values[a], values[b], seed) for a, b in comparisons(conditions, plain, persona)},
              "scorer": scorer, "sampling": sampling.to_dict(), "seed": seed,
              **({"markers": list(markers)} if markers else {})}
    reference = report["paired"].get(f"{persona} - {plain}")
    report["measurable"] = [bool(d["persona_rate"]["above_zero"]) for d in reference["per_turn"]]
    report["series"] = _series(report)

    write_jsonl(out_dir / ANSWERS, _records(conditions, asked, seeds, answers, texts, flags, markers))
    _plot(report, out_dir / PLOT)
    report["files"] = {"report": REPORT, "answers": ANSWERS, "plot": PLOT}
    write_json(out_dir / REPORT, report)
    return report


def _check(conditions: list[Condition], prompts: list[str], turns: int, plain: str, persona: str) -> None:
    if not isinstance(turns, int) or isinstance(turns, bool) or turns < 1:
        raise UserError(f"turns: {turns!r}; give a whole number of 1 or more (user turns per conversation; 8 is usual)")
    if len(prompts) < FOLDS:
        raise UserError(f"persistence check: {len(prompts)} distinct prompt(s); give at least {FOLDS} (the classifier "
                        "is cross-fitted over two folds of conversations, one conversation per prompt)")
    check_names("persistence check", conditions, plain, persona)
    odd = [c.name for c in conditions if c.prefill or c.kind == "steered"]
    if odd:
        raise UserError(f"persistence check: conditions {odd} are prefilled or steered, which a conversation of the "
                        "model's own turns cannot hold; leave them out")


def check_names(what: str, conditions: list[Condition], plain: str, persona: str) -> None:
    """Each condition named once, and the two the classifier is fitted on among them (the
    persistence and spread checks: ``what`` names which)."""
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise UserError(f"{what}: condition names repeat ({names}); give each condition its own name")
    for role, name in (("plain", plain), ("persona", persona)):
        if name not in names:
            raise UserError(f"{what}: the {role} condition {name!r} is not among the conditions {names}; "
                            f"the classifier is fitted on it: add it, or name another with {role}=")


def user_turns(prompts: list[str], turns: int) -> list[list[str]]:
    """[conversation][turn]: conversation i asks prompts[i], prompts[i+1], ..., wrapping around."""
    n = len(prompts)
    return [[prompts[(i + t) % n] for t in range(turns)] for i in range(n)]


def turn_seeds(asked: list[list[str]], seed: int) -> list[list[int]]:
    """[turn][conversation]: the seed of each request, from the user turns so far alone (no
    system prompt, no assistant turn), so the same under every condition."""
    return [seeds_for(seed, [[{"role": "user", "content": p} for p in row[:t + 1]] for row in asked])
            for t in range(len(asked[0]))]


def _user_message(cond: Condition, prompt: str) -> dict:
    return {"role": "user", "content": f"{prompt}\n\n{cond.suffix}" if cond.suffix else prompt}


def converse(backend: Backend, cond: Condition, asked: list[list[str]], sampling: Sampling,
             seeds: list[list[int]]) -> list[list]:
    """[conversation][turn]: the condition's completions, turn by turn, one backend request per
    turn for all conversations; each turn's request holds the condition's own earlier answers."""
    head = [{"role": "system", "content": cond.system_prompt}] if cond.system_prompt else []
    history = [list(head) for _ in asked]
    got = [[] for _ in asked]
    for t in tqdm(range(len(asked[0])), desc=f"persistence: {cond.name}", unit="turn"):
        for conversation, row in zip(history, asked):
            conversation.append(_user_message(cond, row[t]))
        completions = backend.chat([list(c) for c in history], sampling, adapter=cond.adapter,
                                   desc=f"persistence: {cond.name}, turn {t + 1}", seeds=seeds[t])
        if len(completions) != len(history):
            raise RuntimeError(f"the backend answered {len(completions)} of {len(history)} conversations")
        for conversation, answers, completion in zip(history, got, completions):
            conversation.append({"role": "assistant", "content": completion.text.strip()})
            answers.append(completion)
    return got


def comparisons(conditions: list[Condition], plain: str, persona: str) -> list[tuple[str, str]]:
    """Each condition against ``persona`` and against ``plain`` (first minus second); ``persona``
    against ``plain`` once."""
    out = [(persona, plain)]
    for c in conditions:
        if c.name not in (plain, persona):
            out += [(c.name, persona), (c.name, plain)]
    return out


# ------------------------------------------------------------------ scoring


def _cross_fitted(factory: Callable, texts: dict[str, list[list[str]]], plain: str,
                  persona: str) -> tuple[dict[str, np.ndarray], dict]:
    """({condition: flags [conversation, turn]}, the scorer's summary). Conversation i is in fold
    i % FOLDS; its answers, at every turn, are scored by a classifier fitted on the other folds'
    ``plain`` and ``persona`` answers (all their turns)."""
    n, turns = len(texts[plain]), len(texts[plain][0])
    folds = np.arange(n) % FOLDS
    flags = {name: np.zeros((n, turns)) for name in texts}
    fitted = []
    for fold in range(FOLDS):
        train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        scorer = factory()
        fitted.append(scorer.fit([a for i in train for a in texts[persona][i]], [a for i in train for a in texts[plain][i]]))
        for name in texts:
            scored = np.asarray(scorer.persona_flags([a for i in test for a in texts[name][i]]), dtype=float)
            flags[name][test] = scored.reshape(len(test), turns)
    right = np.concatenate([flags[persona], 1 - flags[plain]])  # [2n, turns]: 1 where the scorer is right
    return flags, {"fitted_on": f"this check's {plain} (plain) and {persona} (persona) answers at every turn, "
                                f"cross-fitted over {FOLDS} folds of conversations",
                   "heldout_accuracy": float(right.mean()),
                   "heldout_accuracy_per_turn": right.mean(axis=0).tolist(),
                   "train_examples": [f.get("train_examples") for f in fitted]}


def _marker_grid(texts: list[list[str]], markers: tuple[str, ...]) -> np.ndarray:
    turns = len(texts[0])
    return marker_flags([a for row in texts for a in row], markers).astype(float).reshape(-1, turns)


def _rate(values: np.ndarray, seed: int) -> dict:
    """The mean of ``values`` [conversation, turn] with its 95% interval, resampling conversations."""
    clusters = np.repeat(np.arange(values.shape[0]), values.shape[1])
    return {"rate": float(values.mean()), "ci95": list(clustered_interval(values.reshape(-1), clusters, seed=seed))}


def _condition_summary(cond: Condition, values: dict[str, np.ndarray], completions: list[list], seed: int) -> dict:
    turns = next(iter(values.values())).shape[1]
    per_turn = []
    for t in range(turns):
        row = {"turn": t + 1}
        for metric, v in values.items():
            r = _rate(v[:, t:t + 1], seed)
            row.update({metric: r["rate"], f"{metric}_ci95": r["ci95"]})
        column = [c[t] for c in completions]
        row.update({"unfinished": sum(not c.finished for c in column), "empty": sum(not c.text.strip() for c in column),
                    "mean_tokens": float(np.mean([c.num_tokens for c in column]))})
        per_turn.append(row)
    all_turns = {}
    for metric, v in values.items():
        r = _rate(v, seed)
        all_turns.update({metric: r["rate"], f"{metric}_ci95": r["ci95"]})
    return {"system_prompt": cond.system_prompt is not None, "adapter": cond.adapter, "suffix": cond.suffix,
            "per_turn": per_turn, "all_turns": all_turns,
            "last_minus_first": {metric: paired_difference(v[:, -1], v[:, 0], seed=seed) for metric, v in values.items()}}


def _paired(a: dict[str, np.ndarray], b: dict[str, np.ndarray], seed: int) -> dict:
    """a - b per turn over conversations, and over all turns (each conversation's turns averaged)."""
    turns = a["persona_rate"].shape[1]
    return {"per_turn": [{"turn": t + 1, **{m: paired_difference(a[m][:, t], b[m][:, t], seed=seed) for m in a}}
                         for t in range(turns)],
            "all_turns": {m: paired_difference(a[m].reshape(-1), b[m].reshape(-1), samples_per_prompt=turns, seed=seed)
                          for m in a}}


def _series(report: dict) -> dict:
    """The per-turn numbers as lists, one per condition or comparison: what the plot draws."""
    metrics = [m for m in ("persona_rate", "marker_rate") if m in report["conditions"][report["plain"]]["all_turns"]]
    out = {"turn": list(range(1, report["turns"] + 1))}
    for m in metrics:
        out[m] = {name: [r[m] for r in c["per_turn"]] for name, c in report["conditions"].items()}
        out[f"{m}_ci95"] = {name: [r[f"{m}_ci95"] for r in c["per_turn"]] for name, c in report["conditions"].items()}
        out[f"paired_{m}"] = {comp: [r[m]["difference"] for r in p["per_turn"]] for comp, p in report["paired"].items()}
        out[f"paired_{m}_ci95"] = {comp: [r[m]["ci95"] for r in p["per_turn"]] for comp, p in report["paired"].items()}
    return out


def _records(conditions, asked, seeds, answers, texts, flags, markers) -> list[dict]:
    return [{"condition": c.name, "conversation": i, "turn": t + 1, "prompt": asked[i][t], "answer": texts[c.name][i][t],
             "persona": bool(flags[c.name][i, t]), "seed": seeds[t][i],
             "finish_reason": answers[c.name][i][t].finish_reason,
             **({"markers": markers_in(texts[c.name][i][t], markers)} if markers else {})}
            for c in conditions for i in range(len(asked)) for t in range(len(asked[i]))]


# ------------------------------------------------------------------ output


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report["series"]
    metrics = [m for m in ("persona_rate", "marker_rate") if m in series]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, rates in series[metric].items():
            lo, hi = np.array(series[f"{metric}_ci95"][name], dtype=float).T
            line, = ax.plot(series["turn"], rates, marker="o", label=name)
            ax.fill_between(series["turn"], lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_title(f"{metric.replace('_', ' ')} by turn (95% CI over conversations)")
        ax.set_xlabel("turn")
        ax.set_xticks(series["turn"])
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_persistence(report: dict) -> str:
    """Rows turns, columns conditions: the persona rate (and the marker rate, after a '/'); then
    each paired difference per turn ('*' where its interval excludes zero) and the scorer."""
    names, turns = list(report["conditions"]), report["turns"]
    marked = "marker_rate" in report["series"]

    def cell(row: dict) -> str:
        return f"{row['persona_rate']:.2f}" + (f"/{row['marker_rate']:.2f}" if marked else "")

    def table(columns: list[str], cells) -> list[str]:
        """Rows turns (then 'all' and any extra rows), one column per name, each as wide as its name."""
        widths = [max(11, len(c) + 2) for c in columns]
        lines = [f"{'turn':<9}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
        for label, values in cells:
            lines.append(f"{label:<9}" + "".join(f"{v:>{w}}" for v, w in zip(values, widths)))
        return lines

    conds = report["conditions"]
    rows = [f"persistence over {turns} turns, {report['conversations']} conversations: persona rate"
            + (" / marker rate" if marked else "")]
    rows += table(names, [*((t + 1, [cell(conds[n]["per_turn"][t]) for n in names]) for t in range(turns)),
                          ("all", [cell(conds[n]["all_turns"]) for n in names]),
                          ("last-1st", [_difference(conds[n]["last_minus_first"]["persona_rate"]) for n in names])])
    paired = report["paired"]
    rows.append("paired persona-rate differences over conversations ('*': the 95% CI excludes zero):")
    rows += table(list(paired), [*((t + 1, [_difference(p["per_turn"][t]["persona_rate"]) for p in paired.values()])
                                   for t in range(turns)),
                                 ("all", [_difference(p["all_turns"]["persona_rate"]) for p in paired.values()])])
    unmeasured = [t + 1 for t, ok in enumerate(report["measurable"]) if not ok]
    if unmeasured:
        rows.append(f"turns {unmeasured}: {report['persona']} is not above {report['plain']} there; the scorer does "
                    "not measure the persona at those turns")
    accuracy = report["scorer"]["heldout_accuracy"]
    rows.append(f"scorer: {report['scorer']['fitted_on']}; accuracy on the held-out fold {accuracy:.3f}")
    return "\n".join(rows)


def _difference(d: dict) -> str:
    return f"{d['difference']:+.2f}" + ("*" if d["above_zero"] or d["below_zero"] else "")
