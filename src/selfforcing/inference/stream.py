"""Streaming generation with a causal student: chunk by chunk, each decoded as soon as it is ready.

For every chunk of ``frames_per_block`` latent frames (METHOD.md section 6):
    x = noise
    for each few-step level sigma_j:  x0 = G(x, sigma_j | cache);  x = add_noise(x0, fresh noise, sigma_{j+1})
    decode x0 and hand it to the consumer
    commit: run G once on add_noise(x0, noise, sigma_ctx) at sigma_ctx and store its keys/values
The commit runs after the chunk is handed over (when the next one is asked for), so it is not part of
the first chunk's latency.
The KV cache rolls (evicts the oldest non-sink frames) once the video is longer than its window, so
any length can be generated. ``context="recompute_step"`` / ``"recompute_chunk"`` run the same
computation without a persistent cache (the whole context is re-run at every step / rebuilt at every
chunk); they give the same video and exist to measure what the cache saves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..config import CausalConfig
from ..device import cpu_randn_like, to_device
from ..diffusion.flow_matching import add_noise
from ..diffusion.samplers import sample_few_step
from ..models.causal import block_causal_mask
from ..models.codec import Codec
from ..models.kv_cache import KVCache, TextKV
from ..models.t2v import TextToVideo

CONTEXT_MODES = ("cache", "recompute_step", "recompute_chunk")


@dataclass
class Chunk:
    """One streamed chunk. frames: [B, f, 3, H, W] in [-1, 1]; latents: [B, f_latent, C, h, w]."""

    index: int
    start: int  # first latent frame
    latents: torch.Tensor
    frames: torch.Tensor
    seconds: float  # wall-clock since the previous chunk was handed over (previous commit, denoising, decoding)


def _frame_sigma(sigma: torch.Tensor | float, b: int, f: int, ref: torch.Tensor) -> torch.Tensor:
    """Noise levels ``[B, F]`` in fp32 (a bf16 timestep would round 937.5 to 936)."""
    return torch.as_tensor(sigma, dtype=torch.float32, device=ref.device).expand(b, f)


def denoise_chunk(
    model: TextToVideo,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    text_kv: TextKV,
    cache: KVCache,
    start: int,
    generator: torch.Generator,
    exit_step: int | None = None,
    grad: bool = False,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Few-step sampling of one chunk against a cache: noise [B, f, C, h, w] -> x0 [B, f, C, h, w].

    ``sample_few_step`` with the model reading the cache; ``exit_step``/``grad`` as there. Inference
    and the Self Forcing rollout both use this function. With ``guidance != 1`` (classifier-free
    guidance), ``text_kv`` and ``cache`` hold 2B rows, the prompts then the empty prompt, and
    v = v_uncond + guidance * (v_cond - v_uncond).
    """

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            return model.dit(x, sigma * 1000, text_kv=text_kv, kv_cache=cache, frame_offset=start)
        both = model.dit(
            torch.cat([x, x]), torch.cat([sigma, sigma]) * 1000, text_kv=text_kv, kv_cache=cache, frame_offset=start
        )
        v_cond, v_uncond = both.chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    return sample_few_step(velocity, noise, sigmas, generator=generator, exit_step=exit_step, grad=grad)


