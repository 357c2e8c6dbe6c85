"""Score identity distillation (SiD) on the generated video (METHOD.md section 4).

    x_t = (1 - t) x + t eps, t drawn as for DMD (shifted, clamped to [20, 980] / 1000: the bound the
    reference left unset is set here)
    loss = mean( (x0_real - x0_fake) * ((x0_real - x) - alpha * (x0_real - x0_fake)) / mean(|x - x0_real|) )
The scores are evaluated on x_t built from x *with* gradient, so the generator's gradient flows through
x directly and through both (frozen) score networks' inputs; alpha (default 1) weighs the second term.
"""

from __future__ import annotations

import torch

from ..diffusion.flow_matching import add_noise
from .dmd import Scores


def sid_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The SiD generator loss for ``x: [B, ...]``; the normalizer mean(|x - x0_real|) is per sample, detached."""
    dims = tuple(range(1, x.dim()))
    x, x0_real, x0_fake = x.double(), x0_real.double(), x0_fake.double()
    with torch.no_grad():
        normalizer = (x - x0_real).abs().mean(dim=dims, keepdim=True)
    diff = x0_real - x0_fake
    loss = diff * ((x0_real - x) - alpha * diff) / normalizer
    return torch.nan_to_num(loss).mean().float()


def sid_generator_loss(
    x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, scores: Scores, alpha: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """The SiD loss of a generated video ``x: [B, F, C, H, W]`` (with gradient to the generator), scored
    at ``x_t = add_noise(x, noise, sigma)`` with ``sigma [B]`` from ``dmd_sigma``."""
    x0_real, x0_fake = scores.x0(add_noise(x, noise, sigma), sigma)
    loss = sid_loss(x, x0_real, x0_fake, alpha)
    gap = float((x0_real - x0_fake).detach().abs().mean())
    return loss, {"sid/real_fake_gap": gap, "sid/sigma": float(sigma.mean())}
