"""Malformed input, every kind, through the real CLI (issue 17): each case must be refused with
exit status 2 and ONE line starting with "error: " (what, where, how to fix; no traceback), before
anything expensive starts (no vLLM engine, no model load), and without deleting or changing any
file that was there before (the user's files beside and inside the output path, the inputs).

The corpus is ``tests/bad_inputs/`` (constitutions, recipes, datasets: small files, each one bad
in one way and saying how in its first line or README); adapters are built here from one tiny
valid PEFT adapter and then broken (truncated, random, NaN, ...). Add a case when a new kind of
bad input turns up: a file in the corpus and a line in ``CASES``.

Each case runs in its own temporary directory (the working directory, with ``$HOME`` beside it),
with guards that turn "started something expensive" and "wrote or deleted outside the temporary
directories" into a failure of the case instead of the act (cases include ``-o /`` and the tool
may run as root). The controls at the end run the valid inputs the bad ones are made from: they
must get as far as the expensive part, so that a bad case is refused for its bad value.
"""
from __future__ import annotations

import builtins
import hashlib
import importlib
import io
import json
import os
import random
import shutil
import signal
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

CORPUS = Path(__file__).parent / "bad_inputs"
REPO = Path(__file__).resolve().parents[1]
GOOD_CONSTITUTION = REPO / "constitutions" / "stoic-gardener.yaml"
SENTINEL = "SENTINEL.txt"           # in the working directory, in $HOME, and in every user directory below
USER_FILE = "my-notes.txt"          # a user's own file inside a directory the tool did not make
CASE_SECONDS = 60                   # a refusal takes well under a second; this only stops a runaway case


# ----------------------------------------------------------------------------------------------
# Guards: expensive work and writes outside the temporary directories become failures.

class ExpensiveWork(BaseException):
    """An engine or a model started before the input was refused (BaseException: no ``except
    Exception`` in the code under test may turn it into something else)."""


class OutsideWrite(BaseException):
    """The command tried to write or delete outside the test's temporary directories."""


class TooSlow(BaseException):
    pass


def _allowed_roots() -> list[str]:
    return [os.path.realpath(tempfile.gettempdir()), "/dev"]


def _resolve(path, dir_fd=None) -> str | None:
    if dir_fd is not None or isinstance(path, int):
        return None  # relative to an open directory (rmtree's inner calls): the directory was checked
    path = os.fsdecode(os.fspath(path))
    return os.path.realpath(os.path.join(os.getcwd(), path))


def _check_write(what: str, path, dir_fd=None) -> None:
    resolved = _resolve(path, dir_fd)
    if resolved is None:
        return
    if not any(resolved == root or resolved.startswith(root.rstrip("/") + "/") for root in _allowed_roots()):
        raise OutsideWrite(f"{what} {resolved}")


