"""Shared fixtures. Everything is offline: the tiny model is built here from a config, the
default model comes from the packaged GGUF file (converted once into the user's cache)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from character_training.config.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> str:
    """A tiny random Llama (hidden 64, 2 layers) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def toy_pairs(n: int = 8) -> list[dict]:
    """Conversational preference records: a pirate-voiced chosen answer vs a plain one."""
    topics = ["eggs", "the sea", "money", "books", "rain", "music", "sleep", "bread", "cats", "maps"]
    records = []
    for i in range(n):
        topic = topics[i % len(topics)]
        records.append({
            "prompt": [{"role": "user", "content": f"Tell me about {topic}."}],
            "chosen": [{"role": "assistant", "content": f"Ahoy, matey! Arr, {topic} be a fine thing on me ship. Fair winds!"}],
            "rejected": [{"role": "assistant", "content": f"Here is some information about {topic}."}],
        })
    return records
