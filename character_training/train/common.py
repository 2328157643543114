"""What every training stage shares: TRL config fields, the LoRA, where training starts from,
checkpoints and resume, the loss-curve plot, the model card.

A training stage (``train_dpo``, ``train_sft``, ...) is one straight function over a TRL
trainer; this module keeps the rest out of it:

- (the TRL config's fields, checked and built: config/trainer_fields.py; each stage's trainer
  defaults: its section in config/training.py)
- ``load_start``: the model a stage trains. From the base alone (a new LoRA), or from the
  previous stage's adapter, either continued (the same LoRA trains on) or merged into the base
  first (a new LoRA trains on the merged weights; ``compose_onto`` then folds the two into one
  LoRA on the original base, exactly, by concatenating their factors).
- ``last_checkpoint``: a stage killed mid-training resumes from ``checkpoints/checkpoint-N``
  (a checkpoint whose write was killed is passed over, with a warning).
- ``save_portable_adapter``: the trainer saves ``adapter/``; its config then names the base model
  as a user elsewhere loads it (``portable_model_name``: a hub id, not this machine's directory),
  and the pickles TRL leaves beside it (``training_args.bin``) go: the card and manifest hold the
  settings.
- ``plot_training``: ``training.png`` (loss; reward margins and accuracies for preference
  training) in the stage directory.
- ``stage_card``: the adapter's model card (``character_training.card``), the caller's part
  (persona, constitution, provenance) filled with what the stage did.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import replace
from pathlib import Path

from character_training.card import DataFile, ModelCard, stamp
from character_training.config.layout import CHECKPOINTS
from character_training.config.models import portable_model_name
from character_training.config.trainer_fields import peft_config
from character_training.config.training import LoraSettings, check_overlong, check_start
from character_training.errors import UserError
from character_training.train import distributed



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


def last_checkpoint(out_dir: Path, stage: str) -> str | None:
    """The newest complete ``checkpoints/checkpoint-N`` a killed run left, or None. A newer one
    without ``trainer_state.json`` (the last file the trainer writes) is a write that was killed:
    it is passed over with a warning, so that a run starting over is not silent about it."""
    complete, incomplete = [], []
    for path in (Path(out_dir) / CHECKPOINTS).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            ((complete if (path / "trainer_state.json").is_file() else incomplete)
             .append((int(match.group(1)), path)))
    newest = max(complete) if complete else None
    passed_over = sorted(p for p in incomplete if newest is None or p[0] > newest[0])
    if passed_over and distributed.is_main_process():  # every process asks; one says it
        names = ", ".join(f"{CHECKPOINTS}/{path.name}" for _, path in passed_over)
        then = f"resuming from {newest[1].name}" if newest else "starting from step 0"
        print(f"[{stage}] warning: {names} {'is' if len(passed_over) == 1 else 'are'} incomplete (no "
              f"trainer_state.json: a write was killed); {then}", flush=True)
    return str(newest[1]) if newest else None


# Pickles TRL and PEFT may leave in a saved adapter directory; not part of the adapter.
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl")


def save_portable_adapter(trainer, adapter_dir: Path, model_path: str) -> Path:
    """The trainer's ``save_model(adapter_dir)``, then (on the one process that writes) the adapter
    made portable: ``base_model_name_or_path`` in its config the base model's portable name (a
    hub id, which PEFT's ``AutoPeftModelForCausalLM`` and a model hub resolve anywhere; the local
    directory goes to the card), and no pickles (``training_args.bin``)."""
    adapter_dir = Path(adapter_dir)
    trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        make_portable(adapter_dir, model_path)
    return adapter_dir


def make_portable(adapter_dir: Path, model_path: str) -> str:
    """Rewrite a saved adapter's config to name its base model portably and remove the pickles
    beside it; the name written."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    name = portable_model_name(model_path)
    if config.get("base_model_name_or_path") != name:
        config["base_model_name_or_path"] = name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    weights = (Path(adapter_dir) / "adapter_model.safetensors").is_file()
    for pattern in _PICKLES:
        for pickle in Path(adapter_dir).glob(pattern):
            if pickle.name == "adapter_model.bin" and not weights:  # the weights themselves: keep them
                continue
            pickle.unlink()
    return name


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
        card, kind=manifest["stage"], tags=(manifest["stage"], "trl"), summary=summary,
        base_model=portable_model_name(manifest["model"]), base_model_path=manifest["model"],
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


def fold_merged(previous_adapter: str | Path, out: Path, card: ModelCard | None = None,
                model_path: str | None = None) -> dict:
    """After a ``start: merge`` stage: ``out/adapter`` was trained on the base with
    ``previous_adapter`` merged in. Keep it as ``out/adapter-delta`` and write ``out/adapter``, one
    LoRA on the original base whose delta is the sum of both (exact: factors concatenated).
    ``card``: the caller's (persona, provenance), for the composed adapter's model card;
    ``model_path``: the base model's directory here, recorded in that card."""
    from character_training.adapters.algebra import compose_onto
    from character_training.adapters.io import load_adapter

    delta = out / "adapter-delta"
    (out / "adapter").rename(delta)
    previous, new = load_adapter(previous_adapter), load_adapter(delta)
    # An adapter written before adapters named their base portably names this machine's directory:
    # the same model as the delta's portable name, so it is named so (in memory) to compose.
    if previous.base_model != new.base_model and previous.base_model \
            and portable_model_name(previous.base_model) == new.base_model:
        previous.config["base_model_name_or_path"] = new.base_model
    if model_path is not None:
        card = replace(card or ModelCard(), base_model_path=model_path)
    compose_onto(previous, new, out / "adapter", card=card)
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
