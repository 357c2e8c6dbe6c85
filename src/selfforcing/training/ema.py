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

    def __init__(self, model: nn.Module, decay: float, start: int = 0, share_frozen: bool = False):
        """``share_frozen``: the average holds the model's own frozen parameters (a LoRA run's base) instead of
        a copy, so they are stored once."""
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.start = decay, start
        shared = {id(p): p for p in model.parameters() if not p.requires_grad} if share_frozen else {}
        self.model = copy.deepcopy(model, shared).requires_grad_(False).eval()  # shared: kept, not copied

    def decay_at(self, step: int) -> float:
        if step < self.start:
            return 0.0
        t = step - self.start
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # sharded (FSDP) copies are averaged shard by shard
        # a frozen parameter never moves from the copy it started as: only trained ones are averaged
        both = zip(reshard(self.model).parameters(), reshard(model).parameters(), strict=True)
        pairs = [(q, m) for q, m in both if m.requires_grad]
        if pairs:
            ema_p, p = [local(q) for q, _ in pairs], [local(m.detach()) for _, m in pairs]
            torch._foreach_lerp_(ema_p, p, 1 - self.decay_at(step))
