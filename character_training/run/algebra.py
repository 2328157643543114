"""`character-training algebra`: persona algebra, shown on behaviour (evaluation/algebra/).

    character-training algebra --persona RECIPE_A --persona RECIPE_B -o OUT [--set eval.KEY=VALUE ...]

Each ``--persona`` is the recipe of a finished run: its constitution (name, system prompt,
markers), its run's pairs (the persona's classifier and vector), held-out prompts and final
adapter (the last training stage's, whichever it is). Both runs must be on the same base model.
``--set eval.KEY=VALUE`` sets the evaluation (sampling, samples_per_prompt, general_prompts,
persona_vectors; the defaults are EvalSettings', not either recipe's, so that neither persona's
recipe decides for both). Everything is checked before anything is written; the output is a new
directory, or one this command made (a rerun resumes it).

``add_algebra_command(subparsers)`` registers the command on the main parser.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from character_training.errors import UserError

# The EvalSettings the algebra report reads; the others (adversarial, judge, ...) are the full report's.
ALGEBRA_SETTINGS = ("temperature", "top_p", "max_tokens", "samples_per_prompt", "general_prompts", "persona_vectors")
VLLM_MAX_LORA_RANK = 512  # the largest max_lora_rank vLLM accepts


def add_algebra_command(subparsers) -> None:
    """Register ``algebra`` on the main parser's subparsers."""
    p = subparsers.add_parser("algebra", help="do composed, negated, scaled and orthogonalized persona adapters act "
                                              "as their algebra says? (two finished runs' personas)")
    p.add_argument("--persona", action="append", required=True, metavar="RECIPE",
                   help="the recipe of a finished run (give two: A, then B)")
    p.add_argument("-o", "--output", required=True,
                   help="report directory: a new or empty one, or one this command made (a rerun resumes it)")
    p.add_argument("--set", action="append", metavar="eval.KEY=VALUE",
                   help=f"evaluation setting ({', '.join(ALGEBRA_SETTINGS)}), e.g. --set eval.samples_per_prompt=2 "
                        "(repeatable)")
    p.set_defaults(func=run_algebra)


def algebra_settings(overrides: list[str]):
    """The evaluation settings from ``--set eval.KEY=VALUE`` over EvalSettings' defaults, with the
    recipe's checks and messages; keys the algebra report does not read are refused."""
    from character_training.config.recipe import apply_overrides, build, locate_override
    from character_training.config.eval_settings import EvalSettings

    allowed = ", ".join(f"eval.{k}" for k in ALGEBRA_SETTINGS)
    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    for item in overrides:
        section, _, key = item.split("=", 1)[0].strip().partition(".")
        if section != "eval" or not key:
            raise UserError(f"--set {item}: the algebra report takes evaluation settings only ({allowed}); each "
                            "persona's run is as its recipe made it")
        if key in fields and key not in ALGEBRA_SETTINGS:
            raise UserError(f"--set {item}: a setting of the full eval report, not read by the algebra report; it "
                            f"reads {allowed}")
    values = apply_overrides({}, list(overrides), "--set").get("eval") or {}
    try:
        return build(EvalSettings, values, "--set", "eval.")
    except UserError as exc:
        raise locate_override(exc, "--set", list(overrides)) from None


