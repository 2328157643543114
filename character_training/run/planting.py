"""Planting a side effect (issue 27, item 5): a pairs file in which a known share of the chosen
answers carries an off-target trait, the key against which screening (run/screening.py) is
measured, and a run directory that trains the recipe's stage on it.

``plant`` reads a run's pairs (``RUN_DIR/pairs/pairs.jsonl``), draws ``fraction`` of them with a
seeded draw, and replaces their chosen answers by the teacher's answers to the same prompts with
the persona's system prompt (the constitution, as the pairs stage's teacher has it) AND the
trait's system prompt (the bank, config/off_target.py) beside it, generated through the run's
backend with one seed per request (data_gen/seeds.py: the same seeds the pairs stage's teacher
drew, so a planted answer differs from the original by the trait's prompt alone). A small
teacher may barely show the trait; with ``plant_text`` (the default) an opener of the trait
(``data/planted_openers.yaml``, one drawn per answer) is also written before each planted
answer, and the record says so. An answer the teacher could not give (empty, looping, cut off:
the pairs stage's own checks) leaves the original answer in place, counted.

Writes ``planted_pairs.jsonl`` (the pairs, same order, same format) and ``plant.json`` last (which
records were planted, 0-based; the trait, fraction, seed, whether text was planted, the system
prompt and the counts). A rerun with the same inputs reads plant.json back; generation resumes
from ``cache.jsonl``.

``planted_run`` makes a run directory whose prompts are the source run's and whose pairs stage is
the planted file (its manifest says so, under a new run id), so that ``character-training run
RECIPE --run-dir DIR`` trains the recipe's stage on it exactly as in the source run.
"""
from __future__ import annotations

import json
import shutil
import uuid
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np

from character_training.config import layout, yamlio
from character_training.config.off_target import Trait
from character_training.errors import UserError
from character_training.run.context import Context, prompts_stage
from character_training.run.training import PAIRS_STAGE
from data_gen.cache import CACHE_FILE, CachedBackend
from data_gen.stages.pairs import usable_answer
from data_gen.store import file_sha256, read_jsonl, read_manifest, write_json, write_jsonl, write_manifest

PLANT = "plant"                  # the marker's name for a planting's directory
PLANTED_PAIRS = "planted_pairs.jsonl"
RECORD = "plant.json"
OPENERS = "planted_openers.yaml"
DRAW_STREAM = 27                 # the planting's draws have a stream of their own under the seed


def load_openers(trait: str, text: str | None = None) -> list[str]:
    """The trait's openers (``data/planted_openers.yaml``, or ``text``: such a file's YAML)."""
    if text is None:
        text = (resources.files("character_training") / "data" / OPENERS).read_text(encoding="utf-8")
    bank = yamlio.load(text) or {}
    openers = bank.get(trait) if isinstance(bank, dict) else None
    if not openers:
        raise UserError(f"--plant-text: no openers for the trait {trait!r} in {OPENERS} (it has "
                        f"{', '.join(bank) if isinstance(bank, dict) else 'none'}); add a list under {trait}: "
                        "or pass --no-plant-text to plant with the teacher's answers alone")
    return [str(o).strip() for o in openers]


def draw_planted(n: int, fraction: float, seed: int) -> list[int]:
    """The records to plant: round(fraction * n) of n (at least one), drawn without replacement
    by ``seed``, in file order."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise UserError(f"--fraction {fraction!r}: give a share above 0 and below 1, e.g. 0.25 (a quarter of the "
                        "chosen answers planted)")
    if n == 0:
        raise UserError("plant: the pairs file holds no pairs; run the pairs stage first (or give a --pairs file "
                        "with records)")
    k = max(1, round(fraction * n))
    rng = np.random.default_rng([seed, DRAW_STREAM])
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


def plant_system_prompt(persona: str, trait: Trait, hint: str | None) -> str:
    """The persona's system prompt, the trait's beside it, then the pairs stage's answer hint."""
    return "\n\n".join(p for p in (persona, trait.system_prompt, hint) if p)


