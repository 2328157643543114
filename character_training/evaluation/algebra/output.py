"""The persona-algebra report's answers and how they are shown (algebra.py measures; this module
turns the measurements into the answers, with intervals, and writes the Markdown, the plots and
the table printed at the end).

Every answer compares conditions on the same prompts, so its interval is a paired bootstrap:
the prompts are resampled once per draw and every condition's mean is taken over the same draw.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# -A's answers are called broken beyond these (against base's): the negation "only breaks coherence"
# when it lowers no rate and crosses one of them.
PERPLEXITY_BROKEN = 2.0   # perplexity under the base model, times base's
DISTINCT_BROKEN = 0.15    # distinct 3-grams, this much below base's
MEASURES = {"persona_rate": "persona rate (classifier)", "marker_rate": "marker rate"}


# ---------------------------------------------------------------------------------- answers

def paired(kind: str, arrays: list[np.ndarray], seed: int, resamples: int = 2000) -> dict:
    """{"value", "ci95"} of a statistic of per-prompt means, with a 95% paired bootstrap interval:
    ``difference`` x - y, ``ratio`` x / y, ``lift`` (x - base) / (y - base) for [x, y(, base)]."""
    point = _apply(kind, [float(a.mean()) for a in arrays])
    if len(arrays[0]) == 0:
        return {"value": float("nan"), "ci95": [float("nan"), float("nan")]}
    idx = np.random.default_rng(seed).integers(0, len(arrays[0]), size=(resamples, len(arrays[0])))
    draws = np.asarray(_apply(kind, [a[idx].mean(axis=1) for a in arrays]), dtype=float)
    draws[~np.isfinite(draws)] = np.nan
    if np.isnan(draws).all():
        return {"value": _finite(point), "ci95": [float("nan"), float("nan")]}
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return {"value": _finite(point), "ci95": [float(lo), float(hi)]}


def _apply(kind: str, means):
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "difference":
            return means[0] - means[1]
        if kind == "ratio":
            return np.divide(means[0], means[1])
        if kind == "lift":
            return np.divide(np.subtract(means[0], means[2]), np.subtract(means[1], means[2]))
    raise ValueError(f"unknown statistic {kind}")


def _finite(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("nan")


def analyses(cells: dict, per_prompt: dict, seed: int) -> dict:
    """The report's answers: per measure (persona rate, marker rate) additivity, interference,
    orthogonalization, negation and exactness, each with its paired interval; the negation's
    coherence and the dose-response curves."""
    found = {measure: _answers(m, seed) for measure, m in per_prompt.items()}
    if "-A" in cells and "base" in cells:
        found["negation_coherence"] = _negation_coherence(cells["base"], cells["-A"], found["persona_rate"])
    found["dose_response"] = dose_response(cells)
    return found


def _answers(m: dict, seed: int) -> dict:
    def has(*names):
        return all(n in m for n in names)

    def diff(x, y, p):
        return paired("difference", [m[x][p], m[y][p]], seed)

    out: dict = {}
    combos = [c for c in ("A+B", "A⊥B+B") if has(c, "A", "B", "base")]
    if combos:
        out["additivity"] = {c: {p: {"share": paired("ratio", [m[c][p], m[p][p]], seed),
                                     "lift_share": paired("lift", [m[c][p], m[p][p], m["base"][p]], seed)}
                                 for p in ("A", "B")} for c in combos}
    if has("A", "B", "base"):
        out["interference"] = {"B under A": diff("A", "base", "B"), "A under B": diff("B", "base", "A")}
    if has("A⊥B", "A", "base"):
        out["orthogonalization"] = {"B under A⊥B": diff("A⊥B", "base", "B"),
                                    "interference change": diff("A⊥B", "A", "B"),
                                    "A kept": paired("ratio", [m["A⊥B"]["A"], m["A"]["A"]], seed),
                                    "A change": diff("A⊥B", "A", "A")}
    if has("-A", "base"):
        out["negation"] = {"A change": diff("-A", "base", "A"), "B change": diff("-A", "base", "B")}
    references = {"(A+B)-B": "A", **{n: "A+B" for n in m if n.startswith(("PEFT ", "A+B rank "))}}
    out["exactness"] = {n: {"reference": ref, **{p: diff(n, ref, p) for p in ("A", "B")}}
                        for n, ref in references.items() if has(n, ref)}
    return out


def _negation_coherence(base: dict, negated: dict, rates: dict) -> dict:
    ratio = negated["perplexity"] / base["perplexity"] if base["perplexity"] else float("nan")
    drop = negated["distinct_3grams"] - base["distinct_3grams"]
    broken = bool(ratio > PERPLEXITY_BROKEN or drop < -DISTINCT_BROKEN)
    change = rates.get("negation", {}).get("A change", {})
    lowers = bool(change and change["ci95"][1] < 0)
    return {"perplexity_ratio": _finite(ratio), "distinct_3grams_change": _finite(drop), "broken": broken,
            "lowers_below_base": lowers,
            "verdict": ("lowers A's rate below base" + (", but breaks coherence" if broken else ", coherence kept"))
            if lowers else ("does not lower A's rate below base; it only breaks coherence" if broken
                            else "does not lower A's rate below base, and coherence holds")}


def dose_response(cells: dict) -> dict:
    """{persona: [points by weight]}: each persona's rates under its own adapter scaled (0 = base,
    1 = the adapter, -1 = negated), with the other persona's rate beside them."""
    curves = {}
    for p, other in (("A", "B"), ("B", "A")):
        points = [(c["weight"], name) for name, c in cells.items()
                  if c.get("weight") is not None and (c.get("persona") == p or c["kind"] == "base")]
        curves[p] = [{"weight": w, "condition": name, **cells[name]["rates"][p],
                      "other_persona_rate": cells[name]["rates"][other]["persona_rate"],
                      "perplexity": cells[name]["perplexity"], "distinct_3grams": cells[name]["distinct_3grams"]}
                     for w, name in sorted(points)]
    return curves


