"""Generating videos from prompts with the bidirectional (teacher) model: many-step Euler + CFG."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..diffusion.flow_matching import sampling_sigmas
from ..diffusion.samplers import sample_euler
from ..models.codec import Codec
from ..models.t2v import TextToVideo


@torch.no_grad()
def generate_videos(
    model: TextToVideo,
    codec: Codec,
    prompts: list[str],
    frames: int,
    height: int,
    width: int,
    seed: int = 0,
    steps: int = 30,
    shift: float = 3.0,
    guidance_scale: float = 3.0,
    negative_prompt: str = "",
    progress: bool = False,
    return_latents: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample one video per prompt: ``[B, frames, 3, height, width]`` in [-1, 1] (and, with
    ``return_latents``, the sampled latents ``[B, f, C, h, w]``).

    The starting noise is drawn on the CPU from ``seed``, so a seed gives the same video on any device.
    """
    device = next(model.dit.parameters()).device
    f, c, h, w = codec.latent_shape(frames, height, width)
    noise = torch.randn(len(prompts), f, c, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    cond = model.encode_text(prompts)
    uncond = model.encode_text([negative_prompt] * len(prompts))
    bar = tqdm(total=steps, desc="sampling", disable=not progress, leave=False)

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model.velocity_with_cfg(x, sigma, cond, uncond, guidance_scale)

    latents = sample_euler(velocity, noise, sampling_sigmas(steps, shift).to(device), callback=lambda *_: bar.update())
    bar.close()
    video = codec.decode(latents)
    return (video, latents) if return_latents else video
