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
through :func:`~focuslens.measure.forward.shared_logits`), both sweeps (split-softmax and focus
directions, through :func:`~focuslens.measure.evaluate.evaluate_variants`), patching
(:func:`~focuslens.causal.patching.patch_heads`) and the training cache, in memory
(:func:`~focuslens.directions.train.collect_attention_inputs`) or on disk
(:func:`~focuslens.directions.streamed.cache_to_disk`: each process writes its block of chunks).
Direction training itself runs on every process on the whole gathered cache (it is small
next to the forward passes that fill it).

**When a process joins a group.** Only when asked: under a launcher focuslens recognises,
or after an explicit opt-in. torchrun's elastic agent sets ``TORCHELASTIC_RUN_ID`` in every
process it starts, and ``accelerate launch --multi_gpu`` (what :func:`launch_command` and
``focuslens score --processes N`` run) starts its processes through that agent, so both are
recognised. Elsewhere (a scheduler that exports ``WORLD_SIZE``, ``RANK`` and ``MASTER_ADDR``
for its own launcher, say), set ``FOCUSLENS_DISTRIBUTED=1`` or call :func:`init`. A process
that set up its own process group (``torch.distributed.init_process_group``) is used as it is.
Otherwise ``WORLD_SIZE`` alone is not enough: a notebook kernel that inherited
``WORLD_SIZE=2`` runs :func:`~focuslens.measure.scoring.score_heads` as one process (rank 0
of 1) instead of waiting for a peer that never comes, and says once, in a warning, that it
ignored the variable.

**When peers do not arrive.** An incomplete launcher environment (``WORLD_SIZE`` > 1 without
``RANK``, ``MASTER_ADDR`` or ``MASTER_PORT``) is refused at once; a group whose other
processes never start fails after ``FOCUSLENS_DISTRIBUTED_TIMEOUT`` seconds (default 120,
instead of torch's 30 minutes), each with a ``ModelError`` naming the variables.

Without a launcher this is one process and every function here is the identity. A share
is a contiguous block of prompt indices (:func:`share`), and the blocks of all processes
are put back in rank order: a tensor with a leading prompt axis by :func:`cat`, a list
of Python objects by :func:`gather`. Each is an exact reconstruction: every entry comes from
one process. Each prompt's computation does not depend on the others, so with the same
threads per process the result equals one process's (tests/test_parallel.py).
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world", "init", "distributed", "share", "cat", "gather", "is_main", "launch_command"]

#: set by torch's elastic agent in each process it starts: torchrun, and ``accelerate launch
#: --multi_gpu`` (which runs it; :func:`launch_command`)
LAUNCHER_VARIABLE = "TORCHELASTIC_RUN_ID"
#: the explicit opt-in for any other launcher that exports ``WORLD_SIZE`` (``=1``)
OPT_IN_VARIABLE = "FOCUSLENS_DISTRIBUTED"
#: seconds to wait for every process of the group to arrive (default 120)
TIMEOUT_VARIABLE = "FOCUSLENS_DISTRIBUTED_TIMEOUT"
_asked = False  # init() was called
_warned = False  # the "WORLD_SIZE ignored" warning was given


def world() -> tuple[int, int]:
    """``(rank, number of processes)``. Joins the process group on first use when
    :func:`distributed` says so (a recognised launcher, ``FOCUSLENS_DISTRIBUTED=1`` or
    :func:`init`); with ``WORLD_SIZE`` > 1 but none of these, ``(0, 1)`` and a warning once."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if distributed():
        _join()
        return dist.get_rank(), dist.get_world_size()
    _warn_ignored()
    return 0, 1


def _join() -> None:
    """Join the ``env://`` process group, or fail within :data:`TIMEOUT_VARIABLE` seconds
    (default 120) with a ``ModelError`` naming the variables: incomplete ones at once,
    peers that never arrive when the wait is over (torch's own default is 30 minutes)."""
    from focuslens.errors import ModelError

    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ModelError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for several processes, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set: a launcher (torchrun, accelerate launch) "
                         "sets WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT for each process. Unset WORLD_SIZE "
                         "to run as one process.")
    try:
        seconds = float(os.environ.get(TIMEOUT_VARIABLE, "120"))
    except ValueError:
        raise ModelError(f"{TIMEOUT_VARIABLE}={os.environ[TIMEOUT_VARIABLE]!r} is not a number of seconds.") from None
    if torch.cuda.is_available():  # one GPU per process; nccl collectives run on it
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as err:  # torch's DistStoreError (a timeout) is a RuntimeError
        where = " ".join(f"{v}={os.environ.get(v)}" for v in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"))
        raise ModelError(f"the process group did not form ({where}): {type(err).__name__}: {err}. Are all "
                         f"{os.environ['WORLD_SIZE']} processes started, and is the master reachable? "
                         f"{TIMEOUT_VARIABLE} sets the wait ({seconds:g} s).") from None


def init() -> tuple[int, int]:
    """Join the process group that ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
    describe (torch's ``env://`` rendezvous), for a launcher focuslens does not recognise
    (the same as ``FOCUSLENS_DISTRIBUTED=1``); returns :func:`world`. Without ``WORLD_SIZE`` > 1
    it is one process, as always."""
    global _asked
    _asked = True
    return world()


def distributed() -> bool:
    """Whether this process is one of several that focuslens should join: ``WORLD_SIZE`` > 1
    and a recognised launcher started it (``TORCHELASTIC_RUN_ID``: torchrun, accelerate), or
    ``FOCUSLENS_DISTRIBUTED=1`` is set, or :func:`init` was called."""
    if _world_size() <= 1:
        return False
    return _asked or LAUNCHER_VARIABLE in os.environ or os.environ.get(OPT_IN_VARIABLE) == "1"


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1  # not a number: no launcher of ours set it


def _warn_ignored() -> None:
    """Say once that ``WORLD_SIZE`` > 1 was set but no launcher focuslens recognises started this process."""
    global _warned
    if _world_size() > 1 and not _warned:
        _warned = True
        warnings.warn(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set, but no launcher focuslens recognises started this "
            f"process (no {LAUNCHER_VARIABLE}): running as one process (rank 0 of 1). To run data parallel, "
            f"launch with `accelerate launch` or torchrun, set {OPT_IN_VARIABLE}=1, or call "
            "focuslens.model.parallel.init().", RuntimeWarning, stacklevel=3)


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
