"""Outputs are never destructive: every command writes into a new directory or one it made itself,
and refuses (one line, exit 2, nothing changed) an output that is the current directory, home,
``/``, a file, an input, or a directory it did not make. Each test puts a sentinel file where a
careless command would delete or overwrite it, and drives the real CLI in-process; every refusal
comes before any engine or model loads (the loaders are replaced by ones that fail the test)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from character_training import cli
from character_training.config import layout
from character_training.run import generation, pipeline
from character_training.run import stages

CONSTITUTION = {"name": "toy", "description": "A toy.",
                "traits": [{"trait": "I am a toy.", "questions": ["What are you made of?"]}]}
SENTINEL = "a user's file: must survive\n"


def sentinel(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SENTINEL)
    return path


def refused(capsys, argv: list[str], *expect: str) -> str:
    """Run the CLI: exit 2, one line on stderr naming each of ``expect``, no traceback."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for text in expect:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(CONSTITUTION))
    return path


@pytest.fixture
def no_engine(monkeypatch):
    """Any engine or model load fails the test: refusals come first."""
    from character_training.config import models

    monkeypatch.setattr(generation, "make_backend", lambda *a, **k: pytest.fail("an engine was started"))
    monkeypatch.setattr(models, "resolve_model", lambda *a, **k: pytest.fail("a model was resolved"))


@pytest.fixture
def fake_generation(monkeypatch):
    """The generation stage writes its data file; the engine is never started."""
    runs: list[Path] = []

    def run_stage(stage, *, out, **kwargs):
        runs.append(out)
        (out / layout.DATA[stage][0]).write_text('{"messages": []}\n')
        return {"stage": stage, "counts": {"records": 1}, "drops": {}}

    monkeypatch.setattr(generation, "make_backend", lambda *a, **k: object())
    monkeypatch.setattr(generation, "run_generation_stage", run_stage)
    return runs


def generate(toy, out, *extra) -> list[str]:
    return ["generate", "reflection", "--constitution", str(toy), "-o", str(out), "--backend", "openai",
            "--base-url", "http://127.0.0.1:1/v1", *extra]


# ---- generate ---------------------------------------------------------------------------------

def test_generate_into_a_directory_it_did_not_make_is_refused_and_deletes_nothing(tmp_path, toy, no_engine, capsys):
    out = tmp_path / "mine"
    keep = sentinel(out / "notes.txt")
    (out / "sub").mkdir()
    refused(capsys, generate(toy, out), "-o", "not made by character-training", "choose a new or empty directory")
    refused(capsys, generate(toy, out, "--force"), "--force redoes only an output character-training made")
    assert keep.read_text() == SENTINEL and (out / "sub").is_dir() and not (out / layout.MARKER).exists()


@pytest.mark.parametrize("where", ["cwd", "parent", "home", "root"])
def test_generate_into_the_current_directory_home_or_root_is_refused(tmp_path, toy, no_engine, capsys, monkeypatch,
                                                                     where):
    work = tmp_path / "work"
    keep = sentinel(work / "notes.txt")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    out = {"cwd": ".", "parent": "..", "home": str(tmp_path / "home"), "root": "/"}[where]
    what = {"cwd": "the current directory", "parent": "a directory above the current one",
            "home": "your home directory", "root": "the filesystem root"}[where]
    refused(capsys, generate(toy, out, "--force"), f"-o {out}: is {what}")
    assert keep.read_text() == SENTINEL and sorted(p.name for p in work.iterdir()) == ["notes.txt"]


def test_generate_into_a_directory_holding_an_input_or_onto_a_file_is_refused(tmp_path, toy, no_engine, capsys):
    keep = sentinel(tmp_path / "notes.txt")
    refused(capsys, generate(toy, tmp_path), "holds the input", str(toy))
    refused(capsys, generate(toy, toy), "is the input")
    refused(capsys, generate(toy, keep), f"-o {keep}: is a file")
    assert keep.read_text() == SENTINEL and toy.read_text() == yaml.safe_dump(CONSTITUTION)


