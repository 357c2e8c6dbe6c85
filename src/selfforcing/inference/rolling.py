"""Rolling Forcing's denoising scheme: a window of chunks at rising noise levels, denoised in one pass.

With S few-step levels sigma_0 > ... > sigma_{S-1}, the window holds up to S chunks (``frames_per_block``
latent frames each), the newest at sigma_0 and the oldest at sigma_{S-1}. Every window pass:

    a new chunk of noise enters at sigma_0 (until the video's last chunk has entered)
    one DiT pass over the whole window, each chunk at its own level, without a mask among them
    every chunk predicts x0; a chunk below the last level is re-noised with fresh noise to its next level
    the oldest chunk, at the last level, is done: its x0 is the output, committed clean to the cache

so each chunk meets every level once, and a video of n chunks takes n + S - 1 passes plus n commits.

What a pass attends to (TencentARC/RollingForcing, ``wan/modules/causal_model.py``), for an attention
budget of A latent frames (``window``; 21 in the release):
    the window pass   the first chunk of the video (the anchor) and the last ``A - S f - f`` committed
                      frames before the window, then the window; the anchor is rotated to sit just before
                      those frames, whatever its real position
    the commit pass   the last A frames up to the committed chunk's end, at their own positions
(At the end of a finite video the window drains: a pass of fewer chunks sees more committed frames, A in
all.) Both are caches that rotate their keys by slot (``models.cache_policy``): the commit cache holds the last
``A - f`` committed frames and no sink, so slot positions are its frames' positions shifted by one constant
(which RoPE does not see); the window cache keeps the first chunk as its sink and the frames after it,
which puts the anchor exactly where Rolling Forcing rotates it. One commit pass fills both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..device import cpu_randn_like, to_device
from ..diffusion.flow_matching import add_noise, x0_from_velocity
from ..models.cache_policy import CachePolicy
from ..models.kv_cache import KVCache, TextKV
from ..models.t2v import TextToVideo
from .chunks import frame_sigma


class RollingWindow:
    """The window of one Rolling Forcing stream: ``next_chunk`` runs window passes until the oldest chunk is
    done and returns its x0 ``[B, f, C, h, w]``. ``cache``: the stream's commit cache (``rope="slot"``, no
    sink, ``window`` = the attention budget A); ``sigmas``: the S levels, highest first."""

    def __init__(
        self,
        model: TextToVideo,
        cache: KVCache,
        sigmas: torch.Tensor,
        latent_size: tuple[int, int, int],
        generator: torch.Generator,
        context_sigma: float = 0.0,
    ):
        if not cache.policy.by_slot or cache.sink:
            raise ValueError(
                "Rolling Forcing's commit cache rotates its keys by slot and keeps no sink: set causal.rope: slot "
                "and causal.sink: 0 (the rolling-forcing family does)"
            )
        self.model, self.cache, self.sigmas, self.generator = model, cache, sigmas, generator
        self.latent_size, self.context_sigma = latent_size, context_sigma
        f, s = cache.frames_per_block, len(sigmas)
        working = max(0, cache.window - s * f - f)  # committed frames a window pass sees besides the anchor
        rows, n = cache.k.shape[1], cache.tokens_per_frame
        self.window_cache = KVCache.for_model(
            model.dit, rows, n, s * f, s * f + working, f, cache.k.dtype, cache.k.device, policy=CachePolicy("slot")
        )
        self.blocks: list[torch.Tensor] = []  # the window's chunks, oldest first, each noised to its level
        self.levels: list[int] = []  # each chunk's level index into sigmas
        self.start = 0  # the frame position of the window's oldest chunk

    @torch.no_grad()
    def next_chunk(
        self, text_kv: TextKV, end: int | None = None, enter: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Window passes until the oldest chunk has met every level; its x0, committed. ``end``: the frame
        position where the video ends (no chunk enters from there on: the window drains), or None. ``enter``:
        what a new chunk starts from, given its fresh noise (video-to-video: the input chunk noised to the
        first level); default the noise itself."""
        f = self.cache.frames_per_block
        while True:
            if end is None or self.start + len(self.blocks) * f < end:
                b, (c, h, w) = self.cache.k.shape[1], self.latent_size
                noise = to_device(torch.randn(b, f, c, h, w, generator=self.generator), self.sigmas.device)
                self.blocks.append(enter(noise) if enter is not None else noise)
                self.levels.append(0)
            x0 = self._pass(text_kv)
            if self.levels[0] == len(self.sigmas) - 1:
                return self._finish(x0, text_kv)
            self._renoise(x0)

    def _pass(self, text_kv: TextKV) -> list[torch.Tensor]:
        """One DiT pass over the window, each chunk at its own level; every chunk's x0."""
        x = torch.cat(self.blocks, dim=1)
        f = self.cache.frames_per_block
        sig = torch.cat([frame_sigma(self.sigmas[level], x.shape[0], f, x) for level in self.levels], dim=1)
        cache = self._draining_cache(x.shape[1]) if self.start and len(self.blocks) < len(self.sigmas) else None
        v = self.model.dit(x, sig * 1000, text_kv=text_kv, kv_cache=cache or self.window_cache, frame_offset=self.start)
        return list(x0_from_velocity(x, v, sig).split(f, dim=1))

    def _draining_cache(self, frames: int) -> KVCache:
        """At the end of a finite video the window holds fewer chunks, and a pass of ``frames`` sees more of the
        committed frames (its budget is A in all): the anchor and the last ``A - frames - f`` committed frames,
        copied into a cache of their own."""
        c, f = self.cache, self.cache.frames_per_block
        rows, n = c.k.shape[1], c.tokens_per_frame
        cache = KVCache.for_model(
            self.model.dit, rows, n, frames, c.window - f, f, c.k.dtype, c.k.device, policy=CachePolicy("slot")
        )
        layers = range(c.k.shape[0])
        cache.commit(0, [_cat([self.window_cache.read_frame(i, s) for s in range(f)]) for i in layers])
        first = max(f, self.start - (c.window - frames - f))
        if first < self.start:
            slots = [c.frame_of_slot.index(g) for g in range(first, self.start)]
            cache.skip_to(first)
            cache.commit(first, [_cat([c.read_frame(i, s) for s in slots]) for i in layers])
        cache.skip_to(self.start)
        return cache

    def _renoise(self, x0: list[torch.Tensor], first: int = 0) -> None:
        """Chunks ``first`` on: re-noised from their x0 with fresh noise to their next level."""
        for i in range(first, len(self.blocks)):
            self.levels[i] += 1
            self.blocks[i] = add_noise(x0[i], cpu_randn_like(x0[i], self.generator), self.sigmas[self.levels[i]])

    def _finish(self, x0: list[torch.Tensor], text_kv: TextKV) -> torch.Tensor:
        """The oldest chunk is done: commit its x0 to both caches (clean, at the context level, as Rolling Forcing
        does), re-noise the others."""
        done, f = x0[0], self.cache.frames_per_block
        sig = frame_sigma(self.context_sigma, done.shape[0], f, done) * 1000
        _, kv = self.model.dit(
            done, sig, text_kv=text_kv, kv_cache=self.cache, frame_offset=self.start, commit=True, return_kv=True
        )
        self.window_cache.commit(self.start, kv)
        self._renoise(x0, first=1)
        del self.blocks[0], self.levels[0]
        self.start += f
        return done


def _cat(frames: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames' (keys, values), each ``[B, heads, N, D]``, joined along the tokens."""
    return torch.cat([k for k, _ in frames], dim=2), torch.cat([v for _, v in frames], dim=2)
