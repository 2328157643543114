"""Bad adapters and harmful output paths through the real CLI (issue 17): each is refused with
exit status 2 and one line naming the file and the fix, before anything is computed or loaded,
and nothing that was there before is deleted or changed (a sentinel beside the output, the
inputs, the user's own files).

The adapters are written here directly (adapter_config.json + adapter_model.safetensors, two
modules of rank 2): the commands read adapter files only, so no model is needed.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from character_training.adapters.io import check_adapter_dir, check_safetensors, load_adapter
from character_training.adapters.outputs import written_here
from character_training.errors import UserError

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
SENTINEL = "SENTINEL.txt"


def write_adapter(path: Path, seed: int = 0, **config_changes) -> Path:
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in MODULES:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(2, 8, generator=gen)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(8, 2, generator=gen)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM", **config_changes}
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text("{}")  # a file PEFT does not write: must survive too
    return path


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The working directory, with a sentinel, two valid adapters and $HOME beside it."""
    cwd, home = tmp_path / "work", tmp_path / "home"
    for d in (cwd, home):
        d.mkdir()
        (d / SENTINEL).write_text("must survive\n")
    write_adapter(cwd / "persona", seed=0)
    write_adapter(cwd / "other", seed=1)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return tmp_path


def refused(argv: list[str], root: Path, capsys, *mention: str) -> str:
    """Run the CLI; assert exit 2, one 'error: ' line naming each of ``mention``, and that no file
    under ``root`` that was there before was changed or deleted."""
    from character_training.cli import main

    before = snapshot(root)
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for m in mention:
        assert m.lower() in err.lower(), f"{m!r} not in {err!r}"
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before, "a file was changed or deleted"
    return err


# --------------------------------------------------------------------------- broken adapters

def _truncate(d: Path):
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def _random(d: Path):
    (d / "adapter_model.safetensors").write_bytes(random.Random(0).randbytes(4096))


def _empty(d: Path):
    (d / "adapter_model.safetensors").write_bytes(b"")


def _config(value: str):
    def go(d: Path):
        (d / "adapter_config.json").write_text(value)
    return go


def _set(**changes):
    def go(d: Path):
        config = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return go


