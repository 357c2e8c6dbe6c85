"""Multi-process data-parallel training (``torchrun``) with DistributedDataParallel.

``torchrun --nproc-per-node N -m selfforcing train configs/...`` starts N processes. Each trains on its
own micro-batches; DDP averages the gradients, so every process takes the same optimizer step and the
weights stay identical. Rank 0 alone writes checkpoints, metrics and samples.

A training step's loss is a call of several networks (a Self Forcing rollout runs the generator once
per chunk and denoising step), not one ``forward``. DDP needs one forward per backward, so the loss
itself becomes the module it wraps: ``LossModule`` holds the trainable networks and its ``forward``
computes the micro-batch loss. The gradient hooks sit on the parameters, wherever inside that
forward they are used.

Micro-batch ``k`` of rank ``r`` is global micro-batch ``r * grad_accum_steps + k``: N processes with
``grad_accum_steps = a`` train exactly what one process trains with ``grad_accum_steps = N * a``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    Returns ``(rank, world_size, device)``; a CUDA device becomes this process's ``LOCAL_RANK`` GPU.
    Backend: NCCL on CUDA, gloo on the CPU. A collective that waits more than ``timeout_s`` fails.
    Without ``WORLD_SIZE`` (a plain run): ``(0, 1, device)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class LossModule(nn.Module):
    """``forward(*args) = loss_fn(*args)``, owning ``networks`` (the ones the loss trains) for DDP."""

    def __init__(self, loss_fn: Callable, networks: list[nn.Module]):
        super().__init__()
        self.loss_fn = loss_fn
        self.networks = nn.ModuleList(networks)

    def forward(self, *args):
        return self.loss_fn(*args)


def wrap_loss(loss_fn: Callable, networks: list[nn.Module], world_size: int) -> nn.Module:
    """The loss as a module; under ``world_size > 1`` wrapped in DDP (which also copies rank 0's weights
    to every rank). ``find_unused_parameters``: e.g. a GAN discriminator leaves the backbone's output
    head unused."""
    module = LossModule(loss_fn, networks)
    if world_size == 1:
        return module
    return DistributedDataParallel(module, find_unused_parameters=True, broadcast_buffers=False)


def no_sync(module: nn.Module, sync: bool):
    """Skip the gradient all-reduce of this backward (all micro-batches of a step but the last)."""
    if sync or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


class RankFailure(RuntimeError):
    """Another process of the run stopped; this one stops too, naming it."""


def collective_failed(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because a peer is gone or silent (not this rank's own error)."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    signs = ("connection closed by peer", "connection reset by peer", "broken pipe", "gloo", "nccl", "timed out")
    return isinstance(e, RuntimeError) and any(s in text for s in signs)


def _store():
    """The rendezvous store every process of the group reaches (torchrun's agent holds it, or rank 0)."""
    return dist.distributed_c10d._get_default_store()


def report_failure(rank: int, error: BaseException) -> None:
    """Leave this rank's own error in the store, for the others to name it when they stop."""
    with contextlib.suppress(Exception):  # the store is gone too: the others still name this rank
        _store().set(f"selfforcing/failed/{rank}", f"{type(error).__name__}: {error}"[:400])


def silent_ranks(tag: str, rank: int, world_size: int, wait_s: float = 10.0) -> dict[int, str]:
    """A roll call after a collective failed: every process that is still running checks in under ``tag``
    and waits up to ``wait_s`` for the others. Returns the ranks that did not answer, each with the error it
    left (``report_failure``) or why it is presumed dead. Bounded by ``wait_s`` (and the store's timeout)."""
    try:
        store = _store()
        store.set(f"{tag}/{rank}", "here")
        deadline = time.monotonic() + wait_s
        while True:
            silent = [r for r in range(world_size) if not store.check([f"{tag}/{r}"])]
            failed = [r for r in silent if store.check([f"selfforcing/failed/{r}"])]
            if len(failed) == len(silent) or time.monotonic() > deadline:  # all answered, or said why not
                break
            time.sleep(0.2)
        reasons = {}
        for r in silent:
            key = f"selfforcing/failed/{r}"
            reasons[r] = store.get(key).decode() if store.check([key]) else "no answer (killed, hung or unreachable)"
        return reasons
    except Exception as e:  # the store lives in a process that is gone: torchrun's agent or rank 0
        where = "rank 0, which holds the rendezvous store" if rank != 0 else "the rendezvous store's process"
        return {0 if rank != 0 else -1: f"{where} is unreachable ({type(e).__name__}: {e})"}
