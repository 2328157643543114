"""Context distillation: a LoRA trained so that the model without the constitution answers as the
model with it does, token distribution by token distribution (Askell et al. 2021; Snell et al.
2022), optionally with its activations pulled toward the prompted model's (consistency training).

Reads the teacher's sampled answers: the pairs stage's ``pairs.jsonl`` (the prompt and the chosen
answer; the rejected one is not used) and conversation files (``{"messages": [...]}``, every
assistant turn distilled). Each conversation is tokenized twice (``distill_loss.build_views``):
the teacher view behind the constitution as system prompt, the student view without it; their
answer tokens align one to one. The teacher is the same model with the LoRA disabled (no second
model in memory); the loss on the answer tokens is forward KL, reverse KL or GKD's generalized
JSD (TRL's), plus ``activation_weight`` times the activation term. Each term is logged. With
``lmbda`` above 0, that share of batches is on-policy (GKD): the student samples its own answer
to the first turn and the teacher grades it.

Writes ``adapter/`` (PEFT, README model card), ``training.png`` and ``checkpoints/`` (a killed
run resumes from the last one). The trainer fields are TRL's ``SFTConfig`` fields (a
``TrainingArguments``; the SFT-only ones, e.g. packing, have no effect here).
"""
from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path

from character_training.adapters.io import check_adapter_dir
from character_training.card import DataFile, ModelCard, write_card
from character_training.errors import UserError
from character_training.config import trainer_fields
from character_training.train import common as training
from character_training.config import devices
from character_training.train import distill_loss
from character_training.config.training import DISTILL_TRAINER, DistillSection, LoraSettings
from character_training.train.sft import _short, check_message, read_conversations, read_records, \
    training_chat_template

DEFAULT_TRAINER = DISTILL_TRAINER  # the section's (config/training.py)
# The batches are the two views, not the model's inputs: the trainer must keep every column.
FIXED_TRAINER = {"remove_unused_columns": False, "label_names": []}
TERMS = ("kl", "activation", "total", "on_policy")


# ------------------------------------------------------------------------------------------- data


def pair_conversation(path: Path, number: int, record: dict) -> list[dict]:
    """A pairs record as one conversation: its prompt, then its chosen answer."""
    where = f"{path}:{number}"
    for name in ("prompt", "chosen"):
        if name not in record:
            raise UserError(f"{where}: no '{name}' field; distillation reads the prompt and the teacher's chosen "
                            "answer of pairs records, or {\"messages\": [...]} conversations")
    prompt, chosen = record["prompt"], record["chosen"]
    if isinstance(prompt, str) and isinstance(chosen, str):
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
    for name, value in (("prompt", prompt), ("chosen", chosen)):
        if not isinstance(value, list) or not value:
            raise UserError(f"{where}: {name}: {_short(value)}; give a non-empty list of messages (or prompt and "
                            "chosen both as strings)")
    messages = [check_message(f"{where}: prompt[{i}]", m) for i, m in enumerate(prompt)]
    messages += [check_message(f"{where}: chosen[{i}]", m, roles=("assistant",)) for i, m in enumerate(chosen)]
    return messages


def read_distill_data(data_paths: list[Path]) -> tuple[list[list[dict]], dict[str, int]]:
    """(conversations, how many each file gave): conversation files as they are, pairs files as
    prompt + chosen; the format is told by the first record of each file."""
    if not data_paths:
        raise UserError("distill: no data files to train on; run the pairs stage (or one that writes "
                        "conversations) first")
    conversations, per_file = [], {}
    for path in map(Path, data_paths):
        records = read_records(path, "distillation", "run the stage that writes it, or leave it out")
        if "messages" in records[0][1]:
            found = read_conversations(path)
        else:
            found = [pair_conversation(path, number, record) for number, record in records]
        per_file[path.name] = len(found)
        conversations += found
    return conversations, per_file


