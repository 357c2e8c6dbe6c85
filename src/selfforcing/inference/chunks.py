"""One chunk of causal generation: denoise it against a KV cache, then commit it (METHOD.md section 6).

For every chunk of ``frames_per_block`` latent frames:
    x = noise
    for each few-step level sigma_j:  x0 = G(x, sigma_j | cache);  x = add_noise(x0, fresh noise, sigma_{j+1})
    commit: run G once on add_noise(x0, noise, sigma_ctx) at sigma_ctx and store its keys/values
``causal_chunks`` is that loop over a whole video; the Self Forcing rollout runs it, and an unswitched
``VideoStream`` computes the same video.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..config import CausalConfig
from ..data.video_io import to_uint8
from ..device import cpu_randn_like, to_device
from ..diffusion.flow_matching import add_noise
from ..diffusion.samplers import sample_few_step
from ..models.kv_cache import KVCache, TextKV
from ..models.t2v import TextToVideo


@dataclass
class Chunk:
    """One streamed chunk. frames: [B, f, 3, H, W] in [-1, 1]; latents: [B, f_latent, C, h, w].

    With ``VideoStream(..., overlap_decode=True)`` on CUDA the frames are decoded on a stream of their
    own, and the chunk is handed over as soon as that decoding is queued: ``frames`` may be read only
    once ``ready`` has completed (``wait()``), and ``uint8`` holds them on the host by then."""

    index: int
    start: int  # first latent frame
    latents: torch.Tensor
    frames: torch.Tensor
    seconds: float  # wall-clock since the previous chunk was handed over (previous commit, denoising, decoding)
    prompts: list[str] | None = None  # the prompts in effect (an interactive stream's, after its switches)
    ready: torch.cuda.Event | None = None  # an overlapped decode's completion (None: the frames are ready)
    uint8: torch.Tensor | None = None  # [B, f, H, W, 3] in pinned host memory, with ``ready``

    def wait(self) -> Chunk:
        """Block until the frames are decoded (a no-op unless the decode was overlapped)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self

    def uint8_frames(self, video: int = 0) -> np.ndarray:
        """Video ``video``'s frames as ``[f, H, W, 3]`` uint8 on the host, waiting for them if needed."""
        if self.uint8 is not None:
            return self.wait().uint8[video].numpy()
        return to_uint8(self.frames[video])


def frame_sigma(sigma: torch.Tensor | float, b: int, f: int, ref: torch.Tensor) -> torch.Tensor:
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
    zero_sigma: float | None = None,
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

    return sample_few_step(
        velocity, noise, sigmas, generator=generator, exit_step=exit_step, grad=grad, zero_sigma=zero_sigma
    )


def commit_input(x0: torch.Tensor, context_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """What the commit pass sees: the clean chunk, or it re-noised to ``context_sigma`` (> 0)."""
    if context_sigma == 0:
        return x0
    return add_noise(x0, cpu_randn_like(x0, generator), context_sigma)


def commit_chunk(
    model: TextToVideo, x_ctx: torch.Tensor, context_sigma: float, text_kv: TextKV, cache: KVCache, start: int
) -> None:
    """Run the model once on the chunk at the context level (without gradient), each layer storing its
    keys/values in the cache as it goes."""
    b, f = x_ctx.shape[:2]
    sig = frame_sigma(context_sigma, b, f, x_ctx)
    with torch.no_grad():
        model.dit(x_ctx, sig * 1000, text_kv=text_kv, kv_cache=cache, frame_offset=start, commit=True)


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
    first: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The chunk loop against a KV cache: yields ``(start, x0 [B, fpb, C, H, W])`` for latents ``shape =
    (B, F, C, H, W)``, and commits each chunk but the last when the consumer asks for the next one.

    Each chunk's noise is drawn from ``generator`` (CPU) when it begins. ``exit_step``/``grad`` go to
    ``sample_few_step``; with ``grad``, only chunks overlapping the last ``grad_frames`` frames (default:
    all) carry gradient. ``window`` defaults to ``settings.window`` or the whole video. Streaming and
    the Self Forcing rollout both run this loop. ``guidance != 1``: classifier-free guidance, with
    ``text_kv`` for 2B rows (prompts, then empty prompts) and a cache of 2B rows, each branch
    committing its own keys/values of the same chunk. ``first``: a given first latent frame ``[B, 1, C, H, W]``
    (image-to-video), committed clean at position 0 as ``VideoStream`` commits an image, and not yielded; the
    ``F`` generated frames follow at positions 1, 1 + fpb, ...
    """
    b, f, c, h, w = shape
    fpb = settings.frames_per_block
    settings.validate(f)
    p = next(model.dit.parameters())
    _, gh, gw = model.dit.token_grid(fpb, h, w)
    given = 0 if first is None else first.shape[1]
    window = window or settings.window or given + f
    rows = b if guidance == 1.0 else 2 * b
    cache = KVCache.for_model(model.dit, rows, gh * gw, fpb, window, settings.sink, **settings.cache_options())
    # every chunk but the last is committed; when they all fit no frame is overwritten, so a checkpointed
    # exit-step forward keeps views of the cache instead of copies (the whole context, per chunk and layer)
    cache.append_only = given + f - fpb <= cache.capacity
    if first is not None:
        x_first = first.detach().to(p.device)
        commit_chunk(model, x_first if rows == b else torch.cat([x_first, x_first]), 0.0, text_kv, cache, 0)
    first_sigmas, sigmas = settings.sigmas(0).to(p.device), settings.sigmas().to(p.device)
    ctx_sigma = settings.context_timestep / 1000.0
    first_trained = given + (0 if grad_frames is None else f - grad_frames)
    for start in range(given, given + f, fpb):
        trained = grad and start + fpb > first_trained
        noise = to_device(torch.randn(b, fpb, c, h, w, generator=generator), p.device)
        levels = first_sigmas if start == given else sigmas
        x0 = denoise_chunk(
            model, noise, levels, text_kv, cache, start, generator, exit_step, trained, guidance, settings.zero_sigma
        )
        if start + fpb == given + f:  # the last chunk: no later chunk reads its keys/values, so no commit
            yield start, x0
            return
        x_ctx = commit_input(x0.detach(), ctx_sigma, generator)
        yield start, x0
        commit_chunk(model, x_ctx if rows == b else torch.cat([x_ctx, x_ctx]), ctx_sigma, text_kv, cache, start)
