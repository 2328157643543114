"""The training stages' functions (the table's ``train`` rows, config/stages.py): each is given its
section, the context and its output directory, starts from the previous training stage's adapter
(or ``train --init-adapter``), trains a LoRA with TRL and records where its data came from.

A recipe with a ``launch`` section runs each training stage as an ``accelerate launch`` (or, on the
CPU, ``torchrun``) subprocess on several processes (run/launch.py, started by run/stages.py's
``call``); every process runs the same stage function through run/worker.py, and the manifest
rank 0 writes comes back to the run.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from character_training.errors import UserError
from character_training.config import layout
from character_training.config.stages import writers
from character_training.run.context import Context, data_files, previous_adapter, prompts_stage
from character_training.run.screening import recorded, screen_files
from data_gen.backends import Sampling
from data_gen.store import PREFERENCES, read_jsonl, read_manifest, write_jsonl


PAIRS_STAGE = next(iter(writers(PREFERENCES)))  # the teacher-vs-student pairs (the first stage that writes pairs)
# What each stage that can screen its data (``screen:``) trains on: the file each of its data
# stages writes. The stage functions below read these; so does run/stages.py's ``call``, which
# screens once before a launch.
DATA_KINDS = {"dpo": layout.PAIRS, "kto": layout.PAIRS, "sft": layout.CHATS,
              "distill": {**layout.PAIRS, **layout.CHATS}}


def provenance(ctx: Context, upto: str) -> dict:
    record = {"constitution": ctx.recipe.constitution or None,
              "constitution_sha256": ctx.constitution.sha256 if ctx.constitution else None,
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




def _train_stage(ctx: Context, section, out: Path, train, stage: str) -> dict:
    """Start from the previous training stage's adapter (continued, or merged and then composed
    back into one LoRA on the original base), train, and record the provenance."""
    from character_training.card import ModelCard
    from character_training.train import distributed
    from character_training.train.common import fold_merged

    if not section.uses_judge:  # GRPO's judge may be this process's engine
        ctx.engines.release()  # free the generation engine's memory and cores for training
    init = previous_adapter(ctx, stage)
    c = ctx.constitution
    card = ModelCard(persona=ctx.given.persona or (c.name if c else "persona"),
                     constitution=str(ctx.recipe.constitution) if c else None,
                     constitution_sha256=c.sha256 if c else None, provenance=provenance(ctx, stage))
    manifest = train(lora=section.lora, trainer=section.trainer, seed=ctx.recipe.seed,
                     card=card, init_adapter=init, start=section.start)
    if init is not None and section.start == "merge" and distributed.is_main_process():
        manifest["composed"] = fold_merged(init, out, card, model_path=ctx.model)
    manifest["provenance"] = card.provenance
    if distributed.world_size() > 1:  # a launched stage: the manifest says on how many processes it trained
        manifest["distributed"] = distributed.describe()
    return manifest


def stage_midtrain(section, ctx: Context, out: Path) -> dict:
    from character_training.train.sft import train_lm

    documents = data_files(ctx, "midtrain", layout.DOCUMENTS)
    if ctx.given.standalone:
        chat = list(ctx.given.chat_data)
    else:
        chat = [p for p in (layout.data_file(ctx.run_dir, d, layout.CHATS) for d in layout.CHATS
                            if d in ctx.recipe.stages) if p.is_file() and p.stat().st_size > 0]
    if section.chat_ratio > 0 and not chat:
        raise UserError("midtrain.chat_ratio > 0 but no chat data stage (critique, reflection, interaction) "
                        "has run before midtrain; add one to 'stages' before midtrain or set chat_ratio: 0")
    return _train_stage(ctx, section, out, lambda **kw: train_lm(
        ctx.model, documents[0], out, packing=section.packing, marker=section.marker,
        chat_paths=chat if section.chat_ratio > 0 else [], chat_ratio=section.chat_ratio, **kw), "midtrain")


def stage_dpo(section, ctx: Context, out: Path) -> dict:
    from character_training.train.dpo import train_dpo

    files, screen = screen_files(section, ctx, out, data_files(ctx, "dpo", DATA_KINDS["dpo"]))
    if len(files) == 1:
        pairs = files[0]
    else:  # several pair sources train together
        pairs = out / "train_pairs.jsonl"
        write_jsonl(pairs, (r for f in files for r in read_jsonl(f)))
    return recorded(_train_stage(ctx, section, out, lambda **kw: train_dpo(
        ctx.model, pairs, out, system_prompt=section.system_prompt, overlong=section.overlong,
        loop_negatives=section.loop_negatives, **kw), "dpo"), screen)


def stage_kto(section, ctx: Context, out: Path) -> dict:
    """KTO on the pairs' answers, unpaired: chosen desirable, rejected undesirable."""
    from character_training.train.kto import train_kto

    files, screen = screen_files(section, ctx, out, data_files(ctx, "kto", DATA_KINDS["kto"]))
    return recorded(_train_stage(ctx, section, out, lambda **kw: train_kto(
        ctx.model, files, out, system_prompt=section.system_prompt, overlong=section.overlong, **kw), "kto"), screen)


