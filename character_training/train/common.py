"""What every training stage shares: TRL config fields, the LoRA, where training starts from,
checkpoints and resume, the loss-curve plot, the model card.

A training stage (``train_dpo``, ``train_sft``, ...) is one straight function over a TRL
trainer; this module keeps the rest out of it:

- ``check_trainer_fields`` / ``make_config``: a recipe's ``trainer`` mapping holds the TRL
  config's own fields (``DPOConfig``, ``SFTConfig``, ...), so TRL's documentation applies;
  unknown keys are errors naming the key. CPU runs get ``use_cpu`` and no bf16.
- ``load_start``: the model a stage trains. From the base alone (a new LoRA), or from the
  previous stage's adapter, either continued (the same LoRA trains on) or merged into the base
  first (a new LoRA trains on the merged weights; ``compose_onto`` then folds the two into one
  LoRA on the original base, exactly, by concatenating their factors).
- ``last_checkpoint``: a stage killed mid-training resumes from ``checkpoints/checkpoint-N``.
- ``plot_training``: ``training.png`` (loss; reward margins and accuracies for preference
  training) in the stage directory.
- ``stage_card``: the adapter's model card (``character_training.card``), the caller's part
  (persona, constitution, provenance) filled with what the stage did.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import replace
from pathlib import Path

from character_training.card import DataFile, ModelCard, stamp
from character_training.errors import UserError, did_you_mean
from character_training.train.settings import LoraSettings, check_overlong, check_start

CHECKPOINTS = "checkpoints"


def config_class(kind: str):
    import trl

    classes = {"dpo": "DPOConfig", "sft": "SFTConfig", "lm": "SFTConfig", "grpo": "GRPOConfig", "distill": "SFTConfig"}
    return getattr(trl, classes[kind])


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


def check_trainer_fields(trainer: dict, where: str, kind: str = "dpo", section: str | None = None, *,
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

    defaults = _stage_defaults(kind)
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


def _stage_defaults(kind: str) -> dict:
    """The trainer defaults the stage's own module gives ``make_config``."""
    if kind == "dpo":
        from character_training.train.dpo import DEFAULT_TRAINER
    elif kind == "grpo":
        from character_training.train.grpo import DEFAULT_TRAINER
    elif kind == "sft":
        from character_training.train.sft import DEFAULT_SFT as DEFAULT_TRAINER
    elif kind == "distill":
        from character_training.train.distill import DEFAULT_TRAINER
    else:
        from character_training.train.sft import DEFAULT_LM as DEFAULT_TRAINER
    return DEFAULT_TRAINER


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

    from character_training.train.devices import trainer_args

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


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_start(model_path: str, *, init_adapter: str | Path | None = None, mode: str = "continue",
               bf16: bool = False, lora: LoraSettings = LoraSettings(), model_kwargs: dict | None = None):
    """(model, peft_config for the trainer or None). ``mode``: how ``init_adapter`` is used:
    "continue" trains the same LoRA on; "merge" folds it into the base and starts a new LoRA.
    ``model_kwargs``: ``from_pretrained``'s arguments (``model_load_kwargs(config)``: the trainer's
    ``model_init_kwargs``, which TRL ignores for a model it is handed); None: the dtype of ``bf16``."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, **(model_kwargs or {"dtype": dtype}))
    if init_adapter is None:
        return model, peft_config(lora)
    check_adapter(init_adapter, model_path)
    from peft import PeftModel

    if mode == "continue":
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True), None
    if mode == "merge":
        return PeftModel.from_pretrained(model, str(init_adapter)).merge_and_unload(), peft_config(lora)
    check_start(mode)  # raises: neither continue nor merge


def check_adapter(adapter: str | Path, model_path: str) -> dict:
    """The adapter's config, once its config and weights passed the adapter files' checks (a LoRA
    adapter, complete safetensors, finite factors); a clear error otherwise."""
    from character_training.adapters.io import check_adapter_dir

    return check_adapter_dir(adapter, "--init-adapter")


def last_checkpoint(out_dir: Path) -> str | None:
    """The newest ``checkpoints/checkpoint-N`` a killed run left, or None."""
    found = []
    for path in (Path(out_dir) / CHECKPOINTS).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return str(max(found)[1]) if found else None


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of each training metric, plus the run summary."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                metrics[key] = float(value)
    return metrics


def plot_training(log_history: list[dict], path: Path, title: str) -> Path | None:
    """Loss per step, and reward margins / accuracies when the trainer logged them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for key in ("loss", "rewards/margins", "rewards/accuracies", "reward", "eval_loss"):
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        if points:
            series[key] = points
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_card(card: ModelCard | None, manifest: dict, *, config_name: str, summary: str,
               data: list[DataFile], facts: list[str], sections: dict | None = None) -> ModelCard:
    """A training stage's model card: the caller's (persona, constitution, provenance of earlier
    stages) with what the stage did (base model, data files, LoRA and TRL settings, metrics)."""
    card = card or ModelCard()
    if manifest.get("system_prompt"):
        facts = [*facts, "Trained with a training-time system prompt (absent at evaluation): "
                         f"`{manifest['system_prompt'][:200]}`"]
    filled = replace(
        card, kind=manifest["stage"], tags=(manifest["stage"], "trl"), summary=summary, base_model=manifest["model"],
        data=(*card.data, *data), facts=(*card.facts, *facts),
        settings={"LoRA": manifest["lora"], f"Training settings (TRL {config_name} fields)": manifest["trainer"]},
        sections={**card.sections, **(sections or {})}, metrics=manifest["metrics"])
    return stamp(filled, "torch", "transformers", "trl", "peft")




