"""What a training stage does differently on a GPU and on the CPU: the TRL config's device
defaults, the attention kernels that take padding-free batches, Liger kernels, and the
arguments the stage's model is loaded with. The GPU defaults come from measurements on one H200
(../shared/FIELD_NOTES.md, "One GPU"); on the CPU the defaults are what they always were."""
from __future__ import annotations

from character_training.errors import UserError


# TRL turns bf16 and gradient checkpointing on by default; neither helps on a CPU.
CPU_DEFAULTS = {"use_cpu": True, "bf16": False, "gradient_checkpointing": False}
# On one H200 (FIELD_NOTES, "One GPU") TRL's default gradient checkpointing made SFT at a 1.2B shape 1.68x slower
# where memory was plentiful: it trades compute for memory, so a recipe turns it on where memory needs it
# (trainer.gradient_checkpointing: true).
GPU_DEFAULTS = {"gradient_checkpointing": False}


def trainer_args(args: dict, *, cuda: bool, kernel: str | None | bool = True) -> dict:
    """The keyword arguments of the TRL config: ``args`` (the stage's defaults with the recipe's
    fields over them) over the device's defaults; a value in ``args`` always wins. On a CPU
    exactly ``CPU_DEFAULTS`` (the CPU demo's numbers depend on it). On a GPU ``GPU_DEFAULTS`` and
    ``model_init_kwargs`` with bf16 weights and, where one is installed, a FlashAttention kernel
    (``kernel``: True finds one, a name or None says which)."""
    check_liger(args)
    if not cuda:
        return {**CPU_DEFAULTS, **args}
    out = {**GPU_DEFAULTS, **args}
    init = args.get("model_init_kwargs")
    if init is None or isinstance(init, dict):  # a JSON string is the user's, whole
        kernel = varlen_attention() if kernel is True else kernel
        wanted = {}
        if out.get("bf16") is not False and not out.get("fp16"):
            wanted["dtype"] = "bfloat16"
        if kernel:
            wanted["attn_implementation"] = kernel
        if wanted or init is not None:
            out["model_init_kwargs"] = {**wanted, **(init or {})}
    return out


def check_liger(args: dict) -> None:
    """``use_liger_kernel`` needs the liger-kernel package; say so before any model loads."""
    if not args.get("use_liger_kernel"):
        return
    from transformers.utils import is_liger_kernel_available

    if not is_liger_kernel_available():
        raise UserError("trainer.use_liger_kernel: true, but the liger-kernel package (0.3 or newer) is not "
                        "installed, so TRL cannot apply Liger's fused kernels; install it (pip install liger-kernel, "
                        "as requirements/gpu.txt does; it needs a GPU with Triton) or remove use_liger_kernel")


def varlen_attention() -> str | None:
    """The newest installed FlashAttention kernel (on a GPU), or None."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    if is_flash_attn_3_available():
        return "flash_attention_3"
    if is_flash_attn_2_available():
        return "flash_attention_2"
    return None


def takes_padding_free(attn_implementation: str | None) -> bool:
    """Whether an attention computes padding-free batches sequence by sequence: FlashAttention kernels
    take the boundaries; sdpa and eager get one block-diagonal mask over the whole concatenated batch
    (right, but attention over every pair of its tokens: memory grows with the square of the batch)."""
    if not attn_implementation:
        return False
    try:
        from transformers.utils.generic import is_flash_attention_requested

        return bool(is_flash_attention_requested(requested_attention_implementation=attn_implementation))
    except ImportError:  # an older transformers: the name says it
        return "flash" in attn_implementation


def use_padding_free(sft, recipe_trainer: dict, *, cuda: bool | None = None) -> bool:
    """SFT on a GPU: switch a trainer TRL built with padded batches to padding-free batches (the
    batch's conversations concatenated, no padding: 1.74x the padded tokens/s measured at a 1.2B
    shape, FIELD_NOTES "One GPU") when the model's attention takes them and the recipe left
    ``padding_free`` and ``packing`` alone. Built padded, TRL has cut the dataset to ``max_length``
    (its padding-free mode refuses to cut), so ``overlong`` holds. Returns whether it switched."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda or "padding_free" in recipe_trainer or "packing" in recipe_trainer:
        return False
    if sft.args.padding_free or sft.args.packing or getattr(sft, "padding_free", False):
        return False
    attention = getattr(sft.model.config, "_attn_implementation", None)
    if not takes_padding_free(attention):
        print(f"[sft] padded batches: the model's attention ({attention}) cannot take padding-free batches "
              "efficiently; install flash-attn (FlashAttention 2) for padding-free batching, or set "
              "trainer.padding_free: false to silence this note", flush=True)
        return False
    switch_to_padding_free(sft)
    return True


def switch_to_padding_free(sft) -> None:
    """The collator concatenates each batch's (tokenized, cut) sequences, boundaries in position ids."""
    sft.data_collator.padding_free = True
    sft.padding_free = True
    sft.args.padding_free = True


def model_load_kwargs(config) -> dict:
    """``from_pretrained`` keyword arguments for the stage's model: the config's ``model_init_kwargs``
    (the recipe's or the GPU defaults), as TRL would use them had it loaded the model itself (the stages
    load it, to start from an adapter), dtype from ``bf16`` where they name none."""
    import torch

    kwargs = dict(config.model_init_kwargs or {})
    dtype = kwargs.get("dtype", torch.bfloat16 if config.bf16 else torch.float32)
    kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    return kwargs
