"""Scoring a trained checkpoint: sample held-out shapes-world prompts, run the analyser."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..config import CausalConfig
from ..data.shapes import ShapesWorld
from ..data.video_io import video_grid, write_video
from ..families import family as family_named
from ..inference.generate import generate_videos
from ..inference.stream import generate_stream
from ..pipeline import load_pipeline, stream_guidance, stream_settings
from .analyser import analyse_batch

HELD_OUT_SEED = 123_456  # training batches use other seeds (see training.objective.step_seed)


def sample_videos(
    pipe,
    prompts: list[str],
    frames: int,
    seed: int = 0,
    batch_size: int = 16,
    sink: int | None = None,
    family: str | None = None,
) -> torch.Tensor:
    """Videos ``[N, frames, 3, H, W]`` (CPU) for ``prompts``: a bidirectional teacher samples with its
    recipe's Euler steps and guidance; a causal model streams with its steps and the KV cache (rolling
    beyond the training length), a many-step one with its recipe's guidance (``stream_guidance``).
    Batch ``i`` uses seed ``seed + i * batch_size``. ``sink``: a causal model streams with that many sink
    frames instead of its own setting; ``family``: by that released model's rules (``families.Family.rules_for``)."""
    d, diff = pipe.cfg.data, pipe.cfg.diffusion

    def generate(prompts: list[str], seed: int) -> torch.Tensor:
        if pipe.cfg.causal is not None:
            settings, guidance = stream_settings(pipe.cfg), stream_guidance(pipe.cfg)
            settings = family_named(family).rules_for(settings) if family else settings
            settings = settings if sink is None else replace(settings, sink=sink)
            return generate_stream(pipe.model, pipe.codec, prompts, frames, d.height, d.width, settings, seed, guidance)
        return generate_videos(
            pipe.model,
            pipe.codec,
            prompts,
            frames,
            d.height,
            d.width,
            seed=seed,
            steps=diff.sample_steps,
            shift=diff.sample_shift,
            guidance_scale=diff.guidance_scale,
            progress=True,
        )

    return torch.cat(
        [generate(prompts[i : i + batch_size], seed + i).cpu() for i in range(0, len(prompts), batch_size)]
    )


def held_out_prompts(cfg, num: int, seed: int = 0) -> list[str]:
    """``num`` prompts of the checkpoint's world that no training batch drew (seed ``HELD_OUT_SEED + seed``)."""
    return ShapesWorld(cfg.data).sample(num, seed=HELD_OUT_SEED + seed).prompts


def score_checkpoint(
    checkpoint: str | Path,
    num: int = 16,
    seed: int = 0,
    out: Path | None = None,
    tag: str = "samples",
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    frames: int | None = None,
    as_causal: CausalConfig | None = None,
) -> dict[str, float]:
    """Generate ``num`` videos for held-out prompts of the checkpoint's own world and score them.

    ``frames``: video length (default: the training length). With ``out``, the first 8 are written as a
    captioned grid ``{out}/{tag}.gif`` and ``.mp4``. ``as_causal``: stream a bidirectional checkpoint's
    weights as a causal student with these settings (what the student starts from before ODE regression).
    """
    pipe = load_pipeline(checkpoint, device=device)
    if as_causal is not None:
        pipe.cfg.causal = as_causal
    prompts = held_out_prompts(pipe.cfg, num, seed)
    videos = sample_videos(pipe, prompts, frames or pipe.cfg.data.frames, seed, batch_size)
    if out is not None:
        grid = video_grid(videos[:8], prompts[:8])
        write_video(Path(out) / f"{tag}.mp4", grid)
        write_video(Path(out) / f"{tag}.gif", grid)
    summary, _ = analyse_batch(videos, prompts)
    return summary