def test_generate_into_an_output_of_another_stage_is_refused(tmp_path, toy, fake_generation, capsys):
    out = tmp_path / "out"
    assert cli.main(generate(toy, out)) == 0
    line = refused(capsys, ["generate", "interaction", "--constitution", str(toy), "-o", str(out), "--force",
                            "--backend", "openai", "--base-url", "http://127.0.0.1:1/v1"], "holds a reflection output")
    assert "interaction" in line and (out / "reflection.jsonl").is_file()


def test_generate_marks_its_directory_resumes_it_and_redoes_it_with_force(tmp_path, toy, fake_generation, capsys):
    keep = sentinel(tmp_path / "notes.txt")  # beside the output
    out = tmp_path / "out"
    assert cli.main(generate(toy, out)) == 0
    assert layout.owner(out) == "reflection" and (out / layout.MARKER).is_file()
    refused(capsys, generate(toy, out), "finished already", "--force")
    # killed before its manifest: the rerun keeps the cache it resumes from
    (out / layout.MANIFEST).unlink()
    (out / layout.CACHE_FILE).write_text("{}\n")
    assert cli.main(generate(toy, out)) == 0
    assert (out / layout.CACHE_FILE).read_text() == "{}\n"
    assert cli.main(generate(toy, out, "--force")) == 0  # its own directory: --force redoes it
    assert not (out / layout.CACHE_FILE).exists() and layout.owner(out) == "reflection"
    assert keep.read_text() == SENTINEL and len(fake_generation) == 3


def test_generate_into_an_empty_directory_is_accepted(tmp_path, toy, fake_generation):
    out = tmp_path / "empty"
    out.mkdir()
    assert cli.main(generate(toy, out)) == 0 and layout.owner(out) == "reflection"


# ---- train ------------------------------------------------------------------------------------

def train(data, out, *extra) -> list[str]:
    return ["train", "dpo", "--data", str(data), "-o", str(out), *extra]


def test_train_refuses_an_output_that_is_a_file_an_input_or_not_its_own(tmp_path, no_engine, capsys):
    data = sentinel(tmp_path / "data" / "pairs.jsonl")
    mine = tmp_path / "mine"
    keep = sentinel(mine / "notes.txt")
    refused(capsys, train(data, data), "is the input")
    refused(capsys, train(data, tmp_path / "data"), "holds the input", str(data))
    refused(capsys, train(data, keep), f"-o {keep}: is a file")
    refused(capsys, train(data, mine), "not made by character-training")
    refused(capsys, train(data, mine, "--force"), "--force redoes only an output character-training made")
    assert data.read_text() == SENTINEL and keep.read_text() == SENTINEL


def test_train_refuses_another_commands_output(tmp_path, no_engine, capsys):
    data = sentinel(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    layout.mark(out, "reflection")
    sentinel(out / "reflection.jsonl")
    refused(capsys, train(data, out, "--force"), "holds a reflection output, not dpo")
    assert (out / "reflection.jsonl").is_file()


def test_train_marks_its_directory_resumes_it_and_redoes_it_with_force(tmp_path, monkeypatch, capsys):
    from character_training.train import dpo

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    data = sentinel(tmp_path / "pairs.jsonl")
    seen: list[list[str]] = []

    def fake_train(model, pairs, out, **kwargs):
        seen.append(sorted(p.name for p in out.iterdir()))
        (out / layout.CHECKPOINTS).mkdir(exist_ok=True)
        if len(seen) == 1:
            raise KeyboardInterrupt  # killed mid-training
        return {"stage": "dpo", "counts": {"steps": 1}}

    monkeypatch.setattr(dpo, "train_dpo", fake_train)
    argv = train(data, tmp_path / "out", "--model", str(tmp_path / "model"))
    assert cli.main(argv) == 130
    capsys.readouterr()
    assert cli.main(argv) == 0  # resumed: the checkpoints are still there
    refused(capsys, argv, "finished already")
    assert cli.main([*argv, "--force"]) == 0  # its own directory: cleared, marker kept
    assert seen == [[layout.MARKER], [layout.MARKER, layout.CHECKPOINTS], [layout.MARKER]]
    assert layout.owner(tmp_path / "out") == "dpo" and data.read_text() == SENTINEL


# ---- run --------------------------------------------------------------------------------------

@pytest.fixture
def recipe(tmp_path, toy):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"constitution": "toy.yaml", "run_dir": str(tmp_path / "run"),
                                    "model": str(tmp_path / "model"), "stages": ["prompts", "pairs", "dpo"]}))
    return path


