"""Data parallel over processes: each process runs its share of the prompts, the results
are put back together in input order on every process.

Launched the field's way, with accelerate (torchrun underneath; on CPU the backend is gloo)::

    accelerate launch --multi_gpu --num_processes 2 -m focuslens.cli score --n-prompts 100 ...
    torchrun --nproc_per_node 2 -m focuslens.cli score ...          # the same
    focuslens score --processes 2 ...                              # the same, launched for you

(On a machine without GPUs ``--multi_gpu`` still starts N processes, which then use gloo;
accelerate's ``--cpu`` flag would start one, its CPU multi-process mode expects MPI.)
Only rank 0 writes files (:func:`is_main`). Parallel so far: :func:`~focuslens.scoring.score_heads`,
:func:`~focuslens.eval.evaluate_next_token` (through :func:`~focuslens.eval.shared_logits`) and
:func:`~focuslens.streamed.cache_to_disk` (each process writes its block of chunks).

Without a launcher this is one process and every function here is the identity. A share
is a contiguous block of prompt indices (:func:`share`); a result is one tensor with a
leading prompt axis, zero outside this process's block, and :func:`combine` sums the
blocks of all processes (an exact reconstruction: every entry comes from one process).
Each prompt's computation does not depend on the others, so with the same threads per
process the result equals one process's (tests/test_parallel.py).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world", "share", "combine", "is_main", "launch_command"]


def world() -> tuple[int, int]:
    """``(rank, number of processes)``; starts the process group when a launcher (accelerate,
    torchrun) set ``WORLD_SIZE`` > 1 and none is running yet."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0)."""
    return world()[0] == 0


def share(n: int) -> range:
    """This process's contiguous block of ``range(n)`` (blocks differ in size by ≤ 1)."""
    rank, size = world()
    return range(rank * n // size, (rank + 1) * n // size)


def combine(block: Tensor) -> Tensor:
    """The full result from every process's block (zero outside it), on every process."""
    if world()[1] == 1:
        return block
    out = block.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def launch_command(processes: int) -> list[str]:
    """The command prefix that starts ``processes`` processes of a script (append the script,
    or ``-m module``, and its arguments): accelerate's launcher, torchrun underneath."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
