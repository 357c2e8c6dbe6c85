"""Many-step causal diffusion training: the Teacher Forcing and Diffusion Forcing baselines (METHOD.md 1).

Both train the causal student with flow matching on real videos, every chunk at its own noise level:
- Diffusion Forcing: one block-causal pass over the noisy video; a chunk's context is the earlier
  chunks *noised at their own levels*.
- Teacher Forcing: one pass over ``[context video, noisy video]`` with ``teacher_forcing_mask``; a
  noisy chunk's context is the *real* earlier chunks (clean, or at ``causal.context_timestep``) within
  the window and sink, both copies at RoPE positions 0..F-1. This equals denoising each chunk against a
  KV cache of the ground truth committed as streaming commits (tests/test_causal.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..device import cpu_randn_like
from ..diffusion.flow_matching import add_noise, sample_training_sigmas, velocity_target
from ..models.causal import block_causal_mask, teacher_forcing_mask
from .objective import Objective
from .teacher import drop_prompts


def causal_diffusion_loss(
    model, x0: torch.Tensor, prompts: list[str], cfg: TrainConfig, g: torch.Generator
) -> torch.Tensor:
    """Flow-matching loss of x0: [B, F, C, H, W] with a random noise level per chunk."""
    c, d = cfg.causal, cfg.diffusion
    b, f = x0.shape[:2]
    fpb = c.frames_per_block
    prompts = drop_prompts(prompts, d.prompt_dropout, g)
    levels = sample_training_sigmas(
        b * (f // fpb), g, d.timestep_distribution, d.train_shift, d.logit_mean, d.logit_std
    )
    sigma = levels.view(b, f // fpb).repeat_interleave(fpb, dim=1).to(x0.device)  # [B, F]
    noise = cpu_randn_like(x0, g)
    x_t = add_noise(x0, noise, sigma)
    v = forced_velocity(model, x0, x_t, sigma, model.encode_text(prompts), cfg, g)
    return F.mse_loss(v.float(), velocity_target(x0, noise).float())


def forced_velocity(
    model, x0: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, text, cfg: TrainConfig, g: torch.Generator
):
    """The causal model's velocity for the noisy video ``x_t [B, F, C, H, W]`` (levels ``sigma [B, F]``),
    its context being the real ``x0`` (Teacher Forcing) or ``x_t`` itself (Diffusion Forcing).

    Teacher Forcing sees its context as streaming does: within ``causal.window`` (and the ``sink``), and
    at ``causal.context_timestep`` (x0 re-noised to that level with noise from ``g``; clean at 0)."""
    c = cfg.causal
    f = x0.shape[1]
    _, gh, gw = model.dit.token_grid(f, *x0.shape[-2:])
    if cfg.distill.paradigm == "diffusion_forcing":
        mask = block_causal_mask(f, gh * gw, c.frames_per_block, c.window, c.sink).to(x0.device)
        return model(x_t, sigma, text, attn_mask=mask)
    if cfg.distill.paradigm != "teacher_forcing":
        raise ValueError(f"forced_velocity is for teacher/diffusion forcing, not {cfg.distill.paradigm}")
    mask = teacher_forcing_mask(f, gh * gw, c.frames_per_block, c.window, c.sink).to(x0.device)
    positions = torch.arange(f).repeat(2)
    ctx_sigma = c.context_timestep / 1000.0
    context = x0 if ctx_sigma == 0 else add_noise(x0, cpu_randn_like(x0, g), ctx_sigma)
    levels = torch.full_like(sigma, ctx_sigma)
    v = model(
        torch.cat([context, x_t], 1), torch.cat([levels, sigma], 1), text, attn_mask=mask, frame_positions=positions
    )
    return v[:, f:]


class CausalDiffusion(Objective):
    """``stage: causal`` with ``distill.loss: diffusion``: Teacher or Diffusion Forcing, many-step."""

    def loss(self, kind: str, k: int, step: int, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        video, prompts = self.batch(g)
        return causal_diffusion_loss(self.model, self.latents(video), prompts, self.cfg, g), {}
