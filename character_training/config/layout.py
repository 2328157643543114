"""Where a run keeps its files: the run's directories and files, from the stage table (config/stages.py).

    RUN_DIR/recipe.json                  the recipe as run (final values, model, versions)
    RUN_DIR/STAGE/manifest.json          written last: the stage is finished
    RUN_DIR/STAGE/FILE                   a data stage's records (DATA below; the stage table's ``writes``):
                                         prompts/prompts.jsonl, pairs/pairs.jsonl, critique/sft.jsonl, ...
    RUN_DIR/STAGE/adapter/               a training stage's PEFT adapter and its model card
    RUN_DIR/eval/                        eval.json (quick check) or report.md/report.json

The pipeline reads its stages' inputs from here, the CLI prints what a stage wrote from here,
and the evaluation's contamination check finds a run's training data from here.

Outputs are never destructive: a command writes into a new (or empty) directory, or into one it
made itself, which says so by a ``.character-training`` marker (a run directory: its marker or
``recipe.json``; a stage directory: its marker or ``manifest.json``, or the run directory it is
in). Only such a directory is ever cleared; the current directory, a directory above it, home,
``/`` and a directory that is or holds an input are refused as outputs (``check_output``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from character_training.config import stages
from character_training.errors import UserError
from character_training.util import unsafe_place as _unsafe_place
from data_gen.cache import CACHE_FILE
from data_gen.store import CONVERSATIONS, MANIFEST, MARKER, PREFERENCES, USER_PROMPTS
from data_gen.store import DOCUMENTS as DOCUMENT_RECORDS

RECIPE = "recipe.json"
ADAPTER = stages.ADAPTER
CHECKPOINTS = "checkpoints"  # a training stage's resumable checkpoints
PARTS = "parts"              # the eval report's finished model-side parts

# The data each data stage writes for later stages, by the kind of record it holds (the stage
# table's ``writes``): user prompts, preference pairs (DPO, KTO), chat conversations (SFT),
# documents (midtraining).
PROMPTS = next(iter(stages.writers(USER_PROMPTS).values()))  # the one stage that writes user prompts
PAIRS = stages.writers(PREFERENCES)
CHATS = stages.writers(CONVERSATIONS)
DOCUMENTS = stages.writers(DOCUMENT_RECORDS)

# Every data stage's outputs, in the order the CLI reports them.
DATA: dict[str, tuple[str, ...]] = {s.name: tuple(s.writes.values()) for s in stages.TABLE if s.kind == stages.DATA}


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage


def adapter_dir(run_dir: str | Path, stage: str) -> Path:
    return stage_dir(run_dir, stage) / ADAPTER


def data_file(run_dir: str | Path, stage: str, kind: dict[str, str]) -> Path:
    """A data stage's file of one kind (``PAIRS``, ``CHATS`` or ``DOCUMENTS``)."""
    return stage_dir(run_dir, stage) / kind[stage]


def training_data_files(run_dir: str | Path) -> list[Path]:
    """Every training-data file of the layout that exists in a run, pairs first, then chats,
    then documents (each in stage order)."""
    files = [data_file(run_dir, s, kind) for kind in (PAIRS, CHATS, DOCUMENTS) for s in kind]
    return [p for p in files if p.is_file()]


def keeps_on_resume(name: str) -> bool:
    """What an unfinished stage keeps when it runs again: what resumes it (a generation stage's
    caches, a training stage's checkpoints, the eval report's caches and parts)."""
    return name.endswith(CACHE_FILE) or name in (CHECKPOINTS, PARTS)


def clear_stage_dir(out: Path, keep_resume: bool) -> None:
    """An unfinished stage starts clean except for what resumes it; a forced stage, or one whose
    inputs were just remade, starts from nothing (``keep_resume=False``). Only for a directory
    ``check_output`` accepted: the stage's own; its marker stays."""
    if not out.exists():
        return
    for path in out.iterdir():
        if path.name == MARKER or (keep_resume and keeps_on_resume(path.name)):
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# ---- Whose directory is it? -------------------------------------------------------------------

# MARKER (data_gen.store) in a directory a command made: {"made_by": "character-training", "stage": ...}
RUN = "run"                      # the marker's stage for a run directory


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def owner(directory: str | Path) -> str | None:
    """The stage whose output ``directory`` is, by its marker or manifest (``RUN`` for a run
    directory: its marker or ``recipe.json``); ``""`` when ours but of an unrecorded stage; None
    when character-training did not make it."""
    directory = Path(directory)
    if (directory / MARKER).is_file():
        return str((_json_object(directory / MARKER) or {}).get("stage") or "")
    manifest = _json_object(directory / MANIFEST)
    if manifest is not None and "outputs" in manifest and "finished_at" in manifest:  # written by write_manifest
        return str(manifest.get("stage") or "")
    recipe = _json_object(directory / RECIPE)
    if recipe is not None and "recipe" in recipe:
        return RUN
    return None