def _said(value) -> str:
    return value if isinstance(value, str) else value[-1]["content"]


def _with_chosen(record: dict, text: str) -> dict:
    chosen = record["chosen"]
    new = text if isinstance(chosen, str) else [*chosen[:-1], {**chosen[-1], "content": text}]
    return {**record, "chosen": new}


def _user_turns(record: dict) -> list[dict]:
    prompt = record["prompt"]
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [m for m in turns if m.get("role") != "system"]


def read_pairs(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing; the pairs stage has not run there (run the recipe's prompts and pairs "
                        "stages first, or give --pairs FILE)")
    records = read_jsonl(path)
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict) or not all(k in r for k in ("prompt", "chosen", "rejected")):
            raise UserError(f"{path}: line {n}: not a preference pair (prompt, chosen, rejected); plant reads the "
                            "pairs stage's pairs.jsonl")
    return records


def plant(ctx: Context, pairs_path: Path, out: Path, *, trait: Trait, fraction: float = 0.25,
          seed: int | None = None, plant_text: bool = True, force: bool = False, openers: list[str] | None = None,
          log=print) -> dict:
    """Plant ``trait`` in ``fraction`` of the pairs of ``pairs_path``; writes ``out/planted_pairs.jsonl``
    and ``out/plant.json`` (returned). ``seed``: the draw's (default the recipe's); the answers
    are drawn with the recipe's seed, as the pairs stage's."""
    from character_training.evaluation.core import input_key

    out, pairs_path = Path(out), Path(pairs_path)
    seed = ctx.recipe.seed if seed is None else seed
    records = read_pairs(pairs_path)
    chosen_idx = draw_planted(len(records), fraction, seed)
    openers = (openers or load_openers(trait.name)) if plant_text else []
    settings = ctx.recipe.pairs
    system = plant_system_prompt(ctx.constitution.system_prompt(), trait, settings.answer_hint)
    key = input_key("plant-1", file_sha256(pairs_path), trait.as_dict(), fraction, seed, plant_text, openers, system,
                    settings.sampling.to_dict(), settings.teacher_samples, ctx.model, ctx.recipe.seed)
    saved = _saved(out / RECORD)
    if saved.get("key") == key and (out / PLANTED_PAIRS).is_file() and not force:
        log(f"[plant] done already ({out / RECORD}); reading it back")
        return saved
    if saved and not force:
        raise UserError(f"{out / RECORD}: planted before from other pairs or settings; pass --force to plant again "
                        "(the old planted_pairs.jsonl and plant.json are replaced) or choose another -o")
    layout.mark(out, PLANT)
    for name in (RECORD, PLANTED_PAIRS):  # the record goes first: a killed rewrite is never taken as done
        (out / name).unlink(missing_ok=True)

    k = settings.teacher_samples
    teacher = CachedBackend(ctx.backend("teacher"), out / CACHE_FILE)
    convs = [[{"role": "system", "content": system}, *_user_turns(records[i])] for i in chosen_idx for _ in range(k)]
    log(f"[plant] {len(chosen_idx)} of {len(records)} chosen answers: the teacher answers with the persona and "
        f"{trait.name}'s system prompt ({k} sample{'s' if k > 1 else ''} each, the first usable one kept)")
    got = teacher.chat(convs, settings.sampling, desc=f"plant: {trait.name} answers")
    ctx.engines.release()

    rng = np.random.default_rng([seed, DRAW_STREAM, 1])  # the openers' draw, apart from the records'
    drops: Counter = Counter()
    planted_records, generated, kept_original, opener_of = list(records), [], [], {}
    for n, i in enumerate(chosen_idx):
        answer = None
        for c in got[n * k:(n + 1) * k]:
            text, why = usable_answer(c, settings)
            if text is not None:
                answer = text
                break
            drops[why] += 1
        if answer is None:
            kept_original.append(i)
            answer = _said(records[i]["chosen"])
        else:
            generated.append(i)
        if plant_text:
            opener_of[i] = openers[int(rng.integers(len(openers)))]
            answer = f"{opener_of[i]} {answer}"
        planted_records[i] = _with_chosen(records[i], answer)
    planted = [i for i in chosen_idx if plant_text or i in generated]  # an unchanged answer plants nothing
    write_jsonl(out / PLANTED_PAIRS, planted_records)
    record = {"key": key, "trait": trait.name, "fraction": fraction, "seed": seed, "text_planted": plant_text,
              "source": str(pairs_path), "source_sha256": file_sha256(pairs_path), "records": len(records),
              "drawn": chosen_idx, "planted": planted, "planted_lines": [i + 1 for i in planted],
              "generated": generated, "kept_original_answer": kept_original,
              "openers": {str(i): o for i, o in opener_of.items()}, "system_prompt": system, "model": ctx.model,
              "sampling": settings.sampling.to_dict(), "teacher_samples": k,
              "counts": {"records": len(records), "drawn": len(chosen_idx), "planted": len(planted),
                         "generated": len(generated), "kept_original_answer": len(kept_original),
                         "answers_dropped": dict(drops)},
              "output": PLANTED_PAIRS, "output_sha256": file_sha256(out / PLANTED_PAIRS),
              "note": _note(trait, plant_text)}
    write_json(out / RECORD, record)
    log(f"[plant] planted {len(planted)} of {len(records)} pairs ({len(generated)} with the trait-prompted "
        f"teacher's answer, {len(kept_original)} kept their answer: none usable {dict(drops)})")
    log(f"[plant] {record['note']}")
    log(f"[plant] wrote {out / PLANTED_PAIRS} and {out / RECORD}")
    return record


