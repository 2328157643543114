"""The trainer defaults that move GPU throughput (train.common: trainer_args, use_padding_free,
model_load_kwargs, check_liger): the CPU's stay exactly as they were, the GPU's follow the
measurements, a recipe's value always wins."""
from __future__ import annotations

import json

import pytest

from character_training.errors import UserError
from character_training.config import trainer_fields as training
from character_training.config import devices
from character_training.train.dpo import DEFAULT_TRAINER
from character_training.config.training import lm_fields
from character_training.train.sft import DEFAULT_LM, DEFAULT_SFT

RECIPE = {"learning_rate": 1e-4, "per_device_train_batch_size": 2, "max_length": 256}
STAGES = {"dpo": DEFAULT_TRAINER, "sft": DEFAULT_SFT, "lm": DEFAULT_LM}


def config_before(kind, defaults, trainer, output_dir, seed):
    """make_config as it was before the GPU defaults: the CPU demo's numbers come from this config."""
    args = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False,
            **defaults, **trainer, "output_dir": str(output_dir), "seed": seed}
    return training.config_class(kind)(**args)


def no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.skipif(not no_cuda(), reason="the CPU's config is what a machine without a GPU builds")
@pytest.mark.parametrize("kind", ["dpo", "sft", "lm"])
def test_cpu_config_is_exactly_the_one_before(kind, tmp_path):
    trainer = {**RECIPE, **(lm_fields(True, None) if kind == "lm" else {})}
    for fields in ({}, trainer):
        now = training.make_config(kind, STAGES[kind], fields, tmp_path, seed=3)
        before = config_before(kind, STAGES[kind], fields, tmp_path, seed=3)
        assert now.to_dict() == before.to_dict()
        assert now.gradient_checkpointing is False and now.bf16 is False and now.model_init_kwargs is None


def test_cpu_args_leave_the_recipe_alone():
    args = {**DEFAULT_SFT, "model_init_kwargs": {"attn_implementation": "eager"}, "gradient_checkpointing": True}
    assert devices.trainer_args(args, cuda=False) == {**devices.CPU_DEFAULTS, **args}


def test_gpu_defaults_follow_the_measurements():
    args = devices.trainer_args(dict(DEFAULT_SFT), cuda=True, kernel="flash_attention_2")
    assert args["gradient_checkpointing"] is False  # 1.68x slower with it where memory was plentiful
    assert args["model_init_kwargs"] == {"dtype": "bfloat16", "attn_implementation": "flash_attention_2"}
    assert "use_cpu" not in args and "bf16" not in args  # TRL's GPU default (bf16) stands
    without = devices.trainer_args(dict(DEFAULT_SFT), cuda=True, kernel=None)
    assert without["model_init_kwargs"] == {"dtype": "bfloat16"}  # no kernel installed: TRL's sdpa


def test_on_a_gpu_the_recipe_wins():
    recipe = {"gradient_checkpointing": True, "model_init_kwargs": {"attn_implementation": "sdpa"}}
    args = devices.trainer_args(recipe, cuda=True, kernel="flash_attention_3")
    assert args["gradient_checkpointing"] is True
    assert args["model_init_kwargs"] == {"dtype": "bfloat16", "attn_implementation": "sdpa"}
    fp32 = devices.trainer_args({"bf16": False}, cuda=True, kernel="flash_attention_2")
    assert "dtype" not in fp32["model_init_kwargs"]  # bf16 weights only where the recipe trains in bf16
    as_json = json.dumps({"dtype": "float32"})
    assert devices.trainer_args({"model_init_kwargs": as_json}, cuda=True)["model_init_kwargs"] == as_json


def test_padding_free_needs_a_flash_kernel():
    assert devices.takes_padding_free("flash_attention_2")
    assert devices.takes_padding_free("flash_attention_3")
    assert devices.takes_padding_free("kernels-community/flash-attn3")
    for name in ("sdpa", "eager", None):
        assert not devices.takes_padding_free(name)


def test_liger_refused_where_it_is_not_installed(tmp_path):
    from transformers.utils import is_liger_kernel_available

    if is_liger_kernel_available():
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(UserError, match="liger-kernel.*not installed.*pip install liger-kernel"):
        training.make_config("sft", DEFAULT_SFT, {"use_liger_kernel": True}, tmp_path, seed=0)
    with pytest.raises(UserError, match=r"recipe.yaml: dpo.trainer: .*use_liger_kernel"):
        training.check_trainer_fields({"use_liger_kernel": True}, "recipe.yaml", "dpo")
    training.check_trainer_fields({"use_liger_kernel": False}, "recipe.yaml", "dpo")  # off: nothing to install


def test_model_load_kwargs(tmp_path):
    import torch

    config = training.make_config("dpo", DEFAULT_TRAINER, {}, tmp_path, seed=0)
    assert devices.model_load_kwargs(config) == {"dtype": torch.float32}  # what load_start uses on the CPU
    config.model_init_kwargs = {"dtype": "bfloat16", "attn_implementation": "flash_attention_2"}
    assert devices.model_load_kwargs(config) == {"dtype": torch.bfloat16, "attn_implementation": "flash_attention_2"}


@pytest.fixture()
def sft_trainer(tiny_model_dir, tmp_path):
    from character_training.train.sft import build_sft
    from data_gen.store import write_jsonl

    words = "the sea wind ship harbour captain crew rope sail storm map island".split()
    records = [{"messages": [{"role": "user", "content": f"Tell me about {words[i]}."},
                             {"role": "assistant", "content": " ".join(words[: 3 + 2 * i]) + "."}]}
               for i in range(4)]
    write_jsonl(tmp_path / "sft.jsonl", records)
    trainer = {"max_steps": 1, "save_strategy": "no", "per_device_train_batch_size": 4}
    sft, _ = build_sft(tiny_model_dir, [tmp_path / "sft.jsonl"], tmp_path / "out", trainer=trainer)
    return sft


def test_use_padding_free_only_on_a_gpu_with_a_flash_kernel(sft_trainer, capsys):
    assert not devices.use_padding_free(sft_trainer, {}, cuda=False)
    assert not devices.use_padding_free(sft_trainer, {}, cuda=True)  # the tiny model's attention is sdpa
    assert "padded batches" in capsys.readouterr().out and not sft_trainer.data_collator.padding_free
    sft_trainer.model.config._attn_implementation = "flash_attention_2"
    assert not devices.use_padding_free(sft_trainer, {"padding_free": False}, cuda=True)  # the recipe's
    assert not sft_trainer.data_collator.padding_free
    assert devices.use_padding_free(sft_trainer, {}, cuda=True)
    assert sft_trainer.data_collator.padding_free and sft_trainer.args.padding_free


def test_padding_free_switch_trains_the_same_loss(sft_trainer):
    """After the switch the same (already cut) examples make one concatenated row whose loss is the
    padded batch's: the sequences are kept apart and no padding is trained."""
    import torch

    examples = [sft_trainer.train_dataset[i] for i in range(len(sft_trainer.train_dataset))]
    model = sft_trainer.model.eval()
    padded = sft_trainer.data_collator(examples)
    devices.switch_to_padding_free(sft_trainer)
    flat = sft_trainer.data_collator(examples)
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    assert flat["input_ids"].numel() == int(padded["attention_mask"].sum()) < padded["input_ids"].numel()
    with torch.no_grad():
        loss_padded = sft_trainer.compute_loss(model, padded)
        loss_flat = sft_trainer.compute_loss(model, flat)
    assert torch.allclose(loss_padded, loss_flat, atol=1e-5), (loss_padded, loss_flat)
