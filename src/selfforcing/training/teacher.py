"""The bidirectional text-to-video teacher: flow matching on real videos."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..device import cpu_randn_like
from ..diffusion.flow_matching import add_noise, sample_training_sigmas, velocity_target
from .objective import Objective


def velocity_loss(model, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, text) -> torch.Tensor:
    """``mse(v(x_t, sigma), noise - x0)`` for ``x0: [B, F, C, H, W]`` noised to ``sigma: [B]`` (or [B, F])."""
    v = model(add_noise(x0, noise, sigma), sigma, text)
    return F.mse_loss(v.float(), velocity_target(x0, noise).float())


def drop_prompts(prompts: list[str], p: float, g: torch.Generator) -> list[str]:
    """Each prompt replaced by "" with probability ``p`` (for classifier-free guidance)."""
    drop = torch.rand(len(prompts), generator=g) < p
    return ["" if dropped else prompt for prompt, dropped in zip(prompts, drop.tolist(), strict=True)]


def flow_matching_loss(
    model, x0: torch.Tensor, prompts: list[str], cfg: TrainConfig, g: torch.Generator
) -> torch.Tensor:
    """MSE between the predicted and the true velocity at a random noise level per video."""
    d = cfg.diffusion
    prompts = drop_prompts(prompts, d.prompt_dropout, g)
    sigma = sample_training_sigmas(x0.shape[0], g, d.timestep_distribution, d.train_shift, d.logit_mean, d.logit_std)
    noise = cpu_randn_like(x0, g)
    return velocity_loss(model, x0, noise, sigma.to(x0.device), model.encode_text(prompts))


class FlowMatching(Objective):
    """``stage: teacher``: the generator is the bidirectional teacher."""

    def loss(self, kind: str, k: int, step: int, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        video, prompts = self.batch(g)
        return flow_matching_loss(self.model, self.latents(video), prompts, self.cfg, g), {}
