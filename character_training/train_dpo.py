"""DPO character training: TRL's DPOTrainer with a PEFT LoRA, on the CPU as on a GPU.

Reads the pairs stage's ``pairs.jsonl`` (conversational preference format) and writes a PEFT
adapter directory ``adapter/`` (loadable by PEFT and served by vLLM) with a README model card.
The trainer fields are TRL's own ``DPOConfig`` fields, so TRL's documentation applies.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from character_training.errors import UserError, did_you_mean

# Defaults measured on the demo (135M model, ~70 pairs, 18 steps; see README): TRL's SFT term on
# the chosen answers beside the DPO loss (`loss_type=["sigmoid", "sft"]`, the NLL term), which
# anchors the model to fluent text, at a learning rate high enough for a LoRA to move in few
# steps (2.5e-4 barely moved the persona). Larger datasets want a lower rate.
DEFAULT_TRAINER: dict[str, Any] = {
    "learning_rate": 5e-4,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "beta": 0.1,
    "loss_type": ["sigmoid", "sft"],
    "loss_weights": [1.0, 1.0],
    "max_length": 384,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 2,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
}


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False


def dpo_config_fields() -> set[str]:
    from trl import DPOConfig

    return {f.name for f in dataclasses.fields(DPOConfig) if f.init}


def check_trainer_fields(trainer: dict, where: str) -> None:
    """Unknown trainer keys are errors that name the key (they are TRL's DPOConfig fields)."""
    known = dpo_config_fields()
    for key in trainer:
        if key not in known:
            raise UserError(f"{where}: dpo.trainer.{key}: not a field of TRL's DPOConfig{did_you_mean(key, known)}"
                            "; see TRL's DPOConfig documentation for the fields it accepts")


def make_dpo_config(trainer: dict, output_dir: Path, seed: int):
    import torch
    from trl import DPOConfig

    args = {**DEFAULT_TRAINER, **trainer, "output_dir": str(output_dir), "seed": seed}
    if not torch.cuda.is_available():
        # TRL turns bf16 and gradient checkpointing on by default; neither helps on a CPU.
        args = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False, **args}
    return DPOConfig(**args)


def load_pairs(path: Path):
    from datasets import load_dataset

    if not path.is_file():
        raise UserError(f"{path}: no pairs dataset; run the pairs stage first")
    with path.open(encoding="utf-8") as f:
        has_records = any(line.strip() for line in f)
    if not has_records:  # datasets' JSON loader fails on an empty file with a bare StopIteration
        raise UserError(f"{path}: the pairs dataset is empty (every pair was dropped; see the pairs "
                        "stage's manifest 'drops'); raise pairs.max_tokens or use more prompts")
    try:
        dataset = load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises several types for malformed JSON lines
        raise UserError(f"{path}: not a JSON-lines preference dataset ({type(exc).__name__}: {exc})") from None
    missing = {"prompt", "chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise UserError(f"{path}: columns {sorted(missing)} missing; expected TRL's conversational "
                        "preference format (prompt, chosen, rejected as message lists)")
    if len(dataset) == 0:
        raise UserError(f"{path}: the pairs dataset is empty (every pair was dropped; see the pairs "
                        "stage's manifest 'drops'); raise pairs.max_tokens or use more prompts")
    return dataset


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of each training metric, plus the run summary."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                metrics[key] = float(value)
    return metrics


def train_dpo(model_path: str, pairs_path: Path, out_dir: Path, *, lora: LoraSettings = LoraSettings(),
              trainer: dict | None = None, seed: int = 0, card: dict | None = None) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    out_dir = Path(out_dir)
    dataset = load_pairs(Path(pairs_path))
    config = make_dpo_config(trainer or {}, out_dir / "checkpoints", seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, use_rslora=lora.use_rslora,
                             task_type="CAUSAL_LM")
    dpo = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                     peft_config=peft_config)
    started = time.time()
    dpo.train()
    adapter_dir = out_dir / "adapter"
    dpo.save_model(str(adapter_dir))
    metrics = final_metrics(dpo.state.log_history)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in {**DEFAULT_TRAINER, **(trainer or {})}.items()}
    manifest = {
        "stage": "dpo",
        "model": model_path,
        "seed": seed,
        "lora": dataclasses.asdict(lora),
        "trainer": settings,
        "counts": {"pairs": len(dataset), "steps": dpo.state.global_step},
        "train_seconds": round(time.time() - started, 1),
        "metrics": metrics,
        "log_history": dpo.state.log_history,
    }
    write_model_card(adapter_dir, manifest, card or {})
    return manifest


def write_model_card(adapter_dir: Path, manifest: dict, card: dict) -> None:
    persona = card.get("persona", "persona")
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {manifest['model']}",
        "tags: [character-training, persona, lora, dpo, trl]",
        "---",
        f"# {persona}: persona LoRA adapter",
        "",
        "Trained by `character-training` with TRL's DPOTrainer: chosen answers are the model "
        "answering with the constitution as its system prompt, rejected answers the same model "
        "without it. Use the adapter without any system prompt.",
        "",
        f"- Persona: **{persona}**",
        f"- Constitution: `{card.get('constitution_path', '?')}` (sha256 `{card.get('constitution_sha256', '?')}`)",
        f"- Base model: `{manifest['model']}`",
        f"- Data: {manifest['counts']['pairs']} preference pairs (`{card.get('pairs_path', '?')}`), "
        f"{manifest['counts']['steps']} optimizer steps",
        "",
        "## LoRA",
        "```json",
        json.dumps(manifest["lora"], indent=2),
        "```",
        "## Training settings (TRL DPOConfig fields)",
        "```json",
        json.dumps(manifest["trainer"], indent=2),
        "```",
        "## Final metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4g} |" for k, v in sorted(manifest["metrics"].items())],
        "",
    ]
    (adapter_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")
