"""The model card: one type, one writer; what a caller and a stage put in comes out, once."""
from __future__ import annotations

import ast
import hashlib
from dataclasses import replace
from pathlib import Path

from character_training.card import AdapterInput, DataFile, ModelCard, render, stamp, write_card
from character_training.util import file_sha256, versions

ROOT = Path(__file__).resolve().parents[1]


def test_data_file_records_its_sha256(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt": []}\n')
    assert DataFile.of(path, "1 pair") == DataFile(str(path), "1 pair", hashlib.sha256(path.read_bytes()).hexdigest())
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert DataFile.of(tmp_path / "gone.jsonl").sha256 is None


def test_a_training_card_renders_every_part_once(tmp_path):
    caller = ModelCard(persona="pirate", constitution="pirate.yaml", constitution_sha256="c0ffee",
                       provenance={"stages": {"pairs": {"outputs": {"pairs.jsonl": "abc"}}}})
    card = replace(caller, kind="dpo", tags=("dpo", "trl"), summary="Trained.", base_model="tiny",
                   data=(DataFile("runs/x/pairs.jsonl", "8 preference pairs", "beef"),),
                   facts=("Trained on 8 preference pairs",), settings={"LoRA": {"r": 4}},
                   metrics={"loss": 0.5, "missing": None, "flag": True})
    text = write_card(card, tmp_path).read_text(encoding="utf-8")
    assert text == render(card) and (tmp_path / "README.md").is_file()
    assert text.startswith("---\nlibrary_name: peft\nbase_model: tiny\n")
    assert "tags: [character-training, persona, lora, dpo, trl]" in text
    assert "# pirate: persona LoRA adapter" in text and "Persona: **pirate**" in text
    assert "Constitution: `pirate.yaml` (sha256 `c0ffee`)" in text
    assert "| `runs/x/pairs.jsonl` | 8 preference pairs | `beef` |" in text
    assert "| loss | 0.5 |" in text and "missing" not in text and "| flag |" not in text
    assert text.count("## Provenance") == 1 and '"pairs.jsonl": "abc"' in text
    assert "?" not in text  # nothing the card was given is printed as unknown


def test_an_empty_provenance_gets_no_section_and_unknowns_are_left_out():
    text = render(ModelCard(kind="grpo", provenance={}))
    assert "Provenance" not in text and "## Final metrics" not in text and "## Data" not in text
    assert "Constitution: sha256 `abc`" in render(ModelCard(constitution_sha256="abc"))
    assert "Constitution: `p.yaml`\n" in render(ModelCard(constitution="p.yaml"))
    assert "| `gone.jsonl` |  | (no file) |" in render(ModelCard(data=(DataFile("gone.jsonl"),)))


def test_the_base_models_local_directory_is_named_beside_its_portable_name():
    text = render(ModelCard(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", base_model_path="/cache/SmolLM2"))
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in text
    assert "- Base model: `HuggingFaceTB/SmolLM2-135M-Instruct`\n- Base model loaded from: `/cache/SmolLM2`" in text
    assert "loaded from" not in render(ModelCard(base_model="/models/tiny", base_model_path="/models/tiny"))


def test_an_operation_card_lists_its_inputs_and_what_was_not_carried_over():
    card = stamp(ModelCard(kind="compose", title="Composed persona adapter", operation="compose",
                           inputs=(AdapterInput("a", "1" * 64, 1.0, ("embed.base_layer.weight",)),
                                   AdapterInput("b", "2" * 64, -0.5))), "torch")
    text = render(card)
    assert "| a | 1.0 | `" + "1" * 64 + "` |" in text and "| b | -0.5 |" in text
    assert "Not carried over" in text and "`embed.base_layer.weight`" in text
    assert "Operation: `compose`" in text and f"torch {versions('torch')['torch']}" in text


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_adapter_algebra_imports_neither_data_gen_nor_training():
    for path in [*(ROOT / "character_training" / "adapters").glob("*.py"), ROOT / "character_training" / "card.py",
                 ROOT / "character_training" / "util.py"]:
        bad = [m for m in _imports(path) if m.split(".")[0] == "data_gen" or m.startswith("character_training.train")]
        assert not bad, f"{path.name} imports {bad}"
    assert not [m for m in _imports(ROOT / "character_training" / "util.py") if m.startswith("character_training")]
