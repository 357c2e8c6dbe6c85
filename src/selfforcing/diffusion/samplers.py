"""Samplers as pure functions sharing one signature (k-diffusion style).

``model(x, sigma) -> v`` takes ``x: [B, F, C, H, W]`` and per-frame noise levels ``sigma: [B, F]`` and
returns the predicted velocity. Samplers take that function, starting noise and a sigma schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .flow_matching import add_noise, x0_from_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None]  # (step, num_steps, current x0 estimate)


def _frame_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.device, x.dtype).expand(x.shape[0], x.shape[1])


@torch.no_grad()
def sample_euler(
    model: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler integration of dx/dsigma = v from sigmas[0] to sigmas[-1]: x <- x + (s_next - s) * v."""
    x = noise
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = model(x, _frame_sigma(s, x))
        if callback is not None:
            callback(i, n, x0_from_velocity(x, v, s))
        x = x + (s_next - s).to(x.dtype) * v
    return x


@torch.no_grad()
def sample_few_step(
    model: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Few-step sampling of the distilled student: predict x0, re-noise it with fresh noise to the next level.

    ``sigmas`` are the (warped) step levels, e.g. ``warp_timesteps([1000, 750, 500, 250], 5) / 1000``,
    without a trailing 0: the last prediction is returned as the clean sample.
    """
    x = noise
    for i, s in enumerate(sigmas):
        x0 = x0_from_velocity(x, model(x, _frame_sigma(s, x)), s)
        if callback is not None:
            callback(i, len(sigmas), x0)
        if i + 1 == len(sigmas):
            return x0
        fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = add_noise(x0, fresh, sigmas[i + 1])
    return x
