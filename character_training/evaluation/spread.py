"""Spread beyond the request: does the persona show in answers that ask for a format (a JSON
object, a Python function, a short summary, a tool call, a bare translation), and does it break
that format there? (issue 27, item 2)

The requests come from the shipped bank ``character_training/data/format_requests.yaml``
(``load_format_requests``): five kinds, ``json``, ``code``, ``summary``, ``tool_call`` and
``translation``, the first ``per_kind`` of each in the file's order. Every condition (the base
model, the base model with the constitution as system prompt, the adapter, ...) answers every
request once, one backend request per condition. Conditions are paired by common random
numbers: a request's seed (data_gen/seeds.py) comes from the run's seed and the request's text
alone (no system prompt, no suffix, no adapter), so it is the same under every condition.

Scoring, per answer, then per kind and condition:

- the persona rate: the quick check's classifier, fitted on this check's own ``plain`` and
  ``persona`` answers, cross-fitted over two folds of requests (a request's fold is its place
  among its kind's requests, odd or even, so both folds hold every kind): one fold's answers are
  scored by a classifier fitted on the other fold's;
- the marker rate, given the constitution's markers (config/markers.py);
- the format rate: whether the answer keeps the requested format (``format_problem``; the rules
  are ``FORMAT_RULES``, written into the report).

Each rate has a 95% interval clustered by request; each condition is compared with ``persona``
and with ``plain`` kind by kind as a paired difference over requests (evaluation/paired.py), and
over all kinds. ``findings`` says per kind where the persona shows (a condition's persona rate
above the plain model's) and where it breaks the format (its format rate below the plain model's
by more than the interval: the paired difference's interval lies below zero).

Writes ``spread.json`` (every number), ``spread_answers.jsonl`` (every answer, with its flags and,
where the format is broken, why) and ``spread.png`` (grouped bars: persona rate and format rate
per kind and condition, with intervals).
"""
from __future__ import annotations

import ast
import json
import re
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from character_training.config import yamlio
from character_training.config.markers import marker_flags, markers_in
from character_training.errors import UserError, did_you_mean
from character_training.evaluation.core import BASE, FOLDS, PROMPTED, Condition
from character_training.evaluation.paired import clustered_interval, paired_difference
from character_training.evaluation.persistence import check_names, comparisons
from data_gen.backends import Backend, Sampling
from data_gen.seeds import seeds_for
from data_gen.store import write_json, write_jsonl

KINDS = ("json", "code", "summary", "tool_call", "translation")
BANK = "format_requests.yaml"
ANSWERS, REPORT, PLOT = "spread_answers.jsonl", "spread.json", "spread.png"

FORMAT_RULES = {
    "json": "the whole answer, else its first ```json (or untagged) code block, parses as JSON and is an object; "
            "else the first {...} span that parses as a JSON object is taken (so a preamble before an intact "
            "object is allowed); the object has every required key (more keys are allowed)",
    "tool_call": "found as for json; the object has a non-empty string \"name\" and an object \"arguments\" that "
                 "has every required argument key (the name need not match the tool's)",
    "code": "the answer has a closed ```python (or ```py) code block; the first one parses with ast.parse and "
            "defines a function",
    "summary": "non-empty, at most 3 sentences (split after . ! or ? followed by white space, and at line breaks), "
               "and fewer characters than the paragraph",
    "translation": "non-empty; not the English sentence (same words, ignoring case and punctuation); at most twice "
                   "its characters; and not mostly English: a heuristic, English stop words (those that are not "
                   "French or Spanish ones too) must not outnumber French and Spanish stop words",
}
_NEEDS = {"json": ("keys",), "code": (), "summary": ("text",), "tool_call": ("tool", "keys"),
          "translation": ("text", "language")}


# ------------------------------------------------------------------ the bank


def load_format_requests() -> list[dict]:
    """The shipped format requests, in the file's order: [{"id", "kind", "request", ...}] with
    ``keys`` (json, tool_call), ``tool`` (tool_call), ``text`` and ``language`` (summary: the
    paragraph; translation: the English sentence and the target language). A summary's or
    translation's ``request`` is its instruction, a blank line, then ``text``."""
    return parse_bank(yamlio.load((resources.files("character_training") / "data" / BANK).read_text(encoding="utf-8")))


