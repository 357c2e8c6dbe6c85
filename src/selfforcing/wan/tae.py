"""TAEW2.1: the tiny preview decoder for Wan2.1 latents (TAEHV by Ollin Boer Bohan, MIT), as a ``Codec``.

A 2D convolutional decoder, run frame by frame, with three kinds of layers that give it time:
- ``MemBlock``: a residual block whose convolution also sees the *previous* frame's input to the
  block (zeros before the first frame);
- ``TGrow``: a 1x1 convolution to ``stride x`` channels, split into ``stride`` consecutive frames;
- spatial 2x nearest upsampling.
Each latent frame becomes 4 video frames (two ``TGrow`` of stride 2), the first 3 frames of a video
are dropped (so 1 + 4k frames come out of 1 + k latents, as from the Wan VAE), and the output is in
[0, 1] (mapped here to [-1, 1]). It reads the DiT's latents as they are: no mean/std normalisation.

Loads ``taew2_1.pth`` / ``taew2_1.safetensors`` (its ``decoder.*`` keys; the encoder is not used).
The streaming decoder runs one latent frame at a time (its 4 video frames in parallel), feeding each
``MemBlock`` the last frame it saw before, so a stream decodes exactly as the whole video does, and a
chunk of 3 latent frames at 832x480 needs a third of the working memory of decoding it at once.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.codec import Codec
from ..weights import state_mismatches
from .dit_weights import CheckpointError, load_torch_file, read_safetensors


def conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """A soft clamp of the latents to (-3, 3): 3 tanh(x / 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * torch.tanh(x / 3)


class MemBlock(nn.Module):
    """relu(conv([x, x_prev]) + x), with x and x_prev: [N, C, H, W] this frame's and the previous frame's input."""

    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(2 * n, n), nn.ReLU(), conv3x3(n, n), nn.ReLU(), conv3x3(n, n)
        )  # keys conv.0, conv.2, conv.4

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + x)


class TGrow(nn.Module):
    """One frame -> ``stride`` frames: a 1x1 conv to ``stride * C`` channels, split in time order."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, T, C, H, W] -> [N, T * stride, C, H, W]."""
        n, t, c, h, w = x.shape
        return self.conv(x.flatten(0, 1)).view(n, t * self.stride, c, h, w)


class TAEDecoder(nn.Module):
    """TAEHV's decoder; ``self.layers`` keeps the published ``nn.Sequential`` indices (``decoder.3.conv.0``)."""

    def __init__(self, latent_channels: int = 16, widths=(256, 128, 64, 64), time_upscale=(False, True, True)):
        super().__init__()
        w = widths
        layers: list[nn.Module] = [Clamp(), conv3x3(latent_channels, w[0]), nn.ReLU()]
        for stage in range(3):
            layers += [MemBlock(w[stage]) for _ in range(3)]
            layers += [nn.Upsample(scale_factor=2), TGrow(w[stage], 2 if time_upscale[stage] else 1)]
            layers += [conv3x3(w[stage], w[stage + 1], bias=False)]
        layers += [nn.ReLU(), conv3x3(w[3], 3)]
        self.layers = nn.Sequential(*layers)
        self.time_upscale = 2 ** sum(time_upscale)

    def forward(self, z: torch.Tensor, memory: list[torch.Tensor | None]) -> torch.Tensor:
        """z: [N, T, C, h, w] latents -> frames [N, T * 4, 3, 8h, 8w] in [0, 1] (before trimming).
        ``memory[i]``: the last frame MemBlock i saw before this call, [N, C, H, W] (None: zeros);
        updated in place."""
        x = z
        for i, layer in enumerate(self.layers):
            if isinstance(layer, MemBlock):
                prev = torch.zeros_like(x[:, :1]) if memory[i] is None else memory[i][:, None]
                past = torch.cat([prev, x[:, :-1]], dim=1)  # each frame's previous frame
                memory[i] = x[:, -1]
                x = layer(x.flatten(0, 1), past.flatten(0, 1)).unflatten(0, x.shape[:2])
            elif isinstance(layer, TGrow):
                x = layer(x)
            else:
                x = layer(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        return x.clamp(0, 1)


def load_tae(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> TAEW21:
    """TAEW2.1 from ``taew2_1.pth`` or ``taew2_1.safetensors`` (only its ``decoder.*`` weights are read)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = read_safetensors([path])
    else:
        state = load_torch_file(path, "TAEW2.1 weights, taew2_1.pth")
    state = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    if not state:
        raise CheckpointError(f"{path} has no decoder.* weights: not a TAEHV checkpoint (expected taew2_1.pth)")
    decoder = TAEDecoder(latent_channels=state["1.weight"].shape[1] if "1.weight" in state else 16)
    expected = {k.removeprefix("layers."): v for k, v in decoder.state_dict().items()}
    for i, layer in enumerate(decoder.layers):  # a stride-1 TGrow keeps the last frame's channels of a wider one
        key = f"{i}.conv.weight"
        if isinstance(layer, TGrow) and key in state and state[key].shape[0] > expected[key].shape[0]:
            state[key] = state[key][-expected[key].shape[0] :]
    problems = state_mismatches(expected, state)
    if problems:
        raise CheckpointError("\n".join([f"{path} does not match the TAEW2.1 decoder:", *problems]))
    decoder.layers.load_state_dict(state)
    return TAEW21(decoder.to(device=device, dtype=dtype).eval().requires_grad_(False))


class TAEW21(Codec):
    """A decode-only preview ``Codec`` for Wan2.1 latents: [B, 1 + k, 16, h, w] -> [B, 1 + 4k, 3, 8h, 8w]."""

    spatial_compression = 8
    temporal_compression = 4
    keeps_first_frame = True

    def __init__(self, decoder: TAEDecoder):
        self.decoder = decoder
        self.latent_channels = decoder.layers[1].in_channels
        self.trim = decoder.time_upscale - 1  # frames before the video's first

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("TAEW2.1 is loaded as a preview decoder: encode with the Wan VAE (load_vae)")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.stream_decoder()(latents)

    def stream_decoder(self):
        memory: list = [None] * len(self.decoder.layers)
        done = [0]  # latent frames decoded so far

        @torch.no_grad()
        def decode(latents: torch.Tensor) -> torch.Tensor:
            if latents.dim() != 5 or latents.shape[2] != self.latent_channels:
                raise ValueError(f"expected latents [B, f, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
            p = next(self.decoder.parameters())
            z = latents.to(p.device, p.dtype)
            frames = torch.cat([self.decoder(z[:, i : i + 1], memory) for i in range(z.shape[1])], 1) * 2 - 1
            skip = self.trim if done[0] == 0 else 0
            done[0] += latents.shape[1]
            return frames[:, skip:]

        return decode
