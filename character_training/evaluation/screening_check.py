"""Screening against a known plant (issue 27, item 5): how well did ``screen:`` (run/screening.py)
find the pairs a planting (run/planting.py, ``plant.json``) put an off-target trait into?

Read from a screened training stage's directory: ``screened_out.jsonl`` (the dropped examples,
each with its 1-based line in the data file) and ``screen.json`` (every example's score per
trait). Reported: precision and recall of the pairs the stage dropped against the planted ones;
the same at several top fractions and thresholds, recomputed from the saved scores with the
stage's own rule (evaluation/off_target.py ``screened``: flagged on any trait); and each trait's
AUROC (the chance that a planted pair scores above an unplanted one). Written as JSON by the
caller (scripts/side_effect_demo.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from character_training.errors import UserError
from character_training.evaluation.off_target import screened
from data_gen.store import read_jsonl

DROPPED, RECORD = "screened_out.jsonl", "screen.json"  # run/screening.py's files (the run layer owns them)
TOP_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
THRESHOLDS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # trait units: 1 is as far as the trait's system prompt moves


def precision_recall(flagged, planted) -> dict:
    """Precision, recall and F1 of the ``flagged`` indices against the ``planted`` ones (None where
    a denominator is zero)."""
    flagged, planted = set(flagged), set(planted)
    hit = len(flagged & planted)
    precision = hit / len(flagged) if flagged else None
    recall = hit / len(planted) if planted else None
    f1 = (2 * precision * recall / (precision + recall)) if precision and recall else (0.0 if flagged and planted
                                                                                       else None)
    return {"flagged": len(flagged), "planted_flagged": hit, "precision": precision, "recall": recall, "f1": f1}


def auroc(scores, positive) -> float | None:
    """P(a positive example scores above a negative one), ties counting a half; unscored (NaN)
    examples left out; None without both kinds."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    keep = ~np.isnan(scores)
    pos, neg = scores[keep & positive], scores[keep & ~positive]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def screening_against_plant(stage_dir: Path, plant: dict) -> dict:
    """The screening of ``stage_dir`` scored against ``plant`` (plant.json's record)."""
    stage_dir = Path(stage_dir)
    record_path, dropped_path = stage_dir / RECORD, stage_dir / DROPPED
    if not record_path.is_file() or not dropped_path.is_file():
        raise UserError(f"{stage_dir}: no screening here ({RECORD} or {DROPPED} missing); train the stage with "
                        "screen: on (e.g. --set STAGE.screen.top_fraction=0.25) first")
    saved = json.loads(record_path.read_text(encoding="utf-8"))
    summary, n = saved["summary"], int(plant["records"])
    if summary["examples"] != n:
        raise UserError(f"{record_path}: screened {summary['examples']} examples, but the plant ({plant.get('source')}) "
                        f"holds {n}; score a stage trained on the planted pairs alone (its data: the pairs stage)")
    planted = sorted(int(i) for i in plant["planted"])
    dropped = sorted(r["screen"]["line"] - 1 for r in read_jsonl(dropped_path))
    scores = {t: np.array([np.nan if v is None else v for v in values], dtype=float)
              for t, values in saved["scores"].items()}
    truth = np.zeros(n, dtype=bool)
    truth[planted] = True
    table = []
    for rule, values in (("top_fraction", TOP_FRACTIONS), ("threshold", THRESHOLDS)):
        for value in values:
            drop, _ = screened(scores, **{rule: value})
            table.append({"rule": rule, "value": value, **precision_recall(np.flatnonzero(drop).tolist(), planted)})
    return {"stage_dir": str(stage_dir), "trait_planted": plant.get("trait"), "text_planted": plant.get("text_planted"),
            "examples": n, "planted": len(planted),
            "screen": {"traits": summary["traits"], "threshold": summary["threshold"],
                       "top_fraction": summary["top_fraction"], "dropped": len(dropped)},
            "as_screened": precision_recall(dropped, planted),
            "dropped_planted": sorted(set(dropped) & set(planted)),
            "dropped_unplanted": sorted(set(dropped) - set(planted)),
            "planted_kept": sorted(set(planted) - set(dropped)),
            "auroc": {t: auroc(v, truth) for t, v in scores.items()},
            "table": table}


def _share(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_screening(report: dict) -> str:
    """The screening as run, then the precision-recall table."""
    s, got = report["screen"], report["as_screened"]
    rule = f"top_fraction {s['top_fraction']}" if s["top_fraction"] is not None else f"threshold {s['threshold']}"
    rows = [f"screening ({rule} on {', '.join(s['traits'])}) against the plant ({report['planted']} of "
            f"{report['examples']} pairs, {report['trait_planted']}"
            f"{', text planted' if report['text_planted'] else ''}): dropped {got['flagged']}, "
            f"{got['planted_flagged']} of them planted: precision {_share(got['precision'])}, recall "
            f"{_share(got['recall'])}",
            "  AUROC (a planted pair above an unplanted one): "
            + ", ".join(f"{t} {_share(v)}" for t, v in report["auroc"].items()),
            f"  {'rule':<14}{'value':>7}{'dropped':>9}{'precision':>11}{'recall':>8}{'F1':>6}"]
    for r in report["table"]:
        rows.append(f"  {r['rule']:<14}{r['value']:>7}{r['flagged']:>9}{_share(r['precision']):>11}"
                    f"{_share(r['recall']):>8}{_share(r['f1']):>6}")
    return "\n".join(rows)
