"""Every generation stage's output is data TRL's trainers take as it is: one training step on each.

The real-engine test (test_integration_generation.py) runs the stages through vLLM on a 135M
model, whose answers on some draws are all cut off and dropped, so a stage's output can be empty
there; that test asserts only what every draw guarantees. The format property is tested here on
outputs that cannot be empty: each stage's real function runs with a backend giving fixed,
well-formed answers (the fakes of the stages' own unit tests), and TRL trains one step on the file.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from character_training.config.constitution import load_constitution
from data_gen.stages.critique import run_critique
from data_gen.stages.introspection import InteractionSettings, ReflectionSettings, run_reflection, run_self_interaction
from data_gen.stages.rlaif import run_rlaif
from data_gen.stages.sdf import run_sdf
from tests.fakes import FakeBackend
from tests.test_critique_rlaif import PROMPTS, candidates_backend, critique_responder, judge_responses
from tests.test_critique_rlaif import constitution as critique_constitution
from tests.test_critique_rlaif import stop as cr_stop
from tests.test_introspection import CONSTITUTION as INTROSPECTION_CONSTITUTION
from tests.test_introspection import SAMPLING, essayist, talker
from tests.test_sdf import SMALL
from tests.test_sdf import FakeBackend as SdfBackend

ROOT = Path(__file__).resolve().parents[1]


def _sdf(out: Path) -> dict:
    marlow = load_constitution(ROOT / "constitutions" / "captain-marlow.yaml")
    return run_sdf(SdfBackend(), marlow, out, settings=SMALL, seed=3)


def _critique(out: Path) -> dict:
    return run_critique(FakeBackend(critique_responder()), critique_constitution(), PROMPTS, out, seed=3)


def _rlaif(out: Path) -> dict:  # a consistent judge: the pirate-voiced candidate wins in both orders
    judge = FakeBackend(lambda c: cr_stop("A" if "Ahoy" in judge_responses(c)[0] else "B"), "fake/judge")
    return run_rlaif(candidates_backend(), critique_constitution(), PROMPTS, out, judge=judge, seed=1)


def _reflection(out: Path) -> dict:
    return run_reflection(FakeBackend(essayist()), INTROSPECTION_CONSTITUTION, out, sampling=SAMPLING,
                          settings=ReflectionSettings(samples_per_prompt=1))


def _interaction(out: Path) -> dict:
    return run_self_interaction(FakeBackend(talker()), INTROSPECTION_CONSTITUTION, out, sampling=SAMPLING,
                                settings=InteractionSettings(conversations=2, turns=4))


# (stage, produce, output file, manifest count of its records, TRL trainer)
OUTPUTS = [
    ("sdf", _sdf, "documents.jsonl", "documents_kept", "lm"),
    ("critique", _critique, "sft.jsonl", "sft", "sft"),
    ("critique", _critique, "pairs.jsonl", "pairs", "dpo"),
    ("rlaif", _rlaif, "pairs.jsonl", "pairs", "dpo"),
    ("reflection", _reflection, "reflection.jsonl", "records", "sft"),
    ("interaction", _interaction, "interaction.jsonl", "records", "sft"),
]
COLUMNS = {"lm": ["text"], "sft": ["messages"], "dpo": ["prompt", "chosen", "rejected"]}


def _trl_step(tiny_model_dir, tmp_path, kind, dataset):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    common = dict(output_dir=str(tmp_path / kind), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                  report_to="none", save_strategy="no", max_length=128, disable_tqdm=True)
    if kind == "dpo":
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    else:
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    assert trainer.train().global_step == 1


@pytest.mark.parametrize("stage, produce, filename, count, kind", OUTPUTS,
                         ids=[f"{o[0]}-{o[2]}" for o in OUTPUTS])
def test_stage_output_trains_one_trl_step(stage, produce, filename, count, kind, tiny_model_dir, tmp_path):
    import datasets

    out = tmp_path / stage
    manifest = produce(out)
    lines = [line for line in (out / filename).read_text().splitlines() if line.strip()]
    assert lines, f"{stage} wrote no records to {filename} with well-formed answers"
    assert manifest["counts"][count] == len(lines)

    dataset = datasets.load_dataset("json", data_files=str(out / filename), split="train")
    assert len(dataset) == len(lines)
    _trl_step(tiny_model_dir, tmp_path, kind if kind == "dpo" else "sft", dataset.select_columns(COLUMNS[kind]))
