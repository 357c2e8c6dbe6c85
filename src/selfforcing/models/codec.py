"""Codecs map pixel videos to the model's latent space and back.

The shapes world works in pixel space (``IdentityCodec``); a video VAE (e.g. Wan2.1's: 4x temporal,
8x spatial, 16 channels, first frame kept) implements the same interface, and the model and the
training code only ever see ``Codec``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class Codec:
    """Interface. Pixel videos are ``[B, F, 3, H, W]`` in [-1, 1]; latents ``[B, f, C, h, w]``."""

    latent_channels: int
    spatial_compression: int
    temporal_compression: int
    keeps_first_frame: bool  # causal video VAEs encode frame 0 alone: f = 1 + (F - 1) / temporal

    def encode(self, video: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def stream_decoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A decoder for one stream: called on its latent chunks in order, it returns each chunk's frames,
        and all of them together equal ``decode`` of the whole latents. A codec whose frames decode
        independently needs no state, so by default this is ``decode``; a causal video VAE carries its
        convolutions' cache from chunk to chunk."""
        return self.decode

    def stream_encoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """An encoder for one input video: called on its frames in order (the first call 1 + t k frames for a
        codec that keeps the first frame, every call a multiple of t), it returns their latents, and all of them
        together equal ``encode`` of the whole video (video-to-video reads its input chunk by chunk)."""
        return self.encode

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(f, C, h, w) of the latents of a ``frames x height x width`` video; raises if impossible."""
        s, tc = self.spatial_compression, self.temporal_compression
        if height % s or width % s:
            raise ValueError(f"height and width must be multiples of {s} for this codec, got {height}x{width}")
        if self.keeps_first_frame:
            if frames < 1 or (frames - 1) % tc:
                raise ValueError(f"frame count must be 1 + {tc} * k for this codec, got {frames}")
            f = 1 + (frames - 1) // tc
        else:
            if frames < 1 or frames % tc:
                raise ValueError(f"frame count must be a positive multiple of {tc} for this codec, got {frames}")
            f = frames // tc
        return f, self.latent_channels, height // s, width // s

    def pixel_frames(self, latent_frames: int) -> int:
        """Number of pixel frames decoded from ``latent_frames`` latent frames."""
        tc = self.temporal_compression
        return 1 + (latent_frames - 1) * tc if self.keeps_first_frame else latent_frames * tc


class IdentityCodec(Codec):
    """Pixel space: latents are the pixels themselves."""

    latent_channels = 3
    spatial_compression = 1
    temporal_compression = 1
    keeps_first_frame = False

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"expected a video [B, F, 3, H, W], got shape {tuple(video.shape)}")
        return video

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)
