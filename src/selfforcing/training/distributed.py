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
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    Returns ``(rank, world_size, device)``; a CUDA device becomes this process's ``LOCAL_RANK`` GPU.
    Backend: NCCL on CUDA, gloo on the CPU. Without ``WORLD_SIZE`` (a plain run): ``(0, 1, device)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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
