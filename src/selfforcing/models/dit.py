"""A Wan2.1-style video diffusion transformer (DiT) with per-frame timesteps.

Tokens are ordered (frame, row, column). Every block: adaLN-modulated self-attention with 3D RoPE,
text cross-attention, adaLN-modulated FFN. The modulation comes from a *per-frame* timestep
embedding, so each frame can sit at its own noise level (Diffusion Forcing, cache commits).
Parameter names follow the Wan2.1 checkpoint layout (``blocks.0.self_attn.q.weight`` ...).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

from .attention import CrossAttention, SelfAttention
from .kv_cache import KV, CacheLayer, KVCache, TextKV
from .rope import Rope, rope_3d_angles, rope_cos_sin


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 16
    out_channels: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    num_layers: int = 30
    num_heads: int = 12
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, height, width)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


# Size presets, kept as data. Parameter counts are for the DiT alone (tests check them).
DIT_PRESETS: dict[str, DiTConfig] = {
    # 0.05M: unit tests.
    "tiny": DiTConfig(
        in_channels=3,
        out_channels=3,
        dim=32,
        ffn_dim=64,
        num_layers=2,
        num_heads=2,
        text_dim=32,
        freq_dim=32,
        patch_size=(1, 4, 4),
    ),
    # 0.6M: the CPU demo.
    "demo": DiTConfig(
        in_channels=3,
        out_channels=3,
        dim=96,
        ffn_dim=256,
        num_layers=4,
        num_heads=3,
        text_dim=64,
        freq_dim=64,
        patch_size=(1, 4, 4),
    ),
    # 1.1M: the shapes-world teacher trained on 2 CPU cores.
    "toy": DiTConfig(
        in_channels=3,
        out_channels=3,
        dim=128,
        ffn_dim=384,
        num_layers=4,
        num_heads=4,
        text_dim=64,
        freq_dim=64,
        patch_size=(1, 4, 4),
    ),
    # 1.42B (1.3B counted as Wan does): Wan2.1-T2V-1.3B.
    "wan2.1-1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_layers=30, num_heads=12),
    # 14.3B: Wan2.1-T2V-14B.
    "wan2.1-14b": DiTConfig(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40),
}


def dit_config(preset: str, **overrides) -> DiTConfig:
    """A preset's config with some fields replaced: ``dit_config("toy", num_layers=2)``."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
    return replace(DIT_PRESETS[preset], **overrides)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``[..., dim]`` of timesteps t in [0, 1000]: [cos(t w_i), sin(t w_i)]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with x: [B, F, N, C] and shift/scale: [B, F, 1, C]."""
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)  # Wan layout

    def text_kv(self, context: torch.Tensor) -> KV:
        """This block's cross-attention keys/values of the embedded text (a method of the block, so a
        sharded block gathers its weights for it as for ``forward``)."""
        return self.cross_attn.text_kv(context)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        rope: Rope,
        text_kv: KV,
        context_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None = None,
        kv_prefix: KV | CacheLayer | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """x: [B, F, N, C] tokens per frame; e: [B, F, 6, C] per-frame modulation; text_kv: this layer's text K/V.

        Returns the new tokens and this call's self-attention (k, v) (for a KV cache to commit).
        """
        b, f, n, c = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.unsqueeze(1) + e).unsqueeze(3).unbind(2)
        h = modulate(self.norm1(x), shift1, scale1).reshape(b, f * n, c)
        y, kv = self.self_attn(h, rope, attn_mask, kv_prefix, return_kv=True)
        x = x + gate1 * y.reshape(b, f, n, c)
        x = x + self.cross_attn(self.norm3(x).reshape(b, f * n, c), None, context_mask, text_kv).reshape(b, f, n, c)
        x = x + gate2 * self.ffn(modulate(self.norm2(x), shift2, scale2))
        return x, kv


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)  # Wan layout

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, F, N, C]; e: [B, F, C] the per-frame time embedding."""
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).unsqueeze(3).unbind(2)
        return self.head(modulate(self.norm(x), shift, scale))


