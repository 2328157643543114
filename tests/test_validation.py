"""Issue 17, "validate everything before anything expensive": bad recipes, `--set` values, YAML
files and constitutions are refused by the real CLI with one line and exit 2, before any stage
runs (no run directory is made), and the message names the file or `--set` argument, the field
and the fix."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from character_training.cli import main
from character_training.config import yamlio
from character_training.config.recipe import load_recipe
from character_training.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CONSTITUTION = ROOT / "constitutions" / "captain-marlow.yaml"


def _recipe(tmp_path: Path, body: str) -> Path:
    shutil.copy(CONSTITUTION, tmp_path / "char.yaml")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"constitution: char.yaml\nrun_dir: {tmp_path / 'run'}\n" + body, encoding="utf-8")
    return path


def _refused(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI; assert exit 2, one line on stderr, no traceback, each expected text in it."""
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- ranges in a recipe

RANGE_CASES = {
    "negative count": ("prompts: {per_trait: -3}\n", "prompts.per_trait: -3"),
    "per_request 0": ("prompts: {per_request: 0}\n", "prompts.per_request: 0"),
    "negative temperature": ("pairs: {temperature: -1}\n", "pairs.temperature: -1"),
    "max_tokens 0": ("pairs: {max_tokens: 0}\n", "pairs.max_tokens: 0"),
    "top_p above 1": ("pairs: {top_p: 1.5}\n", "pairs.top_p: 1.5"),
    "nan temperature": ("pairs: {temperature: .nan}\n", "pairs.temperature: nan"),
    "prompts max_tokens": ("prompts: {max_tokens: -5}\n", "prompts.max_tokens: -5"),
    "eval temperature": ("eval: {temperature: -0.5}\n", "eval.temperature: -0.5"),
    "eval top_p 0": ("eval: {top_p: 0}\n", "eval.top_p: 0"),
    "gen sampling": ("stages: [prompts, pairs, dpo, critique, eval]\ncritique: {sampling: {max_tokens: 0}}\n",
                     "critique.sampling.max_tokens: 0"),
    "gen logprobs": ("sdf: {sampling: {logprobs: 500}}\n", "sdf.sampling.logprobs: 500"),
    "repetition_penalty": ("pairs: {repetition_penalty: 0}\n", "pairs.repetition_penalty: 0"),
    "learning_rate text": ("dpo: {trainer: {learning_rate: fast}}\n", "dpo.trainer.learning_rate: 'fast'"),
    "learning_rate negative": ("dpo: {trainer: {learning_rate: -1.0e-4}}\n", "dpo.trainer.learning_rate"),
    "batch size 0": ("dpo: {trainer: {per_device_train_batch_size: 0}}\n", "per_device_train_batch_size: 0"),
    "TRL's own check": ("dpo: {trainer: {lr_scheduler_type: nope}}\n", "dpo.trainer: TRL refused"),
    "lora r 0": ("dpo: {lora: {r: 0}}\n", "dpo.lora.r: 0"),
    "lora dropout 1": ("dpo: {lora: {dropout: 1.0}}\n", "dpo.lora.dropout: 1.0"),
    "target_modules 42": ("dpo: {lora: {target_modules: [42]}}\n", "dpo.lora.target_modules"),
    "target_modules empty": ("dpo: {lora: {target_modules: []}}\n", "dpo.lora.target_modules"),
    "sdf negative": ("sdf: {ideas_per_type: -1}\n", "sdf.ideas_per_type"),
    "interaction share": ("interaction: {min_distinct_3grams: 2}\n", "interaction.min_distinct_3grams: 2"),
    "critique chars": ("critique: {max_answer_chars: 0}\n", "critique.max_answer_chars: 0"),
    "grpo judge tokens": ("grpo: {judge_max_tokens: 0}\n", "grpo.judge_max_tokens: 0"),
    "midtrain chat_ratio": ("midtrain: {chat_ratio: 1.5}\n", "midtrain.chat_ratio: 1.5"),
    "backend concurrency": ("backend: {max_concurrency: 0}\n", "backend.max_concurrency: 0"),
    "eval general": ("eval: {general_prompts: -1}\n", "eval.general_prompts: -1"),
    "eval neutral renamed": ("eval: {neutral_prompts: 12}\n", "set 'eval.general_prompts'"),
    "dpo data empty": ("dpo: {data: []}\n", "dpo.data: []"),
}


@pytest.mark.parametrize("body,expected", RANGE_CASES.values(), ids=RANGE_CASES.keys())
def test_out_of_range_values_are_refused_before_any_stage(tmp_path, capsys, body, expected):
    path = _recipe(tmp_path, body)
    _refused(capsys, ["run", str(path)], str(path), expected)
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was made


