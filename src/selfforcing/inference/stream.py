"""Streaming generation with a causal student: chunk by chunk, each decoded as soon as it is ready.

Each chunk is denoised against the KV cache, decoded and handed to the consumer; its commit (see
``chunks``) runs when the next one is asked for, so it is not part of the first chunk's latency.
``stream_video`` runs a ``VideoStream`` for a given number of frames, with prompt switches at given
frames and an optional first image. The KV cache rolls (evicts the oldest non-sink frames) once the
video is longer than its window, so any length can be generated. ``context="recompute_step"`` /
``"recompute_chunk"`` run the same computation without a persistent cache (the whole context is re-run
at every step / rebuilt at every chunk); they give the same video and exist to measure what the cache
saves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import torch

from ..config import CausalConfig
from ..device import to_device
from ..diffusion.samplers import sample_few_step
from ..models.causal import block_causal_mask
from ..models.codec import Codec
from ..models.kv_cache import KVCache, TextKV
from ..models.t2v import TextToVideo
from .chunks import Chunk, commit_chunk, commit_input, denoise_chunk, frame_sigma
from .video_stream import SWITCH_MODES, VideoStream

CONTEXT_MODES = ("cache", "recompute_step", "recompute_chunk")


def _masked_pass(
    model: TextToVideo, x: torch.Tensor, sigma: torch.Tensor, text_kv: TextKV, settings: CausalConfig, n: int
):
    """Full-sequence forward over frames [0, F) with the block-causal mask (no cache); also returns (k, v)."""
    f = x.shape[1]
    mask = block_causal_mask(f, n, settings.frames_per_block, settings.window, settings.sink).to(x.device)
    return model.dit(x, sigma * 1000, text_kv=text_kv, attn_mask=mask, return_kv=True)


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
    image: torch.Tensor | None = None,
    switches: dict[int, list[str] | str] | None = None,
    switch_mode: str = "recache",
    video: torch.Tensor | None = None,
    strength: float = 1.0,
) -> Iterator[Chunk]:
    """Generate ``len(prompts)`` videos of ``frames`` pixel frames chunk by chunk, yielding each chunk.

    The noise comes from a CPU generator seeded with ``seed`` (the same video on any device and in
    every ``context`` mode). ``context``: ``cache`` (KV cache, rolling past the window),
    ``recompute_step`` or ``recompute_chunk`` (no persistent cache; see the module docstring).
    ``guidance_scale``: classifier-free guidance (for many-step causal models; a DMD student has it
    distilled in and samples with 1). ``image``: the first frame ``[B or 1, 3, H, W]`` (``VideoStream``).
    ``switches``: ``{pixel frame: prompts}``; each applies (``switch_mode``) before the first chunk that
    starts at or after its frame. ``video``: video-to-video, the input ``[B or 1, >= frames, 3, H, W]`` in
    [-1, 1], each chunk starting from its encoded input noised to the first of the step list scaled by
    ``strength`` (``VideoStream``). Guidance, image, switches and video need the cache. A bad request raises
    before the first chunk.
    """
    settings = settings or CausalConfig()
    if context not in CONTEXT_MODES:
        raise ValueError(f"context must be one of {CONTEXT_MODES}, got {context!r}")
    if context != "cache" and (guidance_scale != 1.0 or image is not None or switches or video is not None):
        raise ValueError(
            "guidance_scale, image, switches and video need context='cache': the recompute modes only exist to time "
            "the cache"
        )
    if video is not None and torch.is_tensor(video) and video.dim() == 5 and video.shape[1] < frames:
        raise ValueError(f"the input video has {video.shape[1]} frames, fewer than the {frames} asked for")
    if switch_mode not in SWITCH_MODES:
        raise ValueError(f"switch mode must be one of {SWITCH_MODES}, got {switch_mode!r}")
    f_lat, c, h, w = codec.latent_shape(frames, height, width)
    first = 1 if image is not None else 0  # the image is a one-frame chunk of its own
    settings.validate(f_lat - first)
    switches = dict(sorted((switches or {}).items()))
    starts = [
        codec.pixel_frames(s) if s else 0 for s in [*range(first), *range(first, f_lat, settings.frames_per_block)]
    ]
    bad = [f for f in switches if not 0 < f <= starts[-1]]
    if bad:
        raise ValueError(
            f"switch frames must lie in 1 .. {starts[-1]} (a switch applies from the first chunk that starts at "
            f"or after its frame; chunks start at frames {starts}), got {bad}"
        )
    for p in switches.values():  # unknown words etc. raise now, not mid-stream
        model.encode_text([p] if isinstance(p, str) else list(p))
    if context == "cache":
        stream = VideoStream(
            model,
            codec,
            prompts,
            height,
            width,
            replace(settings, window=settings.window or f_lat),
            seed,
            guidance_scale,
            image,
            length=f_lat,
            video=None if video is None else video[:, :frames],
            strength=strength,
        )
        return _run_stream(stream, f_lat, codec, switches, switch_mode)
    return _decoded(_recomputed_chunks(model, prompts, (len(prompts), f_lat, c, h, w), settings, seed, context), codec)


@torch.no_grad()
def _run_stream(
    stream: VideoStream, f_lat: int, codec: Codec, switches: dict[int, list[str] | str], mode: str
) -> Iterator[Chunk]:
    """``f_lat`` latent frames of ``stream``, switching prompts at the given pixel frames."""
    pending = list(switches.items())
    while stream.latent_frames < f_lat:
        pixels = codec.pixel_frames(stream.latent_frames) if stream.latent_frames else 0
        while pending and pending[0][0] <= pixels:
            stream.switch_prompt(pending.pop(0)[1], mode)
        yield next(stream)


@torch.no_grad()
def _decoded(chunks: Iterator[tuple[int, torch.Tensor]], codec: Codec) -> Iterator[Chunk]:
    """Decode each ``(start, x0)`` as it comes and hand it out as a ``Chunk``."""
    decode = codec.stream_decoder()
    t0 = time.perf_counter()
    for index, (start, x0) in enumerate(chunks):
        pixels = decode(x0)
        if x0.device.type == "cuda":
            torch.cuda.synchronize(x0.device)
        yield Chunk(index, start, x0, pixels, time.perf_counter() - t0)
        t0 = time.perf_counter()


def _recomputed_chunks(
    model: TextToVideo,
    prompts: list[str],
    shape: tuple[int, int, int, int, int],
    settings: CausalConfig,
    seed: int,
    context: str,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``causal_chunks`` without a persistent cache (for measuring what the cache saves): the context is
    re-run at every denoising step (``recompute_step``), or once per chunk to rebuild a cache
    (``recompute_chunk``)."""
    text_kv = model.dit.text_kv(*model.encode_text(prompts))
    g, rebuild_cache = torch.Generator().manual_seed(seed), context == "recompute_chunk"
    b, f, c, h, w = shape
    fpb = settings.frames_per_block
    p = next(model.dit.parameters())
    _, gh, gw = model.dit.token_grid(fpb, h, w)
    n = gh * gw
    window = settings.window or f
    cache = None
    if rebuild_cache:
        cache = KVCache.for_model(model.dit, b, n, fpb, window, settings.sink, **settings.cache_options())
    first_sigmas, later_sigmas = settings.sigmas(0).to(p.device), settings.sigmas().to(p.device)
    ctx_sigma = settings.context_timestep / 1000.0
    history = torch.zeros(b, 0, c, h, w, device=p.device)  # commit-pass inputs of every frame so far
    for start in range(0, f, fpb):
        sigmas = first_sigmas if start == 0 else later_sigmas
        noise = to_device(torch.randn(b, fpb, c, h, w, generator=g), p.device)
        if rebuild_cache:  # re-run the whole history chunk by chunk into an empty cache, then denoise
            cache.reset()
            for past in range(0, start, fpb):
                commit_chunk(model, history[:, past : past + fpb], ctx_sigma, text_kv, cache, past)
            x0 = denoise_chunk(model, noise, sigmas, text_kv, cache, start, g, zero_sigma=settings.zero_sigma)
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
        sig = torch.cat([frame_sigma(ctx_sigma, b, start, x), sigma], dim=1)
        v, _ = _masked_pass(model, torch.cat([history, x], dim=1), sig, text_kv, settings, n)
        return v[:, start:]

    return sample_few_step(velocity, noise, sigmas, generator=g, zero_sigma=settings.zero_sigma)


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
    image: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole streamed video at once: ``[B, frames, 3, H, W]`` in [-1, 1] (``image``: its first frame)."""
    chunks = stream_video(
        model, codec, prompts, frames, height, width, settings, seed, guidance_scale=guidance_scale, image=image
    )
    return torch.cat([chunk.frames for chunk in chunks], dim=1)