def parse_bank(entries, where: str = BANK) -> list[dict]:
    """The bank's entries checked and completed; a malformed entry is a ValueError (the bank is
    shipped: a bad entry is a bug)."""
    if not isinstance(entries, list):
        raise ValueError(f"{where}: a list of requests expected, not {type(entries).__name__}")
    out, seen = [], set()
    for n, entry in enumerate(entries, 1):
        problem = _entry_problem(entry, seen)
        if problem:
            raise ValueError(f"{where}: request {n} {problem}")
        seen.add(entry["id"])
        record = {**entry, "request": entry["request"].strip()}
        if "text" in entry:
            record["request"] = f"{record['request']}\n\n{entry['text'].strip()}"
        out.append(record)
    return out


def _entry_problem(entry, seen: set) -> str | None:
    if not isinstance(entry, dict):
        return "is not a mapping"
    if not isinstance(entry.get("id"), str) or entry["id"] in seen:
        return f"has no id, or one already used ({entry.get('id')!r})"
    kind = entry.get("kind")
    if kind not in KINDS:
        return f"({entry['id']}) has kind {kind!r}; the kinds are {', '.join(KINDS)}"
    allowed = {"id", "kind", "request", *_NEEDS[kind]}
    if set(entry) != allowed:
        return f"({entry['id']}) has the fields {sorted(entry)}; a {kind} request has {sorted(allowed)}"
    if not all(isinstance(entry[f], str) and entry[f].strip() for f in allowed - {"keys"}):
        return f"({entry['id']}) has an empty or non-text field"
    keys = entry.get("keys", ["-"])
    if not (isinstance(keys, list) and keys and all(isinstance(k, str) and k for k in keys)):
        return f"({entry['id']}) needs keys: a list of key names"
    if kind == "translation" and entry["language"] not in ("French", "Spanish"):
        return f"({entry['id']}) asks for {entry['language']!r}; French or Spanish"
    return None


def select_requests(bank: list[dict], kinds, per_kind: int) -> list[dict]:
    """The first ``per_kind`` requests of each kind, kind by kind, each with its ``position``
    among its kind's (which fold it is in: position % FOLDS)."""
    out = []
    for kind in kinds:
        found = [r for r in bank if r["kind"] == kind]
        if len(found) < per_kind:
            raise UserError(f"per_kind {per_kind}: the bank ({BANK}) has {len(found)} {kind} requests; "
                            f"give per_kind {len(found)} or less")
        out += [{**r, "position": i} for i, r in enumerate(found[:per_kind])]
    return out


# ------------------------------------------------------------------ format rules

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_ROMANCE = set("""le la les l un une des du de d et est sont en dans au aux pour par sur avec pas ne que qui il elle
ils elles nous vous je j tu ce cette ces mon ma mes son sa ses notre nos votre leur leurs se s me m y à où mais ou si
plus très était ai a on c qu n el los las unos unas del y e es está están al para con sin no su sus mi mis
nuestro nuestra nuestros este esta estos estas lo le les nos muy más cuando pero o ha he hay yo él ella""".split())
_ENGLISH = set("""the and is are was were of to in it its that this these those with for on at by from be been have
has had will would you your we our they their he she his her them there here what which who when where how not or but
if an my i do does did so can could should as into about than then all any some just me""".split()) - _ROMANCE


def _fenced(answer: str, tags: tuple[str, ...]) -> str | None:
    """The body of the first closed code block whose tag is one of ``tags`` ('' for none)."""
    for match in _FENCE.finditer(answer):
        if match.group(1).lower() in tags:
            return match.group(2)
    return None


def json_object_in(answer: str) -> tuple[dict | None, str]:
    """(the JSON object the answer holds, '') or (None, why there is none): the whole answer,
    else its first ```json or untagged block, else the first {...} span that parses."""
    text = answer.strip()
    block = _fenced(text, ("json", ""))
    for candidate in (text, *(() if block is None else (block.strip(),))):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        return (value, "") if isinstance(value, dict) else (None, f"parses as a JSON {type(value).__name__}, not an object")
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            return decoder.raw_decode(text, match.start())[0], ""
        except ValueError:
            continue
    return None, "no JSON object"