def load_persona(key: str, recipe_path: str, engines):
    """(Persona, its run's Context) from a finished run's recipe; every missing piece is a UserError
    saying what, why and how to fix it."""
    from character_training.adapters.io import check_adapter_dir
    from character_training.config.recipe import load_recipe
    from character_training.evaluation.algebra.report import Persona
    from character_training.evaluation.capability import training_texts_of_run
    from character_training.config import layout
    from character_training.run.context import final_adapter, make_context
    from data_gen.store import read_jsonl

    where = f"--persona {recipe_path}"
    fix = f"run `character-training run {recipe_path}` first"
    recipe = load_recipe(recipe_path)
    run_dir = Path(recipe.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{where}: its run directory {run_dir} does not exist (run_dir is relative to where you run "
                        f"the command); {fix}")
    ctx = make_context(recipe, engines)
    adapter = final_adapter(ctx)
    if adapter is None:
        raise UserError(f"{where}: its stages ({', '.join(recipe.stages)}) train no adapter, and the algebra combines "
                        "the personas' adapters; add a training stage (e.g. dpo) to the recipe and run it")
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{where}: no adapter at {adapter} (its last training stage, {adapter.parent.name}, has not "
                        f"finished); {fix}")
    check_adapter_dir(adapter, where)  # complete, finite safetensors weights
    pairs_path = layout.data_file(run_dir, "pairs", layout.PAIRS)
    if not pairs_path.is_file():
        raise UserError(f"{where}: {pairs_path} missing; the algebra takes each persona's persona "
                        f"vector from its run's teacher/student pairs: add 'pairs' to the recipe's stages, then {fix}")
    pairs = read_jsonl(pairs_path)
    if not pairs:
        raise UserError(f"{where}: {pairs_path} is empty (every pair was dropped: see "
                        f"{pairs_path.parent / 'manifest.json'}); "
                        f"its persona vector needs teacher/student pairs: rerun its pairs stage with `character-training "
                        f"run {recipe_path} --force pairs`")
    try:
        heldout = ctx.prompts("heldout")
    except UserError as exc:
        raise UserError(f"{where}: {exc}; {fix}") from None
    persona = Persona(key=key, name=ctx.constitution.name, system_prompt=ctx.teacher_prompt(), adapter=str(adapter),
                      pairs=pairs, heldout=heldout, markers=tuple(ctx.constitution.markers),
                      training_texts=training_texts_of_run(run_dir), recipe=str(recipe_path), run_dir=str(run_dir))
    return persona, ctx


def check_pair(paths: list[str], loaded: list) -> None:
    """Two different personas on one base model."""
    (a, ctx_a), (b, ctx_b) = loaded
    if Path(a.run_dir).resolve() == Path(b.run_dir).resolve():
        raise UserError(f"--persona {paths[0]} and --persona {paths[1]}: both are the run {a.run_dir}; give the "
                        "recipes of two different personas' runs")
    if ctx_a.model != ctx_b.model:
        raise UserError(f"--persona {paths[0]} and --persona {paths[1]}: their models differ ({ctx_a.model} and "
                        f"{ctx_b.model}); the algebra adds the adapters' deltas on one base model: train both "
                        "personas on the same model (the recipes' `model:`)")


def lora_engine(ctx, adapters: list[str]):
    """The eval stage's LoRA engine of the student (run/stages.py ``eval_engine``), once every
    condition's adapter is known to fit vLLM's largest LoRA rank."""
    from character_training.adapters.io import read_config
    from character_training.adapters.io import lora_rank_for_vllm
    from character_training.run.stages import eval_engine

    rank = lora_rank_for_vllm([read_config(a) for a in adapters])
    if rank > VLLM_MAX_LORA_RANK:
        raise UserError(f"an algebra adapter needs LoRA rank {rank}, above the {VLLM_MAX_LORA_RANK} vLLM serves; "
                        "(A+B)-B has the rank of A plus twice B's: train the personas with a smaller lora.r")
    return eval_engine(ctx, adapters)


def run_algebra(args) -> int:
    from character_training.evaluation.algebra.report import algebra_report
    from character_training.evaluation.algebra.output import format_summary
    from character_training.config import layout
    from data_gen.backends import Engines, Sampling
    from data_gen.store import write_manifest

    if len(args.persona) != 2:
        raise UserError(f"--persona given {len(args.persona)} times: the algebra of {len(args.persona)} personas is "
                        "not supported yet; give exactly two --persona recipes (A, then B)")
    settings = algebra_settings(args.set or [])
    out = Path(args.output)
    with Engines() as engines:
        loaded = [load_persona(key, path, engines) for key, path in zip("AB", args.persona)]
        check_pair(args.persona, loaded)
        personas = [p for p, _ in loaded]
        ctx = loaded[0][1]
        inputs = [*args.persona, *(p.run_dir for p in personas), *(c.recipe.constitution for _, c in loaded), ctx.model]
        layout.check_output(out, "algebra", "-o", inputs=[i for i in inputs if i and Path(i).exists()])
        layout.make_stage_dir(out, "algebra")
        report = algebra_report(engine=lambda adapters: lora_engine(ctx, adapters), model_path=ctx.model,
                                personas=personas, out_dir=out, settings=settings, seed=ctx.recipe.seed,
                                sampling=Sampling(temperature=settings.temperature, top_p=settings.top_p,
                                                  max_tokens=settings.max_tokens),
                                release=engines.release)
    write_manifest(out, {"stage": "algebra", "personas": {p.key: {"recipe": p.recipe, "name": p.name,
                                                                   "adapter": p.adapter} for p in personas},
                         "conditions": list(report["conditions"]), "skipped": report["skipped"]})
    print("\n" + format_summary(report) + f"\n\nreport: {out / 'algebra.md'}")
    return 0