def answer_template(tokenizer, model_path: str, chat_template_path: str | None) -> str:
    """A chat template with {% generation %} marks around each assistant turn (the answer tokens):
    the trainer's ``chat_template_path``, the model's own, TRL's training version of it, or ours."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    own = tokenizer.chat_template
    if chat_template_path:
        training_chat_template(tokenizer, model_path, chat_template_path)  # checks the file
        return Path(chat_template_path).read_text(encoding="utf-8")
    if own and has_generation_markers(own):
        return own
    return training_chat_template(tokenizer, model_path, None) or get_training_chat_template(tokenizer)


def build_rows(tokenizer, template: str, conversations: list[list[dict]], *, teacher_system_prompt: str,
               student_system_prompt: str | None, max_length: int | None, overlong: str,
               source: str) -> tuple[list[dict], dict]:
    """The tokenized, aligned views of each conversation that has answer tokens left to train."""
    views = [distill_loss.build_views(tokenizer, template, c, teacher_system_prompt, student_system_prompt,
                                      where=f"{source}: conversation {i}") for i, c in enumerate(conversations)]
    lengths = [max(len(v["teacher_input_ids"]), len(v["student_input_ids"])) for v in views]
    keep, counts = training.length_limit(lengths, max_length, overlong, "conversations", source)
    rows = [r for r in (distill_loss.truncate_views(views[i], max_length) for i in keep) if r is not None]
    rows = [{**r, "example": number} for number, r in enumerate(rows)]  # the teacher cache's key
    return rows, {**counts, "no_answer_left": len(keep) - len(rows),
                  "answer_tokens": sum(len(r["student_answer"]) for r in rows)}


def check_layers(layers, num_layers: int) -> list[int]:
    """The activation term's layers, as transformers' ``hidden_states`` index them (1..L)."""
    if isinstance(layers, str):
        raise UserError(f"layers: {layers!r}; the recipe resolves 'best' to the persona vectors' best layer before "
                        f"training; give layer numbers here, from 1 to {num_layers}")
    wrong = [layer for layer in layers if not 1 <= layer <= num_layers]
    if wrong:
        raise UserError(f"layers: {wrong}; this model has {num_layers} layers: give numbers from 1 to {num_layers} "
                        "(0 is the embeddings, which the system prompt cannot change on the answer tokens)")
    return list(layers)


# --------------------------------------------------------------------------------------- training


def answer_tokens(batch: dict) -> int:
    """The batch's answer tokens the loss is taken over (the student view's; the teacher's align)."""
    return int(batch["student_answer_mask"][:, 1:].sum())


class TeacherCache:
    """The teacher's targets of each example (``teacher_targets``), kept after their first
    computation: the teacher is the model with its LoRA disabled, which training never changes,
    so a later epoch's targets are the same. Kept in the memory of the device the teacher runs on,
    per process (under several processes each keeps the examples it was given)."""

    def __init__(self):
        self.examples: dict[int, tuple] = {}
        self.computed = self.reused = 0  # batches

    def get(self, examples) -> tuple | None:
        """The batch's targets, its rows' concatenated in order, or None if one row is missing."""
        import torch

        if examples is None or any(int(e) not in self.examples for e in examples):
            return None
        rows = [self.examples[int(e)] for e in examples]
        self.reused += 1
        values = torch.cat([values for values, _, _ in rows])
        top = None if rows[0][1] is None else torch.cat([top for _, top, _ in rows])
        states = [torch.cat([row_states[j] for _, _, row_states in rows]) for j in range(len(rows[0][2]))]
        return values, top, states

    def put(self, examples, targets: tuple, logit_counts: list[int], state_counts: list[int]) -> None:
        self.computed += 1
        if examples is None:
            return
        values, top, states = targets
        values = values.split(logit_counts)
        top = top.split(logit_counts) if top is not None else None
        states = [layer.split(state_counts) for layer in states]
        for row, e in enumerate(examples):
            self.examples[int(e)] = (values[row], top[row] if top is not None else None,
                                     [layer[row] for layer in states])


