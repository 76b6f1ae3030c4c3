"""Data parallel over processes: each process runs its share of the prompts, the results
are put back together in input order on every process.

Launched the field's way, with accelerate (torchrun underneath; on CPU the backend is gloo)::

    accelerate launch --multi_gpu --num_processes 2 -m focuslens.experiments.cli score --n-prompts 100 ...
    torchrun --nproc_per_node 2 -m focuslens.experiments.cli score ...          # the same
    focuslens score --processes 2 ...                              # the same, launched for you

(On a machine without GPUs ``--multi_gpu`` still starts N processes, which then use gloo;
accelerate's ``--cpu`` flag would start one, its CPU multi-process mode expects MPI.)
Only rank 0 writes files and shows progress bars (:func:`is_main`). Parallel: scoring
(:func:`~focuslens.measure.scoring.score_heads`), evaluation (:func:`~focuslens.measure.evaluate.evaluate_next_token`,
through :func:`~focuslens.measure.evaluate.shared_logits`), both sweeps (split-softmax and focus
directions, through :func:`~focuslens.measure.evaluate.evaluate_variants`), patching
(:func:`~focuslens.causal.patching.patch_heads`) and the training cache, in memory
(:func:`~focuslens.directions.train.collect_attention_inputs`) or on disk
(:func:`~focuslens.directions.streamed.cache_to_disk`: each process writes its block of chunks).
Direction training itself runs on every process on the whole gathered cache (it is small
next to the forward passes that fill it).

Without a launcher this is one process and every function here is the identity. A share
is a contiguous block of prompt indices (:func:`share`), and the blocks of all processes
are put back in rank order: a tensor with a leading prompt axis by :func:`cat`, a list
of Python objects by :func:`gather`. Each is an exact reconstruction: every entry comes from
one process. Each prompt's computation does not depend on the others, so with the same
threads per process the result equals one process's (tests/test_parallel.py).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world", "share", "cat", "gather", "is_main", "launch_command"]


def world() -> tuple[int, int]:
    """``(rank, number of processes)``; starts the process group when a launcher (accelerate,
    torchrun) set ``WORLD_SIZE`` > 1 and none is running yet."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():  # one GPU per process; nccl collectives run on it
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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


def _wire(x: Tensor) -> Tensor:
    """``x`` where the backend can send it: on this process's GPU under nccl; bools as bytes."""
    x = x.to(torch.uint8) if x.dtype == torch.bool else x
    return x.cuda() if dist.get_backend() == "nccl" else x


def cat(block: Tensor, n: int) -> Tensor:
    """The whole ``[n, ...]`` result, on every process, from each process's ``block``: its
    share (:func:`share`) of the leading axis. The other axes must agree over processes."""
    rank, size = world()
    if size == 1:
        return block
    sizes = [(r + 1) * n // size - r * n // size for r in range(size)]
    if len(block) != sizes[rank]:
        raise ValueError(f"process {rank} holds {len(block)} rows, not its share of {n}: {sizes[rank]}.")
    padded = _wire(block.new_zeros(max(sizes), *block.shape[1:]))  # all_gather wants equal shapes
    padded[: len(block)] = _wire(block)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:m] for part, m in zip(parts, sizes)]).to(block.device, block.dtype)


def gather(local: list) -> list:
    """The whole list, on every process, from each process's list of results for its share,
    in input order (the objects are pickled: exact)."""
    size = world()[1]
    if size == 1:
        return local
    parts: list = [None] * size
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]


def launch_command(processes: int) -> list[str]:
    """The command prefix that starts ``processes`` processes of a script (append the script,
    or ``-m module``, and its arguments): accelerate's launcher, torchrun underneath."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