def _pickle_only(d: Path):
    torch.save(load_file(d / "adapter_model.safetensors"), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()


def _poison(value: float):
    def go(d: Path):
        tensors = load_file(d / "adapter_model.safetensors")
        tensors[f"base_model.model.{MODULES[1]}.lora_B.weight"][3, 1] = value
        save_file(tensors, str(d / "adapter_model.safetensors"))
    return go


BROKEN = [
    pytest.param(_truncate, ["adapter_model.safetensors", "truncated"], id="truncated-safetensors"),
    pytest.param(_random, ["adapter_model.safetensors", "not safetensors"], id="random-safetensors"),
    pytest.param(_empty, ["adapter_model.safetensors", "empty"], id="empty-safetensors"),
    pytest.param(_config("[1, 2]"), ["adapter_config.json", "list, not an object"], id="config-a-list"),
    pytest.param(_config('{"r": 4,'), ["adapter_config.json", "not valid JSON"], id="config-not-json"),
    pytest.param(_set(r="sixteen"), ["adapter_config.json", "r: 'sixteen'", "positive integer"], id="r-sixteen"),
    pytest.param(_set(r=0), ["adapter_config.json", "r: 0"], id="r-0"),
    pytest.param(_set(lora_alpha="big"), ["lora_alpha"], id="alpha-a-string"),
    pytest.param(_set(rank_pattern={"q_proj": -1}), ["rank_pattern.q_proj"], id="rank-pattern-negative"),
    pytest.param(_set(target_modules=42), ["target_modules"], id="target-modules-42"),
    pytest.param(_pickle_only, ["adapter_model.bin", "safetensors"], id="pickle-only"),
    pytest.param(_poison(float("nan")), ["NaN", MODULES[1] + ".lora_B"], id="nan-factor"),
    pytest.param(_poison(float("inf")), ["inf", MODULES[1] + ".lora_B"], id="inf-factor"),
]


@pytest.mark.parametrize("command", ["inspect", "compose", "scale", "orthogonalize"])
@pytest.mark.parametrize("break_it, mention", BROKEN)
def test_a_broken_adapter_is_refused_in_one_line(break_it, mention, command, work, capsys):
    break_it(work / "work" / "persona")
    argv = {"inspect": ["adapters", "inspect", "persona", "other"],
            "compose": ["adapters", "compose", "other:1.0", "persona:0.5", "-o", "out"],
            "scale": ["adapters", "scale", "persona", "--weight", "2", "-o", "out"],
            "orthogonalize": ["adapters", "orthogonalize", "other", "--against", "persona", "-o", "out"]}[command]
    refused(argv, work, capsys, *mention)
    assert not (work / "work" / "out").exists() and not (work / "work" / "adapters_inspect.png").exists()


@pytest.mark.parametrize("break_it, mention", BROKEN)
def test_check_adapter_dir_refuses_before_any_model_loads(break_it, mention, tmp_path):
    """What ``train --init-adapter`` and evaluation call before loading a model."""
    adapter = write_adapter(tmp_path / "persona")
    check_adapter_dir(adapter, "--init-adapter")
    break_it(adapter)
    with pytest.raises(UserError) as err:
        check_adapter_dir(adapter, "--init-adapter")
    for m in mention:
        assert m.lower() in str(err.value).lower()


def test_a_pickle_only_init_adapter_is_refused_before_the_model_loads(work, capsys, tiny_model_dir, monkeypatch):
    from transformers import PreTrainedModel

    def no_model(cls, *args, **kwargs):
        raise AssertionError("a model was loaded before the adapter was checked")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_model))
    _pickle_only(work / "work" / "persona")
    shutil.copyfile(Path(__file__).parent / "bad_inputs" / "datasets" / "_good_pairs.jsonl", "pairs.jsonl")
    refused(["train", "dpo", "--data", "pairs.jsonl", "--model", tiny_model_dir, "-o", "trained",
             "--init-adapter", "persona"], work, capsys, "adapter_model.bin", "safetensors")


def test_a_header_check_reads_no_tensors(tmp_path):
    adapter = write_adapter(tmp_path / "persona")
    header = check_safetensors(adapter / "adapter_model.safetensors")
    assert sorted(k for k in header if k != "__metadata__") == sorted(
        f"base_model.model.{m}.lora_{w}.weight" for m in MODULES for w in "AB")


# ------------------------------------------------------------------------------ output paths

def test_compose_into_the_current_directory_with_force_is_refused(work, capsys):
    refused(["adapters", "compose", "persona:1.0", "-o", ".", "--force"], work, capsys, "current directory")
    refused(["adapters", "compose", "persona:1.0", "-o", "..", "--force"], work, capsys, "above the current")
    refused(["adapters", "compose", "persona:1.0", "-o", "/", "--force"], work, capsys, "root")
    refused(["adapters", "compose", "persona:1.0", "-o", str(work / "home"), "--force"], work, capsys, "home")


@pytest.mark.parametrize("argv", [
    ["adapters", "compose", "persona:1.0", "-o", "persona", "--force"],
    ["adapters", "compose", "persona:1.0", "other:1.0", "-o", "other", "--force"],
    ["adapters", "scale", "persona", "--weight", "2", "-o", "persona", "--force"],
    ["adapters", "orthogonalize", "persona", "--against", "other", "-o", "other", "--force"],
    ["adapters", "compose", "persona:1.0", "-o", "./persona/../persona", "--force"],
], ids=["compose-self", "compose-second-input", "scale-self", "orthogonalize-against", "compose-dotted"])
def test_an_output_that_is_an_input_is_refused_and_its_tokenizer_files_stay(argv, work, capsys):
    refused(argv, work, capsys, "the input")
    assert (work / "work" / argv[argv.index("-o") + 1] / "tokenizer_config.json").is_file()


