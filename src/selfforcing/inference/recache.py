"""What a stream does to its KV cache when the prompt changes (``VideoStream.switch_prompt``'s rules).

    keep      nothing: the cached keys/values stay as computed under the old prompt; only the new chunks
              read the new text
    recache   every held frame recomputed under the new prompt, run by run, oldest first, each run
              attending to the held frames before it, as when it was first committed (causal; one pass
              per run of held frames; the commit inputs are kept for it)
    one-pass  LongLive 1.0's re-cache: the last ``sink + window`` frames at most (``local_attn_size``),
              their clean latents, in ONE pass at the context timestep under the new prompt, with no mask
              among them. Once the video is longer than that the sink keeps its old keys/values, and only
              the last ``window`` frames are recomputed, attending to the old sink and to each other
              (LongLive's pass also runs the few frames before them, but neither stores nor reads their
              keys, so they change nothing). Cache positions do not move
    blend     Krea Realtime's: the text embeddings move from the old prompt to the new one over
              ``BLEND_CHUNKS`` chunks (weights 0, 1/3, 2/3, 1: the first chunk after the switch still
              reads the old text), the cache as it is
    reset     forget the cache: a hard cut to a new scene at frame position 0

``recache_causal`` and ``recache_one_pass`` are the two that compute; ``VideoStream`` keeps what they need.
"""

from __future__ import annotations

import torch

from ..models.kv_cache import KVCache, TextKV
from ..models.t2v import TextToVideo
from .chunks import commit_chunk

SWITCH_MODES = ("recache", "one-pass", "keep", "blend", "reset")
BLEND_CHUNKS = 4  # Krea Realtime's interp_steps


def blend_weights(chunks: int = BLEND_CHUNKS) -> list[float]:
    """The new prompt's weight in each of the ``chunks`` chunks after a ``blend`` switch: linspace(0, 1)."""
    return torch.linspace(0, 1, chunks).tolist()


def held_runs(frames: list[int], start: int, length: int) -> list[tuple[int, int]]:
    """Contiguous ``[a, b)`` runs of ``frames`` (held by a cache) inside ``[start, start + length)``."""
    runs: list[tuple[int, int]] = []
    for f in sorted(x for x in frames if start <= x < start + length):
        if runs and runs[-1][1] == f:
            runs[-1] = (runs[-1][0], f + 1)
        else:
            runs.append((f, f + 1))
    return runs


def recache_causal(
    model: TextToVideo, cache: KVCache, held: list[tuple[int, torch.Tensor, float]], text_kv: TextKV
) -> None:
    """``recache``: ``held`` = ``(start, commit input [rows, f, C, h, w], its noise level)`` of every chunk with
    frames in ``cache``; each run of held frames is recommitted under ``text_kv``, oldest first."""
    frames, next_frame = cache.frames, cache.next_frame
    cache.reset()
    for start, x_ctx, sigma in held:
        for a, b in held_runs(frames, start, x_ctx.shape[1]):
            cache.skip_to(a)
            commit_chunk(model, x_ctx[:, a - start : b - start], sigma, text_kv, cache, a)
    cache.skip_to(next_frame)
    assert cache.frames == frames, (cache.frames, frames)


def one_pass_start(frame: int, window: int, sink: int) -> int:
    """The first frame LongLive's re-cache recomputes at a switch before ``frame``: 0 while the video is no
    longer than ``sink + window`` (the sink is recomputed too), else ``frame - window``."""
    return 0 if not window or frame <= sink + window else frame - window


def recache_one_pass(
    model: TextToVideo, cache: KVCache, latents: torch.Tensor, context_sigma: float, text_kv: TextKV
) -> None:
    """``one-pass``: ``latents [rows, f, C, h, w]`` are the clean frames from ``one_pass_start`` up to the cache's
    next frame; they are run once at ``context_sigma`` under ``text_kv`` against the sink's keys/values (kept,
    or forgotten too when they start at frame 0), and committed."""
    frame = cache.next_frame
    start = frame - latents.shape[1]
    if start != one_pass_start(frame, cache.window, cache.sink):
        raise ValueError(
            f"a one-pass re-cache at frame {frame} starts at {one_pass_start(frame, cache.window, cache.sink)}"
        )
    if start == 0:
        cache.reset()
    else:
        cache.keep_sink(start)
    commit_chunk(model, latents, context_sigma, text_kv, cache, start)
