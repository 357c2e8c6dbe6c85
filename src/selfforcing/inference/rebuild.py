"""Krea Realtime's denoising scheme: no commit pass; before every chunk the KV cache is rebuilt from a few
context latents, so the positions the model sees never grow.

With K = ``window - frames_per_block`` context frames (3 in the release), for the chunk starting at frame p:

    p == 0        the cache is empty: the chunk denoises at positions 0 .. f-1
    p < K + f     context = latent 0 and the last latents after it, min(p, K) frames in all
    otherwise     context = [the VAE's re-encode of the last pixel frame of latent p - K, as a first-frame
                  latent] + the last K - 1 latents
    the context runs at t = 0 into an emptied cache, at positions 0 .. K-1, block-causal by chunks of f (one
    chunk when K <= f), under the text of the chunk before; the chunk then denoises at positions K .. K+f-1

(krea-ai/realtime-video ``release_server.py``: ``get_clean_context_frames``, ``recompute_kv_cache``.) The
re-encoded frame stands in for a latent whose causal-VAE history the model would otherwise need: a first
frame of a video is what position 0 holds in training.
"""

from __future__ import annotations

import torch

from ..models.codec import Codec
from ..models.kv_cache import KVCache, TextKV
from ..models.t2v import TextToVideo
from .chunks import commit_chunk


class Rebuild:
    """The context of one rebuilding stream: ``keep`` each chunk's latents and decoded frames as they come;
    ``prepare`` rebuilds ``cache`` for the next chunk and returns the frame position it denoises at."""

    def __init__(self, model: TextToVideo, cache: KVCache, codec: Codec):
        if cache.sink:
            raise ValueError("the rebuild scheme keeps no sink: its context is rebuilt every chunk (causal.sink: 0)")
        if codec.temporal_compression != 1 and not codec.keeps_first_frame:
            raise ValueError("the rebuild scheme re-encodes a pixel frame as a first frame: it needs a causal VAE")
        self.model, self.cache, self.codec = model, cache, codec
        self.context = cache.window - cache.frames_per_block  # K
        if self.context < 1:
            raise ValueError("the rebuild scheme needs context frames: causal.window > causal.frames_per_block")
        self.latents: list[torch.Tensor] = []  # [B, 1, C, h, w] per latent frame of this scene
        self.last_pixels: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []  # each latent's last frame

    def keep(self, x0: torch.Tensor, frames: torch.Tensor, ready: torch.cuda.Event | None = None) -> None:
        """A chunk's latents ``[B, f, C, h, w]`` and its decoded frames ``[B, F, 3, H, W]`` (``ready``: when a
        decode on another CUDA stream has written them)."""
        c, first = self.codec.temporal_compression, not self.latents and self.codec.keeps_first_frame
        # the last pixel frame of each latent: a causal VAE's first latent decodes to 1 frame, every other to c
        ends = [i * c if first else (i + 1) * c - 1 for i in range(x0.shape[1])]
        self.latents += list(x0.split(1, dim=1))
        self.last_pixels += [(frames[:, e], ready) for e in ends]
        # latent 0 and the last K: older ones are never context again
        self.latents = self.latents[:1] + self.latents[1:][-self.context :]
        self.last_pixels = self.last_pixels[:1] + self.last_pixels[1:][-self.context :]

    @torch.no_grad()
    def prepare(self, text_kv: TextKV, position: int) -> int:
        """Rebuild the cache for the chunk at frame ``position`` (of this scene) under ``text_kv``; returns the
        frame position the chunk denoises at (0, or the context's length)."""
        self.cache.reset()
        if position == 0:
            return 0
        k, f = self.context, self.cache.frames_per_block
        recent = self.latents[1:][-(k - 1) :] if k > 1 else []
        if position < k + f:
            context = torch.cat([self.latents[0], *recent], dim=1)[:, :k]
        else:
            pixels, ready = self.last_pixels[-k]
            if ready is not None:
                torch.cuda.current_stream(pixels.device).wait_event(ready)
            first = self.codec.encode(pixels[:, None].clamp(-1, 1)).to(self.latents[0].dtype)
            context = torch.cat([first, *recent], dim=1)
        rows = text_kv.batch_size // context.shape[0]  # classifier-free guidance: both rows see the same context
        context = context.repeat(rows, 1, 1, 1, 1)
        for start in range(0, context.shape[1], f):  # block-causal by chunks, at positions 0 .. K-1
            commit_chunk(self.model, context[:, start : start + f], 0.0, text_kv, self.cache, start)
        return context.shape[1]