def test_trainer_check_builds_trl_config_without_changing_the_environment(tmp_path):
    import os

    from accelerate.state import PartialState

    before = dict(os.environ)
    state_before = dict(PartialState._shared_state)
    recipe = load_recipe(_recipe(tmp_path, "dpo: {trainer: {learning_rate: 1.0e-4, bf16: false}}\n"))
    # the values used later: the recipe's over the section's defaults, untouched by the check
    assert recipe.dpo.trainer == {**recipe.dpo.trainer_defaults, "learning_rate": 1.0e-4, "bf16": False}
    assert dict(os.environ) == before
    assert dict(PartialState._shared_state) == state_before


# ----------------------------------------------------------------------------- stage order

ORDER_CASES = {
    "pairs before prompts": ("[pairs, prompts, dpo, eval]", "pairs comes before prompts"),
    "eval before training": ("[prompts, pairs, eval, dpo]", "eval comes before the training stage dpo"),
    "data after its consumer": ("[prompts, dpo, pairs, eval]", "dpo comes before"),
    "listed twice": ("[prompts, pairs, pairs, dpo, eval]", "'pairs' is listed twice"),
    "empty": ("[]", "stages: empty"),
    "unknown": ("[prompts, pair, dpo]", "did you mean 'pairs'"),
    "previous adapter without training": ("[reflection]\nreflection: {adapter: previous}",
                                          "reflection.adapter: 'previous'"),
}


@pytest.mark.parametrize("stages,expected", ORDER_CASES.values(), ids=ORDER_CASES.keys())
def test_stage_order_is_checked(tmp_path, capsys, stages, expected):
    path = _recipe(tmp_path, f"stages: {stages}\n")
    _refused(capsys, ["run", str(path)], f"{path}: ", expected)


def test_valid_orders_still_load(tmp_path):
    for stages in ("[prompts, pairs, dpo, eval]", "[sdf, midtrain, prompts, pairs, dpo, eval]",
                   "[prompts, pairs, dpo, reflection, sft]\nreflection: {adapter: previous}", "[eval]"):
        load_recipe(_recipe(tmp_path, f"stages: {stages}\n"))


# ----------------------------------------------------------------------------- --set

def test_set_errors_name_the_set_argument_not_the_file(tmp_path, capsys):
    path = _recipe(tmp_path, "")
    line = _refused(capsys, ["run", str(path), "--set", "pairs.temperature=-1"],
                    "--set pairs.temperature=-1: pairs.temperature: -1")
    assert str(path) not in line
    _refused(capsys, ["run", str(path), "--set", "dpo.trainer.learning_rate=fast"],
             "--set dpo.trainer.learning_rate=fast: dpo.trainer.learning_rate")
    _refused(capsys, ["run", str(path), "--set", "stages=[pairs, prompts]"], "--set stages=[pairs, prompts]: stages:")
    _refused(capsys, ["run", str(path), "--set", "pairs.tempreature=1"], "--set pairs.tempreature=1", "temperature")


def test_an_error_in_the_file_still_names_the_file(tmp_path, capsys):
    path = _recipe(tmp_path, "pairs: {max_tokens: 0}\n")
    _refused(capsys, ["run", str(path), "--set", "pairs.temperature=0.5"], f"{path}: pairs.max_tokens: 0")


@pytest.mark.parametrize("item", ["pairs.temperature=[1", "pairs.answer_hint={a: b", "pairs.x=: :", ".x=1",
                                  "pairs..x=1", "=1"])
def test_malformed_set_values_are_one_line(tmp_path, capsys, item):
    _refused(capsys, ["run", str(_recipe(tmp_path, "")), "--set", item], f"--set {item}:")


# ----------------------------------------------------------------------------- YAML files

def test_duplicate_key_is_refused_with_its_line(tmp_path, capsys):
    text = CONSTITUTION.read_text(encoding="utf-8")
    bad = tmp_path / "dup.yaml"
    # A second 'questions:' in the first trait: YAML would keep only the second list.
    bad.write_text(text.replace("    questions:", "    questions: [Only this one]\n    questions:", 1), encoding="utf-8")
    line = _refused(capsys, ["constitution", "validate", str(bad)], str(bad), "duplicate key 'questions'",
                    "first given at line")
    assert ":" in line.split(str(bad))[1][:4]  # :LINE:COL follows the path
    recipe = _recipe(tmp_path, "seed: 1\nseed: 2\n")
    _refused(capsys, ["run", str(recipe)], f"{recipe}:4:1", "duplicate key 'seed'")


def test_alias_bomb_is_refused(tmp_path, capsys):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = tmp_path / "recipe.yaml"
    shutil.copy(CONSTITUTION, tmp_path / "char.yaml")
    path.write_text("constitution: char.yaml\nrun_dir: run\n" + "\n".join(levels) + "\n", encoding="utf-8")
    assert path.stat().st_size < 1000
    _refused(capsys, ["run", str(path)], str(path), "aliases expand it")


