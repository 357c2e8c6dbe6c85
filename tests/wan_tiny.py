"""Tiny random Wan-family models written in the real checkpoint layouts, for the Wan tests.

Every writer uses the reference library's own ``save_pretrained`` (diffusers, transformers) or the
original key names, so the loaders are tested on exactly what the released files hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from selfforcing.wan.dit_weights import WEIGHTS_NAME, to_diffusers_key, wan_config

DIT_KW = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
)


def randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn from N(0, std^2) (norm gains and biases too): no zero-initialised shortcuts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def diffusers_dit(seed: int = 0, **kw):
    from diffusers import WanTransformer3DModel

    return randomize(WanTransformer3DModel(**{**DIT_KW, **kw}), seed=seed)


def wan_state_dict(model) -> dict[str, torch.Tensor]:
    """A diffusers transformer's weights under the original Wan2.1 names."""
    return {to_diffusers_key(k, reverse=True): v.clone() for k, v in model.state_dict().items()}


def write_wan_dit(model, folder: Path, shards: int = 1) -> Path:
    """The original Wan2.1 DiT layout: config.json + diffusion_pytorch_model.safetensors (or shards + index)."""
    from safetensors.torch import save_file

    from selfforcing.wan.dit_weights import config_from_diffusers_json

    folder.mkdir(parents=True, exist_ok=True)
    cfg = config_from_diffusers_json(dict(model.config), folder)
    (folder / "config.json").write_text(json.dumps(wan_config(cfg)))
    state = wan_state_dict(model)
    if shards == 1:
        save_file(state, folder / WEIGHTS_NAME)
        return folder
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / (WEIGHTS_NAME + ".index.json")).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def dit_inputs(b: int = 2, f: int = 3, h: int = 4, w: int = 6, c: int = 4, text_dim: int = 24, seed: int = 0):
    """x [B, F, C, H, W], per-frame t [B, F], and Wan-style text: real tokens then zeros to 512."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, c, h, w, generator=g)
    t = torch.rand(b, f, generator=g) * 1000
    ctx = torch.zeros(b, 512, text_dim)
    for i in range(b):
        n = 5 + 4 * i
        ctx[i, :n] = torch.randn(n, text_dim, generator=g)
    return x, t, ctx


def diffusers_velocity(model, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """diffusers' forward in our layout: x [B, F, C, H, W], per-frame t [B, F] given per token."""
    p = model.config.patch_size
    tokens = (x.shape[3] // p[1]) * (x.shape[4] // p[2])
    with torch.no_grad():
        out = model(x.permute(0, 2, 1, 3, 4), t.repeat_interleave(tokens, dim=1), ctx, return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)
