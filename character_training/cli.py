"""`character-training`: constitutions, runs, evaluation.

    character-training constitution validate PATH...
    character-training constitution new NAME [-o FILE]
    character-training constitution import FILE -o OUT.yaml
    character-training run RECIPE.yaml [--force STAGE] [--set KEY=VALUE] [--model M] [--run-dir D]
    character-training eval RECIPE.yaml [--adapter DIR] [--also NAME=DIR] [--set KEY=VALUE] [--side-effects [TRAIT...]]
    character-training generate STAGE --constitution C -o DIR [--set KEY=VALUE]
    character-training train {dpo,sft,lm,grpo,distill} --data FILE -o DIR [--set trainer.X=V] [--set lora.X=V]
    character-training adapters {compose,orthogonalize,scale,inspect} ...
    character-training algebra --persona A.yaml --persona B.yaml -o OUT [--set eval.KEY=VALUE]
    character-training plant RECIPE.yaml --trait TRAIT [--fraction 0.25] [--no-plant-text] -o DIR

A user error prints one line and exits with status 2; a bug keeps its traceback. Outputs are never
destructive: a command writes only into a new or empty directory or one it made (config/layout.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from character_training.errors import UserError


def _constitution_validate(args) -> int:
    from character_training.config.constitution import load_constitution

    failed = 0
    for path in args.paths:
        try:
            c = load_constitution(path)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
        else:
            n_q = sum(len(t.questions) for t in c.traits)
            print(f"ok: {path}: {c.name}: {len(c.traits)} traits, {n_q} seed questions, "
                  f"{len(c.principles)} principles, {len(c.facts)} facts (sha256 {c.sha256[:12]})")
    return 2 if failed else 0


def _write_new(path: Path, text: str, force: bool, source: str | None = None) -> None:
    if path.is_dir():
        raise UserError(f"{path}: is a directory; -o names the YAML file to write, e.g. -o {path / 'NAME.yaml'}")
    if source and path.resolve() == Path(source).resolve():
        raise UserError(f"-o {path}: is the input file; writing it would replace what is being imported; "
                        "choose another -o path")
    if path.exists() and not force:
        raise UserError(f"{path}: already exists; choose another -o path or pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _constitution_new(args) -> int:
    from character_training.config.constitution import template

    out = Path(args.output or f"{args.name}.yaml")
    _write_new(out, template(args.name), args.force)
    print(f"wrote {out}: fill it in, then run `character-training constitution validate {out}`")
    return 0


def _constitution_import(args) -> int:
    from character_training.config.constitution import dump_constitution, import_open_character_training

    c = import_open_character_training(args.file, name=args.name, description=args.description)
    out = Path(args.output)
    _write_new(out, dump_constitution(c), args.force, source=args.file)
    print(f"wrote {out}: {c.name}: {len(c.traits)} traits; edit its description, then validate it")
    return 0


def _load_recipe(args):
    from character_training.config.recipe import load_recipe

    overrides = list(args.set or [])
    if getattr(args, "model", None):
        overrides.append(f"model={args.model}")
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={args.run_dir}")
    recipe = load_recipe(args.recipe, overrides)
    if getattr(args, "model", None):  # --model is the student, over a recipe's models.student.model too
        recipe.models.student.model = None
    return recipe


def _run_dir_flag(args) -> str | None:
    """Where a run directory given on the command line came from (None: the recipe's run_dir)."""
    if getattr(args, "run_dir", None):  # applied after --set: it wins
        return "--run-dir"
    return "--set run_dir" if any(s.split("=", 1)[0].strip() == "run_dir" for s in args.set or []) else None


def _local_inputs(*paths) -> list[str]:
    """The paths given that exist here (a model may be a hub id): what an output must not be or hold."""
    return [str(p) for p in paths if p and Path(p).exists()]


def _run(args) -> int:
    from character_training.config.stages import EVAL_STAGE
    from character_training.run import pipeline
    from character_training.run.stages import summary

    recipe = _load_recipe(args)
    manifests = pipeline.run(recipe, force=args.force or [], run_dir_flag=_run_dir_flag(args))
    if EVAL_STAGE in manifests:
        print("\n" + summary(manifests[EVAL_STAGE], Path(recipe.run_dir) / EVAL_STAGE))
    return 0


def _eval(args) -> int:
    """The recipe's eval stage through the one path every stage runs by (run/stages.py), on the
    run's final adapter or the ones given."""
    from character_training.config import layout
    from character_training.config.stages import EVAL_STAGE
    from character_training.run import stages
    from character_training.run.context import Given, make_context
    from data_gen.backends import Engines

    recipe = _load_recipe(args)
    if args.side_effects is not None:
        return _side_effects(args, recipe)
    out = _eval_output(args, recipe)
    with Engines() as engines:
        ctx = make_context(recipe, engines, Given(adapter=args.adapter, also=args.also or []))
        if args.fresh:
            layout.clear_stage_dir(out, keep_resume=False)
        layout.make_stage_dir(out, EVAL_STAGE)
        manifest = stages.run_stage(ctx, EVAL_STAGE, out, stages.recorded_inputs(ctx, EVAL_STAGE))
    print("\n" + stages.summary(manifest, out))
    return 0


def _side_effects(args, recipe) -> int:
    """``eval --side-effects``: the side-effect report alone (run/stages.py's ``side_effects``) of
    the adapters named, in -o or RUN_DIR/eval/side_effects."""
    from character_training.config import layout
    from character_training.config.off_target import select_traits
    from character_training.config.stages import EVAL_STAGE
    from character_training.run import stages
    from character_training.run.context import Given, make_context
    from data_gen.backends import Engines

    setting = recipe.eval.side_effects
    traits = args.side_effects or (True if setting is False else setting)
    select_traits(traits, "--side-effects")  # an unknown name, before anything starts
    out = Path(args.output) if args.output else layout.stage_dir(recipe.run_dir, EVAL_STAGE) / stages.SIDE_EFFECTS
    adapters = [a.partition("=")[2] if "=" in a else a for a in [args.adapter, *(args.also or [])] if a]
    layout.check_output(out, stages.SIDE_EFFECTS, "-o" if args.output else "the side-effect directory",
                        inputs=_local_inputs(recipe.constitution, recipe.model, *adapters), force=args.fresh)
    if args.fresh:
        layout.clear_stage_dir(out, keep_resume=False)
    with Engines() as engines:
        ctx = make_context(recipe, engines, Given(adapter=args.adapter, also=args.also or []))
        stages.side_effects(ctx, None, stages.eval_adapters(ctx), out, traits)
    print(f"\nreport: {out / 'side_effects.json'} (answers, plot beside it)")
    return 0


def _eval_output(args, recipe) -> Path:
    """The report directory, checked before anything starts: -o, or the run's eval directory."""
    from character_training.config import layout
    from character_training.config.stages import EVAL_STAGE, TRAINING_STAGES
    from character_training.run import pipeline

    adapters = [a.partition("=")[2] if "=" in a else a for a in [args.adapter, *(args.also or [])] if a]
    trained = [s for s in recipe.stages if s in TRAINING_STAGES]
    if trained:
        adapters.append(str(layout.adapter_dir(recipe.run_dir, trained[-1])))
    inputs = _local_inputs(recipe.constitution, recipe.model, *adapters)
    if args.output:
        layout.check_output(args.output, EVAL_STAGE, "-o", inputs=[recipe.run_dir, *inputs], force=args.fresh)
        return Path(args.output)
    where = _run_dir_flag(args) or pipeline.run_dir_where(recipe)
    layout.check_place(recipe.run_dir, where)
    out = layout.stage_dir(recipe.run_dir, EVAL_STAGE)
    layout.check_output(out, EVAL_STAGE, f"{where} {recipe.run_dir}: the eval directory", inputs=inputs,
                        force=args.fresh)
    return out


def _generate(args) -> int:
    """One data stage on its own: its section from --set, its inputs from the flags, run by the
    one path every stage runs by (run/stages.py)."""
    from dataclasses import replace

    from character_training.config import layout
    from character_training.config.constitution import load_constitution
    from character_training.config.recipe import Recipe, apply_overrides, gen_section, locate_override
    from character_training.config.sections import BackendSection, ModelsSection, RoleSection
    from character_training.config.stages import GEN_STAGES
    from character_training.run import stages
    from character_training.run.context import Given, make_context
    from character_training.run.generation import read_prompt_file
    from data_gen.backends import Engines
    from data_gen.store import read_manifest

    spec = GEN_STAGES[args.stage]
    out = Path(args.output)
    layout.check_output(out, args.stage, "-o", force=args.force,
                        inputs=_local_inputs(args.constitution, args.prompts, args.adapter, args.model))
    if read_manifest(out) is not None and not args.force:
        raise UserError(f"{out}: this {args.stage} output is finished already (manifest.json); "
                        "use --force to generate it again or choose another -o")
    try:
        section = gen_section(args.stage, apply_overrides({}, args.set or [], "--set"), "--set", "")
    except UserError as exc:
        raise locate_override(exc, "--set", args.set or []) from None
    constitution = load_constitution(args.constitution)
    if spec.needs_principles:  # before the engine starts: minutes on a CPU
        from data_gen.stages.critique import require_principles

        require_principles(constitution, args.stage)
    if args.adapter and not spec.takes_adapter:
        raise UserError(f"--adapter: the {args.stage} stage does not generate with an adapter "
                        f"(reflection and interaction do)")
    if args.adapter:
        section = replace(section, adapter=args.adapter)
    prompts = None
    if spec.needs_prompts:
        prompts = read_prompt_file(args.prompts) if args.prompts else [
            q for t in constitution.traits for q in t.questions]
    recipe = Recipe(constitution=str(args.constitution), run_dir=str(out.parent), seed=args.seed,
                    stages=[args.stage], **{args.stage: section},
                    backend=BackendSection(kind=args.backend, base_urls=args.base_url or [],
                                           served_model=args.served_model, max_concurrency=args.max_concurrency),
                    models=ModelsSection(student=RoleSection(args.model), teacher=RoleSection(args.teacher_model),
                                         judge=RoleSection(args.judge_model)))
    layout.clear_stage_dir(out, keep_resume=not args.force)  # an unfinished earlier attempt keeps its caches
    layout.make_stage_dir(out, args.stage)
    with Engines() as engines:
        ctx = make_context(recipe, engines, Given(standalone=True, prompts=prompts, adapter=args.adapter),
                           local_student=False)
        manifest = stages.run_stage(ctx, args.stage, out, {})
    print(f"[{args.stage}] counts: {manifest.get('counts')}\n[{args.stage}] drops: {manifest.get('drops')}")
    print(f"[{args.stage}] wrote {', '.join(str(out / o) for o in layout.DATA[args.stage])}")
    return 0


# `train KIND` flags that set a field of the stage's section (the recipe's midtrain, dpo, sft, grpo).
TRAIN_FLAGS = {"start": "start", "system_prompt": "system_prompt", "loop_negatives": "loop_negatives",
               "overlong": "overlong", "marker": "marker", "chat_ratio": "chat_ratio"}


def _train_stage_of(kind: str):
    """The stage table's training row whose TRL config kind ``train KIND`` names."""
    from character_training.config.stages import TABLE

    return next(s for s in TABLE if s.trainer == kind)


def train_section(args):
    """The training stage's section (the class a recipe's section is), from ``--set`` values and
    the flags given: the same defaults, checks and error messages as in a recipe."""
    from character_training.config.recipe import apply_overrides, build, locate_override
    from character_training.config.trainer_fields import check_trainer_fields

    cls = _train_stage_of(args.kind).section
    values = apply_overrides({}, args.set or [], "--set")
    if "data" in values:
        raise UserError("--set data: train reads the files given with --data; drop this --set")
    for flag, key in TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None and key in {f.name for f in dataclasses.fields(cls)}:
            values[key] = value
    try:
        section = build(cls, values, "--set", "")
        check_trainer_fields(section.trainer, "--set", args.kind, extra=section.fixed_trainer_fields() or None)
    except UserError as exc:
        raise locate_override(exc, "--set", args.set or []) from None
    return section


def _train(args) -> int:
    """One training stage on its own: its section from --set and the flags, its inputs (--data,
    --init-adapter, --constitution) from the command line, run by the one path every stage runs by
    (run/stages.py). Runs as is on one process, or under torchrun / accelerate launch on several
    (each rank runs this; rank 0 writes the manifest, plot and model card)."""
    from character_training.config import layout
    from character_training.config.recipe import Recipe
    from character_training.config.sections import BackendSection, ModelsSection, RoleSection
    from character_training.run import stages
    from character_training.run.context import Given, make_context
    from character_training.train import distributed
    from data_gen.backends import Engines
    from data_gen.store import read_manifest

    stage = _train_stage_of(args.kind).name
    out = Path(args.output)
    layout.check_output(out, args.kind, "-o", force=args.force, stages={args.kind, stage},
                        inputs=_local_inputs(*args.data, *(args.chat_data or []), args.init_adapter,
                                             args.constitution, args.model))
    if read_manifest(out) is not None and not args.force:
        raise UserError(f"{out}: this training output is finished already (manifest.json); use --force to "
                        "train again or choose another -o")
    section = train_section(args)
    for path in args.data:
        if Path(path).is_dir():
            raise UserError(f"--data {path}: is a directory, not a data file; give the JSONL file inside it "
                            "(e.g. RUN_DIR/pairs/pairs.jsonl)")
        if not Path(path).is_file():
            raise UserError(f"--data {path}: file not found")
    if section.one_data_file and len(args.data) != 1:
        raise UserError(f"train {args.kind}: give one --data {section.one_data_file}")
    if section.needs_constitution and not args.constitution:
        raise UserError(f"train {args.kind}: --constitution is required ({section.needs_constitution})")
    recipe = Recipe(constitution=str(args.constitution or ""), run_dir=str(out.parent), model=args.model,
                    seed=args.seed, stages=[stage], **{stage: section},
                    backend=BackendSection(kind=args.backend, base_urls=args.base_url or [],
                                           served_model=args.served_model),
                    models=ModelsSection(judge=RoleSection(args.judge_model)))
    given = Given(standalone=True, data=[Path(p) for p in args.data], chat_data=[Path(p) for p in args.chat_data or []],
                  init_adapter=args.init_adapter, persona=args.persona)
    if distributed.is_main_process():
        if args.force:  # check_output accepted it: a directory this command made
            layout.clear_stage_dir(out, keep_resume=False)
        layout.make_stage_dir(out, args.kind)
    with Engines() as engines:  # a GRPO judge's engine, when it runs in this process
        ctx = make_context(recipe, engines, given)
        manifest = stages.run_stage(ctx, stage, out, {}, write=distributed.is_main_process())
    if distributed.is_main_process():
        print(f"[train {args.kind}] {manifest['counts']} -> {out / layout.ADAPTER}")
    if distributed.world_size() > 1:
        print(f"[train] {distributed.summary()} finished", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from character_training.adapters.cli import add_adapter_commands
    from character_training.run.algebra import add_algebra_command
    from character_training.run.planting import add_plant_command

    parser = argparse.ArgumentParser(prog="character-training", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_constitution_commands(sub)
    _add_train_command(sub)
    _add_generate_command(sub)
    add_adapter_commands(sub)
    add_algebra_command(sub)
    _add_recipe_commands(sub)
    add_plant_command(sub)
    return parser


def _add_constitution_commands(sub) -> None:
    con = sub.add_parser("constitution", help="write, import and validate constitutions")
    con_sub = con.add_subparsers(dest="action", required=True)
    p = con_sub.add_parser("validate", help="validate constitution YAML files")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=_constitution_validate)
    p = con_sub.add_parser("new", help="write a commented constitution template to fill in")
    p.add_argument("name")
    p.add_argument("-o", "--output", help="file to write (default NAME.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_constitution_new)
    p = con_sub.add_parser("import", help="import an Open Character Training JSON list of traits")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--name", help="constitution name (default: from the file name)")
    p.add_argument("--description", help="prose description of the character")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_constitution_import)


def _add_train_command(sub) -> None:
    p = sub.add_parser("train", help="one training stage on its own (torchrun / accelerate launch for several processes)")
    from character_training.config.stages import TABLE, TRAIN

    trained = [s for s in TABLE if s.kind == TRAIN]
    p.add_argument("kind", choices=[s.trainer for s in trained],
                   help="; ".join(f"{s.trainer}: {s.summary}" for s in trained))
    p.add_argument("--data", action="append", required=True, help="JSONL dataset (repeatable for sft)")
    p.add_argument("-o", "--output", required=True, help="output directory (adapter/, checkpoints/, training.png): a "
                                                         "new or empty one, or one this command made")
    p.add_argument("--model", help="model directory or hub id (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="trainer.FIELD=VALUE (TRL's config fields) or lora.FIELD=VALUE (repeatable)")
    p.add_argument("--init-adapter", help="start from this adapter (a previous stage's adapter/)")
    p.add_argument("--start", choices=["continue", "merge"],
                   help="continue: train the same LoRA on; merge: fold it into the base and train a new one")
    p.add_argument("--system-prompt", help="training-time system prompt (inoculation-style), absent at evaluation")
    p.add_argument("--loop-negatives", type=float, metavar="SHARE",
                   help="dpo: for this share of the pairs, also train the chosen answer against a looping copy "
                        "of it (keeps a small model from degenerating into repetition)")
    p.add_argument("--overlong", choices=["truncate", "drop"],
                   help="dpo, sft: examples over trainer.max_length are cut by TRL (truncate) or left out (drop); "
                        "counted in the manifest either way")
    p.add_argument("--marker", help="lm: a marker prefixed to every document and masked from the loss")
    p.add_argument("--chat-data", action="append", help="lm: conversational data to mix in")
    p.add_argument("--chat-ratio", type=float, help="lm: share of chat examples in the mix (default 0)")
    p.add_argument("--constitution", help="grpo: the constitution the judge scores against; distill: the one whose "
                                          "system prompt makes the teacher")
    p.add_argument("--backend", choices=["vllm", "openai"], default="vllm",
                   help="grpo: the judge's backend (vllm in this process, or OpenAI-compatible servers)")
    p.add_argument("--base-url", action="append", help="grpo, openai backend: server URL (repeatable)")
    p.add_argument("--served-model", help="grpo, openai backend: the model name the servers serve")
    p.add_argument("--judge-model", help="grpo: judge with another model (default: the trained model's base)")
    p.add_argument("--persona", help="persona name for the model card")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="train again even if finished (clears the output directory "
                                                        "this command made)")
    p.set_defaults(func=_train)


def _add_generate_command(sub) -> None:
    from character_training.config.stages import GEN_STAGES

    p = sub.add_parser("generate", help="run one data-generation stage on its own (resumable: rerun after a crash)")
    p.add_argument("stage", choices=list(GEN_STAGES))
    p.add_argument("--constitution", required=True, help="constitution YAML")
    p.add_argument("-o", "--output", required=True, help="output directory: a new or empty one, or one this command "
                                                         "made (a resumed stage)")
    p.add_argument("--model", help="model directory or hub id (default: the packaged SmolLM2-135M-Instruct); "
                                   "with --backend openai, the served model name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a stage setting, e.g. --set rounds=2 or --set sampling.max_tokens=300 (repeatable)")
    p.add_argument("--prompts", help="user prompts for critique/rlaif: .jsonl with a 'prompt' field, or one per "
                                     "line (default: the constitution's seed questions)")
    p.add_argument("--adapter", help="PEFT LoRA adapter to generate with (reflection, interaction)")
    p.add_argument("--backend", choices=["vllm", "openai"], default="vllm")
    p.add_argument("--base-url", action="append", help="OpenAI-compatible server URL, e.g. "
                                                       "http://127.0.0.1:8000/v1 (repeatable: requests are spread)")
    p.add_argument("--served-model", help="openai backend: the model name the servers serve")
    p.add_argument("--teacher-model", help="answer with the constitution with another model (the teacher: sdf, "
                                           "critique's revisions, reflection/interaction without --adapter); "
                                           "default: --model")
    p.add_argument("--judge-model", help="judge with another model (rlaif, sdf); default: the teacher")
    p.add_argument("--max-concurrency", type=int, default=8, help="openai backend: requests in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="generate again even if finished (clears the output directory "
                                                        "this command made)")
    p.set_defaults(func=_generate)


def _add_recipe_commands(sub) -> None:
    from character_training.config.stages import EVAL_STAGE

    for name, func, help_text in (("run", _run, "run a recipe's stages in order"),
                                  (EVAL_STAGE, _eval, "evaluate an adapter on a run's held-out prompts (the recipe's "
                                                      "eval.report: full or quick)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", help="recipe YAML (recipes/ has the shipped ones)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set dpo.trainer.learning_rate=5e-5 (repeatable)")
        p.add_argument("--model", help="model directory or hub id (default: the packaged SmolLM2-135M-Instruct)")
        p.add_argument("--run-dir", help="run directory (overrides the recipe's run_dir)")
        if name == "run":
            p.add_argument("--force", action="append", metavar="STAGE",
                           help="redo this stage (and the stages after it) even if finished (repeatable)")
        else:
            p.add_argument("--adapter", help="PEFT adapter directory (default: the run's final adapter)")
            p.add_argument("--also", action="append", metavar="[NAME=]PATH",
                           help="another adapter in the same report (the quick check or the full one), compared with the "
                                "first as paired differences, e.g. another recipe's (repeatable)")
            p.add_argument("--side-effects", nargs="*", metavar="TRAIT",
                           help="only the side-effect report: each adapter's shift against the base model along the "
                                "off-target traits named (default: the recipe's eval.side_effects, else all of the bank's: "
                                "sycophancy, hostility, fabrication, refusal)")
            p.add_argument("--fresh", action="store_true",
                           help="start from nothing (by default a killed evaluation resumes from its caches)")
            p.add_argument("-o", "--output", help="report directory (default: RUN_DIR/eval): a new or empty one, or "
                                                  "one eval made")
        p.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from character_training.train import distributed

    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, the unfinished one reruns next time", file=sys.stderr)
        return 130
    finally:
        # Under torchrun / accelerate launch: end the process group once this rank is done (a DeepSpeed
        # run on the CPU otherwise aborts at interpreter exit). Nothing on one process.
        distributed.finish()


if __name__ == "__main__":
    sys.exit(main())
