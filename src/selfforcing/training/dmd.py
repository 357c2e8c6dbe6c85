"""Distribution matching distillation (DMD) on the generated video (METHOD.md section 4).

t ~ U(0, 1), shifted (s = 5), clamped to [20, 980] / 1000;  x_t = (1 - t) x + t eps
x0_real = teacher with CFG:  uncond + w (cond - uncond)        (frozen)
x0_fake = critic, no guidance                                  (trained on the generator's videos)
g = (x0_fake - x0_real) / mean(|x - x0_real|)                  (per sample, made finite)
loss = 0.5 * mse(x, (x - g).detach())                          -> d loss / d x = g / numel
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..diffusion.flow_matching import add_noise, shift_sigma, x0_from_velocity


def dmd_sigma(
    batch: int, generator: torch.Generator, shift: float = 5.0, min_t: float = 20.0, max_t: float = 980.0
) -> torch.Tensor:
    """One noise level per video ``[B]``: uniform, shifted, clamped to [min_t, max_t] / 1000."""
    sigma = shift_sigma(torch.rand(batch, generator=generator), shift)
    return sigma.clamp(min_t / 1000, max_t / 1000)


def score_x0(model, x_t: torch.Tensor, sigma: torch.Tensor, cond, uncond=None, guidance: float = 1.0) -> torch.Tensor:
    """A bidirectional model's x0 prediction for ``x_t: [B, F, C, H, W]``, with CFG when ``guidance != 1``."""
    if uncond is None or guidance == 1.0:
        v = model(x_t, sigma, cond)
    else:
        v = model.velocity_with_cfg(x_t, sigma, cond, uncond, guidance)
    return x0_from_velocity(x_t, v, sigma)


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
    x: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    teacher,
    critic,
    cond,
    uncond,
    guidance: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DMD loss of a generated video ``x: [B, F, C, H, W]`` (with gradient to the generator), scored
    at ``x_t = add_noise(x, noise, sigma)`` with ``sigma [B]`` from ``dmd_sigma``."""
    with torch.no_grad():
        x_t = add_noise(x.detach(), noise, sigma)
        x0_real = score_x0(teacher, x_t, sigma, cond, uncond, guidance)
        x0_fake = score_x0(critic, x_t, sigma, cond)
    loss = dmd_loss(x, x0_real, x0_fake)
    return loss, {"dmd/real_fake_gap": float((x0_real - x0_fake).abs().mean()), "dmd/sigma": float(sigma.mean())}