@pytest.fixture
def fake_stages(monkeypatch):
    calls: list[str] = []

    def fake(name):
        def stage(section, ctx, out):
            calls.append(name)
            (out / f"{name}.txt").write_text(name)
            return {"stage": name}
        return stage

    monkeypatch.setattr(stages, "STAGE_FUNCTIONS", {s: fake(s) for s in pipeline.STAGES})
    return calls


@pytest.mark.parametrize("where", ["cwd", "home", "root"])
def test_run_dir_at_the_current_directory_home_or_root_is_refused(tmp_path, recipe, fake_stages, capsys,
                                                                  monkeypatch, where):
    work = tmp_path / "work"
    sentinel(work / "notes.txt")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    run_dir = {"cwd": ".", "home": str(work), "root": "/"}[where]
    refused(capsys, ["run", str(recipe), "--run-dir", run_dir], f"--run-dir {run_dir}: is")
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**data, "run_dir": run_dir}))
    refused(capsys, ["run", str(recipe)], f"{recipe}: run_dir {run_dir}: is")
    assert fake_stages == [] and sorted(p.name for p in work.iterdir()) == ["notes.txt"]


def test_run_dir_that_is_not_a_run_or_holds_a_file_for_a_stage_is_refused(tmp_path, recipe, fake_stages, capsys):
    mine = tmp_path / "mine"
    keep = sentinel(mine / "notes.txt")
    refused(capsys, ["run", str(recipe), "--run-dir", str(mine)], "not a run directory")
    refused(capsys, ["run", str(recipe), "--set", f"run_dir={mine}"], "--set run_dir", "not a run directory")
    refused(capsys, ["run", str(recipe), "--run-dir", str(keep)], "is a file")
    run = tmp_path / "run"
    layout.mark(run, layout.RUN)
    stage_file = sentinel(run / "pairs")
    refused(capsys, ["run", str(recipe)], f"{run / 'pairs'} is a file where the pairs stage writes")
    assert fake_stages == [] and keep.read_text() == SENTINEL and stage_file.read_text() == SENTINEL


def test_a_stage_directory_holding_an_input_is_refused(tmp_path, recipe, fake_stages, capsys):
    run = tmp_path / "run"
    layout.mark(run, layout.RUN)
    moved = sentinel(run / "prompts" / "toy.yaml")
    moved.write_text(yaml.safe_dump(CONSTITUTION))
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**data, "constitution": str(moved)}))
    refused(capsys, ["run", str(recipe)], "prompts stage's directory", "holds the input")
    assert moved.is_file() and fake_stages == []


def test_a_run_refused_for_changed_settings_leaves_its_recorded_recipe_untouched(tmp_path, recipe, fake_stages,
                                                                                 capsys):
    assert cli.main(["run", str(recipe)]) == 0
    run = tmp_path / "run"
    recorded = (run / layout.RECIPE).read_bytes()
    assert layout.owner(run) == layout.RUN and fake_stages == ["prompts", "pairs", "dpo"]
    refused(capsys, ["run", str(recipe), "--set", "dpo.trainer.learning_rate=5e-5"], "--force dpo")
    assert (run / layout.RECIPE).read_bytes() == recorded and fake_stages == ["prompts", "pairs", "dpo"]