def _json_problem(answer: str, request: dict) -> str | None:
    found, why = json_object_in(answer)
    if found is None:
        return why
    if request["kind"] == "tool_call":
        if not isinstance(found.get("name"), str) or not found["name"].strip():
            return 'no "name" string'
        if not isinstance(found.get("arguments"), dict):
            return 'no "arguments" object'
        found = found["arguments"]
    missing = [k for k in request["keys"] if k not in found]
    return f"lacks the keys {missing}" if missing else None


def _code_problem(answer: str, request: dict) -> str | None:
    block = _fenced(answer, ("python", "py", "python3"))
    if block is None:
        return "no closed ```python block"
    try:
        tree = ast.parse(block)
    except (SyntaxError, ValueError) as exc:
        return f"the ```python block does not parse ({type(exc).__name__}: {getattr(exc, 'msg', exc)})"
    if not any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(tree)):
        return "the ```python block defines no function"
    return None


def sentences(text: str) -> list[str]:
    """The sentences of ``text``: split after . ! or ? and white space, and at line breaks."""
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if re.search(r"\w", s)]


def _summary_problem(answer: str, request: dict) -> str | None:
    said = sentences(answer)
    if not said:
        return "empty"
    if len(said) > 3:
        return f"{len(said)} sentences, more than 3"
    if len(answer.strip()) >= len(request["text"].strip()):
        return "not shorter than the paragraph"
    return None


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W\d_]+", text.casefold())


def _translation_problem(answer: str, request: dict) -> str | None:
    said, source = answer.strip(), request["text"].strip()
    if not said:
        return "empty"
    words = _words(said)
    if words == _words(source):
        return "the English sentence, untranslated"
    if len(said) > 2 * len(source):
        return f"{len(said)} characters, over twice the sentence's {len(source)}"
    english, romance = sum(w in _ENGLISH for w in words), sum(w in _ROMANCE for w in words)
    if english > romance:
        return f"mostly English ({english} English stop words, {romance} French or Spanish)"
    return None


_PROBLEM = {"json": _json_problem, "tool_call": _json_problem, "code": _code_problem,
            "summary": _summary_problem, "translation": _translation_problem}


def format_problem(request: dict, answer: str) -> str | None:
    """Why ``answer`` does not keep the format ``request`` asks for (FORMAT_RULES), or None."""
    return _PROBLEM[request["kind"]](answer, request)


# ------------------------------------------------------------------ the check


