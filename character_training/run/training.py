"""The recipe's training stages: midtrain, distill, dpo, sft, grpo. Each starts from the previous training
stage's adapter, trains a LoRA with TRL and records where its data came from.

A recipe with a ``launch`` section runs each training stage as an ``accelerate launch`` (or, on the
CPU, ``torchrun``) subprocess on several processes (run/launch.py); every process runs the same
stage function through run/worker.py, and the manifest rank 0 writes comes back to the run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from character_training.errors import UserError
from character_training.run import layout
from character_training.run.context import Context, data_files, previous_adapter
from data_gen.backends import Sampling
from data_gen.store import read_jsonl, read_manifest, write_jsonl


def provenance(ctx: Context, upto: str) -> dict:
    record = {"constitution": ctx.recipe.constitution, "constitution_sha256": ctx.constitution.sha256,
              "model": ctx.model, "seed": ctx.recipe.seed, "stages": {}}
    for stage in ctx.recipe.stages[:ctx.recipe.stages.index(upto)]:
        manifest = read_manifest(ctx.stage_dir(stage))
        if manifest is None:
            continue
        entry = {"outputs": manifest.get("outputs", {}), "counts": manifest.get("counts")}
        if "trainer" in manifest:
            entry.update(trainer=manifest["trainer"], lora=manifest.get("lora"),
                         metrics=manifest.get("metrics"), start=manifest.get("start"))
        record["stages"][stage] = entry
    return record




def _train_stage(ctx: Context, stage: str, out: Path, train) -> dict:
    """Start from the previous training stage's adapter (continued, or merged and then composed
    back into one LoRA on the original base), train, and record the provenance."""
    from character_training.card import ModelCard
    from character_training.train import distributed
    from character_training.train.common import fold_merged

    if stage != "grpo":  # GRPO's judge may be this process's engine
        ctx.engines.release()  # free the generation engine's memory and cores for training
    section = getattr(ctx.recipe, stage)
    init = previous_adapter(ctx, stage)
    card = ModelCard(persona=ctx.constitution.name, constitution=str(ctx.recipe.constitution),
                     constitution_sha256=ctx.constitution.sha256, provenance=provenance(ctx, stage))
    manifest = train(lora=section.lora, trainer=section.trainer, seed=ctx.recipe.seed,
                     card=card, init_adapter=init, start=section.start)
    if init is not None and section.start == "merge" and distributed.is_main_process():
        manifest["composed"] = fold_merged(init, out, card)
    manifest["provenance"] = card.provenance
    if distributed.world_size() > 1:  # a launched stage: the manifest says on how many processes it trained
        manifest["distributed"] = distributed.describe()
    return manifest


def stage_midtrain(ctx: Context, out: Path) -> dict:
    from character_training.train.sft import train_lm

    section = ctx.recipe.midtrain
    documents = data_files(ctx, "midtrain", layout.DOCUMENTS)
    chat = [p for p in (layout.data_file(ctx.run_dir, d, layout.CHATS) for d in layout.CHATS if d in ctx.recipe.stages)
            if p.is_file() and p.stat().st_size > 0]
    if section.chat_ratio > 0 and not chat:
        raise UserError("midtrain.chat_ratio > 0 but no chat data stage (critique, reflection, interaction) "
                        "has run before midtrain; add one to 'stages' before midtrain or set chat_ratio: 0")
    return _train_stage(ctx, "midtrain", out, lambda **kw: train_lm(
        ctx.model, documents[0], out, packing=section.packing, marker=section.marker,
        chat_paths=chat if section.chat_ratio > 0 else [], chat_ratio=section.chat_ratio, **kw))


def stage_dpo(ctx: Context, out: Path) -> dict:
    from character_training.train.dpo import train_dpo

    files = data_files(ctx, "dpo", layout.PAIRS)
    if len(files) == 1:
        pairs = files[0]
    else:  # several pair sources train together
        pairs = out / "train_pairs.jsonl"
        write_jsonl(pairs, (r for f in files for r in read_jsonl(f)))
    return _train_stage(ctx, "dpo", out, lambda **kw: train_dpo(
        ctx.model, pairs, out, system_prompt=ctx.recipe.dpo.system_prompt, overlong=ctx.recipe.dpo.overlong,
        loop_negatives=ctx.recipe.dpo.loop_negatives, **kw))


def stage_sft(ctx: Context, out: Path) -> dict:
    from character_training.train.sft import train_sft

    files = data_files(ctx, "sft", layout.CHATS)
    return _train_stage(ctx, "sft", out, lambda **kw: train_sft(
        ctx.model, files, out, system_prompt=ctx.recipe.sft.system_prompt, overlong=ctx.recipe.sft.overlong, **kw))


def stage_distill(ctx: Context, out: Path) -> dict:
    """Context distillation: the student without the constitution learns the prompted model's
    next-token distribution on the teacher's answers (pairs' chosen answers, or conversations)."""
    from dataclasses import replace

    from character_training.train.distill import train_distill

    section = ctx.recipe.distill
    files = data_files(ctx, "distill", {**layout.PAIRS, **layout.CHATS})
    if section.activation_weight > 0 and section.layers == "best":
        section = replace(section, layers=[persona_best_layer(ctx, out)])
    return _train_stage(ctx, "distill", out, lambda **kw: train_distill(
        ctx.model, files, out, teacher_system_prompt=ctx.teacher_prompt(),
        student_system_prompt=section.student_system_prompt, settings=section, **kw))


def persona_best_layer(ctx: Context, out: Path) -> int:
    """The layer where the base model best separates the teacher's answers (with the constitution)
    from the student's (without): persona vectors from the pairs stage, saved in ``out``."""
    from character_training.evaluation.persona_vectors import compute_persona_vectors, load_model

    path = layout.data_file(ctx.run_dir, "pairs", layout.PAIRS)
    if not path.is_file():
        raise UserError(f"distill.layers: 'best' needs the pairs stage's answers ({path} missing) to find the "
                        "persona vector's best layer; add pairs to 'stages' or give layers as numbers, e.g. [12]")
    pairs = read_jsonl(path)
    model, tokenizer = load_model(ctx.model)
    vectors = compute_persona_vectors(model, tokenizer, [p["prompt"][-1]["content"] for p in pairs],
                                      [p["chosen"][-1]["content"] for p in pairs],
                                      [p["rejected"][-1]["content"] for p in pairs], ctx.teacher_prompt())
    vectors.save(out / "persona_vectors")
    print(f"[distill] activation consistency at the persona vector's best layer: {vectors.best_layer}", flush=True)
    return vectors.best_layer


