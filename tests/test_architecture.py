"""The package's shape: which layer may import which, and modules small enough to read."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def files(*parts: str) -> list[Path]:
    base = ROOT.joinpath(*parts)
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


RULES = [  # (files, forbidden import prefixes, why)
    (files("data_gen"), ("character_training",), "data_gen is the layer below: it never imports character_training"),
    (files("character_training", "evaluation"), ("character_training.train", "data_gen.stages"),
     "evaluation measures adapters; it does not import training or data-generation stages"),
    (files("character_training", "adapters") + files("character_training", "card") + files("character_training", "util"),
     ("data_gen", "character_training.train", "character_training.run", "character_training.evaluation"),
     "the adapter algebra stands alone (util.py holds the sha256 and versions it needs)"),
]


@pytest.mark.parametrize("paths,forbidden,why", RULES, ids=["data_gen", "evaluation", "adapters"])
def test_import_directions(paths, forbidden, why):
    assert paths
    wrong = {f"{p.relative_to(ROOT)} imports {m}" for p in paths for m in imports_of(p)
             if any(m == f or m.startswith(f + ".") for f in forbidden)}
    assert not wrong, f"{why}: {sorted(wrong)}"


def test_the_rule_catches_a_forbidden_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from character_training.train.dpo import train_dpo\n")
    assert "character_training.train.dpo" in imports_of(module)


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in files("character_training") + files("data_gen")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"split these modules: {long}"
