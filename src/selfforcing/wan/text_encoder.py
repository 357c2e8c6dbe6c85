"""umT5-XXL text conditioning, exactly as Wan2.1 and diffusers' ``WanPipeline`` do it.

A prompt is cleaned (ftfy, HTML unescape, whitespace collapsed), tokenized to ``text_len = 512``
tokens (truncating longer prompts), encoded by ``transformers.UMT5EncoderModel`` with the padding
masked, cut to its real length and zero-padded back to 512. The DiT then attends to all 512 tokens
without a mask: the zeros are part of what Wan models were trained on.

Each prompt is encoded once; its embedding is kept (on the CPU) for later calls. With ``offload``,
the encoder lives on the CPU and visits the GPU only to encode new prompts, so a 24 GB GPU holds
just the DiT and the VAE while streaming.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch

from ..models.text_encoder import TextEncoder
from .dit_weights import CheckpointError

TEXT_LEN = 512


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy's fixes (when ftfy is installed), HTML unescaped twice, whitespace collapsed."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy comes with the [wan] extra; without it, as diffusers does, skip its fixes
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5TextEncoder(TextEncoder):
    """``forward(prompts) -> (embeddings [B, 512, 4096], None)``: no mask, as Wan attends to the padding.

    ``encoder``: a ``transformers.UMT5EncoderModel``; ``tokenizer``: its tokenizer. ``device``: where
    the embeddings are returned (the DiT's device). ``offload``: keep the encoder on the CPU between
    calls and run it on ``device``.
    """

    def __init__(self, encoder, tokenizer, text_len: int = TEXT_LEN, offload: bool = False, device="cpu"):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.offload = offload
        self.device = torch.device(device)
        self.dim = encoder.config.d_model
        self.cache: dict[str, torch.Tensor] = {}  # cleaned prompt -> [L_real, dim] on the CPU

    @torch.no_grad()
    def embed_new(self, prompts: list[str]) -> None:
        """Encode the prompts not seen yet (cleaned) and keep their embeddings."""
        new = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if not new:
            return
        run_on = self.device if self.offload else next(self.encoder.parameters()).device
        if self.offload:
            self.encoder.to(run_on)
        tokens = self.tokenizer(
            new,
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(run_on), tokens.attention_mask.to(run_on)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        for prompt, h, n in zip(new, hidden, mask.sum(1).tolist(), strict=True):
            self.cache[prompt] = h[:n].float().cpu()
        if self.offload:
            self.encoder.to("cpu")

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        cleaned = [clean_prompt(p) for p in prompts]
        self.embed_new(cleaned)
        out = torch.zeros(len(prompts), self.text_len, self.dim)
        for i, p in enumerate(cleaned):
            out[i, : len(self.cache[p])] = self.cache[p]
        return out.to(self.device), None


def load_text_encoder(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    offload: bool = False,
) -> UMT5TextEncoder:
    """umT5 from a diffusers pipeline folder (``text_encoder/`` + ``tokenizer/``) or from those two
    folders' parent in any other layout."""
    from transformers import AutoTokenizer, UMT5EncoderModel  # the [wan] extra

    folder = Path(folder)
    enc_dir, tok_dir = folder / "text_encoder", folder / "tokenizer"
    for d in (enc_dir, tok_dir):
        if not d.is_dir():
            raise FileNotFoundError(
                f"{folder} has no {d.name}/ folder: the umT5 text encoder loads from a diffusers Wan pipeline "
                "folder (text_encoder/ + tokenizer/, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
            )
    try:
        encoder = UMT5EncoderModel.from_pretrained(enc_dir, torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the umT5 text encoder from {folder}: {e}") from e
    encoder = encoder.eval().requires_grad_(False).to("cpu" if offload else device)
    return UMT5TextEncoder(encoder, tokenizer, offload=offload, device=device)
