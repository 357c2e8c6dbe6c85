"""Exponential moving average of a module's parameters."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .fsdp import local, reshard


class EMA:
    """``ema = d * ema + (1 - d) * param`` after each optimizer step, with the warm-up
    ``d = min(decay, (1 + t) / (10 + t))`` counted from ``start`` (a plain copy before ``start``).

    The warm-up keeps the average from dragging the initial weights along: with a zero-initialised
    output head, a plain 0.998 average would still hold 13 % of the untrained head after 1000 steps.
    """

    def __init__(self, model: nn.Module, decay: float, start: int = 0):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.start = decay, start
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    def decay_at(self, step: int) -> float:
        if step < self.start:
            return 0.0
        t = step - self.start
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # sharded (FSDP) copies are averaged shard by shard
        ema_p = [local(q) for q in reshard(self.model).parameters()]
        p = [local(q.detach()) for q in reshard(model).parameters()]
        torch._foreach_lerp_(ema_p, p, 1 - self.decay_at(step))
