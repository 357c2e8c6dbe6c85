"""The Self Forcing training rollout (METHOD.md section 2).

The generator produces the whole video exactly as at inference, chunk by chunk against its own KV
cache, using the same ``denoise_chunk`` / ``commit_chunk`` as streaming. Stochastic gradient
truncation: one exit step s* is drawn per rollout (shared by its chunks); the steps before it and
every cache commit run without gradient, so the autograd graph holds one
generator forward per trained chunk and no gradient flows through the context.
"""

from __future__ import annotations

import torch

from ..config import CausalConfig
from ..inference.chunks import causal_chunks
from ..models.kv_cache import TextKV
from ..models.t2v import TextToVideo


def draw_exit_step(num_steps: int, generator: torch.Generator) -> int:
    """s* ~ Uniform{1..S} from ``generator``. The trainer seeds it per rollout (step, update kind,
    micro-batch), the same for the k-th rollout of every process."""
    return int(torch.randint(1, num_steps + 1, (1,), generator=generator))


def self_forcing_rollout(
    model: TextToVideo,
    text_kv: TextKV,
    shape: tuple[int, int, int, int, int],
    causal: CausalConfig,
    exit_step: int,
    generator: torch.Generator,
    grad_frames: int | None = None,
    window: int | None = None,
    grad: bool = True,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate a video of latent ``shape = (B, F, C, H, W)``: the x0 of each chunk's exit step.

    The streaming chunk loop (``causal_chunks``), so with ``exit_step = S`` the rollout is the streamed
    video. With ``grad``, gradient reaches the generator only through each chunk's exit-step forward,
    and only for chunks that overlap the last ``grad_frames`` frames (default: all). ``window``:
    KV-cache window in frames (default ``causal.window``, or the whole video). ``first``: image-to-video,
    a given first latent frame ``[B, 1, C, H, W]`` committed clean before the ``F`` generated frames; the
    video returned starts with it (``[B, 1 + F, C, H, W]``, no gradient through the first frame).
    """
    chunks = causal_chunks(model, text_kv, shape, causal, generator, window, exit_step, grad, grad_frames, first=first)
    generated = [x0 for _, x0 in chunks]
    return torch.cat(generated if first is None else [first.to(generated[0]), *generated], dim=1)
