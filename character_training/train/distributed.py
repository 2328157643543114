"""Several processes: who is the main process, what kind of run this is, and a clean end.

Training stages run as they are under ``torchrun`` or ``accelerate launch`` (see
``scripts/launch.sh`` and ``scripts/slurm/train.sbatch``): every rank runs the same stage,
the TRL trainer does the distributed work, and rank 0 alone writes the manifest, the plot and
the model card. This module holds the little that is left:

- ``is_main_process`` / ``rank`` / ``world_size``: from ``torch.distributed`` once it is
  initialized, from the launcher's ``RANK`` / ``WORLD_SIZE`` before that (so a stage can ask
  before its trainer exists, e.g. to clear an output directory once).
- ``describe`` / ``summary``: the run's ``DistributedType`` (accelerate's name: NO, MULTI_CPU,
  MULTI_GPU, DEEPSPEED, FSDP, ...) and its number of processes, for the manifest and the log.
- ``finish``: destroys the torch process group at the end of a run. Without it a DeepSpeed
  run on the CPU was seen to train on every rank and then abort at interpreter exit
  ("terminate called without an active exception"), turning a finished run into a failure.
"""
from __future__ import annotations

import os
import sys


def _initialized() -> bool:
    # Never import torch here: a command that did not train (constitution validate) ends fast.
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 on a single process)."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes in the run, over all machines (1 on a single process)."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on global rank 0: the one process that writes a stage's manifest, plot and card."""
    return rank() == 0


def distributed_type() -> str:
    """accelerate's ``DistributedType`` of this run, by name (MULTI_CPU, MULTI_GPU, DEEPSPEED, ...;
    NO on one process; UNINITIALIZED on several before a trainer set the run up)."""
    from accelerate.state import AcceleratorState, PartialState

    for state in (AcceleratorState, PartialState):
        if state._shared_state != {}:  # set once a trainer (or accelerate) initialised it; never create one here
            return str(state().distributed_type.value)
    return "NO" if world_size() == 1 else "UNINITIALIZED"


def describe() -> dict:
    """What kind of run this is, for a manifest: accelerate's DistributedType and the process count."""
    return {"distributed_type": distributed_type(), "world_size": world_size()}


def summary() -> str:
    """This process in a log line: "rank 1 of 2 (DEEPSPEED)"."""
    return f"rank {rank()} of {world_size()} ({distributed_type()})"


def finish() -> None:
    """End the run's process group, if there is one; safe to call on one process and twice.

    Call it once per process after the last collective (after the trainer saved the adapter),
    e.g. in a ``finally`` around a stage: it does not wait for the other ranks, so an error on
    one rank cannot hang the others here.
    """
    if _initialized():
        sys.modules["torch.distributed"].destroy_process_group()