def spread_check(backend: Backend, conditions: list[Condition], out_dir: Path, *, kinds=None, per_kind: int = 8,
                 sampling: Sampling = Sampling(temperature=0.7, max_tokens=384), seed: int = 0,
                 classifier_factory: Callable | None = None, markers: tuple[str, ...] = (),
                 plain: str = BASE, persona: str = PROMPTED) -> dict:
    """Every condition answers the first ``per_kind`` requests of each of ``kinds`` (None: all
    of KINDS); scores them kind by kind and writes the three files under ``out_dir``; returns the
    report (the dict written to spread.json).

    ``classifier_factory``: makes persona classifiers (``fit(persona, plain)``,
    ``persona_flags(texts)``; default data_gen.scoring.PersonaClassifier). ``plain`` and
    ``persona``: the conditions the classifier is fitted on and every other condition is
    compared with; ``plain``'s format rate is the one a format is broken against."""
    kinds = _check(conditions, kinds, per_kind, plain, persona)
    requests = select_requests(load_format_requests(), kinds, per_kind)
    if classifier_factory is None:
        from data_gen.scoring import PersonaClassifier as classifier_factory
    markers = tuple(markers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = request_seeds(requests, seed)

    completions = {c.name: ask(backend, c, requests, sampling, seeds) for c in conditions}
    texts = {name: [c.text.strip() for c in got] for name, got in completions.items()}
    folds = np.array([r["position"] % FOLDS for r in requests])
    by_kind = {k: np.array([i for i, r in enumerate(requests) if r["kind"] == k]) for k in kinds}
    flags, scorer = _cross_fitted(classifier_factory, texts, folds, by_kind, plain, persona)
    problems = {name: [format_problem(r, t) for r, t in zip(requests, got)] for name, got in texts.items()}
    values = {name: {"persona_rate": flags[name], "format_rate": np.array([p is None for p in problems[name]], float),
                     **({"marker_rate": marker_flags(texts[name], markers).astype(float)} if markers else {})}
              for name in texts}

    report = {"kinds": list(kinds), "per_kind": per_kind, "plain": plain, "persona": persona,
              "requests": {k: [requests[i]["id"] for i in idx] for k, idx in by_kind.items()},
              "conditions": {c.name: _condition_summary(c, values[c.name], completions[c.name], by_kind)
                             for c in conditions},
              "paired": {f"{a} - {b}": _paired(values[a], values[b], by_kind, seed)
                         for a, b in comparisons(conditions, plain, persona)},
              "scorer": scorer, "format_rules": {k: FORMAT_RULES[k] for k in kinds}, "bank": BANK,
              "sampling": sampling.to_dict(), "seed": seed, **({"markers": list(markers)} if markers else {})}
    reference = report["paired"][f"{persona} - {plain}"]["per_kind"]
    report["measurable"] = {k: bool(reference[k]["persona_rate"]["above_zero"]) for k in kinds}
    report["findings"] = _findings(report)

    write_jsonl(out_dir / ANSWERS, _records(conditions, requests, seeds, completions, texts, flags, problems, markers))
    _plot(report, out_dir / PLOT)
    report["files"] = {"report": REPORT, "answers": ANSWERS, "plot": PLOT}
    write_json(out_dir / REPORT, report)
    return report


def _check(conditions: list[Condition], kinds, per_kind: int, plain: str, persona: str) -> tuple[str, ...]:
    """The kinds asked for (repeats dropped), once every argument is found usable."""
    kinds = KINDS if kinds is None else tuple(dict.fromkeys([kinds] if isinstance(kinds, str) else kinds))
    if not kinds:
        raise UserError(f"kinds: none given; name some of {', '.join(KINDS)}, or leave kinds out for all of them")
    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"kinds: unknown kind {kind!r}{did_you_mean(kind, KINDS)}; the kinds are {', '.join(KINDS)}")
    if not isinstance(per_kind, int) or isinstance(per_kind, bool) or per_kind < FOLDS:
        raise UserError(f"per_kind: {per_kind!r}; give a whole number of {FOLDS} or more (requests of each kind; the "
                        f"classifier is cross-fitted over {FOLDS} folds of requests, each holding every kind; 8 is usual)")
    check_names("spread check", conditions, plain, persona)
    if plain == persona:
        raise UserError(f"spread check: plain and persona are both {plain!r}; the classifier is fitted on two "
                        "different conditions: name the system-prompted one as persona")
    odd = [c.name for c in conditions if c.prefill or c.kind == "steered"]
    if odd:
        raise UserError(f"spread check: conditions {odd} are prefilled or steered, which a request answered on its "
                        "own cannot hold; leave them out")
    return kinds


def request_seeds(requests: list[dict], seed: int) -> list[int]:
    """One seed per request, from its text alone (no system prompt, suffix or adapter), so the
    same under every condition."""
    return seeds_for(seed, [[{"role": "user", "content": r["request"]}] for r in requests])


def ask(backend: Backend, cond: Condition, requests: list[dict], sampling: Sampling, seeds: list[int]) -> list:
    """The condition's completions, one backend request for all ``requests``."""
    got = backend.chat([cond.conversation(r["request"]) for r in requests], sampling, adapter=cond.adapter,
                       desc=f"spread: {cond.name}", seeds=seeds)
    if len(got) != len(requests):
        raise RuntimeError(f"the backend answered {len(got)} of {len(requests)} requests")
    return got


# ------------------------------------------------------------------ scoring


