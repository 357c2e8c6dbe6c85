"""Adversarial loss on the generated video (METHOD.md section 4, GAN).

The discriminator is the critic's DiT backbone plus a small head: learned register tokens
cross-attend to the tokens of a few intermediate blocks ("taps"), and an MLP maps them to one logit
per video. Videos are noised to a random level first (as the critic sees them).

    generator:      softplus(-D(fake))                       non-saturating
                    softplus(-(D(fake) - D(real)))           relativistic
    discriminator:  softplus(-D(real)) + softplus(D(fake))   (or the relativistic pair)
                    + gamma * (R1 on real + R2 on fake),  R(x) = ((D(x + s e) - D(x)) / s)^2, s = 0.01
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..device import cpu_randn_like
from ..diffusion.flow_matching import add_noise


class DiscriminatorHead(nn.Module):
    """Register tokens cross-attending to tapped block outputs ``[B, L, dim]``, then an MLP -> ``[B]``."""

    def __init__(self, dim: int, num_taps: int, num_registers: int = 4, num_heads: int = 4):
        super().__init__()
        self.registers = nn.Parameter(torch.randn(num_registers, dim) * 0.02)
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, num_heads, batch_first=True) for _ in range(num_taps))
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(num_taps * dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        b = features[0].shape[0]
        regs = self.registers.expand(b, -1, -1).to(features[0].dtype)
        pooled = [
            attn(regs, self.norm(f), self.norm(f), need_weights=False)[0].mean(1)
            for attn, f in zip(self.attn, features, strict=True)
        ]
        return self.mlp(torch.cat(pooled, dim=-1)).squeeze(-1)


class Discriminator(nn.Module):
    """D(x) for videos ``x: [B, F, C, H, W]``: the critic's model (a TextToVideo) with a head on its taps."""

    def __init__(self, critic, taps: tuple[int, ...]):
        super().__init__()
        n = critic.dit.cfg.num_layers
        if not taps or any(not 0 <= t < n for t in taps):
            raise ValueError(f"discriminator taps must be block indices in 0..{n - 1}, got {taps}")
        self.critic, self.taps = critic, tuple(taps)
        self.head = DiscriminatorHead(critic.dit.cfg.dim, len(taps))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text) -> torch.Tensor:
        """Logits ``[B]`` for ``x`` noised to ``sigma [B]`` (the noise is the caller's, for R1/R2 pairing)."""
        _, features = self.critic.dit(x, sigma * 1000, text[0], text[1], taps=self.taps)
        return self.head(features)


def gan_generator_loss(d_fake: torch.Tensor, d_real: torch.Tensor | None = None) -> torch.Tensor:
    """Non-saturating softplus(-D(fake)), or relativistic softplus(-(D(fake) - D(real))) given d_real."""
    return F.softplus(-(d_fake if d_real is None else d_fake - d_real)).mean()


def gan_discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor, relativistic: bool = False) -> torch.Tensor:
    if relativistic:
        return F.softplus(-(d_real - d_fake)).mean()
    return (F.softplus(-d_real) + F.softplus(d_fake)).mean()


def finite_difference_penalty(
    disc, x: torch.Tensor, d_x: torch.Tensor, g: torch.Generator, step: float = 0.01
) -> torch.Tensor:
    """Approximate R1/R2: mean(((D(x + s e) - D(x)) / s)^2) with e ~ N(0, I), s = ``step``.

    ``disc(x) -> [B]``; ``d_x = disc(x)``. In expectation this is the squared gradient norm of D at x.
    """
    e = cpu_randn_like(x, g)
    return (((disc(x + step * e) - d_x) / step) ** 2).mean()


def noised(x: torch.Tensor, sigma: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x at noise level sigma [B], with noise from g."""
    return add_noise(x, cpu_randn_like(x, g), sigma)
