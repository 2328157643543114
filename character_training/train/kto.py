"""KTO character training: TRL's KTOTrainer with a PEFT LoRA, on the CPU as on a GPU.

Reads one or several pairs files (the pairs, critique and rlaif stages' ``pairs.jsonl``), each
checked record by record before the model loads with DPO's own checks (``train.dpo.load_pairs``:
roles, message shapes, empty turns, each error naming file, line and field). Every pair becomes two
unpaired examples in TRL's conversational unpaired preference format: its chosen answer a desirable
example (``label: True``), its rejected answer an undesirable one (``label: False``). Writes a PEFT
adapter directory ``adapter/`` (loadable by PEFT and served by vLLM) with a README model card.
The trainer fields are TRL's own ``KTOConfig`` fields, so TRL's documentation applies.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from character_training.adapters.io import check_adapter_dir
from character_training.card import DataFile, ModelCard, write_card
from character_training.config import devices, trainer_fields
from character_training.config.training import KTO_TRAINER, LoraSettings
from character_training.errors import UserError
from character_training.train import common as training
from character_training.train.dpo import load_pairs, with_system_prompt

DEFAULT_TRAINER = KTO_TRAINER  # the section's (config/training.py): where a recipe's kto.trainer leaves a field out

# TRL's loss types that estimate KTO's KL term from mismatched answers within a batch.
NO_KL_LOSSES = ("apo_zero_unpaired",)


def read_examples(pairs_paths: list[Path], system_prompt: str | None, seed: int) -> tuple[list[dict], dict[str, int]]:
    """The pairs files, checked record by record (``train.dpo.load_pairs``), as unpaired KTO examples in
    training order, ``system_prompt`` (training-time, as DPO's) in front of every prompt; and the pairs
    read from each file."""
    if not pairs_paths:
        raise UserError("kto: no pairs files; give the pairs.jsonl of the pairs, critique or rlaif stage")
    pairs, pairs_read = [], {}
    for path in map(Path, pairs_paths):
        records = list(with_system_prompt(load_pairs(path), system_prompt))
        pairs_read[str(path)] = len(records)
        pairs += records
    return unpaired(pairs, seed), pairs_read


def unpaired(pairs: list[dict], seed: int) -> list[dict]:
    """Each pair as two KTO examples, in training order. TRL's KTOTrainer samples in order (its KL
    term pairs each example's prompt with the previous example's answer in the batch) and its own
    unpairing puts all chosen answers before all rejected ones, so that every batch would hold one
    label. Here the pairs are shuffled with ``seed`` and desirable and undesirable examples
    alternate, the rejected answers rotated by half the pairs so that neighbours come from
    different prompts (from 4 pairs on)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    examples = []
    for k, i in enumerate(order):
        other = pairs[order[(k + half) % len(order)]]
        examples.append(example(pairs[i], "chosen", True))
        examples.append(example(other, "rejected", False))
    return examples


def example(pair: dict, answer: str, label: bool) -> dict:
    """One answer of a checked pair as TRL's conversational unpaired preference example."""
    return {"prompt": [{"role": m["role"], "content": m["content"]} for m in pair["prompt"]],
            "completion": [{"role": m["role"], "content": m["content"]} for m in pair[answer]],
            "label": label}


def check_kto_settings(config, lora: LoraSettings) -> None:
    """What TRL's KTOTrainer refuses only after the model has loaded (a ValueError and a traceback),
    refused before anything loads, with what to change."""
    if config.loss_type not in NO_KL_LOSSES:
        if config.per_device_train_batch_size < 2:
            raise UserError(f"kto.trainer.per_device_train_batch_size: {config.per_device_train_batch_size}; KTO "
                            "estimates its KL term from mismatched examples within a batch (each prompt with the "
                            "previous example's answer), so a batch of one has no mismatch and the KL term is the "
                            "reward itself (TRL's KTOTrainer refuses it); set it to 2 or more (4 is the default; "
                            "gradient_accumulation_steps keeps the effective batch), or use loss_type: "
                            "apo_zero_unpaired, which has no KL term")
        if config.train_sampling_strategy != "sequential":
            raise UserError(f"kto.trainer.train_sampling_strategy: '{config.train_sampling_strategy}'; KTO's KL term "
                            "pairs each example with its neighbour in a fixed-order batch, which another sampling "
                            "order breaks (TRL's KTOTrainer refuses it); leave it out (the examples are already "
                            "shuffled, desirable and undesirable alternating) or set 'sequential'")
    if config.sync_ref_model:
        raise UserError("kto.trainer.sync_ref_model: true; with a LoRA the reference model is the model with the "
                        "adapter switched off, so there is no separate reference model to synchronise (TRL's "
                        "KTOTrainer refuses it); remove sync_ref_model")
    modules = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
    if "lm_head" in modules:
        raise UserError("kto.lora.target_modules: includes 'lm_head'; KTOTrainer computes log-probabilities from "
                        "lm_head's weight directly, so a LoRA on it would never train (TRL's KTOTrainer refuses it); "
                        "remove 'lm_head' ('all-linear' leaves it out)")


