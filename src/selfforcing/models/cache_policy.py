"""How a KV cache places its frames in RoPE, and what an eviction does to the sink.

Self Forcing, LongLive and CausVid store each key rotated at its frame's absolute position
(``rope="absolute"``): a frame keeps the position it was generated at, so the positions grow without end.
Reward Forcing and LongLive's "infinite" mode store keys *before* RoPE and rotate them at every read
by their slot (``rope="slot"``): the n frames held, oldest first (the sink first), take positions
0..n-1 and the current chunk n..n+F-1, so the positions a long stream sees never exceed what one
window holds.

Reward Forcing also updates its sink at each eviction (``sink_ema = alpha``, 0.999 in its release):
when a commit evicts as many frames as the sink holds, sink frame j <- alpha * sink_j + (1 - alpha) *
evicted_j, keys and values (the oldest evicted frame into the first sink frame); when it evicts another
number, the first evicted frames replace the first sink frames (its code's rule). With keys stored
before RoPE the blend mixes frames at no particular position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROPE_MODES = ("absolute", "slot")


@dataclass(frozen=True)
class CachePolicy:
    """``rope``: "absolute" or "slot" (see the module docstring); ``sink_ema``: the sink's EMA factor at each
    eviction (None: the sink never changes)."""

    rope: str = "absolute"
    sink_ema: float | None = None

    def __post_init__(self) -> None:
        if self.rope not in ROPE_MODES:
            raise ValueError(f"causal.rope must be one of {ROPE_MODES}, got {self.rope!r}")
        if self.sink_ema is not None and not 0 <= self.sink_ema <= 1:
            raise ValueError(f"causal.sink_ema must be in [0, 1] (Reward Forcing: 0.999), got {self.sink_ema}")

    @property
    def by_slot(self) -> bool:
        return self.rope == "slot"


def slot_positions(frame_of_slot: list[int]) -> torch.Tensor:
    """The RoPE position of every held slot under ``rope="slot"``: its frame's rank among the held frames,
    ``[num_held]`` (the held slots are a prefix of ``frame_of_slot``; -1 = empty)."""
    held = [f for f in frame_of_slot if f >= 0]
    rank = {f: i for i, f in enumerate(sorted(held))}
    return torch.tensor([rank[f] for f in held], dtype=torch.long)


def updated_sink(sink: list[torch.Tensor], evicted: list[torch.Tensor], alpha: float) -> list[tuple[int, torch.Tensor]]:
    """The sink frames an eviction rewrites, ``(sink index, new frame)``: ``sink`` and ``evicted`` are one
    layer's keys (or values) per frame, oldest first, each ``[B, heads, N, D]``."""
    if len(evicted) == len(sink):
        return [(j, alpha * s + (1 - alpha) * e) for j, (s, e) in enumerate(zip(sink, evicted, strict=True))]
    return [(j, evicted[j]) for j in range(min(len(evicted), len(sink)))]