def stage_sft(section, ctx: Context, out: Path) -> dict:
    from character_training.train.sft import train_sft

    files, screen = screen_files(section, ctx, out, data_files(ctx, "sft", DATA_KINDS["sft"]))
    return recorded(_train_stage(ctx, section, out, lambda **kw: train_sft(
        ctx.model, files, out, system_prompt=section.system_prompt, overlong=section.overlong, **kw), "sft"), screen)


def stage_distill(section, ctx: Context, out: Path) -> dict:
    """Context distillation: the student without the constitution learns the prompted model's
    next-token distribution on the teacher's answers (pairs' chosen answers, or conversations)."""
    from character_training.train.distill import train_distill

    files, screen = screen_files(section, ctx, out, data_files(ctx, "distill", DATA_KINDS["distill"]))
    if section.activation_weight > 0 and section.layers == "best":
        if ctx.given.standalone:
            raise UserError("train distill: layers 'best' is found from a run's pairs (in a recipe); on its own give "
                            "the layers, e.g. --set 'layers=[12]' (see `character-training eval`'s persona vectors)")
        section = replace(section, layers=[persona_best_layer(ctx, out)])
    return recorded(_train_stage(ctx, section, out, lambda **kw: train_distill(
        ctx.model, files, out, teacher_system_prompt=ctx.teacher_prompt(),
        student_system_prompt=section.student_system_prompt, settings=section, **kw), "distill"), screen)


def persona_best_layer(ctx: Context, out: Path, wait_seconds: float = 3600.0) -> int:
    """The layer where the base model best separates the teacher's answers (with the constitution)
    from the student's (without): persona vectors from the pairs stage, saved in ``out``. Found once:
    a rerun with the same model, pairs and system prompt reads the saved vectors, and under a launch
    only rank 0 computes them while the other processes wait for its file (they share the run
    directory), rather than every process doing the same work before the first step."""
    import time

    from character_training.evaluation.core import input_key
    from character_training.evaluation.persona_vectors import PersonaVectors, compute_persona_vectors, load_model
    from character_training.train import distributed
    from character_training.util import file_sha256

    path = layout.data_file(ctx.run_dir, PAIRS_STAGE, layout.PAIRS)
    if not path.is_file():
        raise UserError(f"distill.layers: 'best' needs the pairs stage's answers ({path} missing) to find the "
                        "persona vector's best layer; add pairs to 'stages' or give layers as numbers, e.g. [12]")
    saved, marker = out / "persona_vectors", out / "persona_vectors" / "inputs.key"
    key = input_key(ctx.model, file_sha256(path), ctx.teacher_prompt())

    def found() -> int | None:
        if marker.is_file() and marker.read_text(encoding="utf-8").strip() == key:
            return PersonaVectors.load(saved).best_layer
        return None

    if (layer := found()) is not None:
        print(f"[distill] activation consistency at the persona vector's best layer: {layer} (found before, "
              f"{saved})", flush=True)
        return layer
    if not distributed.is_main_process():
        deadline = time.monotonic() + wait_seconds
        while (layer := found()) is None:
            if time.monotonic() > deadline:
                raise UserError(f"distill.layers: 'best': rank {distributed.rank()} waited {wait_seconds:.0f} s for "
                                f"rank 0's persona vectors in {saved}; the processes must share the run directory "
                                "(or give the layers as numbers, e.g. --set 'distill.layers=[21]')")
            time.sleep(1.0)
        return layer
    pairs = read_jsonl(path)
    model, tokenizer = load_model(ctx.model)
    vectors = compute_persona_vectors(model, tokenizer, [p["prompt"][-1]["content"] for p in pairs],
                                      [p["chosen"][-1]["content"] for p in pairs],
                                      [p["rejected"][-1]["content"] for p in pairs], ctx.teacher_prompt())
    marker.unlink(missing_ok=True)
    vectors.save(saved)
    marker.write_text(key + "\n", encoding="utf-8")  # last: the others read the vectors once it is there
    print(f"[distill] activation consistency at the persona vector's best layer: {vectors.best_layer}", flush=True)
    return vectors.best_layer


def stage_grpo(section, ctx: Context, out: Path) -> dict:
    """Online RLAIF: GRPO whose reward is a judge scoring each completion against the constitution."""
    from character_training.train.grpo import train_grpo

    prompts = data_files(ctx, "grpo", {prompts_stage(): layout.PROMPTS})
    judge = ctx.backend("judge")
    return _train_stage(ctx, section, out, lambda **kw: train_grpo(
        ctx.model, prompts[0], out, judge_backend=judge,
        constitution=ctx.constitution, system_prompt=section.system_prompt,
        judge_sampling=Sampling(temperature=0.0, max_tokens=section.judge_max_tokens),
        judge_retries=section.judge_retries, **kw), "grpo")
