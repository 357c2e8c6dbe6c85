"""Attention layers of the DiT: self-attention with 3D RoPE and text cross-attention.

Both take optional masks; self-attention also takes ``kv_prefix``, keys/values of earlier tokens that
are attended to before the current ones. A KV cache supplies exactly that: RoPE-rotated keys and
values of previously generated chunks (a ``CacheLayer``, which also stores the current ones in place),
so the causal student reuses these layers unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .kv_cache import CacheLayer
from .rope import Rope, apply_rope


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK RMSNorm (over the full width, as in Wan) and 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (both before RoPE) and values, each ``[B, heads, L, head_dim]``."""
        h = self.num_heads
        q = rearrange(self.norm_q(self.q(x)), "b l (h d) -> b h l d", h=h)
        k = rearrange(self.norm_k(self.k(x)), "b l (h d) -> b h l d", h=h)
        v = rearrange(self.v(x), "b l (h d) -> b h l d", h=h)
        return q, k, v

    def qkv(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries, rotated keys and values, each ``[B, heads, L, head_dim]``."""
        q, k, v = self.project(x)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        attn_mask: torch.Tensor | None = None,
        kv_prefix: tuple[torch.Tensor, torch.Tensor] | CacheLayer | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: [B, L, dim]; rope: ``(cos, sin)``, each [L, head_dim // 2], at the tokens' absolute positions.

        attn_mask: bool ``[L, L_kv]`` (True = may attend) or anything SDPA broadcasts, where
        ``L_kv = L_prefix + L``. kv_prefix: ``(k, v)`` of earlier tokens, ``[B, heads, L_prefix, head_dim]``,
        or a KV cache's ``CacheLayer``. With ``return_kv`` also returns this call's own ``(k, v)`` as a cache
        stores them (rotated, or before RoPE for a cache that rotates by slot: ``models.cache_policy``).
        """
        q, k_raw, v = self.project(x)
        q, k = apply_rope(q, rope), apply_rope(k_raw, rope)
        k_all, v_all = k, v
        if isinstance(kv_prefix, CacheLayer):
            (k_all, v_all), (k, v) = kv_prefix.extend(k, v, k_raw)
        elif kv_prefix is not None:
            k_all = torch.cat([kv_prefix[0].to(k.dtype), k], dim=2)
            v_all = torch.cat([kv_prefix[1].to(v.dtype), v], dim=2)
        out = self.o(
            rearrange(F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=attn_mask), "b h l d -> b l (h d)")
        )
        if isinstance(kv_prefix, CacheLayer):
            kv_prefix.attended(k, v)
        return (out, (k, v)) if return_kv else out


class CrossAttention(SelfAttention):
    """Attention from video tokens to text tokens: the same projections and QK RMSNorm, no RoPE."""

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the text, ``[B, heads, L_text, head_dim]``: computable once per prompt."""
        h = self.num_heads
        k = rearrange(self.norm_k(self.k(context)), "b l (h d) -> b h l d", h=h)
        v = rearrange(self.v(context), "b l (h d) -> b h l d", h=h)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None = None,
        text_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: [B, L, dim]; context: [B, L_text, dim] or its ``text_kv``; context_mask: bool [B, L_text]."""
        q = rearrange(self.norm_q(self.q(x)), "b l (h d) -> b h l d", h=self.num_heads)
        k, v = text_kv if text_kv is not None else self.text_kv(context)
        mask = None if context_mask is None else context_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(rearrange(out, "b h l d -> b l (h d)"))
