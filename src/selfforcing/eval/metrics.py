"""Video-level evidence built on the analyser's per-frame scores: drift, motion, prompt adherence.

- ``drift_curve``: a per-frame figure (e.g. ``frame_ok``) averaged over videos at each frame index
  ``[F]``; ``quarters`` summarises it as first vs last quarter (a model that drifts loses quality
  along the video) and as second vs last quarter (the late change: a model that settles after its
  first frames and then holds shows a negative change but a late change near 0; one whose errors keep
  piling up shows both negative).
- ``motion_error``: the shapes world moves at constant velocity between bounces, so a tracked
  centroid's acceleration ``|c[t+1] - 2 c[t] + c[t-1]|`` is 0 away from the walls. Its mean, in
  pixels per frame^2, over the steps not explained by a bounce (a reversal next to a wall), measures
  jitter and implausible motion.
- ``direction_adherence``: whether each object first moves the way its prompt says (the displacement
  before it first nears a wall has a positive cosine with the prompted direction).
- ``flicker``: the mean absolute change of a pixel from one frame to the next, in [0, 1] units. Real
  videos change only where an object moves; a model that flickers (noise, colours shimmering) changes
  everywhere, and its flicker grows over a long stream if its errors pile up.
"""

from __future__ import annotations

import math

import torch

from ..data.shapes import DIRECTIONS, SIZES, parse_prompt
from .analyser import FrameScores

FRAME_FIGURES = ("found", "colour_fidelity", "coherence", "size_ratio", "shape_correct", "background_clean", "frame_ok")


def flicker(videos: torch.Tensor) -> float:
    """Mean ``|x[t+1] - x[t]|`` over pixels, channels and frames of ``videos: [B, F, 3, H, W]`` in [-1, 1],
    in [0, 1] pixel units."""
    if videos.shape[1] < 2:
        raise ValueError(f"flicker needs at least 2 frames, got {videos.shape[1]}")
    x = (videos.float().clamp(-1, 1) + 1) / 2
    return float((x[:, 1:] - x[:, :-1]).abs().mean())


def drift_curve(scores: list[FrameScores], figure: str = "frame_ok") -> torch.Tensor:
    """Mean of ``figure`` over videos at each frame index ``[F]`` (NaN entries skipped)."""
    values = torch.stack([getattr(s, figure).float() for s in scores])  # [B, F]
    return values.nanmean(0)


def quarters(curve: torch.Tensor) -> dict[str, float]:
    """Quarter means of a drift curve ``[F]``: first, second and last; ``change = last - first`` and
    ``late_change = last - second``."""
    q = max(1, len(curve) // 4)
    first, second, last = (float(curve[a : a + q].nanmean()) for a in (0, q, len(curve) - q))
    return {
        "first_quarter": first,
        "second_quarter": second,
        "last_quarter": last,
        "change": last - first,
        "late_change": last - second,
    }


def near_wall(centroid: torch.Tensor, radius: float, height: int, width: int, margin: float) -> torch.Tensor:
    """``[F, K, 2]`` bool: the object (centre ``centroid [F, K, 2]``) is within ``margin`` px of bouncing
    off the left/right (x) or top/bottom (y) wall."""
    size = torch.tensor([width, height], dtype=torch.float32)
    return (centroid - radius < margin) | (size - centroid - radius < margin)


def motion_error(
    centroid: torch.Tensor, radii: list[float], height: int, width: int, max_speed: float = 1.5
) -> torch.Tensor:
    """Mean acceleration ``[K]`` (px/frame^2) of each object's centroid ``centroid: [F, K, 2]`` over the steps
    where it is found on three consecutive frames and no bounce explains a change of velocity. NaN if none."""
    accel = (centroid[2:] - 2 * centroid[1:-1] + centroid[:-2]).abs()  # [F-2, K, 2]
    out = torch.full((centroid.shape[1],), float("nan"))
    for k, r in enumerate(radii):
        wall = near_wall(centroid[:, k], r, height, width, margin=max_speed + 1.0)  # [F, 2]
        bounce = wall[1:-1]  # a reversal at frame t is a bounce only next to a wall
        valid = ~torch.isnan(accel[:, k]) & ~bounce
        if valid.any():
            out[k] = accel[:, k][valid].mean()
    return out


def direction_adherence(
    centroid: torch.Tensor, directions: list[str], radii: list[float], height: int, width: int, max_speed: float = 1.5
) -> torch.Tensor:
    """``[K]``: 1 if object k's displacement before it first nears a wall points the prompted way (cosine > 0),
    0 if not, NaN if it is never tracked over two frames away from the walls."""
    out = torch.full((centroid.shape[1],), float("nan"))
    for k, (name, r) in enumerate(zip(directions, radii, strict=True)):
        c = centroid[:, k]
        free = ~torch.isnan(c).any(-1) & ~near_wall(c, r, height, width, margin=max_speed + 1.0).any(-1)
        first_wall = int(torch.nonzero(~free).min()) if (~free).any() else len(c)
        track = c[:first_wall]
        if len(track) < 2:
            continue
        step = track[-1] - track[0]
        if float(step.norm()) < 1e-6:
            out[k] = 0.0  # standing still is not moving the prompted way
            continue
        cosine = float(step @ torch.tensor(DIRECTIONS[name])) / float(step.norm())
        out[k] = float(cosine > 0)
    return out


def video_motion(scores: FrameScores, prompt: str, height: int, width: int) -> dict[str, float]:
    """Motion figures of one analysed video: mean acceleration and direction adherence over its objects."""
    objects = parse_prompt(prompt)
    radii = [SIZES[o.size] * min(height, width) for o in objects]
    accel = motion_error(scores.centroid, radii, height, width)
    direction = direction_adherence(scores.centroid, [o.direction for o in objects], radii, height, width)
    return {
        "motion_error": float(accel.nanmean()) if not accel.isnan().all() else math.nan,
        "direction_ok": float(direction.nanmean()) if not direction.isnan().all() else math.nan,
    }