def teacher_targets(teacher_model, batch: dict, settings: DistillSection, layers: list[int],
                    cache: TeacherCache | None = None) -> tuple:
    """(the teacher's logits on the answer tokens, or its top-k's; their token ids under top-k,
    else None; its activations on them at ``layers``), flattened over the batch's rows in order:
    taken from ``cache`` when every row is there, else from one forward pass of the teacher
    (``teacher_model`` with its LoRA disabled, without dropout), then kept there."""
    import torch

    examples = batch.get("example")
    if cache is not None and (found := cache.get(examples)) is not None:
        return found
    states = settings.activation_weight > 0
    training_mode = teacher_model.training
    teacher_model.eval()  # the teacher without dropout: one fixed target per batch
    try:
        with torch.no_grad(), teacher_model.disable_adapter():
            teacher = teacher_model(input_ids=batch["teacher_input_ids"],
                                    attention_mask=batch["teacher_attention_mask"], output_hidden_states=states)
    finally:
        teacher_model.train(training_mode)
    t_mask = batch["teacher_answer_mask"]
    values, top = distill_loss.top_k_logits(distill_loss.answer_logits(teacher.logits, t_mask), settings.top_k)
    targets = (values, top, [teacher.hidden_states[layer][t_mask] for layer in layers] if states else [])
    if cache is not None:
        cache.put(examples, targets, t_mask[:, 1:].sum(1).tolist(), t_mask.sum(1).tolist())
    return targets


def distill_terms(model, batch: dict, settings: DistillSection, layers: list[int], teacher_model=None,
                  num_items: int | None = None, cache: TeacherCache | None = None) -> dict:
    """The loss terms of one batch: ``kl`` (whichever divergence ``settings.loss`` names),
    ``activation`` (when ``activation_weight`` is above 0) and ``total``, each summed over the
    answer tokens and divided by ``num_items`` (the answer tokens of every micro-batch of the
    optimizer step, on every process, as TRL's trainers normalize) or, without it, by this batch's
    own. The teacher is ``teacher_model`` (the unwrapped PEFT model; ``model`` by default) with its
    LoRA disabled; its targets come from ``cache`` where it has them (``teacher_targets``)."""
    teacher_model = teacher_model if teacher_model is not None else model
    states = settings.activation_weight > 0
    t_values, t_top, t_states = teacher_targets(teacher_model, batch, settings, layers, cache)
    student = model(input_ids=batch["student_input_ids"], attention_mask=batch["student_attention_mask"],
                    output_hidden_states=states)
    s_mask = batch["student_answer_mask"]
    divisor = max(int(num_items) if num_items is not None else answer_tokens(batch), 1)
    kl = distill_loss.divergence(distill_loss.answer_logits(student.logits, s_mask), t_values, t_top,
                                 loss=settings.loss, beta=settings.beta, temperature=settings.temperature,
                                 reduction="sum") / divisor
    terms = {"kl": kl, "total": kl}
    if states:
        # The answer mask's first position is never an answer token (a prompt comes first), so the
        # activation term counts the same tokens as the divergence (which is shifted by one).
        terms["activation"] = distill_loss.activation_loss(
            [student.hidden_states[layer][s_mask] for layer in layers], t_states, settings.activation_loss,
            reduction="sum") / divisor
        terms["total"] = kl + settings.activation_weight * terms["activation"]
    return terms


def teacher_cache_bytes(answer_tokens: int, config, layers: list[int], settings: DistillSection,
                        itemsize: int) -> int:
    """What the teacher cache would hold for ``answer_tokens`` answer tokens: their logits (or the
    top-k's, with their int64 ids) and their activations at ``layers``."""
    per_token = settings.top_k * (itemsize + 8) if settings.top_k else config.vocab_size * itemsize
    if settings.activation_weight > 0:
        per_token += len(layers) * config.hidden_size * itemsize
    return answer_tokens * per_token


def first_answer(batch: dict, view: str, row: int) -> tuple[list[int], int]:
    """(the tokens before the row's first answer, that answer's length in tokens) in one view."""
    mask = batch[f"{view}_answer_mask"][row].tolist()
    start = mask.index(True)
    length = next((i for i, marked in enumerate(mask[start:]) if not marked), len(mask) - start)
    return batch[f"{view}_input_ids"][row][:start].tolist(), length


