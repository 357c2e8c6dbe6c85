"""The Wan2.1 video VAE behind the ``Codec`` interface, with a streaming decoder.

The network is diffusers' ``AutoencoderKLWan`` (4x temporal, 8x spatial, 16 channels, causal 3D
convolutions: frame 0 is coded alone, so 81 frames <-> 21 latent frames). This module adds:

- the latent normalisation the DiT was trained on: ``z = (mu - mean) / std`` per channel;
- loading the original ``Wan2.1_VAE.pth`` (the ``WanVAE_`` key names, renamed by explicit rules) as
  well as the diffusers ``vae/`` folder;
- ``WanStreamDecoder``: decodes chunk after chunk of latents, keeping the causal convolutions' cache
  between calls. diffusers' ``decode`` runs the decoder one latent frame at a time over a cache it
  clears at every call; the stream decoder runs the same per-frame loop over a cache it keeps, so the
  frames of a whole stream equal one ``decode`` of all its latents.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..models.codec import Codec
from ..weights import state_mismatches
from .dit_weights import CheckpointError, load_torch_file

ORIGINAL_VAE_NAME = "Wan2.1_VAE.pth"

# Inside a residual block, nn.Sequential indices of the original -> diffusers names
# (0 RMS_norm, 1 SiLU, 2 CausalConv3d, 3 RMS_norm, 4 SiLU, 5 Dropout, 6 CausalConv3d).
_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2"}
_RESIDUAL["shortcut"] = "conv_shortcut"


def _residual_key(rest: str, key: str) -> str:
    for old, new in _RESIDUAL.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise CheckpointError(f"unexpected Wan VAE key {key!r} (not a residual-block parameter)")


def original_vae_key(key: str, num_res_blocks: int = 2) -> str:
    """One ``WanVAE_`` key -> its ``AutoencoderKLWan`` key, e.g. ``decoder.upsamples.3.resample.1.weight``
    -> ``decoder.up_blocks.0.upsamplers.0.resample.1.weight``. ``num_res_blocks`` groups the decoder's
    flat list into stages of ``num_res_blocks + 1`` residual blocks and one upsampler."""
    if key.startswith(("conv1.", "conv2.")):  # the 1x1 convs around the latent
        return ("quant_conv" if key.startswith("conv1.") else "post_quant_conv") + key[5:]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        raise CheckpointError(f"unexpected Wan VAE key {key!r}")
    if rest.startswith("conv1."):
        return f"{side}.conv_in{rest[5:]}"
    if m := re.fullmatch(r"head\.([02])\.(.+)", rest):
        return f"{side}.{'norm_out' if m[1] == '0' else 'conv_out'}.{m[2]}"
    if m := re.fullmatch(r"middle\.([012])\.(.+)", rest):
        if m[1] == "1":  # the attention block keeps its names
            return f"{side}.mid_block.attentions.0.{m[2]}"
        return f"{side}.mid_block.resnets.{int(m[1]) // 2}.{_residual_key(m[2], key)}"
    if (m := re.fullmatch(r"downsamples\.(\d+)\.(.+)", rest)) and side == "encoder":
        tail = m[2] if m[2].startswith(("resample.", "time_conv.")) else _residual_key(m[2], key)
        return f"encoder.down_blocks.{m[1]}.{tail}"
    if (m := re.fullmatch(r"upsamples\.(\d+)\.(.+)", rest)) and side == "decoder":
        stage, pos = divmod(int(m[1]), num_res_blocks + 2)
        if pos == num_res_blocks + 1:
            return f"decoder.up_blocks.{stage}.upsamplers.0.{m[2]}"
        return f"decoder.up_blocks.{stage}.resnets.{pos}.{_residual_key(m[2], key)}"
    raise CheckpointError(f"unexpected Wan VAE key {key!r}")


def original_vae_config(state: dict[str, torch.Tensor], source: str) -> dict:
    """``AutoencoderKLWan`` arguments implied by an original state dict's shapes."""
    try:
        base_dim = state["encoder.conv1.weight"].shape[0]
        z_dim = state["conv2.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{source} lacks {e}: not a Wan2.1 VAE checkpoint") from e
    entries = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.downsamples.")})
    resamples = [i for i in entries if f"encoder.downsamples.{i}.resample.1.weight" in state]
    stages = len(resamples) + 1
    blocks = [i for i in entries if i not in resamples]
    if not blocks or len(blocks) % stages:
        raise CheckpointError(f"{source}: the encoder's blocks do not form {stages} equal stages")
    nrb = len(blocks) // stages
    widths = [state[f"encoder.downsamples.{blocks[s * nrb]}.residual.6.weight"].shape[0] for s in range(stages)]
    return dict(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=[w // base_dim for w in widths],
        num_res_blocks=nrb,
        temperal_downsample=[f"encoder.downsamples.{i}.time_conv.weight" in state for i in resamples],
    )


def read_original_vae(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """An original ``Wan2.1_VAE.pth`` as (diffusers-named state dict, ``AutoencoderKLWan`` arguments)."""
    state = load_torch_file(path, f"the Wan2.1 VAE, {ORIGINAL_VAE_NAME}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors (expected the original {ORIGINAL_VAE_NAME})")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    cfg = original_vae_config(state, str(path))
    return {original_vae_key(k, cfg["num_res_blocks"]): v for k, v in state.items()}, cfg


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> WanVAE:
    """The Wan VAE from ``Wan2.1_VAE.pth`` (or a folder holding it), a diffusers ``vae/`` folder, or a
    diffusers pipeline folder."""
    from diffusers import AutoencoderKLWan  # the [wan] extra

    path = Path(path)
    if path.is_dir() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if path.is_dir() and (path / ORIGINAL_VAE_NAME).is_file():
        path = path / ORIGINAL_VAE_NAME
    if path.is_dir() and (path / "config.json").is_file():
        vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype)
    elif path.suffix in (".pth", ".pt"):
        state, cfg = read_original_vae(path)
        if cfg["z_dim"] != 16:
            raise CheckpointError(f"{path}: z_dim {cfg['z_dim']}; the Wan2.1 latent statistics are for 16 channels")
        with torch.device("meta"):
            vae = AutoencoderKLWan(**cfg)
        problems = state_mismatches(vae.state_dict(), state)
        if problems:
            raise CheckpointError("\n".join([f"{path} does not match a Wan2.1 VAE of {cfg}:", *problems]))
        vae.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    else:
        raise CheckpointError(
            f"{path} is not a Wan VAE: expected {ORIGINAL_VAE_NAME} (or a Wan2.1 folder holding it), a diffusers "
            "vae/ folder (config.json + diffusion_pytorch_model.safetensors) or a pipeline folder with vae/"
        )
    if vae.config.patch_size is not None or vae.config.is_residual:
        raise CheckpointError(f"{path} is a Wan2.2 VAE (patch_size / is_residual): only the Wan2.1 VAE is supported")
    return WanVAE(vae.to(device).eval().requires_grad_(False))


def _causal_convs(module: torch.nn.Module) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


class WanVAE(Codec):
    """``Codec`` over an ``AutoencoderKLWan``. Videos ``[B, F, 3, H, W]`` in [-1, 1] with F = 1 + 4k;
    latents ``[B, 1 + k, 16, H / 8, W / 8]``, normalised per channel."""

    spatial_compression = 8
    temporal_compression = 4
    keeps_first_frame = True

    def __init__(self, vae):
        self.vae = vae
        self.latent_channels = vae.config.z_dim
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (mean, std)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel latent mean and std ``[1, 1, C, 1, 1]`` on ``device``, copied there once (not at
        every streamed chunk)."""
        if device not in self._stats:
            c = self.vae.config
            shape = (1, 1, -1, 1, 1)
            mean = torch.tensor(c.latents_mean, dtype=torch.float32).view(shape)
            self._stats[device] = mean.to(device), torch.tensor(c.latents_std).float().view(shape).to(device)
        return self._stats[device]

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """VAE mean ``[B, f, C, h, w]`` -> the DiT's latents: (mu - mean) / std."""
        mean, std = self.stats(mu.device)
        return (mu.float() - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats(z.device)
        return z.float() * std + mean

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video: [B, F, 3, H, W] in [-1, 1] -> normalised latents [B, f, C, h, w] (fp32), the posterior mean."""
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"expected a video [B, F, 3, H, W], got shape {tuple(video.shape)}")
        self.latent_shape(*video.shape[1:2], *video.shape[3:])  # raises on an impossible size
        x = video.to(self.vae.device, self.dtype).permute(0, 2, 1, 3, 4)
        mu = self.vae.encode(x).latent_dist.mode()
        return self.normalize(mu.permute(0, 2, 1, 3, 4))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, f, C, h, w] -> video [B, 1 + 4 (f - 1), 3, 8h, 8w] in [-1, 1] (diffusers' decode)."""
        z = self.denormalize(self._check(latents)).to(self.vae.device, self.dtype).permute(0, 2, 1, 3, 4)
        return self.vae.decode(z).sample.permute(0, 2, 1, 3, 4)

    def _check(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"expected latents [B, f, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        return latents

    def stream_decoder(self) -> WanStreamDecoder:
        return WanStreamDecoder(self)

    def stream_encoder(self) -> WanStreamEncoder:
        return WanStreamEncoder(self)


class WanStreamEncoder:
    """Encodes one input video's frames call after call, carrying the causal convolutions' cache (diffusers'
    ``_encode`` loop: the first frame alone, then groups of 4). ``encoder(frames [B, F, 3, H, W])`` ->
    normalised latents ``[B, f, C, h, w]``: the first call takes 1 + 4k frames, every later one 4k."""

    def __init__(self, codec: WanVAE):
        self.codec = codec
        self.cache: list = [None] * _causal_convs(codec.vae.encoder)
        self.frames = 0  # encoded so far

    @torch.no_grad()
    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        vae, n = self.codec.vae, video.shape[1]
        first = 1 if self.frames == 0 else 0
        if video.dim() != 5 or video.shape[2] != 3 or n < first or (n - first) % 4:
            raise ValueError(
                f"a streaming Wan encode takes [B, F, 3, H, W] with F = {'1 + 4k' if first else '4k'} frames, got "
                f"{tuple(video.shape)}"
            )
        x = video.to(vae.device, vae.dtype).permute(0, 2, 1, 3, 4)
        groups = [x[:, :, :1]] if first else []
        groups += [x[:, :, i : i + 4] for i in range(first, n, 4)]
        out = torch.cat([vae.encoder(g, feat_cache=self.cache, feat_idx=[0]) for g in groups], dim=2)
        self.frames += n
        mu = vae.quant_conv(out)[:, : vae.config.z_dim]  # the posterior mean
        return self.codec.normalize(mu.permute(0, 2, 1, 3, 4))


class WanStreamDecoder:
    """Decodes one stream's latents chunk after chunk, carrying the causal convolutions' cache.

    ``decoder(chunk [B, f, C, h, w]) -> frames [B, F', 3, H, W]``: the first latent frame of the stream
    gives 1 frame, every later one 4. The cache holds the last frames each causal convolution saw, so
    a new stream needs a new decoder (``WanVAE.stream_decoder()``).
    """

    def __init__(self, codec: WanVAE):
        self.codec = codec
        self.cache: list = [None] * _causal_convs(codec.vae.decoder)
        self.latent_frames = 0  # decoded so far

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.codec.vae
        z = self.codec.denormalize(self.codec._check(latents)).to(vae.device, vae.dtype).permute(0, 2, 1, 3, 4)
        x = vae.post_quant_conv(z)  # 1x1x1: frame by frame, no state
        out = []
        for i in range(x.shape[2]):
            first = self.latent_frames == 0
            out.append(vae.decoder(x[:, :, i : i + 1], feat_cache=self.cache, feat_idx=[0], first_chunk=first))
            self.latent_frames += 1
        return torch.cat(out, dim=2).clamp(-1, 1).permute(0, 2, 1, 3, 4)
