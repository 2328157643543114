"""Models by role through real vLLM (CPU): a pairs stage whose teacher is the packaged model and
whose student is another model (a tiny random Llama, with its own engine options): the two
engines start one after the other in one process, and every answer records its model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory, default_model_dir) -> str:
    """A small random Llama vLLM's CPU attention takes (head_dim 64; the session's tiny model has
    16, which it refuses), with SmolLM2's tokenizer: a student of another model than the teacher."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("small-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_teacher_and_student_of_two_models_answer_in_turn(tmp_path, default_model_dir, small_model_dir):
    from character_training.config.recipe import load_recipe
    from character_training.run.context import make_context
    from data_gen.backends import Engines
    from data_gen.cache import CachedBackend
    from data_gen.stages.pairs import PairSettings, generate_pairs

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "constitution": str(ROOT / "constitutions" / "captain-marlow.yaml"), "run_dir": str(tmp_path / "run"),
        "model": small_model_dir, "backend": {"engine": {"max_num_seqs": 8}},
        # the tiny model's positions stop at 1024: its own engine option, not the teacher's
        "models": {"teacher": default_model_dir, "student": {"backend": {"engine": {"max_model_len": 1024}}}},
    }))
    recipe = load_recipe(path)
    prompts = ["What is courage?", "How do tides work?"]
    with Engines() as engines:
        ctx = make_context(recipe, engines)
        assert not ctx.same("teacher", "student")
        teacher = CachedBackend(ctx.backend("teacher"), tmp_path / "out" / "cache.jsonl")
        student = CachedBackend(ctx.backend("student"), tmp_path / "out" / "cache.jsonl")
        settings = PairSettings(teacher_samples=1, max_tokens=48, min_distinct_3grams=0.0, min_margin=None)
        manifest = generate_pairs(teacher, prompts, ctx.teacher_prompt(), tmp_path / "out", settings=settings,
                                  student_system_prompt=ctx.student_prompt(), student=student)
        held = list(engines._engines)
    assert manifest["models"] == {"teacher": ctx.role("teacher").model, "student": ctx.role("student").model}
    assert manifest["counts"]["teacher_answers"] == 2 and manifest["counts"]["student_answers"] == 2
    assert [model for model, _ in held] == [ctx.role("student").model]  # the teacher's engine was released first
    cached = [json.loads(line) for line in (tmp_path / "out" / "cache.jsonl").read_text().splitlines()]
    assert [c["model"] for c in cached] == [ctx.role("teacher").model] * 2 + [ctx.role("student").model] * 2