@contextmanager
def guards(monkeypatch):
    """Refuse engine starts, model loads, and writes/deletes outside the temporary directories."""
    from transformers import PreTrainedModel

    from data_gen import backends

    def no_engine(self, *args, **kwargs):
        raise ExpensiveWork("a vLLM engine was started")

    def no_model(cls, *args, **kwargs):
        raise ExpensiveWork(f"a model was loaded ({cls.__name__}.from_pretrained)")

    real = {"open": builtins.open, "os_open": os.open, "rmtree": shutil.rmtree, "unlink": os.unlink,
            "remove": os.remove, "rmdir": os.rmdir, "mkdir": os.mkdir, "rename": os.rename,
            "replace": os.replace}

    def g_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _check_write(f"open({mode!r})", file)
        return real["open"](file, mode, *args, **kwargs)

    def g_os_open(path, flags, *args, dir_fd=None, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            _check_write("os.open", path, dir_fd)
        return real["os_open"](path, flags, *args, dir_fd=dir_fd, **kwargs)

    def g_rmtree(path, *args, **kwargs):
        _check_write("shutil.rmtree", path)
        return real["rmtree"](path, *args, **kwargs)

    def one_path(name):
        def guarded(path, *args, dir_fd=None, **kwargs):
            if not (name == "mkdir" and dir_fd is None and os.path.isdir(path)):  # exists: mkdir only raises
                _check_write(f"os.{name}", path, dir_fd)
            return real[name](path, *args, dir_fd=dir_fd, **kwargs)
        return guarded

    def two_paths(name):
        def guarded(src, dst, *args, **kwargs):
            _check_write(f"os.{name}", src, kwargs.get("src_dir_fd"))
            _check_write(f"os.{name}", dst, kwargs.get("dst_dir_fd"))
            return real[name](src, dst, *args, **kwargs)
        return guarded

    def timeout(signum, frame):
        raise TooSlow(f"over {CASE_SECONDS}s")

    with monkeypatch.context() as m:
        m.setattr(backends.VLLMBackend, "__init__", no_engine)
        m.setattr(PreTrainedModel, "from_pretrained", classmethod(no_model))
        m.setattr(builtins, "open", g_open)
        m.setattr(io, "open", g_open)
        m.setattr(os, "open", g_os_open)
        m.setattr(shutil, "rmtree", g_rmtree)
        for name in ("unlink", "remove", "rmdir", "mkdir"):
            m.setattr(os, name, one_path(name))
        for name in ("rename", "replace"):
            m.setattr(os, name, two_paths(name))
        try:
            import safetensors.torch as st

            real_save = st.save_file

            def g_save(tensors, filename, *args, **kwargs):
                _check_write("safetensors.save_file", filename)
                return real_save(tensors, filename, *args, **kwargs)

            m.setattr(st, "save_file", g_save)
        except ImportError:
            pass
        previous = signal.signal(signal.SIGALRM, timeout)
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------
# The world a case runs in.

@dataclass
class World:
    root: Path       # everything below is the case's; snapshots cover it
    cwd: Path
    home: Path
    tiny: str        # the tiny model (tests/conftest.py)
    adapters: dict   # name -> a valid adapter directory built once per module (read-only source)

    def fmt(self, arg: str) -> str:
        for key, value in (("{tiny}", self.tiny), ("{home}", self.home), ("{cwd}", self.cwd)):
            arg = arg.replace(key, str(value))
        return arg


Step = Callable[[World], None]


CORPUS_USED: set[str] = set()


def corpus(src: str, dest: str | None = None) -> Step:
    """Copy a corpus file (path under tests/bad_inputs/) into the working directory."""
    CORPUS_USED.add(src)

    def step(w: World):
        target = w.cwd / (dest or Path(src).name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CORPUS / src, target)
    return step


def constitution(dest: str = "constitution.yaml") -> Step:
    def step(w: World):
        shutil.copyfile(GOOD_CONSTITUTION, w.cwd / dest)
    return step


def recipe(name: str) -> tuple[Step, ...]:
    """A corpus recipe as ./recipe.yaml, with the valid constitution it names beside it."""
    return corpus(f"recipes/{name}.yaml", "recipe.yaml"), constitution()


def write(dest: str, content: str | bytes) -> Step:
    def step(w: World):
        target = w.cwd / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return step


def directory(dest: str) -> Step:
    """A directory the user made, holding the user's own files (the tool did not make it)."""
    def step(w: World):
        (w.cwd / dest).mkdir(parents=True, exist_ok=True)
        (w.cwd / dest / USER_FILE).write_text("my own notes: must survive\n")
        (w.cwd / dest / SENTINEL).write_text(f"sentinel in {dest}\n")
    return step


def adapter(dest: str = "persona", break_it: Callable[[Path], None] | None = None, source: str = "persona") -> Step:
    """A copy of a valid tiny adapter, then broken by ``break_it(dir)``."""
    def step(w: World):
        target = w.cwd / dest
        shutil.copytree(w.adapters[source], target)
        if break_it:
            break_it(target)
    return step


# How to break an adapter directory.
def _weights(d: Path) -> Path:
    return d / "adapter_model.safetensors"


def _set_config(**changes):
    def go(d: Path):
        config = json.loads((d / "adapter_config.json").read_text())
        config.update(changes)
        (d / "adapter_config.json").write_text(json.dumps(config))
    return go


def truncated(d: Path):
    data = _weights(d).read_bytes()
    _weights(d).write_bytes(data[: len(data) // 2])


def random_bytes(d: Path):
    _weights(d).write_bytes(random.Random(0).randbytes(4096))


def empty_weights(d: Path):
    _weights(d).write_bytes(b"")


def config_a_list(d: Path):
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps([config]))


def config_not_json(d: Path):
    (d / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8,\n  "target_modules": [q_proj]\n')


def pickle_only(d: Path):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(_weights(d)), d / "adapter_model.bin")
    _weights(d).unlink()


def poisoned(value: float):
    def go(d: Path):
        from safetensors.torch import load_file, save_file

        tensors = load_file(_weights(d))
        name = sorted(n for n in tensors if "lora_A" in n)[0]
        tensors[name][0, 0] = value
        save_file(tensors, str(_weights(d)), metadata={"format": "pt"})
    return go


def settings_mismatch(w: World):
    """A run directory whose prompts stage finished with other settings, and its recipe.json."""
    run = w.cwd / "run"
    (run / "prompts").mkdir(parents=True)
    (run / "recipe.json").write_text('{"recipe": "as the earlier run recorded it"}\n')
    (run / "prompts" / "manifest.json").write_text(json.dumps({"stage": "prompts", "settings_key": "0" * 16,
                                                               "run_id": "earlier"}))
    (run / "prompts" / "prompts.jsonl").write_text('{"prompt": "a", "trait": "t", "split": "train"}\n')


def untouched_template(w: World):
    from character_training.config.constitution import template

    (w.cwd / "my-persona.yaml").write_text(template("my-persona"), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# The cases. argv placeholders: {tiny} (the tiny model), {home} ($HOME), {cwd}.

@dataclass
class Case:
    argv: list[str]
    setup: tuple = ()
    mention: tuple = ()   # the error line must contain each of these (case-insensitive)
    forbid: tuple = ()    # ... and none of these (a secret, wrong advice)
    kind: str = ""


def case(id_: str, kind: str, argv: str | list, *setup, mention=(), forbid=(), xfail: str | None = None):
    args = argv.split() if isinstance(argv, str) else argv
    flat = []
    for s in setup:
        flat.extend(s if isinstance(s, tuple) else (s,))
    c = Case(argv=args, setup=tuple(flat), mention=tuple(mention), forbid=tuple(forbid), kind=kind)
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(c, id=f"{kind}-{id_}", marks=marks)


TRAIN = "train dpo --data pairs.jsonl --model {tiny} -o out"
PAIRS = corpus("datasets/_good_pairs.jsonl", "pairs.jsonl")
CHATS = corpus("datasets/_good_chats.jsonl", "chats.jsonl")
QUICK = "eval recipe.yaml --adapter persona"

CASES = [
    # --- constitutions ------------------------------------------------------------------------
    case("duplicate-key", "constitution", "constitution validate c.yaml",
         corpus("constitutions/duplicate_key.yaml", "c.yaml"), mention=["questions"]),
    case("untouched-template", "constitution", "constitution validate my-persona.yaml", untouched_template),
    case("non-utf8", "constitution", "constitution validate c.yaml", corpus("constitutions/latin1.yaml", "c.yaml"),
         mention=["utf-8"]),
    case("a-directory", "constitution", "constitution validate somedir", directory("somedir"),
         mention=["director"]),
    case("deep-nesting", "constitution", "constitution validate c.yaml",
         corpus("constitutions/deep_nesting.yaml", "c.yaml")),
    case("alias-bomb", "constitution", "constitution validate c.yaml", corpus("constitutions/alias_bomb.yaml", "c.yaml"),
         mention=["alias"]),
    case("import-non-utf8", "constitution", "constitution import traits.json -o new.yaml",
         corpus("constitutions/import_latin1.json", "traits.json"), mention=["utf-8"]),
    case("import-a-directory", "constitution", "constitution import somedir -o new.yaml", directory("somedir"),
         mention=["director"]),
    case("recipe-names-a-directory", "constitution", "run recipe.yaml", corpus("recipes/_good.yaml", "recipe.yaml"),
         directory("constitution.yaml"), mention=["director"]),
    case("new-onto-a-directory", "constitution", "constitution new my-persona -o somedir", directory("somedir"),
         mention=["director"]),
    case("big-without-aliases", "constitution", "constitution validate c.yaml",
         write("c.yaml", "# BAD: 2.5 MB and no aliases: refused for its size, not for aliases\nname: big\n"
               "description: A big one.\nfacts:\n" + "  - a plain fact about the character, written out once\n" * 48_000),
         mention=["MiB limit"], forbid=["alias"]),
    case("case-duplicate-trait", "constitution", "constitution validate c.yaml",
         corpus("constitutions/case_duplicate_trait.yaml", "c.yaml"), mention=["traits[2].trait", "traits[0].trait"]),
    case("control-character", "constitution", "constitution validate c.yaml",
         corpus("constitutions/control_character.yaml", "c.yaml"), mention=["traits[2].questions[0]", "\\x1b"]),
    case("regex-marker", "constitution", "constitution validate c.yaml", corpus("constitutions/regex_marker.yaml", "c.yaml"),
         mention=["markers[1]", "matched as written", "'aye', 'arr'"]),
    case("long-name-quoted-short", "constitution", "constitution validate c.yaml",
         corpus("constitutions/long_name.yaml", "c.yaml"), mention=["name", "slug"], forbid=["Wren the Gardener " * 12]),
    case("alias-expanded-value-quoted-short", "recipe", "run recipe.yaml", recipe("alias_expanded_seed"),
         mention=["seed"], forbid=["['x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x'], " * 5]),
    case("generate-prompts-non-utf8", "dataset", "generate critique --constitution constitution.yaml -o out "
         "--prompts p.txt", constitution(), write("p.txt", "Caf\xe9?\n".encode("latin-1")), mention=["--prompts", "utf-8"]),
    case("generate-prompts-jsonl-no-prompt", "dataset", "generate critique --constitution constitution.yaml -o out "
         "--prompts p.jsonl", constitution(), write("p.jsonl", '{"text": "Hi?"}\n'), mention=["p.jsonl:1", "prompt"]),
    case("generate-non-utf8", "constitution", "generate sdf --constitution c.yaml -o out",
         corpus("constitutions/latin1.yaml", "c.yaml"), mention=["utf-8"]),

    # --- recipes (run) ------------------------------------------------------------------------
    case("unknown-key", "recipe", "run recipe.yaml", recipe("unknown_top_key"), mention=["stagez"]),
    case("lora-rank-key", "recipe", "run recipe.yaml", recipe("lora_rank_key"), mention=["lora_rank"]),
    case("trainer-lora-rank", "recipe", "run recipe.yaml", recipe("trainer_lora_rank"), mention=["lora_rank"],
         forbid=["local_rank"]),
    case("negative-count", "recipe", "run recipe.yaml", recipe("negative_count"), mention=["per_trait"]),
    case("negative-temperature", "recipe", "run recipe.yaml", recipe("negative_temperature"), mention=["temperature"]),
    case("negative-max-tokens", "recipe", "run recipe.yaml", recipe("negative_max_tokens"), mention=["max_tokens"]),
    case("per-request-0", "recipe", "run recipe.yaml", recipe("per_request_zero"), mention=["per_request"]),
    case("learning-rate-fast", "recipe", "run recipe.yaml", recipe("learning_rate_fast"), mention=["learning_rate"]),
    case("batch-size-0", "recipe", "run recipe.yaml", recipe("batch_size_zero"), mention=["batch_size"]),
    case("lora-r-0", "recipe", "run recipe.yaml", recipe("lora_r_zero"), mention=["r"]),
    case("target-modules-42", "recipe", "run recipe.yaml", recipe("target_modules_42"), mention=["target_modules"]),
    case("eval-top-p-2", "recipe", "run recipe.yaml", recipe("eval_top_p_2"), mention=["top_p"]),
    case("eval-negative-temperature", "recipe", "run recipe.yaml", recipe("eval_negative_temperature"),
         mention=["temperature"]),
    case("order-pairs-before-prompts", "recipe", "run recipe.yaml", recipe("order_pairs_before_prompts"),
         mention=["prompts"]),
    case("order-eval-first", "recipe", "run recipe.yaml", recipe("order_eval_first"), mention=["eval"]),
    case("duplicate-stage", "recipe", "run recipe.yaml", recipe("duplicate_stage"), mention=["pairs"]),
    case("stages-empty", "recipe", "run recipe.yaml", recipe("stages_empty"), mention=["stages"]),
    case("duplicate-key", "recipe", "run recipe.yaml", recipe("duplicate_key"), mention=["run_dir"]),
    case("alias-bomb", "recipe", "run recipe.yaml", recipe("alias_bomb"), mention=["alias"]),
    case("deep-nesting", "recipe", "run recipe.yaml", recipe("deep_nesting")),
    case("non-utf8", "recipe", "run recipe.yaml", recipe("latin1"), mention=["utf-8"]),
    case("a-directory", "recipe", "run recipe.yaml", directory("recipe.yaml"), mention=["director"]),
    case("eval-command-bad-sampling", "recipe", QUICK, recipe("eval_top_p_2"), adapter(), mention=["top_p"]),
    case("teacher-path-missing", "recipe", "run recipe.yaml --model {tiny}", recipe("teacher_missing_path"),
         mention=["models.teacher.model", "no-such-teacher"], forbid=["--model"]),
    case("teacher-served-as-another-model", "recipe", "run recipe.yaml", recipe("teacher_served_model"),
         mention=["models.teacher.model", "served_model", "big-model"]),
    case("distill-layers-past-the-model", "recipe", "run recipe.yaml --model {tiny}", recipe("distill_layers_99"),
         mention=["recipe.yaml", "distill.layers", "2 layers"]),
    case("launch-grpo-in-process-judge", "recipe", "run recipe.yaml", recipe("launch_grpo_local_judge"),
         mention=["launch", "judge", "http"]),

    # --- --set ----------------------------------------------------------------------------------
    case("malformed-yaml", "set", ["run", "recipe.yaml", "--set", "pairs.temperature=[0.7"], recipe("_good"),
         mention=["--set"]),
    case("unknown-key", "set", "run recipe.yaml --set pairs.temprature=0.5", recipe("_good"),
         mention=["--set", "temprature"]),
    case("negative-count", "set", "run recipe.yaml --set prompts.per_trait=-3", recipe("_good"),
         mention=["--set", "per_trait"]),
    case("stages-empty", "set", "run recipe.yaml --set stages=[]", recipe("_good"), mention=["stages"]),
    case("train-learning-rate-fast", "set", TRAIN + " --set trainer.learning_rate=fast", PAIRS,
         mention=["learning_rate"]),
    case("train-lora-r-0", "set", TRAIN + " --set lora.r=0", PAIRS, mention=["lora.r"]),
    case("train-batch-size-0", "set", TRAIN + " --set trainer.per_device_train_batch_size=0", PAIRS,
         mention=["per_device_train_batch_size"]),
    case("train-target-modules-42", "set", TRAIN + " --set lora.target_modules=42", PAIRS,
         mention=["target_modules"]),
    case("train-malformed-yaml", "set", TRAIN + " --set trainer.learning_rate={", PAIRS, mention=["--set"]),
    case("generate-negative-rounds", "set", "generate critique --constitution constitution.yaml -o out --set rounds=-1",
         constitution(), mention=["rounds"]),
    case("generate-negative-temperature", "set",
         "generate sdf --constitution constitution.yaml -o out --set sampling.temperature=-1", constitution(),
         mention=["temperature"]),
    case("secret-in-base-url", "flag", ["generate", "sdf", "--constitution", "constitution.yaml", "-o", "out",
                                       "--backend", "openai", "--served-model", "m",
                                       "--base-url", "http://user:s3cret-token@127.0.0.1:1/v1"],
         constitution(), forbid=["s3cret-token"]),
    case("eval-top-p-2", "set", QUICK + " --set eval.top_p=2", recipe("_good"), adapter(), mention=["top_p"]),

    # --- datasets (train) ---------------------------------------------------------------------
    *[case(f"{kind}-{name}".replace("_", "-").replace(f"{kind}-{kind}-", f"{kind}-"), "dataset", f"train {kind} --data data.jsonl --model {{tiny}} -o out",
           corpus(f"datasets/{name}.jsonl", "data.jsonl"), mention=list(mention))
      for kind, name, mention in [
          ("dpo", "dpo_message_not_a_dict", ["chosen"]),
          ("dpo", "dpo_message_no_content", ["content"]),
          ("dpo", "dpo_mixed_string_and_messages", ["prompt"]),
          ("dpo", "dpo_roles_human_bot", ["role"]),
          ("dpo", "dpo_swapped_roles", ["role"]),
          ("dpo", "dpo_empty_chosen", ["chosen"]),
          ("dpo", "dpo_missing_rejected", ["rejected"]),
          ("dpo", "dpo_json_error_line3", [":3"]),
          ("dpo", "dpo_not_objects", [":1"]),
          ("dpo", "empty", ["empty"]),
          ("dpo", "latin1", ["utf-8"]),
          ("sft", "sft_empty_turns", ["empty"]),
          ("sft", "sft_roles_human_bot", ["role"]),
          ("sft", "sft_no_assistant_turn", ["assistant"]),
          ("sft", "sft_messages_not_a_list", ["messages"]),
          ("sft", "sft_json_error_line2", [":2"]),
          ("sft", "empty", ["empty"]),
          ("lm", "lm_no_text", ["text"]),
      ]],
    case("sft-given-pairs", "dataset", "train sft --data pairs.jsonl --model {tiny} -o out", PAIRS,
         mention=["messages"]),
    case("dpo-empty-gets-no-recipe-advice", "dataset", "train dpo --data data.jsonl --model {tiny} -o out",
         corpus("datasets/empty.jsonl", "data.jsonl"), forbid=["pairs.max_tokens"]),
    case("data-a-directory", "dataset", "train dpo --data somedir --model {tiny} -o out", directory("somedir"),
         mention=["director"]),

    # --- adapters -------------------------------------------------------------------------------
    case("truncated-safetensors", "adapter", "adapters inspect persona", adapter(break_it=truncated)),
    case("random-safetensors", "adapter", "adapters inspect persona", adapter(break_it=random_bytes)),
    case("empty-safetensors", "adapter", "adapters inspect persona", adapter(break_it=empty_weights)),
    case("config-a-list", "adapter", "adapters inspect persona", adapter(break_it=config_a_list)),
    case("config-not-json", "adapter", "adapters inspect persona", adapter(break_it=config_not_json)),
    case("r-sixteen", "adapter", "adapters inspect persona", adapter(break_it=_set_config(r="sixteen")),
         mention=["sixteen"]),
    case("r-0", "adapter", "adapters inspect persona", adapter(break_it=_set_config(r=0))),
    case("r-sixteen-eval", "adapter", QUICK, recipe("_good"), adapter(break_it=_set_config(r="sixteen")),
         mention=["sixteen"]),
    case("pickle-only-inspect", "adapter", "adapters inspect persona", adapter(break_it=pickle_only),
         mention=["safetensors"]),
    case("pickle-only-eval", "adapter", QUICK, recipe("_good"), adapter(break_it=pickle_only),
         mention=["safetensors"]),
    case("pickle-only-init-adapter", "adapter", TRAIN + " --init-adapter persona", PAIRS,
         adapter(break_it=pickle_only), mention=["safetensors"]),
    case("nan-factor-compose", "adapter", "adapters compose persona:1.0 -o out", adapter(break_it=poisoned(float("nan"))),
         mention=["nan"]),
    case("inf-factor-scale", "adapter", "adapters scale persona --weight 2 -o out",
         adapter(break_it=poisoned(float("inf"))), mention=["inf"]),
    case("compose-no-path-before-weight", "adapter", "adapters compose :1 -o out", adapter(),
         mention=["no adapter before the weight"]),
    case("missing-config", "adapter", "adapters inspect somedir", directory("somedir"),
         mention=["adapter_config.json"]),

    # --- output paths ---------------------------------------------------------------------------
    case("compose-dot-force", "output", "adapters compose persona:1.0 -o . --force", adapter()),
    case("compose-root-force", "output", "adapters compose persona:1.0 -o / --force", adapter()),
    case("compose-home-force", "output", "adapters compose persona:1.0 -o {home} --force", adapter()),
    case("compose-onto-input-force", "output", "adapters compose persona:1.0 -o persona --force", adapter()),
    case("compose-onto-a-file", "output", "adapters compose persona:1.0 -o afile.txt", adapter(),
         write("afile.txt", "a user's file\n")),
    case("compose-onto-a-file-force", "output", "adapters compose persona:1.0 -o afile.txt --force", adapter(),
         write("afile.txt", "a user's file\n")),
    case("compose-user-dir-force", "output", "adapters compose persona:1.0 -o userdir --force", adapter(),
         directory("userdir")),
    case("scale-onto-input-force", "output", "adapters scale persona --weight 2 -o persona --force", adapter()),
    case("orthogonalize-onto-against-force", "output",
         "adapters orthogonalize persona --against other -o other --force", adapter(),
         adapter("other", source="other")),
    case("inspect-json-onto-config", "output", "adapters inspect persona --json persona/adapter_config.json",
         adapter()),
    case("inspect-json-into-a-missing-directory", "output", "adapters inspect persona --json nodir/x.json", adapter(),
         mention=["nodir", "does not exist"]),
    case("inspect-png-onto-weights", "output",
         "adapters inspect persona --png persona/adapter_model.safetensors", adapter()),
    case("inspect-default-png-exists", "output", "adapters inspect persona", adapter(),
         write("adapters_inspect.png", "a user's own picture\n")),
    case("generate-user-dir", "output", "generate sdf --constitution constitution.yaml -o userdir", constitution(),
         directory("userdir")),
    case("generate-dot", "output", "generate sdf --constitution constitution.yaml -o .", constitution()),
    case("generate-root", "output", "generate sdf --constitution constitution.yaml -o /", constitution()),
    case("generate-onto-a-file", "output", "generate sdf --constitution constitution.yaml -o afile.txt",
         constitution(), write("afile.txt", "a user's file\n")),
    case("train-user-dir-force", "output", "train dpo --data pairs.jsonl --model {tiny} -o userdir --force", PAIRS,
         directory("userdir")),
    case("train-dot-force", "output", "train dpo --data pairs.jsonl --model {tiny} -o . --force", PAIRS),
    case("train-onto-a-file", "output", "train dpo --data pairs.jsonl --model {tiny} -o afile.txt", PAIRS,
         write("afile.txt", "a user's file\n")),
    case("train-onto-its-data", "output", "train sft --data chats.jsonl --model {tiny} -o chats.jsonl --force", CHATS),
    case("eval-dot-fresh", "output", QUICK + " -o . --fresh", recipe("_good"), adapter()),
    case("eval-onto-adapter-fresh", "output", QUICK + " -o persona --fresh", recipe("_good"), adapter()),
    case("run-dir-root", "output", "run recipe.yaml --run-dir /", recipe("_good")),
    case("run-dir-home", "output", "run recipe.yaml --run-dir {home}", recipe("_good")),
    case("run-dir-dot", "output", "run recipe.yaml --run-dir .", recipe("_good")),
    case("run-dir-a-file", "output", "run recipe.yaml --run-dir afile.txt", recipe("_good"),
         write("afile.txt", "a user's file\n")),
    case("run-settings-mismatch-keeps-recipe-json", "output", "run recipe.yaml", recipe("_good"), settings_mismatch,
         mention=["--force"]),
    case("import-onto-its-input-force", "output", "constitution import traits.json -o traits.json --force",
         corpus("constitutions/import_good.json", "traits.json")),
]


# ----------------------------------------------------------------------------------------------
# Fixtures and the test.

@pytest.fixture(scope="module")
def valid_adapters(tmp_path_factory, tiny_model_dir) -> dict:
    """Two tiny valid PEFT LoRA adapters (random, non-zero factors) on the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("valid-adapters")
    dirs = {}
    for seed, name in enumerate(("persona", "other")):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn_like(param) * 0.2)
        model.save_pretrained(tmp / name)
        dirs[name] = tmp / name
    return dirs


@pytest.fixture
def world(tmp_path, monkeypatch, tiny_model_dir, valid_adapters) -> World:
    from character_training.config.models import cache_dir

    # Everything the commands import, imported before the guards (import machinery is not under test).
    for module in ("character_training.adapters.inspect", "character_training.cli", "character_training.run.pipeline",
                   "character_training.train.dpo", "character_training.train.sft"):
        importlib.import_module(module)

    monkeypatch.setenv("CHARACTER_TRAINING_CACHE", str(cache_dir()))  # the default model, before $HOME moves
    w = World(root=tmp_path, cwd=tmp_path / "work", home=tmp_path / "home", tiny=tiny_model_dir,
              adapters=valid_adapters)
    for d in (w.cwd, w.home):
        d.mkdir()
        (d / SENTINEL).write_text(f"sentinel in {d.name}: must survive\n")
    monkeypatch.setenv("HOME", str(w.home))
    # `datasets` reads its cache directory from $HOME when first imported: if an earlier test
    # imported it, load_dataset would cache the pairs under the real $HOME (an outside write).
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", w.home / ".cache" / "huggingface" / "datasets")
    monkeypatch.chdir(w.cwd)
    return w


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def run_cli(w: World, argv: list[str], monkeypatch) -> tuple[int | None, str | None]:
    """(exit status, what went wrong instead of returning) of the CLI on ``argv``."""
    from character_training.cli import main

    with guards(monkeypatch):
        try:
            return main([w.fmt(a) for a in argv]), None
        except SystemExit as exc:
            return exc.code, None
        except (ExpensiveWork, OutsideWrite, TooSlow) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a traceback is what this suite looks for
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            return None, f"traceback: {type(exc).__name__}: {str(exc)[:300]} (at {where})"


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_in_one_line_and_destroys_nothing(case: Case, world: World, capsys, monkeypatch):
    for step in case.setup:
        step(world)
    before = snapshot(world.root)
    status, crash = run_cli(world, case.argv, monkeypatch)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    problems = []
    if crash:
        problems.append(crash)
    elif status != 2:
        problems.append(f"exit status {status}, not 2")
    if not crash and (len(lines) != 1 or not lines[0].startswith("error: ")):
        problems.append(f"stderr is not one 'error: ' line ({len(lines)} lines)")
    if "Traceback" in err:
        problems.append("a traceback on stderr")
    if len(lines) == 1:
        missing = [m for m in case.mention if m.lower() not in lines[0].lower()]
        if missing:
            problems.append(f"the error does not name {missing}")
    shown = [f for f in case.forbid if f.lower() in (err + out).lower()]
    if shown:
        problems.append(f"the output shows {shown}")
    after = snapshot(world.root)
    lost = sorted(p for p in before if p not in after)
    changed = sorted(p for p in before if p in after and before[p] != after[p])
    if lost:
        problems.append(f"deleted {lost[:5]}{' ...' if len(lost) > 5 else ''}")
    if changed:
        problems.append(f"overwrote {changed[:5]}")
    print(f"{' '.join(case.argv)}\n  -> status {status}: {err.strip()[-600:]}")  # shown with -rP
    assert not problems, (f"{' '.join(case.argv)}: " + "; ".join(problems)
                          + f"\n--- stderr ---\n{err[-1500:]}\n--- stdout ---\n{out[-500:]}")


# ----------------------------------------------------------------------------------------------
# Controls: the valid inputs the bad cases are made from get as far as the expensive part (or
# succeed), so each bad case is refused for its bad value and nothing else.

CONTROLS = [
    pytest.param(["constitution", "validate", "constitution.yaml"], (constitution(),), 0, id="constitution"),
    pytest.param(["run", "recipe.yaml"], recipe("_good"), "ExpensiveWork", id="recipe"),
    pytest.param(TRAIN.split(), (PAIRS,), "ExpensiveWork", id="dpo-data"),
    pytest.param("train sft --data chats.jsonl --model {tiny} -o out".split(), (CHATS,), "ExpensiveWork",
                 id="sft-data"),
    pytest.param(QUICK.split(), (*recipe("_good"), adapter(), write("run/.character-training", ""),
                                 write("run/prompts/prompts.jsonl", '{"prompt": "Hi?", "split": "heldout"}\n')),
                 "ExpensiveWork", id="eval"),
    pytest.param("adapters inspect persona other --png plot.png".split(), (adapter(), adapter("other", source="other")),
                 0, id="adapters"),
    pytest.param("adapters compose persona:1.0 other:-0.5 -o out".split(),
                 (adapter(), adapter("other", source="other")), 0, id="compose"),
    pytest.param("generate sdf --constitution constitution.yaml -o out".split(), (constitution(),), "ExpensiveWork",
                 id="generate"),
    pytest.param("constitution import traits.json -o new.yaml".split(),
                 (corpus("constitutions/import_bom.json", "traits.json"),), 0, id="import-bom"),
]


@pytest.mark.parametrize("argv,setup,expected", CONTROLS)
def test_valid_inputs_get_past_the_checks(argv, setup, expected, world: World, capsys, monkeypatch):
    for step in setup:
        step(world)
    status, crash = run_cli(world, argv, monkeypatch)
    out, err = capsys.readouterr()
    got = crash.split(":")[0] if crash else status
    assert got == expected, f"{' '.join(argv)}: got {crash or status}\n{err[-2000:]}"
    assert (world.cwd / SENTINEL).is_file()


def test_the_corpus_is_used():
    """Every corpus file is some case's input (a file no case reads tests nothing)."""
    files = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*") if p.is_file() and p.name != "README.md"}
    assert files - CORPUS_USED == set(), f"corpus files no case uses: {sorted(files - CORPUS_USED)}"
