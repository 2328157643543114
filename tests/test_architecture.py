"""The package's shape: which layer may import which (cli > run > {evaluation, train, adapters} >
config > data_gen, with card, util and errors at the bottom), no import circles, every stage
named in the stage table only, and modules small enough to read."""
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


CT = "character_training"
RULES = [  # (files, forbidden import prefixes, why)
    (files("data_gen"), (CT,), "data_gen is the layer below: it never imports character_training"),
    (files(CT, "config"), (f"{CT}.run", f"{CT}.train", f"{CT}.adapters", f"{CT}.evaluation", f"{CT}.cli"),
     "config (the recipe, its sections, the stage table, the layout) is read without what runs it"),
    (files(CT, "evaluation"), (f"{CT}.train", f"{CT}.run", f"{CT}.cli", "data_gen.stages"),
     "evaluation measures adapters; it does not import training, the run or data-generation stages"),
    (files(CT, "train"), (f"{CT}.run", f"{CT}.evaluation", f"{CT}.cli"),
     "a trainer is given its section and files; the run calls it, not the other way"),
    (files(CT, "adapters"), ("data_gen", f"{CT}.train", f"{CT}.run", f"{CT}.evaluation", f"{CT}.cli"),
     "the adapter algebra stands on adapter files alone (util.py holds the sha256 and versions it needs)"),
    (files(CT, "card") + files(CT, "util"), ("data_gen", f"{CT}.train", f"{CT}.run", f"{CT}.evaluation",
                                             f"{CT}.config", f"{CT}.adapters", f"{CT}.cli"),
     "card and util are the bottom: they import nothing of the layers above"),
    (files(CT, "run"), (f"{CT}.cli",), "the CLI turns flags into sections and inputs; the run never reads flags"),
]


@pytest.mark.parametrize("paths,forbidden,why", RULES, ids=["data_gen", "config", "evaluation", "train", "adapters", "card-util", "run"])
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


# ------------------------------------------------------------------------------------ no circles


def module_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, imports inside functions included (a circle
    through a function-level import is a circle all the same)."""
    paths = {}
    for path in files(CT) + files("data_gen"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def ours(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    return {module: {t for m in imports_of(path) if (t := ours(m)) and t != module and not module.startswith(t + ".")}
            for module, path in paths.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert circles(module_graph()) == []


def test_the_circle_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# ------------------------------------------------------------------------------- the stage table

# Modules that once listed the stages (issue 24) and must now take them from the table: a stage's
# name written in one of them as a string is a list kept by hand again. The table's two halves
# (config/stages.py with the sections of config/training.py, and run/stages.py with the training
# functions of run/training.py) and each stage's own module name their stages.
MUST_NOT_NAME = [ROOT / p for p in (
    "character_training/cli.py", "character_training/config/recipe.py", "character_training/config/layout.py",
    "character_training/config/sections.py", "character_training/config/trainer_fields.py",
    "character_training/run/pipeline.py", "character_training/run/context.py", "character_training/run/generation.py",
    "character_training/run/worker.py", "character_training/run/launch.py", "character_training/train/common.py",
    "character_training/card.py")]


def stage_names_in(path: Path, names) -> list[str]:
    """The string constants of a module that are a stage's name (docstrings and messages are
    sentences, so they do not match)."""
    return [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}"
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]


def test_no_stage_is_named_outside_the_table():
    from character_training.config.stages import STAGES

    named = [hit for path in MUST_NOT_NAME for hit in stage_names_in(path, set(STAGES))]
    assert not named, f"take these from config/stages.py: {named}"


def test_the_stage_name_check_catches_a_list_kept_by_hand(tmp_path):
    module = ROOT / "tests" / "_stage_list_probe.py"  # inside ROOT, so that its path prints relative
    try:
        module.write_text('KNOWN = ("prompts", "pairs", "kto")\nMESSAGE = "the kto stage"\n')
        assert [h.split(": ")[1] for h in stage_names_in(module, {"prompts", "pairs", "kto"})] == [
            "'prompts'", "'pairs'", "'kto'"]
    finally:
        module.unlink()


def test_both_halves_of_the_stage_table_hold_the_same_stages():
    from character_training.config.stages import STAGES, TABLE
    from character_training.run.stages import STAGE_FUNCTIONS

    assert list(STAGE_FUNCTIONS) == list(STAGES) == [s.name for s in TABLE]
