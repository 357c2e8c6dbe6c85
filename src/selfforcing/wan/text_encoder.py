"""umT5-XXL text conditioning, exactly as Wan2.1 and diffusers' ``WanPipeline`` do it.

A prompt is cleaned (ftfy, HTML unescape, whitespace collapsed), tokenized to ``text_len = 512``
tokens (truncating longer prompts), encoded by ``transformers.UMT5EncoderModel`` with the padding
masked, cut to its real length and zero-padded back to 512. The DiT then attends to all 512 tokens
without a mask: the zeros are part of what Wan models were trained on.

Each prompt is encoded once; its embedding is kept (on the CPU) for later calls, and with
``cache_dir`` on disk, one file per prompt, for later runs (``selfforcing encode-prompts`` fills it
ahead of training). With ``offload``, the encoder lives on the CPU and its 24 blocks visit the GPU one
at a time to encode a new prompt (the 2 GB word embedding stays on the CPU; ``stream_blocks``), so
encoding adds about one block (0.4 GB in bf16) to the GPU, not umT5-XXL's 11 GB.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.text_encoder import TextEncoder
from ..weights import state_mismatches
from .dit_weights import CheckpointError, load_torch_file

TEXT_LEN = 512


class FrozenTextEncoder(TextEncoder):
    """A frozen text encoder shared, not owned: its weights are outside this module's parameters and
    state dict, and ``copy.deepcopy`` (an EMA or a critic copied from a teacher) keeps the same one. So
    the generator, its EMA, the teacher and the critic share one umT5, which no optimizer, checkpoint or
    FSDP shard ever holds."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        object.__setattr__(self, "shared", encoder)  # not registered as a submodule
        self.dim = encoder.dim

    def __deepcopy__(self, memo) -> FrozenTextEncoder:
        return self

    def forward(self, prompts: list[str]):
        with torch.no_grad():
            return self.shared(prompts)


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
    the embeddings are returned (the DiT's device). ``offload``: keep the encoder on the CPU and run it
    on ``device`` block by block (``stream_blocks``).
    """

    def __init__(
        self,
        encoder,
        tokenizer,
        text_len: int = TEXT_LEN,
        offload: bool = False,
        device="cpu",
        cache_dir: str | Path | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.offload = offload
        self.device = torch.device(device)
        self.dim = encoder.config.d_model
        self.cache: dict[str, torch.Tensor] = {}  # cleaned prompt -> [L_real, dim] on the CPU
        self.cache_dir = Path(cache_dir) if cache_dir else None  # the same on disk, one file per prompt
        self._lock = threading.Lock()  # one encode at a time (the server's streams share the encoder)
        if hasattr(encoder, "encoder") and hasattr(encoder.encoder, "block"):  # a UMT5EncoderModel
            stream_blocks(encoder, lambda: self.device if self.offload else None)

    def cache_file(self, prompt: str) -> Path:
        """Where a (cleaned) prompt's embedding is kept on disk: a hash of the prompt."""
        return self.cache_dir / f"{hashlib.sha256(prompt.encode()).hexdigest()[:32]}.safetensors"

    def __getstate__(self) -> dict:  # copies and pickles get a lock of their own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    @torch.no_grad()
    def embed_new(self, prompts: list[str]) -> None:
        """Encode the prompts not seen yet (cleaned) and keep their embeddings (in memory, and in
        ``cache_dir`` when set, where later runs read them instead of running umT5). Thread-safe: two
        streams of a server encode one after the other, and an offloaded encoder always goes back to the
        CPU, error or not."""
        with self._lock:
            new = list(dict.fromkeys(p for p in prompts if p not in self.cache))
            if self.cache_dir is not None:
                for p in [p for p in new if self.cache_file(p).is_file()]:
                    with safe_open(self.cache_file(p), "pt") as f:
                        if f.metadata().get("prompt") != p:
                            raise ValueError(f"{self.cache_file(p)} holds another prompt's embedding: clear the cache")
                        self.cache[p] = f.get_tensor("embedding")
                    new.remove(p)
            if not new:
                return
            tokens = self.tokenizer(
                new,
                padding="max_length",
                max_length=self.text_len,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
            self._check_words(new, tokens.input_ids, tokens.attention_mask)
            run_on = self.device if self.offload else next(self.encoder.parameters()).device
            try:
                ids, mask = tokens.input_ids.to(run_on), tokens.attention_mask.to(run_on)
                hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                hidden = [h[:n].float().cpu() for h, n in zip(hidden, mask.sum(1).tolist(), strict=True)]
            finally:
                if self.offload:  # every block back on the CPU, also after an error inside one
                    self.encoder.encoder.to("cpu")
            for prompt, h in zip(new, hidden, strict=True):
                self.cache[prompt] = h
                if self.cache_dir is not None:  # written under a temporary name, then renamed: never half a file
                    self.cache_dir.mkdir(parents=True, exist_ok=True)
                    # a name of this process and thread: ranks encoding the same prompt never share a file
                    tmp = self.cache_file(prompt).with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
                    save_file({"embedding": h.contiguous()}, tmp, metadata={"prompt": prompt})
                    os.replace(tmp, self.cache_file(prompt))

    def _check_words(self, prompts: list[str], ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Refuse a non-empty prompt whose tokens are all special ones (``<pad>``, ``</s>``, ``<unk>``): umT5
        has nothing to read in it (the empty prompt, CFG's negative, is fine)."""
        special = torch.tensor(sorted(self.tokenizer.all_special_ids))
        for prompt, row, m in zip(prompts, ids, mask.bool(), strict=True):
            if prompt and torch.isin(row[m], special).all():
                raise ValueError(
                    f"the prompt {prompt[:60]!r} holds only the text encoder's special tokens "
                    f"({', '.join(self.tokenizer.all_special_tokens)}): describe the video in words"
                )

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        cleaned = [clean_prompt(p) for p in prompts]
        self.embed_new(cleaned)
        out = torch.zeros(len(prompts), self.text_len, self.dim)
        for i, p in enumerate(cleaned):
            out[i, : len(self.cache[p])] = self.cache[p]
        return out.to(self.device), None


def stream_blocks(encoder, device: Callable[[], torch.device | None]) -> None:
    """Hooks that run a CPU-resident ``UMT5EncoderModel`` on ``device()`` (when not None) a block at a time:
    each block and the final norm move there just before their forward and back right after; the word
    embedding looks the ids up on the CPU and hands the vectors over. The weights never all sit on the
    device: at most one block (0.4 GB of umT5-XXL in bf16) and the activations of 512 tokens."""
    stack = encoder.encoder

    def ids_to_cpu(module, args):
        return (args[0].cpu(), *args[1:]) if device() is not None else None

    def vectors_to_device(module, args, out):
        return out.to(device()) if device() is not None else None

    def arrive(module, args):
        if device() is not None:
            module.to(device())

    def leave(module, args, out):
        if device() is not None:
            module.to("cpu")

    stack.embed_tokens.register_forward_pre_hook(ids_to_cpu)
    stack.embed_tokens.register_forward_hook(vectors_to_device)
    for module in [*stack.block, stack.final_layer_norm]:
        module.register_forward_pre_hook(arrive)
        module.register_forward_hook(leave)


ORIGINAL_T5_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER_DIR = "google/umt5-xxl"

# Wan's own T5 encoder (wan/modules/t5.py) -> transformers' UMT5EncoderModel, per block.
_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",  # one per layer
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU(tanh)-gated
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def original_t5_key(key: str) -> str:
    """``blocks.3.ffn.fc1.weight`` -> ``encoder.block.3.layer.1.DenseReluDense.wi_1.weight``."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        if rest in _T5_BLOCK:
            return f"encoder.block.{index}.{_T5_BLOCK[rest]}"
    raise CheckpointError(f"unexpected key {key!r} in Wan's umT5 checkpoint")


def load_original_t5(path: Path, dtype: torch.dtype = torch.float32):
    """A ``UMT5EncoderModel`` with the weights of Wan's ``models_t5_umt5-xxl-enc-bf16.pth``; its size is
    read off the shapes (umT5-XXL: 24 layers, d_model 4096, 64 heads, d_ff 10240, 32 buckets)."""
    from transformers import UMT5Config, UMT5EncoderModel

    state = load_torch_file(path, f"Wan's umT5 encoder, {ORIGINAL_T5_NAME}")
    state = {original_t5_key(k): v for k, v in state.items()}
    try:
        vocab, d_model = state["shared.weight"].shape
        buckets, heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
        cfg = UMT5Config(
            vocab_size=vocab,
            d_model=d_model,
            d_kv=state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
            d_ff=state["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"].shape[0],
            num_layers=len({k.split(".")[2] for k in state if k.startswith("encoder.block.")}),
            num_heads=heads,
            relative_attention_num_buckets=buckets,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            layer_norm_epsilon=1e-6,
        )
    except KeyError as e:
        raise CheckpointError(f"{path} lacks {e}: not Wan's umT5 encoder") from e
    with torch.device("meta"):
        encoder = UMT5EncoderModel(cfg)
    expected = {k: v for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied
    problems = state_mismatches(expected, state)
    if problems:
        raise CheckpointError("\n".join([f"{path} does not match a umT5 encoder of its own size:", *problems]))
    encoder.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    encoder.encoder.embed_tokens = encoder.shared  # tied, as in UMT5EncoderModel
    return encoder


def load_text_encoder(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    offload: bool = False,
    cache_dir: str | Path | None = None,
) -> UMT5TextEncoder:
    """umT5 and its tokenizer from a Wan folder: the diffusers layout (``text_encoder/`` + ``tokenizer/``)
    or the original one (``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl/``)."""
    from transformers import AutoTokenizer, UMT5EncoderModel  # the [wan] extra

    folder = Path(folder)
    if (folder / "text_encoder").is_dir():
        enc_dir, tok_dir = folder / "text_encoder", folder / "tokenizer"
    elif (folder / ORIGINAL_T5_NAME).is_file():
        enc_dir, tok_dir = folder / ORIGINAL_T5_NAME, folder / ORIGINAL_TOKENIZER_DIR
    else:
        raise FileNotFoundError(
            f"{folder} has no text_encoder/ folder (diffusers layout) and no {ORIGINAL_T5_NAME} (original Wan2.1 "
            "layout): point at a downloaded Wan2.1-T2V folder"
        )
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{folder} has no tokenizer folder {tok_dir.relative_to(folder)}/")
    try:
        if enc_dir.is_file():
            encoder = load_original_t5(enc_dir, dtype)
        else:
            encoder = UMT5EncoderModel.from_pretrained(enc_dir, torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot load the umT5 text encoder from {folder}: {e}") from e
    encoder = encoder.eval().requires_grad_(False).to("cpu" if offload else device)
    return UMT5TextEncoder(encoder, tokenizer, offload=offload, device=device, cache_dir=cache_dir)
