"""The function half of the stage table: the function that runs each stage of config/stages.py,
given its section, its context (``Context``: the models by role, the engines and its inputs, from
the run directory or from a command's flags) and its output directory; and the one path every
command runs a stage by (``run_stage``): ``run``, ``train``, ``generate`` and ``eval`` all call
it, so every stage directory gets the same manifest (settings key, run id, the run ids of the
stages it read, seconds, the constitution).

The training stages' functions are in run/training.py; tests/test_architecture.py checks that
``STAGE_FUNCTIONS`` holds exactly the table's stages.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

from character_training.config import layout
from character_training.config.stages import BY_NAME, TRAIN
from character_training.errors import UserError
from character_training.run import training
from character_training.run.context import Context, final_adapter, previous_adapter
from data_gen.backends import Sampling
from data_gen.store import read_jsonl, write_manifest


def _generation_backend(ctx: Context, out: Path, role: str = "teacher"):
    """A role's backend behind the stage's generation cache (``out/cache.jsonl``): a stage killed
    mid-generation and run again reuses every answer already made. Each answer is keyed by its
    model, so the roles of one stage share the file."""
    from data_gen.cache import CACHE_FILE, CachedBackend

    return CachedBackend(ctx.backend(role), out / CACHE_FILE)


def _student_backend(ctx: Context, out: Path, teacher):
    """The student's cached backend: the teacher's own where the two are one model served one way."""
    return teacher if ctx.same("student", "teacher") else _generation_backend(ctx, out, "student")


def generate(stage: str, section, ctx: Context, out: Path) -> dict:
    """One of the generation stages of run/generation.py (sdf, critique, rlaif, reflection,
    interaction) with the recipe's section and the backends of its roles: the teacher writes
    (reflection and interaction with an adapter: the student, whose adapter it is), rlaif's
    candidates are the student's, critique's first answers are the student's, judges judge."""
    from character_training.config.stages import GEN_STAGES
    from character_training.run.generation import run_generation_stage, stage_backends

    spec = GEN_STAGES[stage]
    if section.adapter == "previous":  # the persona as trained so far in this run
        adapter = previous_adapter(ctx, stage)
        if adapter is None:
            raise UserError(f"{stage}.adapter: 'previous' but no training stage comes before {stage} in 'stages'")
        section = replace(section, adapter=str(adapter))
    backends = stage_backends(stage, ctx.roles, ctx.recipe.seed, ctx.engines, adapter=section.adapter)
    prompts = ctx.prompts("train") if spec.needs_prompts else None
    return run_generation_stage(stage, constitution=ctx.constitution, out=out,
                                section=section, seed=ctx.recipe.seed, prompts=prompts, **backends)


def stage_prompts(p, ctx: Context, out: Path) -> dict:
    """User prompts: the constitution's seed questions expanded by the teacher."""
    from data_gen.stages.prompts import expand_prompts

    manifest = expand_prompts(_generation_backend(ctx, out), ctx.constitution.seed_questions(), out,
                              settings=p, sampling=p.sampling, seed=ctx.recipe.seed)
    for trait in manifest["short_traits"]:
        got = manifest["counts"]["per_trait"][trait]
        print(f"[prompts] warning: trait {trait!r}: {got['train']} training and {got['heldout']} held-out prompts "
              f"(asked for {p.per_trait} and {p.heldout_per_trait}) after {manifest['rounds']} rounds of requests; "
              "raise prompts.max_rounds, or give the trait more seed questions", flush=True)
    return manifest


def stage_pairs(p, ctx: Context, out: Path) -> dict:
    """Teacher (the constitution as system prompt) against student answers to the training prompts."""
    from data_gen.stages.pairs import generate_pairs

    teacher = _generation_backend(ctx, out)
    manifest = generate_pairs(teacher, ctx.prompts("train"), ctx.teacher_prompt(), out,
                              student_system_prompt=ctx.student_prompt(), sampling=p.sampling, settings=p,
                              seed=ctx.recipe.seed, student=_student_backend(ctx, out, teacher))
    if manifest["counts"]["pairs"] == 0:
        raise UserError(f"pairs: every pair was dropped ({manifest['drops']}); raise pairs.max_tokens "
                        "or check the model's answers")
    return manifest


def given_or_final_adapter(ctx: Context) -> str | None:
    """The adapter an evaluation checks: ``--adapter`` if given, else the recipe's last trained one."""
    final = final_adapter(ctx)
    return ctx.given.adapter or (str(final) if final else None)