def stage_grpo(ctx: Context, out: Path) -> dict:
    """Online RLAIF: GRPO whose reward is a judge scoring each completion against the constitution."""
    from character_training.train.grpo import train_grpo

    section = ctx.recipe.grpo
    data_files(ctx, "grpo", {"prompts": layout.PROMPTS})
    judge = ctx.backend("judge")
    return _train_stage(ctx, "grpo", out, lambda **kw: train_grpo(
        ctx.model, ctx.stage_dir("prompts") / layout.PROMPTS, out, judge_backend=judge,
        constitution=ctx.constitution, system_prompt=section.system_prompt,
        judge_sampling=Sampling(temperature=0.0, max_tokens=section.judge_max_tokens),
        judge_retries=section.judge_retries, **kw))


TRAINING_FUNCTIONS: dict[str, Callable[[Context, Path], dict]] = {
    "midtrain": stage_midtrain, "distill": stage_distill, "dpo": stage_dpo, "sft": stage_sft, "grpo": stage_grpo,
}


def run_training(ctx: Context, stage: str, out: Path) -> dict:
    """A training stage in this process, or, with the recipe's ``launch`` section, on the
    processes it names (the generation engines are released first: the launched processes need
    the devices). ``ctx.worker``: this is one of those processes, so the stage runs here."""
    launch = ctx.recipe.launch
    if launch.enabled and not ctx.worker:
        from character_training.run.launch import run_launched

        ctx.engines.release()
        return run_launched(launch, stage, ctx.run_dir / layout.RECIPE, out)
    return TRAINING_FUNCTIONS[stage](ctx, out)