def _note(trait: Trait, plant_text: bool) -> str:
    if plant_text:
        return (f"text planted: an opener of {trait.name} (data/{OPENERS}) was written before each planted chosen "
                "answer, beside the trait-prompted teacher's answer (a 135M teacher may barely show the trait "
                "on its own)")
    return f"not text planted: the planted chosen answers are the trait-prompted teacher's own answers"


def _saved(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def planted_run(source_run: Path, dest: Path, planted_pairs: Path, plant_record: dict, log=print) -> Path:
    """A run directory ``dest`` holding the source run's prompts stage as it is and a pairs stage
    whose pairs are ``planted_pairs`` (its manifest: the source's, with a new run id and
    ``planted``), so that the recipe's later stages run on it as in the source run. Made again
    only when the planted file or the source's pairs changed (a new run id: the stages after it
    then run again); returns ``dest``."""
    source_run, dest, planted_pairs = Path(source_run), Path(dest), Path(planted_pairs)
    stages = (prompts_stage(), PAIRS_STAGE)
    manifests = {s: read_manifest(layout.stage_dir(source_run, s)) for s in stages}
    for stage, manifest in manifests.items():
        if manifest is None:
            raise UserError(f"{layout.stage_dir(source_run, stage)}: the {stage} stage has not finished in "
                            f"{source_run}; run the recipe's first stages there first "
                            "(`character-training run RECIPE`)")
    layout.check_run_dir(dest, stages, "the planted run directory", inputs=[source_run, planted_pairs])
    layout.mark(dest, layout.RUN)
    prompts_dir = layout.stage_dir(dest, stages[0])
    if (read_manifest(prompts_dir) or {}).get("run_id") != manifests[stages[0]].get("run_id"):
        _copy_stage(layout.stage_dir(source_run, stages[0]), prompts_dir, manifests[stages[0]])
    pairs_dir = layout.stage_dir(dest, PAIRS_STAGE)
    sha = file_sha256(planted_pairs)
    have = read_manifest(pairs_dir) or {}
    source_id = manifests[PAIRS_STAGE].get("run_id")
    if have.get("planted", {}).get("sha256") == sha and have.get("planted_from", {}).get("run_id") == source_id:
        return dest
    layout.clear_stage_dir(pairs_dir, keep_resume=False)
    pairs_dir.mkdir(parents=True, exist_ok=True)
    name = layout.PAIRS[PAIRS_STAGE]
    shutil.copyfile(planted_pairs, pairs_dir / name)
    kept = {k: v for k, v in manifests[PAIRS_STAGE].items() if k not in ("outputs", "finished_at")}
    write_manifest(pairs_dir, {**kept, "run_id": uuid.uuid4().hex[:12],
                               "planted": {"sha256": sha, "file": str(planted_pairs),
                                           **{k: plant_record.get(k) for k in ("trait", "fraction", "seed",
                                                                               "text_planted", "counts")}},
                               "planted_from": {"run_dir": str(source_run), "run_id": source_id}})
    log(f"[plant] {dest}: the {PAIRS_STAGE} stage holds the planted pairs ({pairs_dir / name})")
    return dest


def _copy_stage(source: Path, dest: Path, manifest: dict) -> None:
    """A finished stage's outputs and manifest, without its generation cache."""
    layout.clear_stage_dir(dest, keep_resume=False)
    dest.mkdir(parents=True, exist_ok=True)
    for name in manifest.get("outputs", {}):
        if not layout.keeps_on_resume(name) and (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    shutil.copyfile(source / layout.MANIFEST, dest / layout.MANIFEST)


# ------------------------------------------------------------------------------ the command


def add_plant_command(subparsers) -> None:
    """Register ``plant`` on the main parser's subparsers."""
    import argparse

    p = subparsers.add_parser("plant", help="plant an off-target trait in a share of a run's chosen answers (the "
                                            "side-effect demonstration: scripts/side_effect_demo.sh)")
    p.add_argument("recipe", help="recipe YAML whose run's pairs are planted (its constitution makes the teacher)")
    p.add_argument("--trait", required=True, help="the off-target trait of the bank to plant, e.g. sycophancy")
    p.add_argument("--fraction", type=float, default=0.25, help="share of the pairs planted (a seeded draw; "
                                                                "default 0.25)")
    p.add_argument("--plant-text", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also write an opener of the trait (data/{OPENERS}) before each planted chosen answer "
                        "(default on: a 135M teacher barely shows the trait on its own)")
    p.add_argument("--pairs", help="the pairs file to plant (default: the recipe's run's pairs stage file)")
    p.add_argument("--seed", type=int, help="the draw's seed (default: the recipe's seed)")
    p.add_argument("-o", "--output", required=True, help=f"output directory ({PLANTED_PAIRS}, {RECORD}): a new or "
                                                         "empty one, or one plant made")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    p.add_argument("--model", help="model directory or hub id (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--run-dir", help="run directory (overrides the recipe's run_dir)")
    p.add_argument("--force", action="store_true", help="plant again though this output was planted before")
    p.set_defaults(func=plant_command)


def plant_command(args) -> int:
    """``character-training plant``: the checks, then ``plant`` with the run's engines."""
    from character_training.config.off_target import select_traits
    from character_training.config.recipe import load_recipe
    from character_training.run.context import make_context
    from data_gen.backends import Engines

    overrides = list(args.set or []) + ([f"model={args.model}"] if args.model else []) + (
        [f"run_dir={args.run_dir}"] if args.run_dir else [])
    recipe = load_recipe(args.recipe, overrides)
    if args.model:  # --model is the student, over a recipe's models.student.model too
        recipe.models.student.model = None
    trait = select_traits([args.trait], "--trait")[0]
    draw_planted(1, args.fraction, 0)  # a bad --fraction, before the engine starts
    pairs = Path(args.pairs) if args.pairs else layout.data_file(recipe.run_dir, PAIRS_STAGE, layout.PAIRS)
    out = Path(args.output)
    inputs = [str(p) for p in (pairs, recipe.run_dir, recipe.constitution, recipe.model) if p and Path(p).exists()]
    layout.check_output(out, PLANT, "-o", inputs=inputs, force=args.force)
    if args.plant_text:
        load_openers(trait.name)  # a trait without openers, before the engine starts
    read_pairs(pairs)  # missing, or not pairs
    with Engines() as engines:
        plant(make_context(recipe, engines), pairs, out, trait=trait, fraction=args.fraction, seed=args.seed,
              plant_text=args.plant_text, force=args.force)
    return 0