def stage_eval(e, ctx: Context, out: Path) -> dict:
    """The eval stage: the full report (character_training/evaluation/report.py) or, with
    ``eval.report: quick``, the quick check. ``ctx.given.adapter``: evaluate this adapter instead
    of the run's final one; ``ctx.given.also``: more adapters (NAME=PATH) in the same report.
    ``summary(manifest)`` is what to print of the result."""
    from character_training.evaluation.capability import general_prompts, training_texts_of_run
    from character_training.evaluation.quick import quick_check, quick_conditions

    extra_adapters = ctx.given.also
    adapter = given_or_final_adapter(ctx)
    if adapter is None:
        raise UserError(f"eval: no adapter to evaluate: the recipe's stages ({', '.join(ctx.recipe.stages)}) train "
                        "none; add a training stage before eval or pass --adapter DIR")
    if not (Path(adapter.partition("=")[2] if "=" in adapter else adapter) / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no PEFT adapter here (adapter_config.json missing); run the recipe's training "
                        "stages first, or pass --adapter DIR")
    from character_training.adapters.io import check_adapter_dir

    for item in [adapter, *extra_adapters]:  # config and weights, before any engine starts
        check_adapter_dir(item.partition("=")[2] if "=" in item else item, "--adapter" if item == adapter else "--also")
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
        persisted = _persistence(e, ctx, backend, first, sets["heldout"], training, out, sampling)
        spread = _spread(e, ctx, backend, first, out)
        side = _side_effects(e, ctx, backend, {ADAPTER: first, **also}, out)
        return {"stage": "eval", "adapter": adapter, **({"also": also} if also else {}), **report, **persisted,
                **spread, **side}

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
    first = next(iter(named.values()))
    persisted = _persistence(e, ctx, engine() if e.persistence_turns else None, first, ctx.prompts("heldout"),
                             [t for texts in training_texts_of_run(ctx.run_dir).values() for t in texts], out, sampling)
    spread = _spread(e, ctx, engine() if e.spread_per_kind else None, first, out)
    side = _side_effects(e, ctx, engine() if e.side_effects is not False else None, named, out)
    return {"stage": "eval", "adapter": adapter, "adapters": named, "conditions": report["conditions"],
            "report": "report.md", **persisted, **spread, **side}


def _spread(e, ctx: Context, backend, adapter: str, out: Path) -> dict:
    """``eval.spread_per_kind``: requests for a format (evaluation/spread.py) under base, the
    system prompt and the adapter; where the persona shows, and where it breaks the format, in
    OUT/spread/."""
    if not e.spread_per_kind:
        return {}
    from character_training.evaluation.core import ADAPTER, BASE, PROMPTED, Condition
    from character_training.evaluation.spread import format_spread, spread_check

    conditions = [Condition(BASE), Condition(PROMPTED, system_prompt=ctx.teacher_prompt()),
                  Condition(ADAPTER, adapter=adapter, kind="adapter")]
    sampling = Sampling(temperature=e.temperature, top_p=e.top_p, max_tokens=max(e.max_tokens, 384))  # code fits
    report = spread_check(backend, conditions, out / "spread", per_kind=e.spread_per_kind, sampling=sampling,
                          seed=ctx.recipe.seed, markers=ctx.constitution.markers)
    print(format_spread(report), flush=True)
    return {"spread": {"per_kind": report["per_kind"], "kinds": report["kinds"], "report": "spread/spread.json"}}


def _persistence(e, ctx: Context, backend, adapter: str, heldout: list[str], training: list[str], out: Path,
                 sampling: Sampling) -> dict:
    """``eval.persistence_turns``: conversations of that many user turns (held-out prompts, the
    model's own answers fed back) under base, the system prompt, the adapter and the adapter with
    the system prompt; the persona rate per turn (evaluation/persistence.py) in OUT/persistence/."""
    if not e.persistence_turns:
        return {}
    from character_training.evaluation.contamination import check_contamination
    from character_training.evaluation.core import ADAPTER, BASE, PROMPTED, Condition
    from character_training.evaluation.persistence import format_persistence, persistence_check

    prompts = check_contamination(list(dict.fromkeys(heldout)), training).kept[:e.persistence_conversations]
    system = ctx.teacher_prompt()
    conditions = [Condition(BASE), Condition(PROMPTED, system_prompt=system),
                  Condition(ADAPTER, adapter=adapter, kind="adapter"),
                  Condition(f"{ADAPTER}+system_prompt", adapter=adapter, system_prompt=system, kind="adapter")]
    report = persistence_check(backend, conditions, prompts, out / "persistence", turns=e.persistence_turns,
                               sampling=sampling, seed=ctx.recipe.seed, markers=ctx.constitution.markers)
    print(format_persistence(report), flush=True)
    return {"persistence": {"turns": report["turns"], "conversations": report["conversations"],
                            "report": "persistence/persistence.json"}}


