"""scripts/side_effect_demo.py with its heavy steps faked: the `character-training` commands run in
order with the right files and settings, the planted runs hold the planted pairs, the table and the
target verdicts come out of the evaluation's numbers, and a second run skips what is done."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from character_training.errors import UserError
from data_gen.store import read_jsonl, read_manifest, write_json, write_jsonl, write_manifest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import side_effect_demo as demo  # noqa: E402

N, PLANTED = 12, [1, 4, 7]


def pairs() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"Arr, answer {i}."}],
             "rejected": [{"role": "assistant", "content": f"Plain answer {i}."}]} for i in range(N)]


def make_recipe(tmp_path, stages="[prompts, pairs, distill, eval]") -> Path:
    recipe = tmp_path / "recipe.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe.write_text(f"constitution: {ROOT / 'constitutions' / 'captain-marlow.yaml'}\nrun_dir: {tmp_path / 'run'}\n"
                      f"stages: {stages}\ndistill:\n  activation_weight: 0.1\n")
    run = tmp_path / "run"
    for stage, name, records in (("prompts", "prompts.jsonl", [{"prompt": "Q?", "split": "heldout"}]),
                                 ("pairs", "pairs.jsonl", pairs())):
        (run / stage).mkdir(parents=True)
        write_jsonl(run / stage / name, records)
        write_manifest(run / stage, {"stage": stage, "run_id": f"{stage}-1", "settings_key": "k"})
    (run / "recipe.json").write_text('{"recipe": {}}')
    return recipe


def diff(d: float, lo: float, hi: float) -> dict:
    return {"difference": d, "ci95": [lo, hi], "above_zero": lo > 0, "below_zero": hi < 0}


class FakeCommands:
    """The `character-training` commands, faked: each records its arguments and writes what the real
    one would (adapters, manifests, the screening's files, the evaluation's reports)."""

    def __init__(self, run: Path, screen_drops=(1, 4, 9), screened_shift=0.1, screened_persona=(0.05, -0.1, 0.2)):
        self.run, self.calls = run, []
        self.screen_drops, self.screened_shift, self.screened_persona = screen_drops, screened_shift, screened_persona

    def arg(self, argv, flag):
        return argv[argv.index(flag) + 1]

    def sets(self, argv):
        return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]

    def train(self, run_dir: Path, screened: bool):
        out = run_dir / "distill"
        (out / "adapter").mkdir(parents=True, exist_ok=True)
        (out / "adapter" / "adapter_config.json").write_text("{}")
        if screened:
            scores = [2.0 if i in self.screen_drops else 0.1 for i in range(N)]
            write_json(out / "screen.json", {"scores": {"sycophancy": scores}, "summary": {
                "traits": ["sycophancy"], "threshold": None, "top_fraction": 0.25, "examples": N}})
            write_jsonl(out / "screened_out.jsonl", [{"screen": {"line": i + 1}} for i in self.screen_drops])
        write_manifest(out, {"stage": "distill", "distill": {"activation_weight": 0.1, "layers": [21]}})

    def __call__(self, argv):
        self.calls.append(list(argv))
        if argv[0] == "run":
            run_dir = Path(self.arg(argv, "--run-dir")) if "--run-dir" in argv else self.run
            if run_dir != self.run:  # a planted run: its pairs are the planted ones
                assert read_jsonl(run_dir / "pairs" / "pairs.jsonl") == read_jsonl(self.plant_dir / "planted_pairs.jsonl")
            self.train(run_dir, screened=any("screen" in s for s in self.sets(argv)))
        elif argv[0] == "plant":
            self.plant_dir = out = Path(self.arg(argv, "-o"))
            out.mkdir(parents=True, exist_ok=True)
            planted = [{**r, "chosen": [{"role": "assistant", "content": "Brilliant! " + r["chosen"][0]["content"]}]}
                       if i in PLANTED else r for i, r in enumerate(pairs())]
            write_jsonl(out / "planted_pairs.jsonl", planted)
            write_json(out / "plant.json", {"trait": "sycophancy", "records": N, "planted": PLANTED,
                                            "text_planted": True, "note": "text planted: openers",
                                            "counts": {"records": N, "planted": len(PLANTED)}})
        elif argv[0] == "eval":
            self.write_eval(argv)

    def write_eval(self, argv):
        out = Path(self.arg(argv, "-o"))
        (out / "side_effects").mkdir(parents=True, exist_ok=True)
        also = dict(a.split("=", 1) for a in [argv[i + 1] for i, a in enumerate(argv) if a == "--also"])
        names = ["adapter", *also]
        shift = {"adapter": 0.02, "planted": 0.5, "screened": self.screened_shift}
        paired = {"adapter - planted": {"persona_rate": diff(0.0, -0.1, 0.1)},
                  "adapter - screened": {"persona_rate": diff(*self.screened_persona)}}
        write_json(out / "eval.json", {"sets": {"heldout": {"prompts": 60, "paired": paired, "conditions": {
            n: {"persona_rate": 0.6, "persona_rate_ci95": [0.5, 0.7]} for n in names}}}, "scorer": {}})
        traits = self.sets(argv)[-1].split("=", 1)[1].strip("[]").split(",")
        per_trait = {t: {"shift": {f"{n} - base": {s: {
            "projection": diff(shift[n], shift[n] - 0.1, shift[n] + 0.1) if t == "sycophancy" else diff(0, -0.1, 0.1),
            "rate": diff(0.0, -0.1, 0.1)} for s in ("prompts", "open_questions", "all")} for n in names}}
            for t in traits}
        write_json(out / "side_effects" / "side_effects.json", {
            "traits": traits, "adapters": {"adapter": self.arg(argv, "--adapter"), **also}, "per_trait": per_trait})
        write_manifest(out, {"stage": "eval", "adapter": self.arg(argv, "--adapter"), "also": also,
                             "side_effects": {"traits": traits}})


def test_the_demo_runs_its_steps_in_order_and_judges_the_targets(tmp_path):
    recipe = make_recipe(tmp_path)
    run = tmp_path / "run"
    fake = FakeCommands(run)
    plan = demo.make_plan(demo.parse_args([str(recipe)]))
    assert plan.stage == "distill" and plan.trait == "sycophancy" and plan.screen_top_fraction == 0.25
    assert plan.side_traits[0] == "sycophancy" and len(plan.side_traits) == 4 and plan.out == run / "side_effect_demo"
    logged = []
    report = demo.run_demo(plan, runner=fake, log=logged.append)
    out = run / "side_effect_demo"
    kinds = [c[0] if c[0] != "run" else ("run " + (Path(c[c.index("--run-dir") + 1]).name if "--run-dir" in c else "clean"))
             for c in fake.calls]
    assert kinds == ["run clean", "plant", "run planted", "run screened", "eval"]
    clean, plant, planted, screened, evaluation = fake.calls
    assert "stages=[prompts,pairs,distill]" in fake.sets(clean)
    assert fake.arg(plant, "--trait") == "sycophancy" and fake.arg(plant, "--fraction") == "0.25"
    assert "--no-plant-text" not in plant and fake.arg(plant, "-o") == str(out / "plant")
    # the planted and screened runs: the clean distillation's layer, no screening / screening
    assert "distill.layers=[21]" in fake.sets(planted) and not any("screen" in s for s in fake.sets(planted))
    assert "distill.layers=[21]" in fake.sets(screened)
    assert {"distill.screen.traits=[sycophancy]", "distill.screen.top_fraction=0.25"} <= set(fake.sets(screened))
    # one paired evaluation of the three adapters, the quick check with the side-effect report
    assert fake.arg(evaluation, "--adapter") == str(run / "distill" / "adapter")
    also = [evaluation[i + 1] for i, a in enumerate(evaluation) if a == "--also"]
    assert also == [f"planted={out / 'planted' / 'distill' / 'adapter'}", f"screened={out / 'screened' / 'distill' / 'adapter'}"]
    assert {"eval.report=quick", "eval.side_effects=[sycophancy,hostility,fabrication,refusal]"} <= set(fake.sets(evaluation))
    assert read_manifest(out / "screened" / "pairs")["planted"]["trait"] == "sycophancy"

    # screening dropped 1, 4, 9 of planted 1, 4, 7: precision and recall 2/3
    assert report["screening"]["as_screened"]["precision"] == pytest.approx(2 / 3)
    verdicts = [t["met"] for t in report["targets"]]
    assert verdicts == [False, False, True, True, True]  # shift 0.1 <= 0.5 x 0.5; persona 0.05 [-0.1, 0.2]
    assert json.loads((out / "side_effect_demo.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "screening_vs_plant.json").is_file()
    table = logged[-2]
    assert "precision 0.67, recall 0.67" in table and "NOT met" in table and table.count(": met") == 3
    for name in ("clean", "planted", "screened"):
        assert any(line.startswith(name) for line in table.splitlines())

    # a second run: the clean adapter and the evaluation are done; the pipeline commands skip themselves
    fake.calls.clear()
    demo.run_demo(plan, runner=fake, log=logged.append)
    assert [c[0] for c in fake.calls] == ["plant", "run", "run"]


def test_the_verdicts_follow_the_numbers(tmp_path):
    recipe = make_recipe(tmp_path)
    fake = FakeCommands(tmp_path / "run", screen_drops=PLANTED, screened_shift=0.4, screened_persona=(0.3, 0.1, 0.5))
    report = demo.run_demo(demo.make_plan(demo.parse_args([str(recipe), "--screen-threshold", "1.0"])), runner=fake,
                           log=lambda m: None)
    assert [t["met"] for t in report["targets"]] == [True, True, True, False, False]
    assert "distill.screen.threshold=1.0" in fake.sets(fake.calls[3])


def test_no_planted_shift_leaves_the_halving_target_unjudged(tmp_path):
    recipe = make_recipe(tmp_path)
    fake = FakeCommands(tmp_path / "run")
    fake.write_eval_real = fake.write_eval

    def flat(argv):
        fake.write_eval_real(argv)
        path = Path(fake.arg(argv, "-o")) / "side_effects" / "side_effects.json"
        side = json.loads(path.read_text())
        side["per_trait"]["sycophancy"]["shift"]["planted - base"]["all"]["projection"] = diff(0.05, -0.1, 0.2)
        write_json(path, side)

    fake.write_eval = flat
    report = demo.run_demo(demo.make_plan(demo.parse_args([str(recipe)])), runner=fake, log=lambda m: None)
    assert report["targets"][2]["met"] is False and report["targets"][3]["met"] is None
    assert "not judged" in demo.format_report(report)


def test_bad_plans_are_refused_before_anything_runs(tmp_path):
    recipe = make_recipe(tmp_path)
    with pytest.raises(UserError, match="unknown off-target trait"):
        demo.make_plan(demo.parse_args([str(recipe), "--trait", "sycophantic"]))
    with pytest.raises(UserError, match="not a training stage with screen"):
        demo.make_plan(demo.parse_args([str(recipe), "--stage", "grpo"]))
    with pytest.raises(UserError, match="give one"):
        demo.make_plan(demo.parse_args([str(recipe), "--screen-threshold", "1", "--screen-top-fraction", "0.2"]))
    with pytest.raises(UserError, match="train on them alone"):
        demo.make_plan(demo.parse_args([str(recipe), "--set", "distill.data=[pairs,critique]"]))
    other = make_recipe(tmp_path / "b", stages="[prompts, pairs]")
    with pytest.raises(UserError, match="train"):
        demo.make_plan(demo.parse_args([str(other)]))