def prompt_length(tokenizer, messages: list[dict]) -> int:
    """Tokens of a prompt as TRL's KTOTrainer renders it (with the assistant turn's opening)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def train_kto(model_path: str, pairs_paths: list[Path], out_dir: Path, *, lora: LoraSettings = LoraSettings(),
              trainer: dict | None = None, seed: int = 0, card: ModelCard | None = None,
              init_adapter: str | Path | None = None, start: str = "continue",
              system_prompt: str | None = None, overlong: str = "truncate") -> dict:
    from datasets import Dataset
    from trl import KTOTrainer

    out_dir, pairs_paths = Path(out_dir), [Path(p) for p in pairs_paths]
    if init_adapter is not None:  # its config and weights, before anything loads
        check_adapter_dir(init_adapter, "init adapter")
    examples, pairs_read = read_examples(pairs_paths, system_prompt, seed)
    config = trainer_fields.make_config("kto", DEFAULT_TRAINER, trainer or {}, out_dir / training.CHECKPOINTS, seed)
    check_kto_settings(config, lora)
    tokenizer = training.load_tokenizer(model_path)
    source = ", ".join(map(str, pairs_paths))
    lengths = [training.chat_length(tokenizer, e["prompt"] + e["completion"]) for e in examples]
    keep, length_counts = training.length_limit(lengths, config.max_length, overlong, "examples", source)
    # TRL drops an example whose prompt alone fills max_length (nothing of its answer would be left); left
    # out here, so that it is counted and the batches TRL's KL term is built from are the ones trained on.
    full = set() if config.max_length is None else \
        {i for i in keep if prompt_length(tokenizer, examples[i]["prompt"]) >= config.max_length}
    length_counts["prompt_fills_max_length"] = len(full)
    examples = [examples[i] for i in keep if i not in full]
    desirable = sum(e["label"] for e in examples)
    undesirable = len(examples) - desirable
    if not desirable or not undesirable:
        missing, left = ("desirable (chosen)", undesirable) if not desirable else ("undesirable (rejected)", desirable)
        raise UserError(f"{source}: no {missing} examples left to train on ({left} of the other kind, "
                        f"{len(lengths) - len(examples)} of {len(lengths)} dropped as longer than max_length="
                        f"{config.max_length} tokens); KTO learns from both kinds, each batch should hold both; "
                        "raise trainer.max_length, use overlong: truncate, or use shorter data")
    model, peft_config = training.load_start(model_path, init_adapter=init_adapter, mode=start, bf16=config.bf16,
                                             model_kwargs=devices.model_load_kwargs(config),
                                             lora=lora)
    # No ref_model: with a LoRA, TRL's reference is the model with the adapter off (or, continuing an
    # adapter, a frozen copy of it), as in train_dpo.
    kto = KTOTrainer(model=model, args=config, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                     peft_config=peft_config)
    resume = training.last_checkpoint(out_dir, "kto")
    started = time.time()
    kto.train(resume_from_checkpoint=resume)
    adapter_dir = out_dir / "adapter"
    training.save_portable_adapter(kto, adapter_dir, model_path)
    metrics = training.final_metrics(kto.state.log_history)
    manifest = {
        **training.stage_manifest("kto", model_path=model_path, seed=seed, lora=lora,
                                  settings={**DEFAULT_TRAINER, **(trainer or {})}, init_adapter=init_adapter,
                                  start=start, system_prompt=system_prompt, overlong=overlong),
        "counts": {"pairs_read": pairs_read, "pairs": sum(pairs_read.values()), "desirable": desirable,
                   "undesirable": undesirable, "overlong": length_counts["overlong"],
                   "dropped": len(lengths) - len(examples), "steps": kto.state.global_step},
        "lengths": length_counts,
        "resumed_from": resume,
        "train_seconds": round(time.time() - started, 1),
        "metrics": metrics,
        "log_history": kto.state.log_history,
    }
    if kto.is_world_process_zero():  # under several processes, one writes
        training.plot_training(kto.state.log_history, out_dir / "training.png", f"KTO: {(card and card.persona) or ''}")
        write_card(model_card(card, manifest, pairs_paths), adapter_dir)
    return manifest


def model_card(card: ModelCard | None, manifest: dict, pairs_paths: list[Path]) -> ModelCard:
    """The caller's card (persona, constitution, provenance) with what this KTO run did."""
    counts = manifest["counts"]
    return training.stage_card(
        card, manifest, config_name="KTOConfig",
        summary=("Trained by `character-training` with TRL's KTOTrainer (KTO): each preference pair's chosen answer "
                 "(the model answering with the constitution as its system prompt) is a desirable example and its "
                 "rejected answer (the same model without it) an undesirable example, trained unpaired. Use the "
                 "adapter without any system prompt."),
        data=[DataFile.of(p, f"{counts['pairs_read'][str(p)]} preference pairs") for p in pairs_paths],
        facts=[f"Trained on {counts['desirable']} desirable and {counts['undesirable']} undesirable examples "
               f"(the answers of {counts['pairs']} preference pairs), {counts['steps']} optimizer steps"])
