"""A text-to-video model: a text encoder and a velocity-predicting DiT, used together."""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion.flow_matching import NUM_TRAIN_TIMESTEPS
from .dit import VideoDiT
from .text_encoder import TextEncoder

Text = tuple[torch.Tensor, torch.Tensor | None]  # (embeddings [B, L, D], mask [B, L] or None: attend to all)


class TextToVideo(nn.Module):
    def __init__(self, text_encoder: TextEncoder, dit: VideoDiT):
        super().__init__()
        self.text_encoder = text_encoder
        self.dit = dit

    def encode_text(self, prompts: list[str]) -> Text:
        return self.text_encoder(prompts)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: Text, **kw) -> torch.Tensor:
        """Velocity for x: [B, F, C, H, W] at noise levels sigma: [B] or [B, F]."""
        return self.dit(x, sigma * NUM_TRAIN_TIMESTEPS, text[0], text[1], **kw)

    def velocity_with_cfg(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Text, uncond: Text, scale: float
    ) -> torch.Tensor:
        """Classifier-free guidance in one batched call: v_u + scale * (v_c - v_u) (DiT's forward_with_cfg)."""
        if scale == 1.0:
            return self(x, sigma, cond)
        v_c, v_u = self.cond_uncond_velocities(x, sigma, cond, uncond)
        return v_u + scale * (v_c - v_u)

    def cond_uncond_velocities(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Text, uncond: Text
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v_c, v_u)``, the velocities with the prompt and with the empty prompt, in one batched call."""
        length = max(cond[0].shape[1], uncond[0].shape[1])
        emb = torch.cat([_pad(cond[0], length), _pad(uncond[0], length)])
        if (cond[1] is None) != (uncond[1] is None):
            raise ValueError("the prompt and the empty prompt must both have a text mask or both have none")
        mask = None if cond[1] is None else torch.cat([_pad(cond[1], length), _pad(uncond[1], length)])
        v_c, v_u = self(torch.cat([x, x]), torch.cat([sigma, sigma]), (emb, mask)).chunk(2)
        return v_c, v_u


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 of ``t`` to ``length`` (False for bool masks)."""
    if t.shape[1] == length:
        return t
    pad = torch.zeros(t.shape[0], length - t.shape[1], *t.shape[2:], dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)