def mark(directory: str | Path, stage: str) -> None:
    """Make ``directory`` (and its parents) and say that character-training made it, for ``stage``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / MARKER).is_file():
        (directory / MARKER).write_text(json.dumps({"made_by": "character-training", "stage": stage}) + "\n",
                                        encoding="utf-8")


def make_stage_dir(out: str | Path, stage: str) -> None:
    """Make a stage's output directory: in a run directory character-training made, as is (the run
    directory says whose it is); elsewhere with a marker naming the stage."""
    out = Path(out)
    if out.name == stage and owner(out.parent) == RUN:
        out.mkdir(parents=True, exist_ok=True)
    else:
        mark(out, stage)


def _absolute(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _input_inside(path: Path, inputs) -> tuple[str, bool] | None:
    """The first input that ``path`` is (True) or holds (False)."""
    for given in inputs:
        if not given:
            continue
        resolved = _absolute(given)
        if resolved == path:
            return str(given), True
        if path in resolved.parents:
            return str(given), False
    return None


def check_place(path: str | Path, flag: str, inputs=()) -> Path:
    """Refuse an output at a place no output may be (the current directory or one above it, home,
    ``/``), one that is or holds an input, or a file; ``flag`` names where the path came from."""
    resolved = _absolute(path)
    fix = f"give {flag} a new directory of its own"
    where = _unsafe_place(resolved)
    if where:
        raise UserError(f"{flag} {path}: is {where}; an output directory is cleared when its stage runs again, "
                        f"so it must be one character-training makes; {fix}, e.g. {flag} runs/NAME")
    hit = _input_inside(resolved, inputs)
    if hit:
        given, same = hit
        raise UserError(f"{flag} {path}: {'is' if same else 'holds'} the input {given}; writing there would "
                        f"overwrite or clear it; nothing was changed; {fix}")
    if resolved.exists() and not resolved.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a directory; nothing was changed; {fix}")
    return resolved


def check_output(out: str | Path, stage: str, flag: str, *, inputs=(), stages=(), force: bool = False) -> None:
    """Before anything starts: refuse an output directory that writing into, or clearing, would
    harm. Accepted: a new or empty directory, one character-training made for this stage
    (``stages``: the names its marker or manifest may give; default ``stage``), or the stage's
    directory in a run directory it made."""
    check_place(out, flag, inputs)
    out = Path(out)
    if not out.exists() or not any(out.iterdir()):
        return
    made = owner(out)
    if made is None and owner(out.parent) == RUN:
        if out.name == stage:
            return  # the stage's own directory in a run directory character-training made
        raise UserError(f"{flag} {out}: a directory of the run {out.parent} that is not the {stage} stage's "
                        f"({out.parent / stage}); nothing was changed; choose another {flag} directory")
    if made is None:
        forced = "; --force redoes only an output character-training made" if force else ""
        raise UserError(f"{flag} {out}: not empty and not made by character-training (no {MARKER} or {MANIFEST} "
                        f"in it){forced}; nothing was changed; choose a new or empty directory")
    if made and made not in set(stages or (stage,)):
        raise UserError(f"{flag} {out}: holds a {made} output, not {stage}; nothing was changed; choose another "
                        f"{flag} directory")


def check_run_dir(run_dir: str | Path, stages, flag: str = "run_dir", inputs=()) -> None:
    """Before a run starts: its run directory is new, empty or made by character-training, at no
    place an output may not be; no stage directory it clears is a file or holds an input."""
    check_place(run_dir, flag)
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and owner(run_dir) is None:
        raise UserError(f"{flag} {run_dir}: not empty and not a run directory (no {MARKER} or {RECIPE} in it); "
                        "nothing was changed; choose a new or empty run directory")
    for stage in stages:
        out = stage_dir(run_dir, stage)
        if out.exists() and not out.is_dir():
            raise UserError(f"{flag} {run_dir}: {out} is a file where the {stage} stage writes its directory; "
                            "nothing was changed; move it away or choose another run directory")
        hit = _input_inside(_absolute(out), inputs)
        if hit:
            raise UserError(f"{flag} {run_dir}: the {stage} stage's directory {out} {'is' if hit[1] else 'holds'} "
                            f"the input {hit[0]}, and a stage clears its directory; nothing was changed; move the "
                            "input out or choose another run directory")


__all__ = ["MANIFEST", "CACHE_FILE", "RECIPE", "PROMPTS", "ADAPTER", "CHECKPOINTS", "PARTS", "PAIRS", "CHATS",
           "DOCUMENTS", "DATA", "MARKER", "RUN", "stage_dir", "adapter_dir", "data_file", "training_data_files",
           "keeps_on_resume", "clear_stage_dir", "owner", "mark", "make_stage_dir", "check_place", "check_output",
           "check_run_dir"]
