"""Block-causal attention: which frames a frame may attend to.

A video of F latent frames is cut into chunks of ``frames_per_block`` frames (3 = chunk-wise, 1 =
frame-wise). A token of the chunk covering frames [s, e) attends to every frame in

    [max(0, e - window), e)  U  [0, sink)

i.e. its own chunk, earlier chunks within a local window of ``window`` frames counted back from the
chunk's end (0 = unlimited), and the first ``sink`` frames always. The KV cache
(``selfforcing.models.kv_cache``) keeps exactly these frames, so the cached chunk-by-chunk path and the
full-sequence forward with this mask give the same result.
"""

from __future__ import annotations

import torch


def check_layout(frames_per_block: int, window: int = 0, sink: int = 0) -> None:
    """Raise a ValueError naming the problem for an impossible chunk layout."""
    if frames_per_block < 1:
        raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
    if window < 0 or sink < 0:
        raise ValueError(f"window and sink must be >= 0 (0 = none), got window={window}, sink={sink}")
    if window and window < frames_per_block:
        raise ValueError(
            f"window={window} frames is shorter than one chunk ({frames_per_block} frames): "
            "a chunk must see itself; use window >= frames_per_block or 0 (unlimited)"
        )


def frame_visibility(num_frames: int, frames_per_block: int, window: int = 0, sink: int = 0) -> torch.Tensor:
    """Bool ``[F, F]``: entry (i, j) is True where frame i may attend to frame j."""
    check_layout(frames_per_block, window, sink)
    idx = torch.arange(num_frames)
    end = (idx // frames_per_block + 1) * frames_per_block  # exclusive end of each frame's chunk
    key = idx[None, :]
    visible = key < end[:, None]
    if window:
        visible &= (key >= (end - window)[:, None]) | (key < sink)
    return visible


def block_causal_mask(
    num_frames: int, tokens_per_frame: int, frames_per_block: int, window: int = 0, sink: int = 0
) -> torch.Tensor:
    """Bool token mask ``[F * N, F * N]`` (True = may attend) for tokens ordered (frame, token)."""
    vis = frame_visibility(num_frames, frames_per_block, window, sink)
    return vis.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def teacher_forcing_mask(
    num_frames: int, tokens_per_frame: int, frames_per_block: int, window: int = 0, sink: int = 0
) -> torch.Tensor:
    """Bool mask ``[2 F N, 2 F N]`` for Teacher Forcing in one pass over ``[context video, noisy video]``.

    The context copy (first F frames) is block-causal within itself, with the same window and sink as
    streaming; a noisy chunk attends to itself and to the context frames of *earlier* chunks that its
    window (or the sink) lets it see, never to other noisy chunks; the context never sees noisy frames.
    Both copies take the same frame positions (RoPE), 0..F-1. This is a KV cache of the context,
    committed chunk by chunk, seen by each noisy chunk.
    """
    vis = frame_visibility(num_frames, frames_per_block, window, sink)
    chunk = torch.arange(num_frames) // frames_per_block
    earlier = (chunk[:, None] > chunk[None, :]) & vis  # (noisy i, context j): j's chunk strictly before i's
    same = chunk[:, None] == chunk[None, :]
    frames = torch.cat(
        [torch.cat([vis, torch.zeros_like(vis)], dim=1), torch.cat([earlier, same], dim=1)],
        dim=0,
    )
    return frames.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