# --------------------------------------------------------------------------------- markdown

def _v(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _ci(stat: dict) -> str:
    lo, hi = stat["ci95"]
    return f"{_v(stat['value'])} [{_v(lo)}, {_v(hi)}]"


def _read(stat: dict, above: str, below: str, none: str = "no change detected") -> str:
    """What an interval of a difference says: above 0, below 0, or neither."""
    lo, hi = stat["ci95"]
    return above if lo > 0 else below if hi < 0 else none


def _rate(cell: dict, key: str) -> str:
    if key not in cell:
        return ""
    lo, hi = cell[f"{key}_ci95"]
    return f"{_v(cell[key])} [{_v(lo)}, {_v(hi)}]"


def markdown_report(report: dict) -> str:
    """algebra.md: every answer of the report, with its numbers and intervals."""
    personas = report["personas"]
    a, b = personas["A"]["name"], personas["B"]["name"]
    prompts = report["prompts"]
    lines = [f"# Persona algebra: A = {a}, B = {b}", "",
             f"Model `{report['model']}`. Every condition answered the same {prompts['total']} prompts "
             f"({prompts['heldout']} held out by the runs, {prompts['general']} general) x "
             f"{prompts['samples_per_prompt']} (sampling: {_sampling(report['sampling'])}). Rates: each persona's own "
             "classifier (fitted on this report's base and that persona's system-prompted answers, cross-fitted over "
             "two folds of prompts; never on the runs' pairs) and its constitution's markers; intervals are 95% bootstrap "
             "intervals resampling prompts (paired across conditions in the answers below).", "",
             "![rates](heatmap.png)", "", *_rate_table(report), ""]
    lines += _answers_md(report)
    lines += ["## Dose-response", "", "![dose-response](dose_response.png)", ""]
    for p, curve in report["analyses"]["dose_response"].items():
        lines += [f"{p} ({personas[p]['name']}) scaled:", "", "| weight | condition | persona rate | marker rate | "
                  "other persona's rate | perplexity | distinct 3-grams |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {pt['weight']:g} | {pt['condition']} | {_rate(pt, 'persona_rate')} | {_rate(pt, 'marker_rate')} "
                  f"| {_v(pt['other_persona_rate'])} | {_v(pt['perplexity'])} | {_v(pt['distinct_3grams'])} |"
                  for pt in curve]
        lines.append("")
    lines += _exactness_md(report) + _projections_md(report) + _checks_md(report)
    return "\n".join(lines) + "\n"


def _sampling(sampling: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sampling.items() if k in ("temperature", "top_p", "max_tokens"))


def _rate_table(report: dict) -> list[str]:
    marked = any(report["personas"][p]["markers"] for p in ("A", "B"))
    projected = "projections" in report
    head = ["condition", "A persona rate", *(["A markers"] if marked else []), "B persona rate",
            *(["B markers"] if marked else []), "distinct 3-grams", "perplexity",
            *(["projection A", "projection B"] if projected else [])]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in report["conditions"].items():
        cells = [name]
        for p in ("A", "B"):
            cells.append(_rate(c["rates"][p], "persona_rate"))
            if marked:
                cells.append(_rate(c["rates"][p], "marker_rate"))
        cells += [_v(c["distinct_3grams"]), _v(c["perplexity"])]
        if projected:
            cells += [_rate(c["rates"][p], "projection_ratio") for p in ("A", "B")]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _answers_md(report: dict) -> list[str]:
    found, lines = report["analyses"], []
    for measure, title in MEASURES.items():
        m = found.get(measure)
        if not m:
            continue
        lines += [f"## The answers, by {title}", ""]
        for combo, by in m.get("additivity", {}).items():
            lines.append(f"- **Additivity** ({combo}): A's rate is {_ci(by['A']['share'])} of A alone's "
                         f"({_ci(by['A']['lift_share'])} of its lift over base); B's is {_ci(by['B']['share'])} "
                         f"of B alone's ({_ci(by['B']['lift_share'])} of its lift). 1 = fully additive.")
        if "interference" in m:
            i = m["interference"]
            lines.append(f"- **Interference**: B's rate under A alone minus under base: {_ci(i['B under A'])} "
                         f"({_read(i['B under A'], 'A raises B', 'A suppresses B', 'none detected')}); A's under B "
                         f"minus base: {_ci(i['A under B'])} "
                         f"({_read(i['A under B'], 'B raises A', 'B suppresses A', 'none detected')}).")
        if "orthogonalization" in m:
            o = m["orthogonalization"]
            lines.append(f"- **Orthogonalization**: B's rate under A⊥B minus base {_ci(o['B under A⊥B'])}; change in "
                         f"interference against A {_ci(o['interference change'])} "
                         f"({_read(o['interference change'], 'raised', 'lowered')}); A's rate kept {_ci(o['A kept'])} "
                         f"of A's (change {_ci(o['A change'])}: {_read(o['A change'], 'gained', 'a cost')}).")
        if "negation" in m:
            n = m["negation"]
            lines.append(f"- **Negation**: A's rate under -A minus base {_ci(n['A change'])} "
                         f"({_read(n['A change'], 'raised', 'lowered below base')}); B's {_ci(n['B change'])}.")
        lines.append("")
    if "negation_coherence" in found:
        n = found["negation_coherence"]
        lines += [f"-A {n['verdict']} (perplexity x{_v(n['perplexity_ratio'])} base's, distinct 3-grams "
                  f"{n['distinct_3grams_change']:+.2f}; broken beyond x{PERPLEXITY_BROKEN:g} or "
                  f"-{DISTINCT_BROKEN:g}).", ""]
    return lines


def _exactness_md(report: dict) -> list[str]:
    lines = ["## Exactness", "", "Weights: how far each built adapter's delta is from what its name promises "
             "(relative Frobenius error over all modules, from the factors). Behaviour: its rate minus its "
             "reference's, paired.", "", "| condition | rank | equals | weight error | A rate vs reference | "
             "B rate vs reference |", "|---|---|---|---|---|---|"]
    exact = report["analyses"].get("persona_rate", {}).get("exactness", {})
    for name, w in report["weights"].items():
        e = exact.get(name)
        error = f"{w['relative_error']:.2g}" if "relative_error" in w else ""
        behaviour = f"{_ci(e['A'])} vs {e['reference']} | {_ci(e['B'])}" if e else " | "
        lines.append(f"| {name} | {w['rank']} | {w.get('equals', '')} | {error} | {behaviour} |")
    orth = report["weights"].get("A⊥B")
    if orth:
        lines += ["", f"A⊥B's cosine with B: {orth['cosine_with_B']:.2g} overall, at most "
                      f"{orth['max_module_cosine_with_B']:.2g} in a module."]
    return lines + [""]


def _projections_md(report: dict) -> list[str]:
    if "projections" not in report:
        return []
    lines = ["## Projections", "", "Each condition's activations on each persona's vector at that persona's best "
             "layer, as a ratio to its system-prompt condition (1 = as far as the system prompt moves them); in "
             "the table above.", ""]
    for p, found in report["projections"].items():
        lines.append(f"- {p}: " + (found["skipped"] if "skipped" in found else
                                   f"best layer {found['best_layer']}, reference '{found['reference']}'"))
    return lines + [""]


def _checks_md(report: dict) -> list[str]:
    c = report["contamination"]
    found = "none found" if c["clean"] else f"left out {len(c['left_out'])}: " + "; ".join(c["left_out"][:10])
    lines = ["## Checks", "", f"Contamination: {c['checked']} candidate prompts checked against both runs' training "
             f"data; {found}."]
    for p, info in report["personas"].items():
        cls = info["classifier"]
        acc = (f"; accuracy on the held-out fold {cls['heldout_accuracy']:.2f}"
               if cls.get("heldout_accuracy") is not None else "")
        lines.append(f"Classifier {p} ({info['name']}): fitted on {cls['fitted_on']}{acc}.")
    for name, why in report.get("skipped", {}).items():
        lines.append(f"Skipped {name}: {why}")
    return lines


def format_summary(report: dict) -> str:
    """The table printed at the end of ``character-training algebra``."""
    rows = [f"{'condition':<16} {'A rate':>7} {'B rate':>7} {'distinct-3':>10} {'perplexity':>10}"]
    for name, c in report["conditions"].items():
        rows.append(f"{name:<16} {c['rates']['A']['persona_rate']:>7.2f} {c['rates']['B']['persona_rate']:>7.2f} "
                    f"{c['distinct_3grams']:>10.2f} {c['perplexity']:>10.2f}")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------ plots

def plot_report(report: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return {"heatmap": _heatmap(plt, report, Path(out)), "dose_response": _dose_plot(plt, report, Path(out))}


def _heatmap(plt, report: dict, out: Path) -> str:
    names = list(report["conditions"])
    columns = [(p, key) for p in ("A", "B") for key in MEASURES
               if key in report["conditions"][names[0]]["rates"][p]]
    grid = np.array([[report["conditions"][n]["rates"][p][key] for p, key in columns] for n in names], dtype=float)
    fig, ax = plt.subplots(figsize=(2.0 * len(columns) + 3, 0.32 * len(names) + 1.8))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=7)
    personas = report["personas"]
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([f"{p} ({personas[p]['name']})\n{MEASURES[key]}" for p, key in columns], fontsize=7)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    fig.colorbar(im, ax=ax, label="share of answers")
    ax.set_title("rates: condition x persona")
    fig.tight_layout()
    fig.savefig(out / "heatmap.png", dpi=120)
    plt.close(fig)
    return "heatmap.png"


def _dose_plot(plt, report: dict, out: Path) -> str:
    curves = report["analyses"]["dose_response"]
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4.2), squeeze=False)
    for ax, (p, curve) in zip(axes[0], curves.items()):
        other = "B" if p == "A" else "A"
        weights = [pt["weight"] for pt in curve]
        for key, style, label in (("persona_rate", "-o", f"{p}'s persona rate"),
                                  ("marker_rate", "--s", f"{p}'s marker rate")):
            if all(key in pt for pt in curve):
                rates = np.array([pt[key] for pt in curve])
                los = np.array([pt[f"{key}_ci95"][0] for pt in curve])
                his = np.array([pt[f"{key}_ci95"][1] for pt in curve])
                ax.errorbar(weights, rates, yerr=[rates - los, his - rates], fmt=style, capsize=3, label=label)
        ax.plot(weights, [pt["other_persona_rate"] for pt in curve], ":", color="grey",
                label=f"{other}'s persona rate")
        ax.set_xlabel(f"weight on {p}'s adapter (0 = base, 1 = the adapter)")
        ax.set_ylabel("share of answers (95% CI)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{p} ({report['personas'][p]['name']}) scaled")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dose_response.png", dpi=120)
    plt.close(fig)
    return "dose_response.png"