def test_an_output_that_holds_an_input_is_refused(work, capsys):
    (work / "work" / "adapters").mkdir()
    shutil.move(work / "work" / "persona", work / "work" / "adapters" / "persona")
    refused(["adapters", "compose", "adapters/persona:1.0", "-o", "adapters", "--force"], work, capsys,
            "holds the input")


def test_force_replaces_only_an_adapter_this_tool_wrote(work, capsys):
    from character_training.cli import main

    cwd = work / "work"
    (cwd / "userdir").mkdir()
    (cwd / "userdir" / "notes.txt").write_text("mine\n")
    refused(["adapters", "compose", "persona:1.0", "-o", "userdir", "--force"], work, capsys,
            "not an adapter character-training wrote")
    # A PEFT adapter someone else wrote is not ours either.
    refused(["adapters", "compose", "persona:1.0", "-o", "other", "--force"], work, capsys,
            "not an adapter character-training wrote")
    (cwd / "afile.txt").write_text("a user's file\n")
    for force in ([], ["--force"]):
        refused(["adapters", "compose", "persona:1.0", "-o", "afile.txt", *force], work, capsys, "is a file")
    # Ours: replaced with --force, refused without it; an empty directory is fine with --force.
    assert main(["adapters", "compose", "persona:1.0", "-o", "mix"]) == 0
    assert written_here(cwd / "mix")
    refused(["adapters", "compose", "persona:1.0", "-o", "mix"], work, capsys, "already exists", "--force")
    assert main(["adapters", "compose", "persona:2.0", "-o", "mix", "--force"]) == 0
    assert torch.allclose(load_adapter(cwd / "mix").modules[MODULES[0]].A,
                          2 * load_adapter(cwd / "persona").modules[MODULES[0]].A * 2)  # weight 2, scaling 2
    (cwd / "empty").mkdir()
    assert main(["adapters", "scale", "persona", "--weight", "0.5", "-o", "empty", "--force"]) == 0
    assert not list(cwd.glob(".*tmp-*")) and not list(cwd.glob(".*old-*"))
    assert (cwd / SENTINEL).is_file() and (cwd / "userdir" / "notes.txt").is_file()


def test_inspect_never_overwrites_an_input_or_a_file_it_did_not_write(work, capsys):
    from character_training.cli import main

    cwd = work / "work"
    refused(["adapters", "inspect", "persona", "--json", "persona/adapter_config.json"], work, capsys,
            "--json", "input adapter")
    refused(["adapters", "inspect", "persona", "--png", "persona/adapter_model.safetensors"], work, capsys,
            "--png", "input adapter")
    refused(["adapters", "inspect", "persona", "--png", "persona/new.png"], work, capsys, "input adapter")
    (cwd / "adapters_inspect.png").write_text("a user's own picture\n")
    refused(["adapters", "inspect", "persona"], work, capsys, "adapters_inspect.png", "not a heatmap")
    (cwd / "adapters_inspect.png").unlink()
    (cwd / "notes.json").write_text('{"mine": true}\n')
    refused(["adapters", "inspect", "persona", "--json", "notes.json"], work, capsys, "notes.json", "not a report")
    refused(["adapters", "inspect", "persona", "--json", "same", "--png", "same"], work, capsys, "different names")
    refused(["adapters", "inspect", "persona", "--png", "other"], work, capsys, "is a directory")
    (cwd / "plots").mkdir()
    refused(["adapters", "inspect", "persona", "--png", "plots"], work, capsys, "is a directory")
    # Its own files are replaced on a second run.
    for _ in range(2):
        assert main(["adapters", "inspect", "persona", "other", "--json", "r.json"]) == 0
    assert (cwd / "adapters_inspect.png").is_file() and json.loads((cwd / "r.json").read_text())["pairs"]
    assert (cwd / "notes.json").read_text() == '{"mine": true}\n'