def commit_input(x0: torch.Tensor, context_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """What the commit pass sees: the clean chunk, or it re-noised to ``context_sigma`` (> 0)."""
    if context_sigma == 0:
        return x0
    return add_noise(x0, cpu_randn_like(x0, generator), context_sigma)


def commit_chunk(
    model: TextToVideo, x_ctx: torch.Tensor, context_sigma: float, text_kv: TextKV, cache: KVCache, start: int
) -> None:
    """Run the model once on the chunk at the context level (without gradient) and store its keys/values."""
    b, f = x_ctx.shape[:2]
    sig = _frame_sigma(context_sigma, b, f, x_ctx)
    with torch.no_grad():
        _, kv = model.dit(x_ctx, sig * 1000, text_kv=text_kv, kv_cache=cache, frame_offset=start, return_kv=True)
    cache.commit(start, kv)


def causal_chunks(
    model: TextToVideo,
    text_kv: TextKV,
    shape: tuple[int, int, int, int, int],
    settings: CausalConfig,
    generator: torch.Generator,
    window: int | None = None,
    exit_step: int | None = None,
    grad: bool = False,
    grad_frames: int | None = None,
    guidance: float = 1.0,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The chunk loop against a KV cache: yields ``(start, x0 [B, fpb, C, H, W])`` for latents ``shape =
    (B, F, C, H, W)``, and commits each chunk but the last when the consumer asks for the next one.

    Each chunk's noise is drawn from ``generator`` (CPU) when it begins. ``exit_step``/``grad`` go to
    ``sample_few_step``; with ``grad``, only chunks overlapping the last ``grad_frames`` frames (default:
    all) carry gradient. ``window`` defaults to ``settings.window`` or the whole video. Streaming and
    the Self Forcing rollout both run this loop. ``guidance != 1``: classifier-free guidance, with
    ``text_kv`` for 2B rows (prompts, then empty prompts) and a cache of 2B rows, each branch
    committing its own keys/values of the same chunk.
    """
    b, f, c, h, w = shape
    fpb = settings.frames_per_block
    settings.validate(f)
    p = next(model.dit.parameters())
    _, gh, gw = model.dit.token_grid(fpb, h, w)
    window = window or settings.window or f
    rows = b if guidance == 1.0 else 2 * b
    cache = KVCache.for_model(model.dit, rows, gh * gw, fpb, window, settings.sink, dtype=p.dtype, device=p.device)
    sigmas = settings.sigmas().to(p.device)
    ctx_sigma = settings.context_timestep / 1000.0
    first_trained = 0 if grad_frames is None else f - grad_frames
    for start in range(0, f, fpb):
        trained = grad and start + fpb > first_trained
        noise = to_device(torch.randn(b, fpb, c, h, w, generator=generator), p.device)
        x0 = denoise_chunk(model, noise, sigmas, text_kv, cache, start, generator, exit_step, trained, guidance)
        if start + fpb == f:  # the last chunk: no later chunk reads its keys/values, so no commit
            yield start, x0
            return
        x_ctx = commit_input(x0.detach(), ctx_sigma, generator)
        yield start, x0
        commit_chunk(model, x_ctx if rows == b else torch.cat([x_ctx, x_ctx]), ctx_sigma, text_kv, cache, start)


def _masked_pass(
    model: TextToVideo, x: torch.Tensor, sigma: torch.Tensor, text_kv: TextKV, settings: CausalConfig, n: int
):
    """Full-sequence forward over frames [0, F) with the block-causal mask (no cache); also returns (k, v)."""
    f = x.shape[1]
    mask = block_causal_mask(f, n, settings.frames_per_block, settings.window, settings.sink).to(x.device)
    return model.dit(x, sigma * 1000, text_kv=text_kv, attn_mask=mask, return_kv=True)


@torch.no_grad()
def stream_video(
    model: TextToVideo,
    codec: Codec,
    prompts: list[str],
    frames: int,
    height: int,
    width: int,
    settings: CausalConfig | None = None,
    seed: int = 0,
    context: str = "cache",
    guidance_scale: float = 1.0,
) -> Iterator[Chunk]:
    """Generate ``len(prompts)`` videos of ``frames`` pixel frames chunk by chunk, yielding each chunk.

    The noise comes from a CPU generator seeded with ``seed`` (the same video on any device and in
    every ``context`` mode). ``context``: ``cache`` (KV cache, rolling past the window),
    ``recompute_step`` or ``recompute_chunk`` (no persistent cache; see the module docstring).
    ``guidance_scale``: classifier-free guidance (for many-step causal models; a DMD student has it
    distilled in and samples with 1). Cache mode only.
    """
    settings = settings or CausalConfig()
    if context not in CONTEXT_MODES:
        raise ValueError(f"context must be one of {CONTEXT_MODES}, got {context!r}")
    if guidance_scale != 1.0 and context != "cache":
        raise ValueError(
            f"guidance_scale {guidance_scale} needs context='cache': the recompute modes only exist to time the cache"
        )
    device = next(model.dit.parameters()).device
    f_lat, c, h, w = codec.latent_shape(frames, height, width)
    settings.validate(f_lat)
    g = torch.Generator().manual_seed(seed)
    b = len(prompts)
    text_kv = model.dit.text_kv(*model.encode_text(prompts if guidance_scale == 1.0 else prompts + [""] * b))
    shape = (b, f_lat, c, h, w)
    chunks = (
        causal_chunks(model, text_kv, shape, settings, g, guidance=guidance_scale)
        if context == "cache"
        else _recomputed_chunks(model, text_kv, shape, settings, g, context == "recompute_chunk")
    )
    decode = codec.stream_decoder()  # a causal VAE keeps its cache from chunk to chunk
    t0 = time.perf_counter()
    for index, (start, x0) in enumerate(chunks):  # asking for a chunk also commits the previous one
        pixels = decode(x0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield Chunk(index, start, x0, pixels, time.perf_counter() - t0)
        t0 = time.perf_counter()


def _recomputed_chunks(
    model: TextToVideo,
    text_kv: TextKV,
    shape: tuple[int, int, int, int, int],
    settings: CausalConfig,
    g: torch.Generator,
    rebuild_cache: bool,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``causal_chunks`` without a persistent cache (for measuring what the cache saves): the context is
    re-run at every denoising step, or (``rebuild_cache``) once per chunk to rebuild a cache."""
    b, f, c, h, w = shape
    fpb = settings.frames_per_block
    p = next(model.dit.parameters())
    _, gh, gw = model.dit.token_grid(fpb, h, w)
    n = gh * gw
    window = settings.window or f
    cache = KVCache.for_model(model.dit, b, n, fpb, window, settings.sink, p.dtype, p.device) if rebuild_cache else None
    sigmas = settings.sigmas().to(p.device)
    ctx_sigma = settings.context_timestep / 1000.0
    history = torch.zeros(b, 0, c, h, w, device=p.device)  # commit-pass inputs of every frame so far
    for start in range(0, f, fpb):
        noise = to_device(torch.randn(b, fpb, c, h, w, generator=g), p.device)
        if rebuild_cache:  # re-run the whole history chunk by chunk into an empty cache, then denoise
            cache.reset()
            for past in range(0, start, fpb):
                commit_chunk(model, history[:, past : past + fpb], ctx_sigma, text_kv, cache, past)
            x0 = denoise_chunk(model, noise, sigmas, text_kv, cache, start, g)
        else:
            x0 = _denoise_recompute(model, noise, sigmas, history, ctx_sigma, text_kv, settings, n, g)
        history = torch.cat([history, commit_input(x0, ctx_sigma, g)], dim=1)
        yield start, x0


def _denoise_recompute(
    model: TextToVideo,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    history: torch.Tensor,
    ctx_sigma: float,
    text_kv: TextKV,
    settings: CausalConfig,
    n: int,
    g: torch.Generator,
) -> torch.Tensor:
    """``denoise_chunk`` without a cache: every step runs the masked model over history + chunk."""
    b, start = history.shape[:2]

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sig = torch.cat([_frame_sigma(ctx_sigma, b, start, x), sigma], dim=1)
        v, _ = _masked_pass(model, torch.cat([history, x], dim=1), sig, text_kv, settings, n)
        return v[:, start:]

    return sample_few_step(velocity, noise, sigmas, generator=g)


def generate_stream(
    model: TextToVideo,
    codec: Codec,
    prompts: list[str],
    frames: int,
    height: int,
    width: int,
    settings: CausalConfig | None = None,
    seed: int = 0,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The whole streamed video at once: ``[B, frames, 3, H, W]`` in [-1, 1]."""
    chunks = stream_video(model, codec, prompts, frames, height, width, settings, seed, guidance_scale=guidance_scale)
    return torch.cat([chunk.frames for chunk in chunks], dim=1)
