"""DPO character training: TRL's DPOTrainer with a PEFT LoRA, on the CPU as on a GPU.

Reads the pairs stage's ``pairs.jsonl`` (TRL's conversational preference format; its standard
format, three strings a record, is converted to it), checked record by record before the model
loads (``load_pairs``: roles, message shapes, empty turns, each error naming file, line and
field), and writes a PEFT adapter directory ``adapter/`` (loadable by PEFT and served by vLLM)
with a README model card.
The trainer fields are TRL's own ``DPOConfig`` fields, so TRL's documentation applies.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from character_training.adapters.io import check_adapter_dir
from character_training.card import DataFile, ModelCard, write_card
from character_training.errors import UserError
from character_training.config import trainer_fields
from character_training.train import common as training
from character_training.config import devices
from character_training.config.training import DPO_TRAINER, LoraSettings, check_loop_negatives
from character_training.train.sft import check_message, read_records

DEFAULT_TRAINER = DPO_TRAINER  # the section's (config/training.py): where a recipe's dpo.trainer leaves a field out


def check_trainer_fields(trainer: dict, where: str) -> None:
    """Unknown trainer keys are errors that name the key (they are TRL's DPOConfig fields)."""
    trainer_fields.check_trainer_fields(trainer, where, "dpo")


PAIR_FIELDS = ("prompt", "chosen", "rejected")
PAIR_FORMAT = ('{"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}], '
               '"rejected": [{"role": "assistant", "content": ...}]}')


def check_pair(path: Path, number: int, record: dict) -> dict | None:
    """One preference record, checked field by field (errors name ``FILE:LINE: FIELD``). None for
    a record in TRL's conversational format (message lists), used as it is; for one in TRL's
    standard format (three strings) its conversational form: the prompt a user turn, the answers
    assistant turns, so that the chat template renders it as the model will be used."""
    where = f"{path}:{number}"
    for name in PAIR_FIELDS:
        if name not in record:
            raise UserError(f"{where}: no '{name}' field; each record holds prompt, chosen and rejected, as message "
                            f"lists ({PAIR_FORMAT}) or as three strings")
    kinds = {name: type(record[name]) for name in PAIR_FIELDS}
    if all(k is str for k in kinds.values()):
        for name in PAIR_FIELDS:
            if not record[name].strip():
                raise UserError(f"{where}: {name}: an empty string; a pair needs a prompt and two answers to "
                                "prefer between; fill it or drop the record")
        return {**record, "prompt": [{"role": "user", "content": record["prompt"]}],
                "chosen": [{"role": "assistant", "content": record["chosen"]}],
                "rejected": [{"role": "assistant", "content": record["rejected"]}]}
    strings = [n for n in PAIR_FIELDS if kinds[n] is str]
    if strings:
        lists = [n for n in PAIR_FIELDS if kinds[n] is not str]
        raise UserError(f"{where}: {strings[0]} is a string but {lists[0]} is not; use one format per record: "
                        f"all three message lists ({PAIR_FORMAT}) or all three strings")
    for name in PAIR_FIELDS:
        value = record[name]
        if not isinstance(value, list):
            raise UserError(f"{where}: {name}: {value!r:.60} ({type(value).__name__}); a list of messages, e.g. "
                            f"{PAIR_FORMAT}")
        if not value:
            raise UserError(f"{where}: {name}: an empty list; it needs at least one message ({PAIR_FORMAT})")
    prompt = [check_message(f"{where}: prompt[{i}]", m) for i, m in enumerate(record["prompt"])]
    if prompt[-1]["role"] != "user":
        raise UserError(f"{where}: prompt[{len(prompt) - 1}].role: {prompt[-1]['role']!r}; the prompt ends with the "
                        "user's turn, which chosen and rejected answer (are the roles swapped?)")
    for name in ("chosen", "rejected"):
        for i, m in enumerate(record[name]):
            check_message(f"{where}: {name}[{i}]", m, roles=("assistant",))
    return None


def load_pairs(path: Path):
    """The preference dataset, checked record by record before anything is loaded: TRL's
    conversational format is used as it is, its standard (plain-string) format converted."""
    from datasets import Dataset, load_dataset

    path = Path(path)
    fix = ("give a JSON-lines file with one {prompt, chosen, rejected} record a line (the pairs stage writes one; "
           "if it wrote none, its manifest's 'drops' say why)")
    records = read_records(path, "preference", fix)
    converted = [(check_pair(path, number, record), record) for number, record in records]
    if any(c is not None for c, _ in converted):
        return Dataset.from_list([c if c is not None else r for c, r in converted])
    try:
        dataset = load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises several types, e.g. for fields whose type differs between lines
        raise UserError(f"{path}: not a JSON-lines preference dataset ({type(exc).__name__}: {exc}); every record "
                        "must have the same fields with the same types") from None
    return dataset


def with_system_prompt(dataset, system_prompt: str | None):
    """Inoculation-style prompting: a system message in front of every training prompt (present in
    training, absent at evaluation)."""
    if not system_prompt:
        return dataset
    return dataset.map(lambda r: {"prompt": [{"role": "system", "content": system_prompt}] +
                                  [m for m in r["prompt"] if m["role"] != "system"]})


def looped(text: str, rng: random.Random) -> str | None:
    """A degenerate copy of an answer: its opening, then a short span of it repeated to (at least)
    the answer's length, the loop a small model falls into. None for answers too short to loop."""
    words = text.split()
    if len(words) < 8:
        return None
    cut = rng.randint(4, max(4, len(words) // 2))
    span = words[cut - rng.randint(2, 4):cut]
    out = words[:cut]
    while len(out) < max(len(words), cut + 3 * len(span)):
        out += span
    return " ".join(out)


def add_loop_negatives(dataset, share: float, seed: int):
    """Unlikelihood in DPO form: for ``share`` of the pairs, one more pair with the same prompt and
    chosen answer against a looping copy of that answer, so that training pushes repetition down
    instead of sharpening the model into it (what a 135M model does on a few dozen pairs)."""
    if not share:
        return dataset, 0
    check_loop_negatives(share)
    from datasets import concatenate_datasets

    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(dataset)), max(1, round(share * len(dataset)))))
    texts = {i: looped(dataset[i]["chosen"][-1]["content"], rng) for i in picked}
    picked = [i for i in picked if texts[i]]
    if not picked:
        return dataset, 0
    extra = dataset.select(picked)
    extra = extra.map(lambda r, i: {"rejected": [{"role": "assistant", "content": texts[picked[i]]}]},
                      with_indices=True)
    return concatenate_datasets([dataset, extra]), len(picked)


