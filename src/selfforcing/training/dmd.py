"""Distribution matching distillation (DMD) on the generated video (METHOD.md section 4).

t ~ U(0, 1), shifted (s = 5), clamped to [20, 980] / 1000;  x_t = (1 - t) x + t eps
x0_real = teacher with CFG:  uncond + w (cond - uncond)        (frozen)
          optionally rescaled:   phi * x0_real * std(cond) / std(x0_real) + (1 - phi) * x0_real
x0_fake = critic, no guidance                                  (trained on the generator's videos)
g = (x0_fake - x0_real) / mean(|x - x0_real|)                  (per sample, made finite)
loss = 0.5 * mse(x, (x - g).detach())                          -> d loss / d x = g / numel
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..diffusion.flow_matching import add_noise, shift_sigma, x0_from_velocity


def dmd_sigma(
    batch: int, generator: torch.Generator, shift: float = 5.0, min_t: float = 20.0, max_t: float = 980.0
) -> torch.Tensor:
    """One noise level per video ``[B]``: uniform, shifted, clamped to [min_t, max_t] / 1000."""
    sigma = shift_sigma(torch.rand(batch, generator=generator), shift)
    return sigma.clamp(min_t / 1000, max_t / 1000)


def score_x0(
    model,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    cond,
    uncond=None,
    guidance: float | torch.Tensor = 1.0,
    rescale: float = 0.0,
) -> torch.Tensor:
    """A bidirectional model's x0 prediction for ``x_t: [B, F, C, H, W]``, with CFG when ``guidance != 1``.

    rescale (phi in [0, 1], Lin et al. 2024, "Common diffusion noise schedules are flawed"): pull the
    guided prediction's per-video standard deviation back towards the conditional one's. CFG inflates
    it, which shows as over-saturated colours and swollen objects in what a DMD student learns.
    guidance: a number, or one per video ``[B]`` (see ``guidance_per_video``).
    """
    if uncond is None or (not torch.is_tensor(guidance) and guidance == 1.0):
        return x0_from_velocity(x_t, model(x_t, sigma, cond), sigma)
    if torch.is_tensor(guidance):
        guidance = guidance.to(x_t.device, x_t.dtype).view(-1, *[1] * (x_t.dim() - 1))
    v_c, v_u = model.cond_uncond_velocities(x_t, sigma, cond, uncond)
    x0_c, x0_u = x0_from_velocity(x_t, v_c, sigma), x0_from_velocity(x_t, v_u, sigma)
    guided = x0_u + guidance * (x0_c - x0_u)  # CFG, in x0 (linear in v, so the same as guiding v)
    if rescale == 0.0:
        return guided
    dims = tuple(range(1, guided.dim()))
    ratio = x0_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return rescale * guided * ratio + (1 - rescale) * guided


def guidance_per_video(
    sigma: torch.Tensor, guidance: float, min_sigma: float = 0.0, max_sigma: float = 1.0
) -> torch.Tensor | float:
    """CFG in a limited interval (Kynkaanniemi et al. 2024): ``guidance`` where
    ``min_sigma <= sigma <= max_sigma``, 1 (no guidance) outside it. ``sigma: [B]`` -> ``[B]``."""
    if min_sigma <= 0.0 and max_sigma >= 1.0:
        return guidance
    inside = (sigma >= min_sigma) & (sigma <= max_sigma)
    return torch.where(inside, guidance, 1.0)


@dataclass
class Scores:
    """The two scores DMD and SiD compare: the real one (the frozen teacher, with CFG ``guidance`` and
    ``rescale`` as in ``score_x0``) and the fake one (the critic, prompt only)."""

    teacher: torch.nn.Module
    critic: torch.nn.Module
    cond: tuple[torch.Tensor, torch.Tensor]
    uncond: tuple[torch.Tensor, torch.Tensor]
    guidance: float | torch.Tensor
    rescale: float = 0.0

    def x0(self, x_t: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_real, x0_fake)`` for ``x_t: [B, F, C, H, W]`` at ``sigma [B]``."""
        real = score_x0(self.teacher, x_t, sigma, self.cond, self.uncond, self.guidance, self.rescale)
        return real, score_x0(self.critic, x_t, sigma, self.cond)


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """g = (x0_fake - x0_real) / mean(|x - x0_real|) per sample, with NaN/inf replaced by 0."""
    dims = tuple(range(1, x.dim()))
    normalizer = (x - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / normalizer, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * mse(x, (x - g).detach()): its gradient with respect to x is g / x.numel()."""
    g = dmd_gradient(x.detach().float(), x0_real.detach().float(), x0_fake.detach().float())
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - g))


def dmd_generator_loss(
    x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, scores: Scores
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DMD loss of a generated video ``x: [B, F, C, H, W]`` (with gradient to the generator), scored
    at ``x_t = add_noise(x, noise, sigma)`` with ``sigma [B]`` from ``dmd_sigma``."""
    with torch.no_grad():
        x0_real, x0_fake = scores.x0(add_noise(x.detach(), noise, sigma), sigma)
    loss = dmd_loss(x, x0_real, x0_fake)
    return loss, {"dmd/real_fake_gap": float((x0_real - x0_fake).abs().mean()), "dmd/sigma": float(sigma.mean())}
