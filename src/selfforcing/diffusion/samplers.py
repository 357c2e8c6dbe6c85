"""Samplers as pure functions sharing one signature (k-diffusion style).

``model(x, sigma) -> v`` takes ``x: [B, F, C, H, W]`` and per-frame noise levels ``sigma: [B, F]`` and
returns the predicted velocity. Samplers take that function, starting noise and a sigma schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..device import cpu_randn_like
from .flow_matching import add_noise, x0_from_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None]  # (step, num_steps, current x0 estimate)


def _frame_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-frame noise levels ``[B, F]`` in fp32 (a bf16 timestep would round 937.5 to 936)."""
    return torch.as_tensor(sigma).to(x.device, torch.float32).expand(x.shape[0], x.shape[1])


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


def sample_few_step(
    model: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    exit_step: int | None = None,
    grad: bool = False,
    zero_sigma: float | None = None,
) -> torch.Tensor:
    """Few-step sampling of the distilled student: predict x0, re-noise it with fresh noise to the next level.

    ``sigmas`` are the (warped) step levels, e.g. ``warp_timesteps([1000, 750, 500, 250], 5) / 1000``,
    without a trailing 0. Runs the first ``exit_step`` levels (default: all) and returns that step's
    x0 prediction. Only the exit step may carry gradient (``grad``; stochastic gradient truncation,
    METHOD.md section 2). Fresh noise is drawn on the CPU from ``generator``, so a seed gives the same
    result on any device. A last level of 0 is a final step at t = 0 (Krea Realtime): the model sees t = 0,
    and the re-noise before it and its x0 compute with ``zero_sigma`` (``flow_matching.zero_step_sigma``).
    """
    steps = len(sigmas) if exit_step is None else exit_step
    if not 1 <= steps <= len(sigmas):
        raise ValueError(f"exit_step must be in 1..{len(sigmas)}, got {exit_step}")
    if sigmas[-1] == 0 and zero_sigma is None:
        raise ValueError("a step list ending at t = 0 needs zero_sigma, the noise level that step computes with")
    levels = sigmas.clone()
    if sigmas[-1] == 0:
        levels[-1] = zero_sigma
    x = noise
    for i in range(steps):
        last = i + 1 == steps
        with torch.set_grad_enabled(grad and last):
            x0 = x0_from_velocity(x, model(x, _frame_sigma(sigmas[i], x)), levels[i])
        if callback is not None:
            callback(i, len(sigmas), x0)
        if last:
            return x0
        fresh = cpu_randn_like(x, generator)
        x = add_noise(x0, fresh, levels[i + 1])
    return x
