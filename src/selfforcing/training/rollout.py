"""The Self Forcing training rollout (METHOD.md section 2).

The generator produces the whole video exactly as at inference, chunk by chunk against its own KV
cache, using the same ``denoise_chunk`` / ``commit_chunk`` as streaming. Stochastic gradient
truncation: one exit step s* is drawn per rollout (shared by every chunk and every process); the
steps before it and every cache commit run without gradient, so the autograd graph holds one
generator forward per trained chunk and no gradient flows through the context.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import CausalConfig
from ..inference.stream import commit_chunk, commit_input, denoise_chunk
from ..models.kv_cache import KVCache, TextKV
from ..models.t2v import TextToVideo


def draw_exit_step(num_steps: int, generator: torch.Generator) -> int:
    """s* ~ Uniform{1..S}, the same on every process: rank 0 draws it and broadcasts it."""
    s = torch.randint(1, num_steps + 1, (1,), generator=generator)
    if dist.is_available() and dist.is_initialized():
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        s = s.to(backend_device)
        dist.broadcast(s, src=0)
    return int(s)


def self_forcing_rollout(
    model: TextToVideo,
    text_kv: TextKV,
    shape: tuple[int, int, int, int, int],
    causal: CausalConfig,
    exit_step: int,
    generator: torch.Generator,
    grad_frames: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Generate a video of latent ``shape = (B, F, C, H, W)``: the x0 of each chunk's exit step.

    Each chunk's starting noise is drawn from ``generator`` (on the CPU) when the chunk begins, as in
    ``stream_video``, so with ``exit_step = S`` the rollout is the streamed video. Gradient reaches the
    generator only through each chunk's exit-step forward, and only for chunks that overlap the last
    ``grad_frames`` frames (default: all). ``window``: KV-cache window in frames (default
    ``causal.window``, or the whole video).
    """
    b, f, c, h, w = shape
    fpb = causal.frames_per_block
    causal.validate(f)
    device = next(model.parameters()).device
    _, gh, gw = model.dit.token_grid(fpb, h, w)
    window = window or causal.window or f
    dtype = next(model.parameters()).dtype
    cache = KVCache.for_model(model.dit, b, gh * gw, fpb, window, causal.sink, dtype=dtype, device=device)
    sigmas = causal.sigmas().to(device)
    ctx_sigma = causal.context_timestep / 1000.0
    first_trained = 0 if grad_frames is None else f - grad_frames
    chunks = []
    for start in range(0, f, fpb):
        trained = start + fpb > first_trained
        noise = torch.randn(b, fpb, c, h, w, generator=generator).to(device)
        x0 = denoise_chunk(model, noise, sigmas, text_kv, cache, start, generator, exit_step, trained)
        chunks.append(x0)
        commit_chunk(model, commit_input(x0.detach(), ctx_sigma, generator), ctx_sigma, text_kv, cache, start)
    return torch.cat(chunks, dim=1)