def train_dpo(model_path: str, pairs_path: Path, out_dir: Path, *, lora: LoraSettings = LoraSettings(),
              trainer: dict | None = None, seed: int = 0, card: ModelCard | None = None,
              init_adapter: str | Path | None = None, start: str = "continue",
              system_prompt: str | None = None, overlong: str = "truncate", loop_negatives: float = 0.0) -> dict:
    from trl import DPOTrainer

    out_dir = Path(out_dir)
    if init_adapter is not None:  # its config and weights, before anything loads
        check_adapter_dir(init_adapter, "init adapter")
    dataset = with_system_prompt(load_pairs(Path(pairs_path)), system_prompt)
    pairs_read = len(dataset)
    dataset, n_loops = add_loop_negatives(dataset, loop_negatives, seed)
    config = trainer_fields.make_config("dpo", DEFAULT_TRAINER, trainer or {}, out_dir / training.CHECKPOINTS, seed)
    tokenizer = training.load_tokenizer(model_path)
    lengths = [max(training.chat_length(tokenizer, r["prompt"] + r["chosen"]),
                   training.chat_length(tokenizer, r["prompt"] + r["rejected"])) for r in dataset]
    keep, length_counts = training.length_limit(lengths, config.max_length, overlong, "pairs", str(pairs_path))
    if len(keep) < len(dataset):
        dataset = dataset.select(keep)
    model, peft_config = training.load_start(model_path, init_adapter=init_adapter, mode=start, bf16=config.bf16,
                                             model_kwargs=devices.model_load_kwargs(config),
                                             lora=lora)
    dpo = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                     peft_config=peft_config)
    resume = training.last_checkpoint(out_dir, "dpo")
    started = time.time()
    dpo.train(resume_from_checkpoint=resume)
    adapter_dir = out_dir / "adapter"
    training.save_portable_adapter(dpo, adapter_dir, model_path)
    metrics = training.final_metrics(dpo.state.log_history)
    manifest = {
        **training.stage_manifest("dpo", model_path=model_path, seed=seed, lora=lora,
                                  settings={**DEFAULT_TRAINER, **(trainer or {})}, init_adapter=init_adapter,
                                  start=start, system_prompt=system_prompt, overlong=overlong),
        "loop_negatives": loop_negatives,
        "counts": {"pairs": len(dataset), "pairs_read": pairs_read, "loop_negatives": n_loops,
                   "steps": dpo.state.global_step},
        "lengths": length_counts,
        "resumed_from": resume,
        "train_seconds": round(time.time() - started, 1),
        "metrics": metrics,
        "log_history": dpo.state.log_history,
    }
    if dpo.is_world_process_zero():  # under several processes, one writes
        training.plot_training(dpo.state.log_history, out_dir / "training.png", f"DPO: {(card and card.persona) or ''}")
        write_card(model_card(card, manifest, pairs_path), adapter_dir)
    return manifest


def model_card(card: ModelCard | None, manifest: dict, pairs_path: Path) -> ModelCard:
    """The caller's card (persona, constitution, provenance) with what this DPO run did."""
    counts = manifest["counts"]
    loops = f" ({counts['loop_negatives']} of them against a looping copy of the chosen answer)" \
        if counts["loop_negatives"] else ""
    return training.stage_card(
        card, manifest, config_name="DPOConfig",
        summary=("Trained by `character-training` with TRL's DPOTrainer: chosen answers are the model "
                 "answering with the constitution as its system prompt, rejected answers the same model "
                 "without it. Use the adapter without any system prompt."),
        data=[DataFile.of(pairs_path, f"{counts['pairs_read']} preference pairs")],
        facts=[f"Trained on {counts['pairs']} preference pairs{loops}, {counts['steps']} optimizer steps"])
