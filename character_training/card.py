"""The model card: the ``README.md`` in every adapter directory this framework writes.

One type and one writer for all of them: each training stage (dpo, sft, lm, grpo) and each
adapter operation (compose, orthogonalize, scale) fills a ``ModelCard`` and calls
``write_card``. The caller of a stage knows who the adapter is for (persona, constitution, the
provenance of earlier stages) and passes a partial card; the stage adds what it did (base
model, data files and their sha256, settings, metrics) with ``dataclasses.replace``:

    card = ModelCard(persona="pirate", constitution="pirate.yaml", constitution_sha256=sha)
    train_dpo(model, pairs, out, card=card)   # writes out/adapter/README.md

Imports nothing from the stages, so the adapter algebra can use it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from character_training.util import file_sha256, versions

CARD_FILE = "README.md"
PROVENANCE_NOTE = "Constitution, data stages' output hashes, earlier training stages' settings and final metrics."


@dataclass(frozen=True)
class DataFile:
    """A file an adapter was trained on: where it was, what it holds, its sha256."""

    path: str
    holds: str = ""
    sha256: str | None = None

    @classmethod
    def of(cls, path: str | Path, holds: str = "") -> "DataFile":
        """The file with its sha256 computed now (None when the file is not there)."""
        return cls(str(path), holds, file_sha256(path) if Path(path).is_file() else None)


@dataclass(frozen=True)
class AdapterInput:
    """An adapter an operation read: its directory, the sha256 of its ``adapter_model.safetensors``,
    its weight (compose, scale) or role ("adapter", "against"), and the saved tensors it did not
    carry over (base-layer copies PEFT stores next to an embedding LoRA)."""

    path: str
    sha256: str | None
    role: str | float
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelCard:
    """What an adapter is and what it was made from. Every field is optional so that a caller can
    pass what it knows and the stage or operation adds the rest.

    ``kind``: the stage or operation (dpo, sft, lm, grpo, compose, ...), a tag on the hub.
    ``base_model``: the name a user elsewhere loads the base by (a hub id where there is one);
    ``base_model_path``: the directory on this machine the adapter was trained from.
    ``facts``: one-line bullets under the summary. ``settings``: what it was made with, by
    section title (LoRA, the TRL config fields); ``sections``: what came out of it (a report,
    reward per step), by title; both rendered as JSON. ``provenance``: the run's record of the
    earlier stages (constitution hash, data stages' output hashes, training stages' settings)."""

    kind: str = ""
    title: str = ""
    summary: str = ""
    persona: str | None = None
    base_model: str | None = None
    base_model_path: str | None = None
    constitution: str | None = None
    constitution_sha256: str | None = None
    tags: tuple[str, ...] = ()
    facts: tuple[str, ...] = ()
    data: tuple[DataFile, ...] = ()
    operation: str | None = None
    inputs: tuple[AdapterInput, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict | None = None
    versions: dict[str, str] = field(default_factory=dict)
    written: str | None = None


def stamp(card: ModelCard, *packages: str) -> ModelCard:
    """The card with the time of writing and the versions of ``packages`` (and Python)."""
    return replace(card, written=time.strftime("%Y-%m-%dT%H:%M:%S%z"), versions=versions(*packages))


def _json_block(title: str, value: Any) -> list[str]:
    return [f"## {title}", "", "```json", json.dumps(value, indent=2, default=str), "```", ""]


def _facts(card: ModelCard) -> list[str]:
    facts = []
    if card.persona:
        facts.append(f"Persona: **{card.persona}**")
    if card.constitution and card.constitution_sha256:
        facts.append(f"Constitution: `{card.constitution}` (sha256 `{card.constitution_sha256}`)")
    elif card.constitution:
        facts.append(f"Constitution: `{card.constitution}`")
    elif card.constitution_sha256:
        facts.append(f"Constitution: sha256 `{card.constitution_sha256}`")
    if card.base_model:
        facts.append(f"Base model: `{card.base_model}`")
    if card.base_model_path and card.base_model_path != card.base_model:
        facts.append(f"Base model loaded from: `{card.base_model_path}` (on the machine that wrote this card)")
    if card.operation:
        facts.append(f"Operation: `{card.operation}`")
    facts += card.facts
    if card.written:
        used = ", ".join(f"{k} {v}" for k, v in card.versions.items())
        facts.append(f"Written: {card.written} by character-training" + (f" ({used})" if used else ""))
    return [f"- {fact}" for fact in facts]


def _hash(sha256: str | None) -> str:
    return f"`{sha256}`" if sha256 else "(no file)"


def _inputs(card: ModelCard) -> list[str]:
    if not card.inputs:
        return []
    lines = ["## Inputs", "", "| adapter | weight / role | sha256 of adapter_model.safetensors |",
             "| --- | --- | --- |", *[f"| {i.path} | {i.role} | {_hash(i.sha256)} |" for i in card.inputs], ""]
    skipped = sorted({k for i in card.inputs for k in i.skipped})
    if skipped:
        lines += ["Not carried over: base-layer weights PEFT saved next to an embedding LoRA (copies of the base "
                  "model's, not part of any delta): " + ", ".join(f"`{k}`" for k in skipped), ""]
    return lines


def _data(card: ModelCard) -> list[str]:
    if not card.data:
        return []
    return ["## Data", "", "| file | holds | sha256 |", "| --- | --- | --- |",
            *[f"| `{d.path}` | {d.holds} | {_hash(d.sha256)} |" for d in card.data], ""]


def _metrics(card: ModelCard) -> list[str]:
    numbers = {k: v for k, v in card.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not numbers:
        return []
    return ["## Final metrics", "", "| metric | value |", "| --- | --- |",
            *[f"| {k} | {v:.4g} |" for k, v in sorted(numbers.items())], ""]


def render(card: ModelCard) -> str:
    """The card as Markdown with the Hugging Face hub's YAML front matter."""
    title = card.title or f"{card.persona or 'persona'}: persona LoRA adapter"
    lines = ["---", "library_name: peft", f"base_model: {card.base_model}",
             f"tags: [{', '.join(['character-training', 'persona', 'lora', *card.tags])}]", "---",
             f"# {title}", ""]
    if card.summary:
        lines += [card.summary, ""]
    facts = _facts(card)
    lines += [*facts, ""] if facts else []
    lines += _data(card) + _inputs(card)
    for section_title, value in {**card.settings, **card.sections}.items():
        lines += _json_block(section_title, value)
    lines += _metrics(card)
    if card.provenance:
        lines += ["## Provenance", "", PROVENANCE_NOTE, "", "```json",
                  json.dumps(card.provenance, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def write_card(card: ModelCard, directory: str | Path) -> Path:
    """Write ``directory/README.md``; the directory must exist (the adapter was saved there)."""
    path = Path(directory) / CARD_FILE
    path.write_text(render(card), encoding="utf-8")
    return path
