"""Stage directories: JSONL records, and a manifest written last.

A stage directory whose ``manifest.json`` exists is finished. Files are written to a temporary
name and renamed, so a stage killed mid-write never leaves a half file that looks finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

MANIFEST = "manifest.json"
# The kinds of records a data stage writes for later stages: each stage module's OUTPUTS maps a
# kind to its file; the stage table (character_training/config/stages.py) reads them there.
USER_PROMPTS = "user prompts"        # {"prompt", "split", ...}: the prompts stage
PREFERENCES = "preference pairs"     # {"prompt", "chosen", "rejected"}: DPO, KTO, distillation
CONVERSATIONS = "conversations"      # {"messages"}: SFT, distillation, midtraining's chat mix
DOCUMENTS = "documents"              # {"text"}: midtraining
MARKER = ".character-training"  # in a directory a command made (character_training/config/layout.py)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # per process: launched ranks may write one file
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # per process: launched ranks may write one file
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions(*packages: str) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_manifest(stage_dir: Path, manifest: dict) -> dict:
    """Write the manifest last: it marks the stage finished. Adds hashes of the stage's files."""
    stage_dir = Path(stage_dir)
    outputs = {p.name: file_sha256(p) for p in sorted(stage_dir.iterdir())
               if p.is_file() and p.name not in (MANIFEST, MARKER) and not p.name.endswith(".tmp") and ".tmp-" not in p.name}
    manifest = {**manifest, "outputs": outputs, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(stage_dir / MANIFEST, manifest)
    return manifest


def read_manifest(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