def sample_answer(model, prefix: list[int], max_new_tokens: int, temperature: float, pad_id: int) -> list[int]:
    """The student's own answer to ``prefix`` (sampled, LoRA on), up to its end-of-turn token."""
    import torch

    training_mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = torch.tensor([prefix], device=model.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=True, temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad_id)
    finally:
        model.train(training_mode)
    answer = out[0, len(prefix):].tolist()
    eos = model.generation_config.eos_token_id
    ends = [i for i, t in enumerate(answer) if t in (eos if isinstance(eos, list) else [eos])]
    return answer[:ends[0] + 1] if ends else answer


def on_policy_batch(model, batch: dict, temperature: float, pad_id: int) -> dict:
    """GKD's on-policy batch: each row's first answer replaced by one the student samples from its
    own view (as long as the teacher's at most), put after both views' prefixes, so the teacher
    grades the student's own tokens. Later turns of a conversation are left out."""
    rows = []
    for row in range(batch["student_input_ids"].shape[0]):
        student_prefix, length = first_answer(batch, "student", row)
        teacher_prefix, _ = first_answer(batch, "teacher", row)
        answer = sample_answer(model, student_prefix, length, temperature, pad_id)
        rows.append({"student_input_ids": student_prefix + answer, "teacher_input_ids": teacher_prefix + answer,
                     "student_answer": list(range(len(student_prefix), len(student_prefix) + len(answer))),
                     "teacher_answer": list(range(len(teacher_prefix), len(teacher_prefix) + len(answer)))})
    return {k: v.to(batch["student_input_ids"].device) for k, v in distill_loss.ViewsCollator(pad_id)(rows).items()}


