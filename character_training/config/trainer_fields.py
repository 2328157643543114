"""A training section's ``trainer`` and ``lora`` mappings as TRL and PEFT take them, checked when
the recipe is read (before any stage starts) and built the same way when the stage trains:

- ``check_trainer_fields``: the TRL config's own fields (``DPOConfig``, ``SFTConfig``, ...):
  unknown keys are errors naming the key (or the ``lora`` mapping, for a LoRA setting), types and
  ranges are checked, and the config is built once as the stage will build it.
- ``make_config``: the stage's TRL config, the section's trainer fields (its defaults included)
  over the device's defaults (config/devices.py).
- ``check_lora`` / ``peft_config``: the LoRA as PEFT's ``LoraConfig``.

Importing this module imports neither TRL nor PEFT; the functions do, when called.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from character_training.config.stages import TRAINER_KINDS
from character_training.config.training import LoraSettings
from character_training.errors import UserError, did_you_mean


def config_class(kind: str):
    """The TRL config class of a training kind (its section's ``config_name``)."""
    import trl

    return getattr(trl, TRAINER_KINDS[kind].config_name)


def config_fields(kind: str) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class(kind)) if f.init}


# Trainer keys that are LoRA settings: the suggestion points at the section's ``lora`` mapping, not
# at the nearest TRL field (``lora_rank`` is not ``local_rank``).
LORA_KEYS = {"r": "r", "rank": "r", "lora_r": "r", "lora_rank": "r", "alpha": "alpha", "lora_alpha": "alpha",
             "dropout": "dropout", "lora_dropout": "dropout", "target_modules": "target_modules",
             "lora_target_modules": "target_modules", "use_rslora": "use_rslora"}

# Ranges TRL's configs leave to the trainer (which fails late, or trains on nonsense): field ->
# (lowest, whether the lowest is allowed, what the field is). None values are TRL's "off".
TRAINER_RANGES = {
    "learning_rate": (0, False, "the optimizer's step size, e.g. 5e-5"),
    "per_device_train_batch_size": (1, True, "examples per device and step"),
    "per_device_eval_batch_size": (1, True, "examples per device and evaluation step"),
    "gradient_accumulation_steps": (1, True, "batches accumulated per optimizer step"),
    "num_train_epochs": (0, False, "passes over the data"),
    "max_length": (1, True, "tokens per example"),
    "max_prompt_length": (1, True, "prompt tokens"),
    "max_completion_length": (1, True, "generated tokens"),
    "num_generations": (2, True, "answers per prompt"),
    "beta": (0, True, "the strength of the KL term"),
    "warmup_steps": (0, True, "warm-up steps"),
    "weight_decay": (0, True, "weight decay"),
    "max_grad_norm": (0, True, "gradient clipping norm"),
    "save_total_limit": (1, True, "checkpoints kept"),
}


def check_trainer_fields(trainer: dict, where: str, kind: str, section: str | None = None, *,
                         build: bool = True, extra: dict | None = None) -> None:
    """A recipe's ``trainer`` mapping against TRL's config: unknown keys (naming the nearest field,
    or the ``lora`` mapping for a LoRA setting), values of the wrong type or out of range, and, with
    ``build``, the config object itself built once as the stage will build it (its defaults, these
    fields, ``extra``), so TRL's own checks run now and not after the data stages."""
    known = config_fields(kind)
    cls = config_class(kind)
    name = section or kind
    if not isinstance(trainer, dict):
        raise UserError(f"{where}: {name}.trainer: must be a mapping of TRL {cls.__name__} fields, got {trainer!r}")
    for key in trainer:
        if key in known:
            continue
        if str(key) in LORA_KEYS:
            raise UserError(f"{where}: {name}.trainer.{key}: a LoRA setting, not a field of TRL's {cls.__name__}; "
                            f"set it as {name}.lora.{LORA_KEYS[str(key)]}")
        raise UserError(f"{where}: {name}.trainer.{key}: not a field of TRL's {cls.__name__}"
                        f"{did_you_mean(key, known)}; see TRL's {cls.__name__} documentation for the fields it accepts")
    hints = _config_hints(kind)
    for key, value in trainer.items():
        problem = _field_problem(value, hints.get(key))
        if problem is None and key in TRAINER_RANGES and value is not None and not isinstance(value, (list, str)):
            low, inclusive, what = TRAINER_RANGES[key]
            if not (value >= low if inclusive else value > low) or value != value:
                problem = f"must be {'at least' if inclusive else 'above'} {low} ({what})"
        if problem:
            raise UserError(f"{where}: {name}.trainer.{key}: {value!r} {problem}; see TRL's {cls.__name__} "
                            "documentation")
    if build:
        _build_config(kind, trainer, extra, where, name)


