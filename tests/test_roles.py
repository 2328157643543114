"""Models by role (issue 14): the recipe's `models` section, each role's backend and engine
options, and a pairs stage whose chosen answers come from a teacher and rejected ones from a
student of another model, through the real pipeline and Engines with vllm.LLM recorded."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from character_training.config.recipe import load_recipe
from character_training.errors import UserError
from character_training.config.sections import BackendSection, ModelsSection, RoleSection
from character_training.run.generation import resolve_roles

ROOT = Path(__file__).resolve().parent.parent
CONSTITUTION = ROOT / "constitutions" / "captain-marlow.yaml"


def write_recipe(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"constitution": str(CONSTITUTION), "run_dir": str(tmp_path / "run"), **sections}))
    return path


def local(spec, where="--model"):
    return f"/models/{spec or 'default'}"


def test_roles_default_to_the_student_then_the_teacher():
    roles = resolve_roles(None, ModelsSection(), BackendSection(), local)
    assert [r.model for r in roles.values()] == ["/models/default"] * 3
    assert roles["teacher"] == roles["student"] == roles["judge"]  # one model served one way: one engine
    roles = resolve_roles("small", ModelsSection(teacher=RoleSection("big")), BackendSection(), local)
    assert (roles["student"].model, roles["teacher"].model, roles["judge"].model) == ("/models/small", "/models/big",
                                                                                      "/models/big")
    assert roles["teacher"] != roles["student"] and roles["judge"] == roles["teacher"]


def test_a_role_over_http_inherits_to_the_roles_that_default_to_it():
    teacher = RoleSection("glm-air", backend={"kind": "openai", "base_urls": ["http://10.0.0.1:8000/v1"]})
    roles = resolve_roles(None, ModelsSection(teacher=teacher), BackendSection(), local)
    assert roles["teacher"].served == "glm-air"  # served over HTTP: not resolved as a local model
    assert roles["judge"].backend.base_urls == ["http://10.0.0.1:8000/v1"] and roles["judge"].served == "glm-air"
    assert roles["student"].backend.kind == "vllm" and roles["student"].model == "/models/default"


def test_recipe_models_section(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, models={"teacher": "org/teacher", "judge": {"model": "org/judge"}},
                                      backend={"engine": {"max_num_seqs": 16}}))
    assert recipe.models.teacher == RoleSection("org/teacher")  # `teacher: MODEL` is short for {model: MODEL}
    assert recipe.models.judge.model == "org/judge" and recipe.backend.engine == {"max_num_seqs": 16}
    assert recipe.to_dict()["models"]["teacher"] == {"model": "org/teacher", "backend": {}}


@pytest.mark.parametrize("sections, message", [
    ({"models": {"teacher": {"backend": {"kind": "openia"}}}}, "models.teacher.backend.kind: 'openia' is not a backend"),
    ({"models": {"judge": {"backend": {"base_url": ["http://x/v1"]}}}}, "models.judge.backend.base_url: unknown key"),
    ({"models": {"teachr": "org/t"}}, "models.teachr: unknown key (did you mean 'teacher'?)"),
    ({"backend": {"judge_model": "org/j"}}, "models.judge"),
    ({"backend": {"engine": {"tensor_parallel_sise": 2}}}, "tensor_parallel_size"),
    ({"models": {"teacher": {"backend": {"engine": {"seed": 3}}}}}, "seed"),
])
def test_recipe_models_errors_say_where(tmp_path, sections, message):
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(tmp_path, **sections))
    assert message in str(err.value) and str(tmp_path / "recipe.yaml") in str(err.value)


def test_the_student_is_given_once(tmp_path):
    with pytest.raises(UserError, match="give the student once"):
        resolve_roles("a", ModelsSection(student=RoleSection("b")), BackendSection(), local)
    assert resolve_roles("a", ModelsSection(student=RoleSection("a")), BackendSection(), local)["student"].model == "/models/a"


class RecordingLLM:
    """Stands in for vllm.LLM: records each engine's arguments and start/stop, and answers as
    the model it was built with (so the test can tell whose answer each is)."""

    log: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.name = Path(kwargs["model"]).name
        RecordingLLM.log.append(("start", self.name, kwargs))
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self.shutdown))

    def shutdown(self):
        RecordingLLM.log.append(("stop", self.name, None))

    def chat(self, conversations, params, use_tqdm=False, lora_request=None):
        words = {"teacher": "Arr matey, the salt wind and the {q} are my compass on every voyage we sail",
                 "student": "Certainly, here is a clear and helpful overview of {q} for your needs today"}
        outs = []
        for conversation in conversations:
            question = conversation[-1]["content"].rstrip("?").lower()
            text = words[self.name].format(q=question) + "."
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=text, finish_reason="stop",
                                                                  token_ids=list(range(len(text.split()))),
                                                                  logprobs=None)]))
        return outs


def test_pairs_chosen_from_the_teacher_rejected_from_the_student(tmp_path, monkeypatch):
    """Two models: the teacher's engine starts, answers, is released, then the student's; each
    gets its own engine options; pairs, manifest and cache say whose answer is whose."""
    import vllm

    from character_training.run import pipeline

    models = {}
    for name in ("teacher", "student"):
        models[name] = tmp_path / name
        models[name].mkdir()
        (models[name] / "config.json").write_text("{}")
    RecordingLLM.log = []
    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    run_dir = tmp_path / "run"
    questions = ["What is courage", "How do maps work", "Why do tides turn", "What makes a good crew"]
    from character_training.config import layout

    layout.mark(run_dir, layout.RUN)  # a run directory whose prompts stage ran before
    (run_dir / "prompts").mkdir(parents=True)
    (run_dir / "prompts" / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": q + "?", "split": "train", "trait": "t"}) + "\n" for q in questions))
    recipe = load_recipe(write_recipe(
        tmp_path, stages=["pairs"], model=str(models["student"]),
        models={"teacher": {"model": str(models["teacher"]), "backend": {"engine": {"max_num_seqs": 4}}}},
        backend={"engine": {"max_model_len": 1024}}, pairs={"teacher_samples": 1, "min_margin": None}))
    manifest = pipeline.run(recipe, log=lambda line: None)["pairs"]

    events = [(what, name) for what, name, _ in RecordingLLM.log]
    assert events == [("start", "teacher"), ("stop", "teacher"), ("start", "student"), ("stop", "student")]
    started = {name: kwargs for what, name, kwargs in RecordingLLM.log if what == "start"}
    assert started["teacher"]["max_num_seqs"] == 4 and started["teacher"]["max_model_len"] == 1024
    assert "max_num_seqs" not in started["student"] and started["student"]["max_model_len"] == 1024
    assert started["teacher"]["model"] == str(models["teacher"].resolve())

    pairs = [json.loads(line) for line in (run_dir / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == len(questions)
    assert all(p["chosen"][0]["content"].startswith("Arr matey") for p in pairs)
    assert all(p["rejected"][0]["content"].startswith("Certainly") for p in pairs)
    assert manifest["models"] == {"teacher": str(models["teacher"].resolve()), "student": str(models["student"].resolve())}
    cached = [json.loads(line) for line in (run_dir / "pairs" / "cache.jsonl").read_text().splitlines()]
    by_model = {c["model"]: c["text"][:9] for c in cached}
    assert by_model == {str(models["teacher"].resolve()): "Arr matey", str(models["student"].resolve()): "Certainly"}


def test_each_generation_stage_writes_with_its_role():
    from character_training.run.generation import stage_backends
    from data_gen.backends import Engines

    roles = resolve_roles("small", ModelsSection(teacher=RoleSection("big")), BackendSection(), local)
    engines = Engines()

    def models(stage, adapter=None):
        found = stage_backends(stage, roles, 0, engines, adapter=adapter)
        return {k: (v.model if v is not None else None) for k, v in found.items()}

    assert models("critique") == {"backend": "/models/big", "judge": None, "student": "/models/small"}
    assert models("rlaif") == {"backend": "/models/small", "judge": "/models/big", "student": None}
    assert models("sdf") == {"backend": "/models/big", "judge": None, "student": None}  # the judge is the teacher
    assert models("reflection") == {"backend": "/models/big", "judge": None, "student": None}
    with_adapter = stage_backends("reflection", roles, 0, engines, adapter="runs/x/dpo/adapter")["backend"]
    assert with_adapter.model == "/models/small" and with_adapter.enable_lora  # the student's adapter