def distill_trainer_class():
    """``DistillTrainer``: transformers' Trainer (checkpoints, resume, logging, schedules) with
    the distillation loss; defined on first use so that importing this module loads no torch."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        # compute_loss divides by the answer tokens of the whole optimizer step (num_items_in_batch),
        # so the Trainer must not divide by the gradient accumulation steps again.
        loss_is_scaled_for_ga = True

        def __init__(self, *args, distill: DistillSection, layers: list[int], cache: TeacherCache | None = None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.distill, self.layers, self.cache = distill, layers, cache
            self.terms = defaultdict(list)

        def _get_num_items_in_batch(self, batch_samples: list, device):
            """The answer tokens of every micro-batch of this optimizer step, summed over the
            processes (``average_tokens_across_devices``, on by default), as TRL's trainers count
            their completion tokens; the batches carry no ``labels`` for the Trainer to count."""
            import torch

            count = torch.tensor(sum(answer_tokens(b) for b in batch_samples), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
            return count

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            unwrapped = self.accelerator.unwrap_model(model)
            on_policy = self.distill.lmbda > 0 and random.random() < self.distill.lmbda  # GKD's draw per batch
            if on_policy:  # its sampled answers are at most the teacher's length: the count stays an upper bound
                inputs = on_policy_batch(unwrapped, inputs, self.distill.temperature,
                                         self.processing_class.pad_token_id)
            if num_items_in_batch is None:  # a call outside training_step: this batch's own tokens
                num_items_in_batch = answer_tokens(inputs)
            terms = distill_terms(model, inputs, self.distill, self.layers, unwrapped, num_items=num_items_in_batch,
                                  cache=self.cache)  # an on-policy batch has no example numbers: never cached
            if self.distill.lmbda > 0:
                self.terms["on_policy"].append(float(on_policy))  # logged as the share of on-policy batches
            per_token = float(num_items_in_batch) / max(answer_tokens(inputs), 1)
            for name, value in terms.items():  # logged per answer token of this batch, whatever the step's count
                self.terms[name].append(float(value.detach()) * per_token)
            loss = terms["total"]
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # the processes' gradients are averaged, not summed
            return (loss, terms) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # Each term's mean since the last log, beside the Trainer's own "loss" (the total).
            if "loss" in logs and self.terms:
                logs = {**logs, **{name: sum(v) / len(v) for name, v in self.terms.items()}}
                self.terms.clear()
            super().log(logs, start_time)

    return DistillTrainer


def build_distill(model_path: str, data_paths: list[Path], out: Path, *, teacher_system_prompt: str,
                  student_system_prompt: str | None = None, settings: DistillSection, lora: LoraSettings,
                  trainer: dict, seed: int, init_adapter: str | Path | None, start: str):
    """(the DistillTrainer ``train_distill`` runs, with its two-view dataset; counts)."""
    from datasets import Dataset
    from peft import PeftModel, get_peft_model

    if not isinstance(teacher_system_prompt, str) or not teacher_system_prompt.strip():
        raise UserError("distill: the teacher's system prompt is empty; it is the constitution the student learns "
                        "to answer as if it had: give the constitution's system prompt")
    conversations, per_file = read_distill_data(data_paths)
    if init_adapter is not None:  # its config and weights, before any model loads
        check_adapter_dir(init_adapter, "init adapter")
    config = trainer_fields.make_config("distill", DEFAULT_TRAINER, {**trainer, **FIXED_TRAINER}, out / training.CHECKPOINTS,
                                  seed)
    tokenizer = training.load_tokenizer(model_path)
    template = answer_template(tokenizer, model_path, config.chat_template_path)
    rows, counts = build_rows(tokenizer, template, conversations, teacher_system_prompt=teacher_system_prompt,
                              student_system_prompt=student_system_prompt, max_length=config.max_length,
                              overlong=settings.overlong, source=", ".join(str(p) for p in data_paths))
    if not rows:
        raise UserError(f"{', '.join(map(str, data_paths))}: no conversation has an answer token left within "
                        f"max_length={config.max_length}; raise trainer.max_length")
    model, peft_config = training.load_start(model_path, init_adapter=init_adapter, mode=start, bf16=config.bf16,
                                             model_kwargs=devices.model_load_kwargs(config),
                                             lora=lora)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    assert isinstance(model, PeftModel)  # the teacher is this model with its LoRA disabled
    layers = check_layers(settings.layers, model.config.num_hidden_layers) if settings.activation_weight else []
    cache, cache_info = teacher_cache(counts["answer_tokens"], model, layers, settings)
    dataset = Dataset.from_list(rows)
    trainer_class = distill_trainer_class()
    distiller = trainer_class(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              data_collator=distill_loss.ViewsCollator(tokenizer.pad_token_id),
                              distill=settings, layers=layers, cache=cache)
    return distiller, {"conversations": len(conversations), "per_file": per_file, "examples": len(rows),
                       "assistant_turns": sum(m["role"] == "assistant" for c in conversations for m in c), **counts,
                       "teacher_cache": cache_info}


def teacher_cache(answer_tokens: int, model, layers: list[int], settings: DistillSection,
                  log=print) -> tuple[TeacherCache | None, dict]:
    """(a TeacherCache, or None where the teacher's targets of every example would not fit in
    ``settings.teacher_cache_gib``, or where it is 0; what was decided, for the manifest)."""
    gib = teacher_cache_bytes(answer_tokens, model.config, layers, settings, model.dtype.itemsize) / 2 ** 30
    info = {"gib": round(gib, 3), "limit_gib": settings.teacher_cache_gib, "kept": False}
    if settings.teacher_cache_gib == 0 or settings.lmbda >= 1:  # off, or every batch on-policy (never kept)
        return None, info
    if gib > settings.teacher_cache_gib:
        log(f"[distill] the teacher runs on every batch: its targets for {answer_tokens} answer tokens would take "
            f"{gib:.2f} GiB, over distill.teacher_cache_gib={settings.teacher_cache_gib:g}; raise it"
            + ("" if settings.top_k else ", or set distill.top_k (e.g. 64) to keep the teacher's 64 likeliest tokens")
            + " to compute them once and reuse them in later epochs")
        return None, info
    log(f"[distill] the teacher's targets are computed once and reused in later epochs ({gib:.2f} GiB in memory)")
    return TeacherCache(), {**info, "kept": True}


def loss_terms(log_history: list[dict]) -> dict[str, dict[str, float]]:
    """Each loss term's first and last logged value (the manifest's summary of the curves)."""
    found = {}
    for name in TERMS:
        values = [e[name] for e in log_history if name in e]
        if values:
            found[name] = {"first": values[0], "last": values[-1]}
    return found


def train_distill(model_path: str, data_paths: list[Path], out: Path, *, teacher_system_prompt: str,
                  student_system_prompt: str | None = None, settings: DistillSection | None = None,
                  lora: LoraSettings = LoraSettings(), trainer: dict | None = None, seed: int = 0,
                  card: ModelCard | None = None, init_adapter: str | Path | None = None,
                  start: str = "continue") -> dict:
    """Train the distillation LoRA (resuming from the last checkpoint a killed run left), save the
    adapter, the loss plot and the model card, and return the stage's manifest."""
    out, trainer, settings = Path(out), trainer or {}, settings or DistillSection()
    distiller, counts = build_distill(model_path, data_paths, out, teacher_system_prompt=teacher_system_prompt,
                                      student_system_prompt=student_system_prompt, settings=settings, lora=lora,
                                      trainer=trainer, seed=seed, init_adapter=init_adapter, start=start)
    resume = training.last_checkpoint(out, "distill")
    started = time.time()
    distiller.train(resume_from_checkpoint=resume)
    training.save_portable_adapter(distiller, out / "adapter", model_path)
    history = distiller.state.log_history
    manifest = {
        **training.stage_manifest("distill", model_path=model_path, seed=seed, lora=lora,
                                  settings={**DEFAULT_TRAINER, **trainer, **FIXED_TRAINER}, init_adapter=init_adapter,
                                  start=start, teacher_system_prompt=teacher_system_prompt,
                                  student_system_prompt=student_system_prompt, distill=distill_settings(settings)),
        "counts": {**counts, "steps": distiller.state.global_step, "teacher_cache": teacher_cache_counts(distiller, counts)},
        "resumed_from": resume,
        "train_seconds": round(time.time() - started, 1),
        "loss_terms": loss_terms(history),
        "metrics": training.final_metrics(history),
        "log_history": history,
    }
    if distiller.is_world_process_zero():  # under several processes, one writes
        training.plot_training(history, out / "training.png", f"DISTILL: {(card and card.persona) or ''}")
        write_card(model_card(card, manifest, data_paths), out / "adapter")
    return manifest


