"""ODE-regression initialisation of the causal student (METHOD.md section 5, after CausVid).

The student sees a teacher trajectory with every chunk at its own randomly drawn level of the
student's few-step list, runs one full-sequence forward with the block-causal mask, and regresses the
teacher's clean result: ``loss = mse(x_t - sigma * v_student, x0_teacher)``. With
``ode.include_clean`` a chunk may also be drawn clean (sigma = 0, the cache-commit level): it adds no
loss of its own but teaches later chunks to read clean context, as they do at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..diffusion.flow_matching import x0_from_velocity
from ..models.causal import block_causal_mask
from .objective import Objective, Setup
from .ode_pairs import ODEPairs


def pick_levels(
    trajectory: torch.Tensor, levels: torch.Tensor, frames_per_block: int, include_clean: bool, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put each chunk at its own random trajectory entry.

    trajectory: [B, L, F, C, H, W], entry j at noise level ``levels[j]`` (the last entry clean, level 0).
    Returns ``x_t [B, F, C, H, W]`` and the per-frame levels ``sigma [B, F]``.
    """
    b, num_levels, f = trajectory.shape[:3]
    choices = num_levels if include_clean else num_levels - 1
    pick = torch.randint(choices, (b, f // frames_per_block), generator=g)
    pick = pick.repeat_interleave(frames_per_block, dim=1).to(trajectory.device)  # [B, F]
    x_t = trajectory[torch.arange(b, device=pick.device)[:, None], pick, torch.arange(f, device=pick.device)]
    return x_t, levels.to(trajectory.device)[pick]


def ode_regression_loss(
    model, trajectory: torch.Tensor, levels: torch.Tensor, prompts: list[str], cfg: TrainConfig, g: torch.Generator
) -> torch.Tensor:
    """mse(x_t - sigma * v, x0) over the block-causal full sequence, each chunk at its own level."""
    x_t, sigma = pick_levels(trajectory, levels, cfg.causal.frames_per_block, cfg.ode.include_clean, g)
    return x0_mse(model, x_t, sigma, trajectory[:, -1], prompts, cfg)


def x0_mse(model, x_t: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, prompts: list[str], cfg: TrainConfig):
    """mse(x_t - sigma * v, x0) of the student under the block-causal mask; x_t, x0: [B, F, C, H, W], sigma: [B, F]."""
    c = cfg.causal
    f, h, w = model.dit.token_grid(*x0.shape[1:2], *x0.shape[-2:])
    mask = block_causal_mask(f, h * w, c.frames_per_block, c.window, c.sink).to(x_t.device)
    v = model(x_t, sigma, model.encode_text(prompts), attn_mask=mask)
    return F.mse_loss(x0_from_velocity(x_t, v, sigma).float(), x0.float())


def load_student_pairs(cfg: TrainConfig, codec) -> tuple[ODEPairs, torch.Tensor]:
    """The ODE pairs in ``cfg.ode.pairs``, checked against the student's noise levels and the data's
    latent shape, and the levels of their trajectory entries ``[S + 1]`` (the last 0, clean)."""
    pairs = ODEPairs(cfg.ode.pairs)
    want = cfg.causal.sigmas()
    if len(want) != len(pairs.sigmas) or not torch.allclose(want, pairs.sigmas, atol=1e-6):
        raise ValueError(
            f"the ODE pairs in {cfg.ode.pairs} sit at noise levels {pairs.sigmas.tolist()} but the student "
            f"uses {want.tolist()} (causal.denoising_steps warped by causal.shift): make pairs with the "
            "student's --student-steps/--student-shift"
        )
    if list(codec.latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width)) != pairs.index["latent_shape"]:
        raise ValueError(
            f"the ODE pairs hold latents {pairs.index['latent_shape']} but data is "
            f"{cfg.data.frames}x{cfg.data.height}x{cfg.data.width}: set data.* to the teacher's size"
        )
    return pairs, torch.cat([pairs.sigmas, torch.zeros(1)])


class ODERegression(Objective):
    """``stage: ode_init``: regresses a causal student (from ``init_from``, usually the teacher) on ODE pairs."""

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.pairs, self.levels = load_student_pairs(self.cfg, self.codec)

    def loss(self, kind: str, k: int, step: int, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        trajectory, prompts = self.pairs.sample(self.cfg.batch_size, g)
        return ode_regression_loss(self.model, trajectory.to(self.device), self.levels, prompts, self.cfg, g), {}