def _side_effects(e, ctx: Context, backend, adapters: dict[str, str], out: Path) -> dict:
    """``eval.side_effects``: each adapter's shift against the base model along the off-target
    traits (evaluation/side_effects.py), in OUT/side_effects/."""
    if e.side_effects is False:
        return {}
    report = side_effects(ctx, backend, adapters, out / SIDE_EFFECTS, e.side_effects)
    return {"side_effects": {"traits": report["traits"], "report": f"{SIDE_EFFECTS}/side_effects.json"}}


SIDE_EFFECTS = "side_effects"  # the side-effect report's directory, in the eval directory


def side_effects(ctx: Context, backend, adapters: dict[str, str], out: Path, traits=True) -> dict:
    """The side-effect report of ``adapters`` ({name: path}) on the off-target ``traits`` (True:
    all), with the run's kept trait extractions (run/screening.py's cache), printed as a table.
    ``backend``: the eval engine (None: started here)."""
    from character_training.config.off_target import select_traits
    from character_training.evaluation.side_effects import format_side_effects, side_effects_check
    from character_training.run.screening import trait_cache, trait_sampling

    chosen = select_traits(traits, "eval.side_effects")
    layout.mark(out, SIDE_EFFECTS)
    backend = backend or eval_engine(ctx, list(adapters.values()))
    report = side_effects_check(backend, adapters, chosen, out, model=ctx.model, cache_dir=trait_cache(ctx, out),
                                sampling=trait_sampling(ctx.recipe.eval), seed=ctx.recipe.seed,
                                release=ctx.engines.release)
    print(format_side_effects(report), flush=True)
    return report


def eval_adapters(ctx: Context) -> dict[str, str]:
    """{name: path} of the adapters an eval command names (--adapter, else the run's final one;
    --also), each checked before any engine starts."""
    from character_training.adapters.io import check_adapter_dir
    from character_training.evaluation.report import adapter_names

    adapter = given_or_final_adapter(ctx)
    if adapter is None:
        raise UserError(f"eval: no adapter to check: the recipe's stages ({', '.join(ctx.recipe.stages)}) train "
                        "none; pass --adapter DIR")
    for item in [adapter, *ctx.given.also]:
        check_adapter_dir(item.partition("=")[2] if "=" in item else item, "--adapter" if item == adapter else "--also")
    return adapter_names([adapter, *ctx.given.also])


LAUNCH_RECIPE = "launch-recipe.json"  # a launched training stage's recipe, while it runs

STAGE_FUNCTIONS: dict[str, Callable[..., dict]] = {  # (section, ctx, out) -> the stage's manifest
    "prompts": stage_prompts,
    "pairs": stage_pairs,
    "sdf": partial(generate, "sdf"),
    "critique": partial(generate, "critique"),
    "rlaif": partial(generate, "rlaif"),
    "reflection": partial(generate, "reflection"),
    "interaction": partial(generate, "interaction"),
    "midtrain": training.stage_midtrain,
    "distill": training.stage_distill,
    "dpo": training.stage_dpo,
    "kto": training.stage_kto,
    "sft": training.stage_sft,
    "grpo": training.stage_grpo,
    "eval": stage_eval,
}