def teacher_cache_counts(distiller, counts: dict) -> dict:
    """The teacher cache's decision, with how many batches ran the teacher and how many reused it."""
    cache = distiller.cache
    return {**counts["teacher_cache"], **({"batches_computed": cache.computed, "batches_reused": cache.reused}
                                          if cache is not None else {})}


def distill_settings(settings: DistillSection) -> dict:
    return {name: getattr(settings, name) for name in ("loss", "beta", "top_k", "temperature", "lmbda",
                                                       "activation_weight", "layers", "activation_loss", "overlong")}


def model_card(card: ModelCard | None, manifest: dict, data_paths: list[Path]) -> ModelCard:
    """The caller's card (persona, constitution, provenance) with what this distillation did."""
    counts, distill = manifest["counts"], manifest["distill"]
    activation = (f"; activation consistency ({distill['activation_loss']}, weight {distill['activation_weight']}, "
                  f"layers {distill['layers']})" if distill["activation_weight"] else "")
    return training.stage_card(
        card, manifest, config_name="SFTConfig",
        summary=("Trained by `character-training` by context distillation: the model without the constitution "
                 "learns to match its own next-token distribution with the constitution as system prompt (the "
                 "teacher: the same weights, LoRA disabled) on the teacher's answers. Use the adapter without "
                 "any system prompt."),
        data=[DataFile.of(p, f"{counts['per_file'][Path(p).name]} conversations") for p in data_paths],
        facts=[f"Distilled on {counts['examples']} conversations ({counts['answer_tokens']} answer tokens), "
               f"{counts['steps']} optimizer steps; loss {distill['loss']} (temperature {distill['temperature']}"
               f"{', top-' + str(distill['top_k']) if distill['top_k'] else ''}){activation}",
               f"Teacher system prompt: `{manifest['teacher_system_prompt'][:200]}`"])
