"""Screening before training (issue 27, item 4): a training stage's ``screen:`` setting
(config/training.py's ScreenSettings) drops the examples whose teacher answer lies past the
student's along an off-target trait, before the trainer sees them.

Each example's score on a trait (evaluation/off_target.py's ``screening_scores``) is the base
model's projection of the teacher's answer minus the student's, both read after the example's
context with no system message, at the trait's best layer, in trait units. A preference pair's
teacher is its chosen answer and its student its rejected one; a conversation's (SFT, or
distillation on conversations) teacher is its last assistant turn and its student the base
model's own answer to the turns before it (generated here, one seed per context).

The trait vectors come from the run's kept extractions (``RUN_DIR/off_target/``; a standalone
``train``: ``OUT/off_target/``), made with the recipe's eval sampling, so the eval stage's
side-effect report and the screening share them. The stage writes the examples it keeps
(``screened_N_FILE``, what it trains on), the ones it dropped with their scores
(``screened_out.jsonl``, beside the adapter: nothing is lost) and ``screen.json`` (the scores'
record, reused while the data, the settings and the model are the same: a resumed or launched
stage does not score again); its manifest's ``screen`` counts what was dropped, per trait.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from character_training.errors import UserError
from character_training.run.context import Context
from data_gen.backends import Sampling
from data_gen.store import file_sha256, read_jsonl, write_json, write_jsonl

CACHE = "off_target"           # the kept trait extractions, in the run directory
DROPPED = "screened_out.jsonl"
RECORD = "screen.json"


def trait_cache(ctx: Context, out: Path) -> Path:
    return Path(out) / CACHE if ctx.given.standalone else Path(ctx.run_dir) / CACHE


def trait_sampling(e) -> Sampling:
    """The sampling extractions are made with: the recipe's eval sampling (so the side-effect
    report and the screening share them)."""
    return Sampling(temperature=e.temperature, top_p=e.top_p, max_tokens=e.max_tokens)


def _context(record: dict, where: str) -> tuple[list[dict], str, str | None]:
    """(context, teacher answer, student answer or None: to generate) of one training record."""
    if "chosen" in record:
        def said(value):  # a conversation's last message, or the answer as a string
            return value if isinstance(value, str) else value[-1]["content"]

        if "rejected" not in record:
            raise UserError(f"{where}: a record with a chosen but no rejected answer; screening scores a pair's "
                            "chosen answer against its rejected one")
        prompt = record["prompt"]
        context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return context, said(record["chosen"]), said(record["rejected"])
    messages = record.get("messages") or []
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise UserError(f"{where}: a record with no assistant turn; screening scores the last assistant turn of a "
                        "conversation (or a pair's chosen against its rejected answer)")
    return messages[:last], messages[last]["content"], None


def screen_files(section, ctx: Context, out: Path, files: list[Path]) -> tuple[list[Path], dict | None]:
    """(the files to train on, the manifest's ``screen`` record); the files as they are when
    ``section.screen`` is off."""
    from character_training.config.off_target import select_traits
    from character_training.evaluation.core import input_key
    from character_training.evaluation.off_target import extraction_key

    screen = section.screen
    if not screen.enabled:
        return files, None
    out = Path(out)
    traits = select_traits(screen.traits, "screen.traits")
    sampling = trait_sampling(ctx.recipe.eval)
    key = input_key("screen-1", [file_sha256(f) for f in files], screen.traits, screen.threshold, screen.top_fraction,
                    [extraction_key(t, ctx.model, sampling, ctx.recipe.seed) for t in traits])
    kept_files = [out / f"screened_{i}_{Path(f).name}" for i, f in enumerate(files)]
    saved = _saved(out / RECORD)
    if saved.get("key") == key and all(p.is_file() for p in kept_files) and (out / DROPPED).is_file():
        return kept_files, saved["summary"]

    records = [(i, j, r) for i, f in enumerate(files) for j, r in enumerate(read_jsonl(f))]
    found = [_context(r, str(files[i])) for i, _, r in records]
    contexts = [[m for m in c if m.get("role") != "system"] for c, _, _ in found]
    scores, layers = _scores(ctx, out, traits, sampling, contexts, [t for _, t, _ in found], [s for *_, s in found])
    from character_training.evaluation.off_target import screened

    drop, per_trait = screened(scores, threshold=screen.threshold, top_fraction=screen.top_fraction)
    flags = {t: screened({t: v}, threshold=screen.threshold, top_fraction=screen.top_fraction)[0]
             for t, v in scores.items()}
    for i, path in enumerate(kept_files):
        write_jsonl(path, (r for (f, _, r), d in zip(records, drop) if f == i and not d))
    write_jsonl(out / DROPPED, ({**r, "screen": {"file": str(files[f]), "line": j + 1,
                                                 "scores": {t: _number(v[n]) for t, v in scores.items()},
                                                 "flagged": [t for t, f in flags.items() if f[n]]}}
                                for n, ((f, j, r), d) in enumerate(zip(records, drop)) if d))
    summary = {"traits": list(scores), "threshold": screen.threshold, "top_fraction": screen.top_fraction,
               "examples": len(records), "dropped": int(drop.sum()), "kept": int(len(records) - drop.sum()),
               "dropped_per_trait": per_trait, "unscored": int(np.isnan(np.stack(list(scores.values()))).any(0).sum()),
               "layers": layers, "score_quantiles": {t: _quantiles(v) for t, v in scores.items()},
               "dropped_file": DROPPED, "trained_on": [p.name for p in kept_files]}
    write_json(out / RECORD, {"key": key, "summary": summary,
                              "scores": {t: [_number(x) for x in v] for t, v in scores.items()}})
    print(f"[screen] dropped {summary['dropped']} of {summary['examples']} examples ({per_trait}); "
          f"kept in {DROPPED}", flush=True)
    if summary["kept"] == 0:
        raise UserError(f"screen: every example was dropped ({per_trait}); raise screen.threshold or lower "
                        f"screen.top_fraction (the scores are in {out / RECORD})")
    return kept_files, summary


def _scores(ctx: Context, out: Path, traits, sampling: Sampling, contexts, teacher, student):
    """({trait: scores}, {trait: layer}): the extractions (kept in the run), the students' answers
    where a conversation has none, then the base model's reading of both answers."""
    from character_training.evaluation.off_target import ModelReader, extract_traits, screening_scores
    from data_gen.seeds import seeds_for

    backend = ctx.backend("student")
    reader = ModelReader(ctx.model)
    extractions = extract_traits(traits, backend, reader, trait_cache(ctx, out), model=ctx.model, sampling=sampling,
                                 seed=ctx.recipe.seed)
    missing = [n for n, s in enumerate(student) if s is None]
    if missing:
        print(f"[screen] the base model answers {len(missing)} conversations (the student side)", flush=True)
        got = backend.chat([contexts[n] for n in missing], sampling, desc="screen: student answers",
                           seeds=seeds_for(ctx.recipe.seed, [contexts[n] for n in missing]))
        student = list(student)
        for n, c in zip(missing, got):
            student[n] = c.text.strip()
    ctx.engines.release()
    scores = screening_scores(reader, extractions, contexts, teacher, student)
    return scores, {n: e.layer for n, e in extractions.items()}


def _saved(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _number(x) -> float | None:
    return None if np.isnan(x) else float(x)


def _quantiles(values: np.ndarray) -> dict:
    v = values[~np.isnan(values)]
    if not len(v):
        return {}
    return {q: float(np.quantile(v, p)) for q, p in (("min", 0), ("median", 0.5), ("p90", 0.9), ("max", 1))}


def recorded(manifest: dict, screen: dict | None) -> dict:
    """The training stage's manifest, with the screen's record where it screened."""
    if screen is not None:
        manifest["screen"] = screen
    return manifest
