"""The fixed prompts sampled during training: a captioned grid, and its analyser scores on the shapes world."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.video_io import video_grid, write_video
from ..eval.analyser import analyse_batch
from ..inference.generate import generate_videos
from ..inference.stream import generate_stream
from ..models.codec import Codec
from ..models.t2v import TextToVideo
from ..pipeline import stream_settings


@torch.no_grad()
def sample_images(
    cfg: TrainConfig, codec: Codec, videos: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """An image-to-video run's samples start from the first frames ``[B, 3, H, W]`` of real ``videos`` (pixels,
    or latents with ``data.source: latents``, decoded); other runs' from noise alone (None)."""
    if not cfg.distill.image_to_video:
        return None
    if cfg.data.source == "latents":
        return codec.decode(videos[:, :1].to(device)).clamp(-1, 1)[:, 0].float().cpu()
    return videos[:, 0]


@torch.no_grad()
def sample_videos(
    cfg: TrainConfig, model: TextToVideo, codec: Codec, prompts: list[str], image: torch.Tensor | None = None
) -> torch.Tensor:
    """``prompts`` sampled by ``model``: ``[B, F, 3, H, W]``. A bidirectional teacher uses many Euler steps
    with CFG; a causal student streams its few steps with the KV cache (from ``image``, its first frames,
    when given)."""
    c, d = cfg, cfg.diffusion
    shape = (c.data.frames, c.data.height, c.data.width)
    if c.causal is not None:
        return generate_stream(model, codec, prompts, *shape, stream_settings(c), seed=c.seed, image=image)
    return generate_videos(
        model,
        codec,
        prompts,
        *shape,
        seed=c.seed,
        steps=d.sample_steps,
        shift=d.sample_shift,
        guidance_scale=d.guidance_scale,
    )


def write_samples(cfg: TrainConfig, videos: torch.Tensor, prompts: list[str], file: Path) -> dict[str, float]:
    """Write ``videos`` as a captioned grid to ``file``; on the shapes world return their analyser scores."""
    write_video(file, video_grid(videos, prompts))
    if cfg.data.source != "shapes":
        return {}
    summary, _ = analyse_batch(videos, prompts)
    return {f"sample/{k}": v for k, v in summary.items()}