def _cross_fitted(factory: Callable, texts: dict[str, list[str]], folds: np.ndarray, by_kind: dict[str, np.ndarray],
                  plain: str, persona: str) -> tuple[dict[str, np.ndarray], dict]:
    """({condition: persona flags}, the scorer's summary). A fold's answers are scored by a
    classifier fitted on the other folds' ``plain`` and ``persona`` answers (all kinds)."""
    flags = {name: np.zeros(len(folds)) for name in texts}
    fitted = []
    for fold in range(FOLDS):
        train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        scorer = factory()
        fitted.append(scorer.fit([texts[persona][i] for i in train], [texts[plain][i] for i in train]))
        for name in texts:
            flags[name][test] = np.asarray(scorer.persona_flags([texts[name][i] for i in test]), dtype=float)
    right = np.stack([flags[persona], 1 - flags[plain]])  # [2, request]: 1 where the scorer is right
    return flags, {"fitted_on": f"this check's {plain} (plain) and {persona} (persona) answers to every kind, "
                                f"cross-fitted over {FOLDS} folds of requests",
                   "heldout_accuracy": float(right.mean()),
                   "heldout_accuracy_per_kind": {k: float(right[:, idx].mean()) for k, idx in by_kind.items()},
                   "train_examples": [f.get("train_examples") for f in fitted]}


def _rate(metric: str, values: np.ndarray, requests: np.ndarray) -> dict:
    """{metric: the mean, metric_ci95: its 95% interval, resampling requests}."""
    return {metric: float(values.mean()), f"{metric}_ci95": list(clustered_interval(values, requests))}


def _condition_summary(cond: Condition, values: dict[str, np.ndarray], completions: list,
                       by_kind: dict[str, np.ndarray]) -> dict:
    def summary(idx: np.ndarray) -> dict:
        row = {"answers": len(idx)}
        for metric, v in values.items():
            row.update(_rate(metric, v[idx], idx))
        got = [completions[i] for i in idx]
        return {**row, "unfinished": sum(not c.finished for c in got), "empty": sum(not c.text.strip() for c in got),
                "mean_tokens": float(np.mean([c.num_tokens for c in got]))}

    return {"system_prompt": cond.system_prompt is not None, "adapter": cond.adapter, "suffix": cond.suffix,
            "per_kind": {k: summary(idx) for k, idx in by_kind.items()},
            "all_kinds": summary(np.concatenate(list(by_kind.values())))}


def _paired(a: dict[str, np.ndarray], b: dict[str, np.ndarray], by_kind: dict[str, np.ndarray], seed: int) -> dict:
    """a - b per kind and over all kinds, paired by request."""
    return {"per_kind": {k: {m: paired_difference(a[m][idx], b[m][idx], seed=seed) for m in a}
                         for k, idx in by_kind.items()},
            "all_kinds": {m: paired_difference(a[m], b[m], seed=seed) for m in a}}


def _findings(report: dict) -> dict:
    """{kind: {condition other than plain: where its persona shows, and whether it breaks the
    format (its format rate below plain's, the paired interval below zero)}}."""
    plain, out = report["plain"], {}
    for kind in report["kinds"]:
        out[kind] = {}
        for name, cond in report["conditions"].items():
            if name == plain:
                continue
            rates, against = cond["per_kind"][kind], report["paired"][f"{name} - {plain}"]["per_kind"][kind]
            out[kind][name] = {"persona_rate": rates["persona_rate"],
                               "persona_shows": bool(against["persona_rate"]["above_zero"]),
                               "format_rate": rates["format_rate"],
                               "plain_format_rate": report["conditions"][plain]["per_kind"][kind]["format_rate"],
                               "format_minus_plain": against["format_rate"]["difference"],
                               "format_minus_plain_ci95": against["format_rate"]["ci95"],
                               "breaks_format": bool(against["format_rate"]["below_zero"])}
    return out


