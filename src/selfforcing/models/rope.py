"""3D rotary position embedding over (frame, height, width), laid out as in Wan2.1.

The head dimension d is split into three parts: ``d - 4 * (d // 6)`` channels rotate with the frame
index, ``2 * (d // 6)`` with the row and ``2 * (d // 6)`` with the column (44/42/42 for d = 128).
Channels are rotated in adjacent pairs (x[2i], x[2i+1]), the layout of Wan's complex-number RoPE, done
here with real arithmetic so it runs in any dtype on any device.
"""

from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (frame, height, width); each is even."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and >= 6 for 3D RoPE, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles ``[N, dim // 2]`` for integer positions ``[N]``: pos / theta^(2i / dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


def rope_3d_angles(
    frames: int,
    height: int,
    width: int,
    head_dim: int,
    frame_offset: int = 0,
    theta: float = 10000.0,
    frame_positions: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Angles ``[frames * height * width, head_dim // 2]`` (fp64, on ``device``) for tokens ordered (frame,
    row, column).

    ``frame_offset`` gives absolute frame positions, so a chunk generated later gets the same
    rotation as it would inside the full sequence; ``frame_positions [frames]`` gives each frame's
    position explicitly instead (e.g. a clean and a noisy copy of the same frames).
    """
    df, dh, dw = rope_axis_dims(head_dim)
    dev = torch.device(device)
    if frame_positions is None:
        frame_positions = torch.arange(frame_offset, frame_offset + frames, device=dev)
    af = rope_angles(frame_positions.to(dev), df, theta)
    ah = rope_angles(torch.arange(height, device=dev), dh, theta)
    aw = rope_angles(torch.arange(width, device=dev), dw, theta)
    grid = torch.cat(
        [
            af[:, None, None, :].expand(frames, height, width, -1),
            ah[None, :, None, :].expand(frames, height, width, -1),
            aw[None, None, :, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    )
    return grid.reshape(frames * height * width, head_dim // 2)


Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of the angles, each [L, head_dim // 2]


def rope_cos_sin(angles: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> Rope:
    """``(cos, sin)`` of ``angles`` (fp64, computed where the angles are) on ``device`` in ``dtype``: computed
    once per forward, and read by every layer."""
    return torch.cos(angles).to(device, dtype), torch.sin(angles).to(device, dtype)


def apply_rope(x: torch.Tensor, rope: Rope | torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x: [B, H, L, D]`` by ``rope``: ``(cos, sin)``, or the angles, [L, D // 2]."""
    if isinstance(rope, torch.Tensor):
        rope = rope_cos_sin(rope, x.device, x.dtype)
    cos, sin = rope[0].to(x.dtype), rope[1].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)