def test_a_run_directory_from_before_markers_is_still_the_runs(tmp_path, recipe, fake_stages):
    """A run made before the marker existed has its recipe.json: it resumes and stays the run's."""
    assert cli.main(["run", str(recipe)]) == 0
    run = tmp_path / "run"
    (run / layout.MARKER).unlink()
    (run / "dpo" / layout.MANIFEST).unlink()  # killed during dpo
    assert cli.main(["run", str(recipe)]) == 0
    assert fake_stages == ["prompts", "pairs", "dpo", "dpo"] and layout.owner(run) == layout.RUN
    assert not any((run / s / layout.MARKER).exists() for s in ("prompts", "pairs", "dpo"))


def test_run_stage_directories_get_no_marker_so_manifests_are_unchanged(tmp_path, recipe, fake_stages):
    assert cli.main(["run", str(recipe)]) == 0
    for stage in ("prompts", "pairs", "dpo"):
        outputs = json.loads((tmp_path / "run" / stage / layout.MANIFEST).read_text())["outputs"]
        assert list(outputs) == [f"{stage}.txt"]


# ---- eval -------------------------------------------------------------------------------------

def test_eval_refuses_an_output_it_did_not_make_an_input_or_another_stage(tmp_path, recipe, fake_stages, capsys,
                                                                         monkeypatch):
    assert cli.main(["run", str(recipe)]) == 0
    from data_gen import backends

    monkeypatch.setattr(backends.Engines, "vllm", lambda *a, **k: pytest.fail("an engine was started"))
    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "eval", lambda *a, **k: pytest.fail("the evaluation started"))
    run = tmp_path / "run"
    mine = tmp_path / "mine"
    keep = sentinel(mine / "notes.txt")
    refused(capsys, ["eval", str(recipe), "--fresh", "-o", str(mine)], "not made by character-training", "--force")
    refused(capsys, ["eval", str(recipe), "-o", str(mine)], "not made by character-training")
    refused(capsys, ["eval", str(recipe), "--fresh", "-o", str(run)], "is the input", str(run))
    refused(capsys, ["eval", str(recipe), "--fresh", "-o", str(run / "pairs")], "holds a pairs output, not eval")
    refused(capsys, ["eval", str(recipe), "--fresh", "--run-dir", "/"], "--run-dir /: is the filesystem root")
    assert keep.read_text() == SENTINEL and (run / "pairs" / "pairs.txt").is_file()
    assert (run / "pairs" / layout.MANIFEST).is_file()


# ---- constitution files -----------------------------------------------------------------------

def test_constitution_files_never_replace_their_input_or_a_directory(tmp_path, capsys):
    keep = sentinel(tmp_path / "dir" / "notes.txt")
    src = tmp_path / "traits.json"
    src.write_text(json.dumps([{"trait": "I am a toy.", "questions": ["What are you made of?"]}]))
    refused(capsys, ["constitution", "new", "toy", "-o", str(keep.parent)], "is a directory")
    refused(capsys, ["constitution", "import", str(src), "-o", str(src), "--force"], "is the input file")
    assert keep.read_text() == SENTINEL and json.loads(src.read_text())[0]["trait"] == "I am a toy."


def test_a_directory_of_a_run_that_is_not_the_stages_own_is_refused(tmp_path):
    from character_training.errors import UserError

    run = tmp_path / "run"
    layout.mark(run, layout.RUN)
    keep = sentinel(run / "notes" / "x.txt")
    with pytest.raises(UserError, match="not the eval stage's"):
        layout.check_output(run / "notes", "eval", "-o")
    layout.check_output(run / "eval", "eval", "-o")  # the stage's own: accepted, new
    assert keep.read_text() == SENTINEL