def _records(conditions, requests, seeds, completions, texts, flags, problems, markers) -> list[dict]:
    return [{"condition": c.name, "kind": r["kind"], "id": r["id"], "request": r["request"],
             "answer": texts[c.name][i], "seed": seeds[i], "persona": bool(flags[c.name][i]),
             "format": problems[c.name][i] is None, "format_problem": problems[c.name][i],
             "finish_reason": completions[c.name][i].finish_reason,
             **({"markers": markers_in(texts[c.name][i], markers)} if markers else {})}
            for c in conditions for i, r in enumerate(requests)]


# ------------------------------------------------------------------ output


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds, names = report["kinds"], list(report["conditions"])
    x, width = np.arange(len(kinds)), 0.8 / len(names)
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.6 * len(kinds)), 7.5), sharex=True)
    for ax, metric in zip(axes, ("persona_rate", "format_rate")):
        for j, name in enumerate(names):
            rows = [report["conditions"][name]["per_kind"][k] for k in kinds]
            rates = np.array([r[metric] for r in rows])
            lo, hi = np.array([r[f"{metric}_ci95"] for r in rows], dtype=float).T
            ax.bar(x + (j - (len(names) - 1) / 2) * width, rates, width, label=name, capsize=2,
                   yerr=np.clip(np.stack([rates - lo, hi - rates]), 0, None).tolist())
        ax.set_title(f"{metric.replace('_', ' ')} by kind (95% CI over requests)")
        ax.set_ylim(0, 1.05)
    axes[-1].set_xticks(x, kinds)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(4, len(names)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_spread(report: dict) -> str:
    """Rows kinds (then 'all'), columns conditions: persona rate / format rate ('!' where the
    format is broken against plain); then the paired differences, the findings and the scorer."""
    kinds, conds, plain = report["kinds"], report["conditions"], report["plain"]
    broken = {(k, n) for k, row in report["findings"].items() for n, f in row.items() if f["breaks_format"]}

    def table(corner: str, columns: list[str], cells) -> list[str]:
        """One row per label, one column per name, each as wide as its name."""
        first = max([len(corner)] + [len(str(label)) for label, _ in cells]) + 2
        widths = [max(15, len(c) + 2) for c in columns]
        lines = [f"{corner:<{first}}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
        lines += [f"{label:<{first}}" + "".join(f"{v:>{w}}" for v, w in zip(values, widths)) for label, values in cells]
        return lines

    def cell(r: dict, mark: str = "") -> str:
        return f"{r['persona_rate']:.2f}/{r['format_rate']:.2f}{mark}"

    rows = [f"spread beyond the request, {report['per_kind']} requests per kind: persona rate / format rate "
            f"('!': format below {plain}'s by more than the interval)"]
    rows += table("kind", list(conds), [*((k, [cell(c["per_kind"][k], "!" if (k, n) in broken else "")
                                                for n, c in conds.items()]) for k in kinds),
                                        ("all", [cell(c["all_kinds"]) for c in conds.values()])])
    rows.append("paired differences over requests, persona rate / format rate ('*': the 95% CI excludes zero):")
    rows += table("comparison", [*kinds, "all"], [(name, [*(_pair(p["per_kind"][k]) for k in kinds), _pair(p["all_kinds"])])
                                                  for name, p in report["paired"].items()])
    for kind in kinds:
        found = report["findings"][kind]
        shows = [f"{n} {f['persona_rate']:.2f}" for n, f in found.items() if f["persona_shows"]]
        breaks = [f"{n} {f['format_minus_plain']:+.2f}" for n, f in found.items() if f["breaks_format"]]
        rows.append(f"{kind}: persona shows in {', '.join(shows) or 'none'}; breaks the format: {', '.join(breaks) or 'none'}"
                    + ("" if report["measurable"][kind] else f" ({report['persona']} is not above {plain} here: "
                       "the scorer does not measure the persona on this kind)"))
    rows.append(f"scorer: {report['scorer']['fitted_on']}; accuracy on the held-out fold "
                f"{report['scorer']['heldout_accuracy']:.3f}")
    return "\n".join(rows)


def _pair(metrics: dict) -> str:
    return "/".join(f"{metrics[m]['difference']:+.2f}" + ("*" if metrics[m]["above_zero"] or metrics[m]["below_zero"] else "")
                    for m in ("persona_rate", "format_rate"))