def length_limit(lengths: list[int], max_length: int | None, policy: str, what: str, source: str) -> tuple[list[int], dict]:
    """Which examples to train on under ``max_length`` (tokens), and the counts for the manifest.

    ``policy`` is the stage's ``overlong`` setting: "truncate" keeps over-long examples (TRL cuts
    them to ``max_length``), "drop" leaves them out. Either way they are counted. When every
    example is over the limit the stage stops before training: truncation would leave nothing
    whole, dropping would leave nothing at all."""
    check_overlong(policy)
    if not lengths:
        return [], {"overlong": 0, "overlong_policy": policy}
    over = [i for i, n in enumerate(lengths) if max_length is not None and n > max_length]
    if over and len(over) == len(lengths):
        raise UserError(f"{source}: all {len(lengths)} {what} are longer than max_length={max_length} tokens "
                        f"(the shortest has {min(lengths)}); raise trainer.max_length or use shorter data")
    keep = [i for i, n in enumerate(lengths) if policy == "truncate" or max_length is None or n <= max_length]
    return keep, {"overlong": len(over), "overlong_policy": policy, "longest_tokens": max(lengths)}


def chat_length(tokenizer, messages: list[dict]) -> int:
    """Tokens of a conversation as the chat template renders it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fold_merged(previous_adapter: str | Path, out: Path, card: ModelCard | None = None) -> dict:
    """After a ``start: merge`` stage: ``out/adapter`` was trained on the base with
    ``previous_adapter`` merged in. Keep it as ``out/adapter-delta`` and write ``out/adapter``, one
    LoRA on the original base whose delta is the sum of both (exact: factors concatenated).
    ``card``: the caller's (persona, provenance), for the composed adapter's model card."""
    from character_training.adapters.algebra import compose_onto

    delta = out / "adapter-delta"
    (out / "adapter").rename(delta)
    compose_onto(previous_adapter, delta, out / "adapter", card=card)
    return {"previous": str(previous_adapter), "delta": str(delta), "adapter": str(out / "adapter")}


def stage_manifest(stage: str, *, model_path: str, seed: int, lora: LoraSettings, settings: dict,
                   init_adapter, start: str, **extra) -> dict:
    """The head every training stage's manifest shares (its counts and metrics follow)."""
    return {
        "stage": stage,
        "model": model_path,
        "seed": seed,
        "lora": dataclasses.asdict(lora),
        "trainer": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
        "start": {"init_adapter": str(init_adapter) if init_adapter else None, "mode": start if init_adapter else None},
        **extra,
    }