class VideoDiT(nn.Module):
    """Velocity-predicting video DiT. See ``forward`` for shapes."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False  # set True to trade compute for activation memory in training
        self.compute_dtype: torch.dtype | None = None  # set by FSDP mixed precision: what a KV cache stores
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)  # the untrained model predicts v = 0

    def compile_blocks(self, **compile_kwargs) -> VideoDiT:
        """``torch.compile`` each transformer block in place (fuses norms, RoPE and modulation around the
        matmuls and cuts kernel launches). Blocks, not the whole model: the KV cache's bookkeeping stays
        plain Python, and one compiled graph serves every block. Returns self."""
        for block in self.blocks:
            block.compile(**compile_kwargs)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (F, H, W) -> token grid (f, h, w); raises if not divisible by the patch size."""
        pf, ph, pw = self.cfg.patch_size
        if frames % pf or height % ph or width % pw:
            raise ValueError(
                f"latent size (frames={frames}, height={height}, width={width}) is not divisible by the "
                f"patch size {self.cfg.patch_size}: change the resolution/frame count or the patch size"
            )
        return frames // pf, height // ph, width // pw

    def text_kv(self, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> TextKV:
        """The cross-attention cache: every layer's text keys/values, computed once per prompt.

        context: [B, L, text_dim] text embeddings; context_mask: bool [B, L], True = real token.
        """
        if context.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"text embeddings have width {context.shape[-1]}, the model expects {self.cfg.text_dim}")
        ctx = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        return TextKV([block.text_kv(ctx) for block in self.blocks], context_mask)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        frame_offset: int = 0,
        *,
        text_kv: TextKV | None = None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
        frame_positions: torch.Tensor | None = None,
        taps: tuple[int, ...] = (),
        commit: bool = False,
    ) -> torch.Tensor | tuple:
        """Predict the velocity.

        x: [B, F, C, H, W] noisy latents; t: [B] or [B, F] timesteps in [0, 1000] (per latent frame);
        context: [B, L, text_dim] text embeddings and context_mask: bool [B, L], True = real token (or
        ``text_kv``, the same precomputed by ``self.text_kv``); attn_mask: self-attention mask over
        tokens (e.g. ``causal.block_causal_mask``); frame_offset: absolute index of x's first latent
        frame (for RoPE). kv_cache: attend to its frames before x's (x must be the cache's next chunk,
        or several: x's frames then attend to each other without a mask, as in LongLive's one-pass
        re-cache); it is only read. Returns [B, F, C_out, H, W], and with ``return_kv`` also every layer's (k, v)
        of x's tokens, ``[B, heads, F * N, head_dim]``, for ``kv_cache.commit``. frame_positions: [F]
        RoPE position of every latent frame (instead of frame_offset + 0..F-1; patch_size[0] must be 1).
        taps: block indices whose output tokens ``[B, F * N, dim]`` are also returned, as a list (last).
        commit: the cache-commit pass: each layer stores x's keys/values in ``kv_cache`` as soon as its
        attention is done (no layer's keys/values wait for the whole pass), and the cache then holds x.
        """
        b, nf, c, hh, ww = x.shape
        if c != self.cfg.in_channels:
            raise ValueError(f"input has {c} channels but the model expects {self.cfg.in_channels}")
        f, h, w = self.token_grid(nf, hh, ww)
        pf, ph, pw = self.cfg.patch_size
        if t.shape not in ((b,), (b, nf)):
            raise ValueError(f"t must be [B] or [B, F] = [{b}, {nf}], got {tuple(t.shape)}")
        if text_kv is None:
            if context is None:
                raise ValueError("pass the text as context (embeddings) or as text_kv (from VideoDiT.text_kv)")
            text_kv = self.text_kv(context, context_mask)
        if kv_cache is not None:
            if pf != 1:
                raise ValueError(f"a KV cache needs patch_size[0] == 1, the model has {self.cfg.patch_size}")
            if kv_cache.tokens_per_frame != h * w:
                raise ValueError(f"the cache holds {kv_cache.tokens_per_frame} tokens per frame, x has {h * w}")
            kv_cache.check_next(frame_offset)
        if commit and (kv_cache is None or torch.is_grad_enabled()):
            raise ValueError("commit=True is the cache-commit pass: pass a kv_cache and run it without gradient")
        t = t if t.dim() == 2 else t[:, None].expand(b, nf)
        t = t[:, ::pf]  # one timestep per token frame

        in_dtype = x.dtype  # e.g. fp32 sampler state with bf16 weights: compute in the weights' dtype
        tokens = self.patch_embedding(rearrange(x.to(self.patch_embedding.weight.dtype), "b f c h w -> b c f h w"))
        tokens = rearrange(tokens, "b d f h w -> b f (h w) d").contiguous()  # the residual stream, dense
        e = self.time_embedding(timestep_embedding(t, self.cfg.freq_dim).to(tokens.dtype))  # [B, f, d]
        e6 = self.time_projection(e).unflatten(-1, (6, self.cfg.dim))  # [B, f, 6, d]
        if frame_positions is not None and (pf != 1 or frame_positions.shape != (nf,)):
            raise ValueError(f"frame_positions must be [F] = [{nf}] with patch_size[0] == 1")
        # RoPE's cos/sin, built once per forward on the device, in the dtype the queries have (RMSNorm's output)
        q_dtype = torch.promote_types(tokens.dtype, self.blocks[0].self_attn.q.weight.dtype)
        context_rope = None
        if kv_cache is not None and kv_cache.policy.by_slot:  # positions by slot (``models.cache_policy``)
            if frame_positions is not None:
                raise ValueError("a KV cache with rope='slot' places the chunk itself: pass no frame_positions")
            frame_positions = kv_cache.chunk_positions(frame_offset, nf)
            held = kv_cache.context_positions()
            ctx = rope_3d_angles(len(held), h, w, self.cfg.head_dim, 0, self.cfg.rope_theta, held, tokens.device)
            context_rope = rope_cos_sin(ctx, tokens.device, q_dtype)
        angles = rope_3d_angles(
            f, h, w, self.cfg.head_dim, frame_offset // pf, self.cfg.rope_theta, frame_positions, tokens.device
        )
        rope = rope_cos_sin(angles, tokens.device, q_dtype)

        new_kv, features = [], []
        slots = kv_cache.slots_for(frame_offset, nf) if commit else None
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()  # recompute blocks in backward
        if checkpointed and context_rope is not None:
            raise ValueError("a KV cache with rope='slot' is for inference: training rotates keys by absolute position")
        for i, block in enumerate(self.blocks):
            prefix = kv_cache.layer(i, slots, context_rope) if kv_cache is not None else None
            if checkpointed and prefix is not None:
                # the backward recomputation must see this cache as it is now: views of it when nothing can
                # overwrite its frames (``append_only``: a rollout that fits), else a copy (later commits
                # may evict in place; no more memory than the concatenation attention saves)
                prefix = kv_cache.context(i)
                if prefix is not None and not kv_cache.append_only:
                    prefix = (prefix[0].clone(), prefix[1].clone())
            args = (tokens, e6, rope, text_kv.layers[i], text_kv.mask, attn_mask, prefix)
            if checkpointed:
                tokens, kv = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                tokens, kv = block(*args)
            if return_kv:
                new_kv.append(kv)
            if i in taps:
                features.append(tokens.flatten(1, 2))
        if commit:
            kv_cache.take_slots(frame_offset, nf)  # the bookkeeping: every layer has stored its keys/values
        out = self.head(tokens, e)  # [B, f, h*w, pf*ph*pw*c_out]
        out = rearrange(out, "b f (h w) (pf ph pw c) -> b (f pf) c (h ph) (w pw)", h=h, w=w, pf=pf, ph=ph, pw=pw)
        out = out.to(in_dtype)
        extra = ([new_kv] if return_kv else []) + ([features] if taps else [])
        return (out, *extra) if extra else out

    def config_dict(self) -> dict:
        return asdict(self.cfg)