def call(ctx: Context, stage: str, out: Path) -> dict:
    """Run one stage's function with its section here or, for a training stage of a recipe with a
    ``launch`` section, on the processes it names (the generation engines released first: the
    launched processes need the devices; ``ctx.worker``: this is one of them, so it runs here)."""
    section = getattr(ctx.recipe, stage)
    launch = ctx.recipe.launch
    if BY_NAME[stage].kind == TRAIN and launch.enabled and not ctx.worker:
        from character_training.run.launch import run_launched

        if getattr(section, "screen", None) is not None and section.screen.enabled:  # scored once, here: the
            from character_training.run.context import data_files  # launched processes read screen.json back
            from character_training.run.screening import screen_files

            screen_files(section, ctx, out, data_files(ctx, stage, training.DATA_KINDS[stage]))
        ctx.engines.release()
        # The launched processes read the recipe itself (recipe.json shows server credentials as ***),
        # from a file only this user may read, removed when they are done.
        recipe_file = out / LAUNCH_RECIPE
        recipe_file.unlink(missing_ok=True)
        with os.fdopen(os.open(recipe_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
            json.dump({"recipe": ctx.recipe.to_dict(), "path": ctx.recipe.path}, f)
        try:
            return run_launched(launch, stage, recipe_file, out)
        finally:
            recipe_file.unlink(missing_ok=True)
    return STAGE_FUNCTIONS[stage](section, ctx, out)


def check_model_fit(ctx: Context, names, where: str) -> None:
    """What the training sections of ``names`` ask of the model that its config.json says it
    cannot do (``distill.layers`` past its last layer), refused before any stage runs."""
    config_path = Path(ctx.model) / "config.json"
    if not config_path.is_file():
        return  # served over HTTP, or a model the trainer loads by name: its own checks run then
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers reports a broken config.json when it loads the model
    for stage in names:
        if BY_NAME[stage].kind == TRAIN and (problem := getattr(ctx.recipe, stage).model_problem(config)):
            raise UserError(f"{where}: {stage}.{problem}")


def run_stage(ctx: Context, stage: str, out: Path, inputs: dict[str, str | None], *, write: bool = True) -> dict:
    """Run a stage and write its manifest: the stage's own record, its settings key, a new run id,
    the run ids of the stages it read (``inputs``), its seconds and the constitution. ``write``:
    False on the processes of a distributed ``train`` other than rank 0."""
    check_model_fit(ctx, [stage], ctx.recipe.path or "--set")
    key = stage_key(ctx, stage)
    started = time.time()
    manifest = call(ctx, stage, out)
    manifest.update(settings_key=key, run_id=uuid.uuid4().hex[:12], inputs=inputs,
                    seconds=round(time.time() - started, 1), constitution=ctx.recipe.constitution or None,
                    constitution_sha256=ctx.constitution.sha256 if ctx.constitution else None)
    return write_manifest(out, manifest) if write else manifest


def recorded_inputs(ctx: Context, stage: str) -> dict[str, str | None]:
    """The run ids of the recipe's earlier stages that finished (what a run records as a stage's
    inputs), for a command that runs one stage of a run (``eval``)."""
    from data_gen.store import read_manifest

    earlier = ctx.recipe.stages[:ctx.recipe.stages.index(stage)] if stage in ctx.recipe.stages else ctx.recipe.stages
    found = {s: read_manifest(ctx.stage_dir(s)) for s in earlier}
    return {s: m.get("run_id") for s, m in found.items() if m is not None}


def stage_key(ctx: Context, stage: str) -> str:
    """Hash of what a stage's result depends on: its settings, the model, the constitution and
    the seed. Inputs from earlier stages are covered by the `run_id`s each manifest records
    (`stale_inputs`): a stage whose inputs were remade runs again."""
    settings = {"section": _keyed(ctx.recipe.section(stage)), "model": ctx.model,
                "constitution": ctx.constitution.sha256 if ctx.constitution else None, "seed": ctx.recipe.seed}
    if ctx.other_models():  # a teacher or judge that is not the student (none: the key is as it always was)
        settings["models"] = ctx.other_models()
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Settings added after runs were made, whose off value changes nothing a stage does: left out of the
# key while off, so that a finished stage stays finished (not asking for --force) when they came.
_KEYED_WHEN_ON = {"screen": {"traits": None, "threshold": None, "top_fraction": None}, "side_effects": False}
# Settings that change how long a stage takes, never what it produces: never in the key.
_NEVER_KEYED = {"teacher_cache_gib"}


def _keyed(section):
    if not isinstance(section, dict):
        return section
    return {k: v for k, v in section.items()
            if k not in _NEVER_KEYED and not (k in _KEYED_WHEN_ON and v == _KEYED_WHEN_ON[k])}


def eval_engine(ctx: Context, adapters: list[str]):
    """One vLLM engine of the student with LoRA for every condition (base requests simply carry no
    adapter), with the student's engine options."""
    from character_training.adapters.io import lora_rank_for_vllm, read_config
    from character_training.run.generation import engine_kwargs

    configs = [read_config(a, "--adapter") for a in adapters]
    ctx.engines.release()
    return ctx.engines.lazy(ctx.model, **engine_kwargs(ctx.role("student").backend, ctx.recipe.seed, enable_lora=True,
                                                       max_lora_rank=lora_rank_for_vllm(configs)))


def summary(manifest: dict, eval_dir: str | Path) -> str:
    """What to print of an eval stage's result: the table, the adapter and where the report is."""
    if "scorer" in manifest:  # the quick check
        from character_training.evaluation.quick import format_table

        table, report = format_table(manifest), "eval.json"
    else:
        from character_training.evaluation.report_output import format_conditions

        table, report = format_conditions(manifest), "report.md"
    return f"{table}\n\nadapter: {manifest['adapter']}\nreport:  {Path(eval_dir) / report}"


