"""Where a run keeps its files: the one place that says which file each stage writes.

    RUN_DIR/recipe.json                  the recipe as run (final values, model, versions)
    RUN_DIR/STAGE/manifest.json          written last: the stage is finished
    RUN_DIR/prompts/prompts.jsonl        training and held-out user prompts ("split")
    RUN_DIR/pairs/pairs.jsonl            teacher (chosen) vs student (rejected) answers
    RUN_DIR/{sdf,critique,rlaif,reflection,interaction}/...   see DATA below
    RUN_DIR/{midtrain,dpo,sft,grpo}/adapter/                  the PEFT adapter and its model card
    RUN_DIR/eval/                        eval.json (quick check) or report.md/report.json

The pipeline reads its stages' inputs from here, the CLI prints what a stage wrote from here,
and the evaluation's contamination check finds a run's training data from here.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from data_gen.cache import CACHE_FILE
from data_gen.store import MANIFEST

RECIPE = "recipe.json"
PROMPTS = "prompts.jsonl"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"  # a training stage's resumable checkpoints
PARTS = "parts"              # the eval report's finished model-side parts

# The data each generation stage writes for training stages, by the kind of record it holds:
# preference pairs (DPO), chat conversations (SFT), documents (midtraining).
PAIRS = {"pairs": "pairs.jsonl", "critique": "pairs.jsonl", "rlaif": "pairs.jsonl"}
CHATS = {"critique": "sft.jsonl", "reflection": "reflection.jsonl", "interaction": "interaction.jsonl"}
DOCUMENTS = {"sdf": "documents.jsonl"}

# Every generation stage's data outputs, in the order the CLI reports them.
DATA: dict[str, tuple[str, ...]] = {
    "prompts": (PROMPTS,),
    "pairs": (PAIRS["pairs"],),
    "sdf": (DOCUMENTS["sdf"],),
    "critique": (CHATS["critique"], PAIRS["critique"]),
    "rlaif": (PAIRS["rlaif"],),
    "reflection": (CHATS["reflection"],),
    "interaction": (CHATS["interaction"],),
}


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
    inputs were just remade, starts from nothing (``keep_resume=False``)."""
    if not out.exists():
        return
    for path in out.iterdir():
        if keep_resume and keeps_on_resume(path.name):
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


__all__ = ["MANIFEST", "CACHE_FILE", "RECIPE", "PROMPTS", "ADAPTER", "CHECKPOINTS", "PARTS", "PAIRS", "CHATS",
           "DOCUMENTS", "DATA", "stage_dir", "adapter_dir", "data_file", "training_data_files", "keeps_on_resume",
           "clear_stage_dir"]