def test_many_aliases_and_recursive_alias_are_refused():
    many = "a: &a 1\nb: [" + ", ".join(["*a"] * (yamlio.MAX_ALIASES + 1)) + "]\n"
    with pytest.raises(Exception, match="aliases"):
        yamlio.load(many)
    with pytest.raises(Exception, match="contains it"):
        yamlio.load("a: &a [1, *a]\n")
    assert yamlio.load("a: &x {p: 1}\nb: *x\n") == {"a": {"p": 1}, "b": {"p": 1}}  # a few aliases are fine


@pytest.mark.parametrize("text", ["[" * 3000 + "]" * 3000, "a: " + "{b: " * 3000 + "1" + "}" * 3000,
                                  "x:\n" + "".join("  " * i + "- \n" for i in range(1, 400))])
def test_deep_nesting_is_one_line(tmp_path, capsys, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text, encoding="utf-8")
    _refused(capsys, ["run", str(path)], str(path), "nested")
    _refused(capsys, ["constitution", "validate", str(path)], str(path), "nested")


def test_oversized_non_utf8_and_directory_inputs_are_named(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * (yamlio.MAX_BYTES + 1), encoding="utf-8")
    _refused(capsys, ["run", str(big)], str(big), "MiB limit")
    _refused(capsys, ["constitution", "validate", str(big)], str(big), "MiB limit")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    _refused(capsys, ["run", str(latin)], f"{latin}:1: not UTF-8")
    _refused(capsys, ["constitution", "validate", str(latin)], f"{latin}:1: not UTF-8")
    _refused(capsys, ["constitution", "import", str(latin), "-o", str(tmp_path / "o.yaml")], "not UTF-8")
    _refused(capsys, ["run", str(tmp_path)], str(tmp_path), "is a directory")
    _refused(capsys, ["constitution", "validate", str(tmp_path)], "is a directory")
    _refused(capsys, ["constitution", "import", str(tmp_path), "-o", str(tmp_path / "o.yaml")], "is a directory")
    assert not (tmp_path / "o.yaml").exists()


def test_deeply_nested_json_import_is_one_line(tmp_path, capsys):
    path = tmp_path / "traits.json"
    path.write_text("[" * 100000 + "]" * 100000, encoding="utf-8")
    _refused(capsys, ["constitution", "import", str(path), "-o", str(tmp_path / "o.yaml")], str(path))


# ----------------------------------------------------------------------------- constitutions

def test_untouched_template_does_not_validate(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["constitution", "new", "my-persona"]) == 0
    _refused(capsys, ["constitution", "validate", "my-persona.yaml"], "my-persona.yaml: description: still the "
             "template's placeholder")
    text = (tmp_path / "my-persona.yaml").read_text(encoding="utf-8")
    text = text.replace("You are ... (who the character is, how they speak, what they care about).",
                        "You are Ada, a patient tutor.")
    (tmp_path / "my-persona.yaml").write_text(text, encoding="utf-8")
    _refused(capsys, ["constitution", "validate", "my-persona.yaml"], "traits[0].trait: still the template's")


def test_shipped_constitutions_still_validate(capsys):
    paths = sorted(str(p) for p in (ROOT / "constitutions").glob("*.yaml"))
    assert main(["constitution", "validate", *paths]) == 0


# ----------------------------------------------------------------------------- suggestions

def test_lora_keys_are_suggested_from_the_lora_section(tmp_path, capsys):
    path = _recipe(tmp_path, "dpo: {trainer: {lora_rank: 8}}\n")
    line = _refused(capsys, ["run", str(path)], "dpo.trainer.lora_rank", "dpo.lora.r")
    assert "local_rank" not in line
    _refused(capsys, ["run", str(_recipe(tmp_path, "dpo: {lora_rank: 8}\n"))], "dpo.lora_rank", "dpo.lora.r")
    _refused(capsys, ["run", str(_recipe(tmp_path, "dpo: {lora: {rank: 8}}\n"))], "dpo.lora.rank", "dpo.lora.r")
    _refused(capsys, ["run", str(_recipe(tmp_path, "dpo: {learning_rate: 1.0e-4}\n"))], "dpo.trainer.learning_rate")


def test_user_error_type_for_library_callers(tmp_path):
    with pytest.raises(UserError, match="pairs.temperature"):
        load_recipe(_recipe(tmp_path, "pairs: {temperature: -2}\n"))


def test_duplicate_key_in_imported_json_is_refused(tmp_path, capsys):
    path = tmp_path / "traits.json"
    path.write_text('[{"trait": "I am calm.", "questions": ["How?"], "questions": ["Why?"]}]', encoding="utf-8")
    _refused(capsys, ["constitution", "import", str(path), "-o", str(tmp_path / "o.yaml")], str(path),
             "duplicate key 'questions'")
    assert not (tmp_path / "o.yaml").exists()