def _config_hints(kind: str) -> dict:
    import typing

    try:
        return typing.get_type_hints(config_class(kind))
    except Exception:  # an annotation this Python cannot resolve: the config's own checks still run
        return {}


def _field_problem(value, hint) -> str | None:
    """Why ``value`` does not fit a TRL field's annotation, or None (unknown kinds of types pass)."""
    import enum
    import types
    import typing

    if hint is None:
        return None
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    wanted = []
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None):
            if value is None:
                return None
            continue
        if origin is typing.Literal:
            if value in typing.get_args(option):
                return None
            wanted.append(" or ".join(repr(a) for a in typing.get_args(option)))
        elif origin is bool:
            if isinstance(value, bool):
                return None
            wanted.append("true or false")
        elif origin is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return None
            wanted.append("a whole number")
        elif origin is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return None
            wanted.append("a number")
        elif origin is str:
            if isinstance(value, str):
                return None
            wanted.append("text")
        elif origin in (list, tuple):
            if isinstance(value, (list, tuple)):
                args = typing.get_args(option)
                if not args or all(_field_problem(v, args[0]) is None for v in value):
                    return None
            wanted.append("a list" + (f" of {args[0].__name__}" if (args := typing.get_args(option))
                                      and isinstance(args[0], type) else ""))
        elif origin is dict:
            if isinstance(value, dict):
                return None
            wanted.append("a mapping")
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            if isinstance(value, str):
                return None  # the config checks the name
            wanted.append("text")
        else:
            return None  # a type this check does not know: leave it to the config
    return f"must be {' or '.join(dict.fromkeys(wanted))}" if wanted else None


def _build_config(kind: str, trainer: dict, extra: dict | None, where: str, name: str) -> None:
    """Build the TRL config as ``make_config`` will (the stage's defaults, these fields, the CPU
    flags), in a scratch directory, and throw it away. Building one reads the environment, starts
    Accelerate's process state and may set environment variables: those are put back, so what
    runs later is exactly what ran before this check existed."""
    import os
    import tempfile

    from accelerate.state import AcceleratorState, PartialState

    defaults = TRAINER_KINDS[kind].trainer_defaults
    environ = dict(os.environ)
    state_was_set = bool(PartialState._shared_state)
    try:
        with tempfile.TemporaryDirectory(prefix="ct-validate-") as tmp:
            make_config(kind, defaults, {**trainer, **(extra or {})}, Path(tmp), seed=0)
    except UserError as exc:
        raise UserError(f"{where}: {name}.trainer: {str(exc).removeprefix(f'{kind}.trainer: ')}") from None
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        if not state_was_set:
            AcceleratorState._reset_state(reset_partial_state=True)


def check_lora(lora: LoraSettings, where: str, section: str) -> None:
    """The LoRA settings as PEFT takes them: ``LoraConfig`` built once (PEFT's own checks)."""
    try:
        peft_config(lora)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}: {section}.lora: PEFT refused it: {' '.join(str(exc).split())}") from None


def make_config(kind: str, defaults: dict, trainer: dict, output_dir: Path, seed: int):
    """The stage's TRL config: ``defaults``, the recipe's ``trainer`` over them, the device's under both.

    Also seeds torch, numpy and Python's ``random`` with ``seed``: the LoRA's random init (PEFT's,
    made before the Trainer seeds itself) came from each process's own random seed, so two runs
    of one stage trained two different adapters (the same loss at the first step, B being zero,
    but other gradients)."""
    import torch
    from transformers import set_seed

    from character_training.config.devices import trainer_args

    set_seed(seed)

    args = trainer_args({**defaults, **trainer, "output_dir": str(output_dir), "seed": seed},
                        cuda=torch.cuda.is_available())
    try:
        return config_class(kind)(**args)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{kind}.trainer: TRL refused the settings: {' '.join(str(exc).split())}") from None


def peft_config(lora: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, use_rslora=lora.use_rslora, task_type="CAUSAL_LM")
