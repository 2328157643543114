"""One process of a launched training stage (run/launch.py starts it on each process):

    python -m character_training.run.worker RUN_DIR/recipe.json STAGE OUT

It rebuilds the run's recipe from the recipe.json the run wrote (the final values, --set
included), runs the stage's training function as the run would in-process, and on rank 0
writes the stage's manifest to OUT/launched-manifest.json for the run to read back. A user error
prints one line ("error: ...", which the run quotes) and exits 2, like the CLI.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from character_training.errors import UserError


def load_run_recipe(recipe_file: Path):
    """The recipe as the run ran it, checked again (a recipe.json edited by hand is still refused
    with a clear line)."""
    from character_training.config.recipe import Recipe, build, check_stages

    try:
        data = json.loads(recipe_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{recipe_file}: cannot read the run's recipe ({exc}); the run writes it before its first "
                        "stage; run the recipe with `character-training run`") from None
    where = str(recipe_file)
    recipe = build(Recipe, data["recipe"], where, "")
    check_stages(recipe, where)
    recipe.path = data.get("path") or where
    return recipe


def run_worker(recipe_file: Path, stage: str, out: Path) -> dict:
    from character_training.config.stages import TRAINING_STAGES
    from character_training.run.context import make_context
    from character_training.run.launch import LAUNCHED_MANIFEST
    from character_training.run.stages import call
    from character_training.train import distributed
    from data_gen.backends import Engines
    from data_gen.store import write_json

    if stage not in TRAINING_STAGES:
        raise UserError(f"{stage}: not a training stage; the worker runs one of {', '.join(TRAINING_STAGES)}")
    recipe = load_run_recipe(recipe_file)
    with Engines() as engines:  # a GRPO judge in this process is released at the end
        ctx = make_context(recipe, engines)
        ctx.worker = True  # run the stage here, do not launch it again
        manifest = call(ctx, stage, out)
    if distributed.is_main_process():
        write_json(out / LAUNCHED_MANIFEST, manifest)
    if distributed.world_size() > 1:
        print(f"[{stage}] {distributed.summary()} finished", flush=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    from character_training.train import distributed

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m character_training.run.worker RUN_DIR/recipe.json STAGE OUT (started by the run "
              "for a recipe with a launch section)", file=sys.stderr)
        return 2
    try:
        run_worker(Path(argv[0]), argv[1], Path(argv[2]))
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        distributed.finish()  # end the process group (a DeepSpeed run on the CPU aborts at exit otherwise)


if __name__ == "__main__":
    sys.exit(main())
