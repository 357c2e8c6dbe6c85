"""Text conditioning: the ``TextEncoder`` interface and a small trainable encoder for the shapes world.

Any encoder maps a list of prompts to embeddings ``[B, L, D]`` plus a bool mask ``[B, L]`` (True =
real token). The empty prompt "" is the unconditional prompt for classifier-free guidance; it encodes
to a single learned ``<empty>`` token so attention always has something to look at.
"""

from __future__ import annotations

import torch
from torch import nn

from .tokens import tokenize

PAD, EMPTY, UNK = "<pad>", "<empty>", "<unk>"


class TextEncoder(nn.Module):
    """Interface: ``forward(prompts) -> (embeddings [B, L, dim], mask [B, L])``."""

    dim: int

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class ShapesTextEncoder(TextEncoder):
    """Word embeddings + learned positions + a small Transformer encoder over a closed vocabulary.

    ``unknown_words="error"`` (default) rejects words outside the vocabulary with a message listing
    them; ``"unk"`` maps them to a shared ``<unk>`` token instead.
    """

    def __init__(
        self,
        vocab: list[str],
        dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        max_len: int = 32,
        unknown_words: str = "error",
    ):
        super().__init__()
        if unknown_words not in ("error", "unk"):
            raise ValueError(f"unknown_words must be 'error' or 'unk', got {unknown_words!r}")
        self.words = [PAD, EMPTY, UNK, *sorted(set(vocab))]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.dim, self.max_len, self.unknown_words = dim, max_len, unknown_words
        self.token_embedding = nn.Embedding(len(self.words), dim)
        self.position_embedding = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def token_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, L]`` (padded with <pad>) and mask ``[B, L]``."""
        rows = []
        for p in prompts:
            words = tokenize(p) or [EMPTY]
            unknown = [w for w in words if w not in self.index]
            if unknown and self.unknown_words == "error":
                known = ", ".join(self.words[3:])
                raise ValueError(
                    f"prompt {p!r} has words outside the vocabulary: {unknown}. Known words: {known}. "
                    "(Build the encoder with unknown_words='unk' to map them to <unk>.)"
                )
            if len(words) > self.max_len:
                raise ValueError(f"prompt {p!r} has {len(words)} words, more than max_len={self.max_len}")
            rows.append([self.index.get(w, self.index[UNK]) for w in words])
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, ids != self.index[PAD]

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.token_embedding.weight.device
        ids, mask = (t.to(device) for t in self.token_ids(prompts))
        h = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=~mask)
        return self.norm(h), mask
