"""Rectified-flow (flow matching) math, as in METHOD.md section 3.

Conventions: ``sigma`` in [0, 1] is the noise level, ``t = 1000 * sigma`` the timestep the network sees.
    x_t = (1 - sigma) * x0 + sigma * noise
    v   = noise - x0                       (the network predicts v)
    x0  = x_t - sigma * v
All functions broadcast ``sigma`` against ``x`` from the left: ``sigma`` may be a float, ``[B]`` or
``[B, F]`` for videos ``x: [B, F, C, H, W]`` (per-frame noise levels).
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def _expand(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Right-pad ``sigma`` with singleton dims so it broadcasts against ``x``."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(sigma.shape + (1,) * (x.dim() - sigma.dim()))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise."""
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target v = noise - x0."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0 = x_t - sigma * v."""
    return x_t - _expand(sigma, x_t) * v


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """v = (x_t - x0) / sigma (undefined at sigma = 0)."""
    return (x_t - x0) / _expand(sigma, x_t)


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Timestep shift: sigma' = s * sigma / (1 + (s - 1) * sigma). s > 1 spends more steps at high noise."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigmas_to_timesteps(sigma: torch.Tensor) -> torch.Tensor:
    """t = 1000 * sigma."""
    return sigma * NUM_TRAIN_TIMESTEPS


def sampling_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """Noise levels for a ``num_steps`` Euler sampler: ``[num_steps + 1]`` from 1 down to 0, shifted."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


def _step_list(timesteps: list[float] | torch.Tensor) -> list[float]:
    """A few-step list checked as numbers, before any tensor exists: 1-D, in (0, 1000], strictly decreasing;
    the last may be 0 (a final step at t = 0, as Krea Realtime's list ends: ``zero_step_sigma``)."""
    values = torch.as_tensor(timesteps, dtype=torch.float64).tolist() if torch.is_tensor(timesteps) else timesteps
    if not isinstance(values, list | tuple) or not values or any(isinstance(v, list) for v in values):
        raise ValueError("timesteps must be a non-empty 1-D list")
    values = [float(v) for v in values]
    if any(v <= 0 or v > NUM_TRAIN_TIMESTEPS for v in values[:-1]) or not 0 <= values[-1] <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"timesteps must lie in (0, {NUM_TRAIN_TIMESTEPS}] (the last may be 0), got {values}")
    if values == [0.0]:
        raise ValueError("timesteps need a step above t = 0 (0 may only end the list)")
    if any(b >= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"timesteps must be strictly decreasing, got {values}")
    return values


def warp_timesteps(timesteps: list[float] | torch.Tensor, shift: float) -> torch.Tensor:
    """Warp a few-step list through the shifted schedule.

    ``[1000, 750, 500, 250]`` with shift 5 gives ``[1000, 937.5, 833.3, 625]``: each t is read as
    sigma = t / 1000 on the unshifted grid and mapped to its shifted noise level.
    """
    sigma = shift_sigma(torch.tensor(_step_list(timesteps), dtype=torch.float64) / NUM_TRAIN_TIMESTEPS, shift)
    return (sigma * NUM_TRAIN_TIMESTEPS).float()


def zero_step_sigma(shift: float) -> float:
    """The noise level a step at t = 0 computes with: the schedule's smallest, shift(1 / 1000) (0.00498 for
    shift 5). The reference schedulers map a timestep to the nearest of their 1000 levels, which for t = 0 is
    this one: the model sees t = 0, and x0 = x - sigma * v and the re-noise before it use this sigma."""
    return float(shift_sigma(torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64), shift))


def step_sigmas(timesteps: list[float] | torch.Tensor, shift: float, warp: bool = True) -> torch.Tensor:
    """The noise levels ``[S]`` of a few-step list: warped through the shift (``warp_timesteps``, Self
    Forcing's lists), or read as they are, sigma = t / 1000 (CausVid's [1000, 757, 522], timesteps already
    on its shifted schedule)."""
    if warp:
        return warp_timesteps(timesteps, shift) / NUM_TRAIN_TIMESTEPS
    return torch.tensor(_step_list(timesteps), dtype=torch.float32) / NUM_TRAIN_TIMESTEPS


def sample_training_sigmas(
    batch: int,
    generator: torch.Generator | None = None,
    distribution: str = "logit_normal",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Noise levels for flow-matching training, ``[batch]``.

    ``uniform``: sigma ~ U(0, 1); ``logit_normal``: sigma = sigmoid(N(mean, std)) (SD3), which spends
    the budget on mid-range noise. Either is then passed through the timestep shift.
    """
    if distribution == "uniform":
        sigma = torch.rand(batch, generator=generator)
    elif distribution == "logit_normal":
        sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator))
    else:
        raise ValueError(f"unknown timestep distribution {distribution!r}: use 'uniform' or 'logit_normal'")
    return shift_sigma(sigma, shift).to(device)
