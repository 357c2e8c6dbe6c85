"""Building a text-to-video model from a config, and loading a trained one from a checkpoint."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from .config import CausalConfig, TrainConfig, config_from_yaml
from .inference.video_stream import VideoStream
from .models.codec import Codec, IdentityCodec
from .models.dit import DiTConfig, VideoDiT
from .models.t2v import TextToVideo
from .models.text_encoder import ShapesTextEncoder, TextEncoder
from .weights import load_network, load_subset, read_checkpoint_weights, resolve_checkpoint


def stream_settings(cfg: TrainConfig, window: int | None = None) -> CausalConfig:
    """The causal student's generation settings; the attention window defaults to the training length.

    A longer video then rolls the KV cache instead of attending to more frames than the model was trained on.
    """
    if cfg.causal is None:
        raise ValueError(
            f"{cfg.name} is a bidirectional (stage {cfg.stage}) model: streaming needs a causal student "
            "(a checkpoint trained with a causal: section, e.g. configs/ode_init_toy.yaml)"
        )
    f_lat = build_codec(cfg).latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width)[0]
    return replace(cfg.causal, window=window or cfg.causal.window or f_lat)


def stream_guidance(cfg: TrainConfig) -> float:
    """The classifier-free guidance a causal model streams with by default: its recipe's
    ``diffusion.guidance_scale`` for a many-step causal diffusion model (Teacher/Diffusion Forcing),
    1 for a few-step student (ODE-initialised or distilled: guidance is part of what it learned)."""
    many_step = cfg.stage == "causal" and cfg.distill.loss == "diffusion"
    return cfg.diffusion.guidance_scale if many_step else 1.0


@functools.cache
def wan_vae(folder: str) -> Codec:
    """The Wan folder's VAE, loaded once per process (frozen; every model of a run shares it)."""
    from .wan.vae import load_vae

    return load_vae(folder)


class LazyUMT5(TextEncoder):
    """The Wan folder's umT5 (``wan.text_encoder.UMT5TextEncoder``: ``forward(prompts) -> (embeddings
    [B, 512, dim], None)``), loaded only when a prompt's embedding is not in ``cache_dir`` already: with a
    text cache that holds every prompt of a run (``selfforcing encode-prompts``), umT5-XXL (~11 GB in
    bf16) is never loaded. It loads at most once, in ``dtype`` (bf16: Wan's own), on the CPU when
    ``offload`` (``place``), and then encodes (and caches) the missing prompts as ``UMT5TextEncoder`` does."""

    def __init__(self, folder: str | Path, dim: int, cache_dir: str | Path | None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        from .wan.text_encoder import UMT5TextEncoder

        self.folder, self.dim, self.dtype = folder, dim, dtype
        self.cache_dir = Path(cache_dir) if cache_dir else None
        # reads cached embeddings only: a placeholder encoder of the right width, no tokenizer
        stub = SimpleNamespace(config=SimpleNamespace(d_model=dim))
        self.encoder: UMT5TextEncoder = UMT5TextEncoder(stub, None, cache_dir=self.cache_dir)
        self.loaded = False
        self._lock = threading.Lock()  # one load, even with several threads encoding

    def place(self, device: torch.device | str) -> None:
        """Return embeddings on ``device``; on CUDA umT5 stays on the CPU and visits the GPU only to encode
        new prompts (``offload``)."""
        device = torch.device(device)
        self.encoder.device, self.encoder.offload = device, device.type == "cuda"
        if self.loaded:
            self.encoder.encoder.to("cpu" if self.encoder.offload else device)

    def missing(self, prompts: list[str]) -> list[str]:
        """The (cleaned) prompts whose embedding is neither in memory nor in ``cache_dir``."""
        from .wan.text_encoder import clean_prompt

        cleaned = [clean_prompt(p) for p in prompts]
        on_disk = self.cache_dir is not None
        return [
            p for p in cleaned if p not in self.encoder.cache and not (on_disk and self.encoder.cache_file(p).is_file())
        ]

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        with self._lock:
            if not self.loaded and self.missing(prompts):
                self.load()
        return self.encoder(prompts)

    def load(self) -> None:
        """Load umT5 in place of the cache reader, keeping what was read, where ``place`` said."""
        from .wan.text_encoder import load_text_encoder

        reader = self.encoder
        encoder = load_text_encoder(self.folder, self.dtype, reader.device, reader.offload, cache_dir=self.cache_dir)
        encoder.cache.update(reader.cache)
        self.encoder, self.loaded = encoder, True


@functools.cache
def wan_text_encoder(folder: str, text_cache: str = "") -> TextEncoder:
    """The Wan folder's umT5, loaded once per process, and only if a prompt is missing from ``text_cache``
    (``LazyUMT5``; frozen and shared: see ``FrozenTextEncoder``)."""
    from .wan.dit_weights import folder_config
    from .wan.text_encoder import FrozenTextEncoder

    return FrozenTextEncoder(LazyUMT5(folder, folder_config(folder).text_dim, text_cache or None))


def wan_model(
    cfg: TrainConfig, dit_weights: str | Path, lora: str = "", lora_alpha: float | None = None
) -> TextToVideo:
    """``model.wan``'s shared frozen umT5 with the DiT of ``dit_weights`` (any Wan DiT layout: the folder
    itself, a Self Forcing / ODE-init ``.pt``, any released causal model's file: ``families.py``, whose
    network it reads), which must be the folder's size, with ``lora`` merged in. Frozen, in eval mode."""
    from .families import detect_family
    from .wan.dit_weights import check_same_size, load_dit

    size = dit_config(cfg)  # the folder's
    fam = detect_family(dit_weights)
    dit = load_dit(dit_weights, weights=fam.weights if fam else None, num_heads=size.num_heads)
    check_same_size(dit.cfg, size, dit_weights, cfg.model.wan)
    if lora:  # merged: the adapters become part of the weights that train
        from .wan.lora_weights import load_lora

        dit = load_lora(dit, lora, lora_alpha or (fam.lora_alpha if fam else None), merge=True)
    return TextToVideo(wan_text_encoder(cfg.model.wan, cfg.model.text_cache), dit)


def dit_config(cfg: TrainConfig, in_channels: int = 0, text_dim: int = 0) -> DiTConfig:
    """The DiT's config: the Wan folder's for ``model.wan``, else the preset's with its size overrides."""
    if cfg.model.wan:
        from .wan.dit_weights import folder_config

        return folder_config(cfg.model.wan)
    return cfg.model.dit(in_channels, text_dim)


def build_codec(cfg: TrainConfig) -> Codec:
    """Pixel space for the shapes world; the folder's Wan VAE for ``model.wan``."""
    return wan_vae(cfg.model.wan) if cfg.model.wan else IdentityCodec()


def build_model(cfg: TrainConfig) -> TextToVideo:
    """A freshly initialised model for ``cfg`` (``cfg.text.vocab`` must be filled in). With ``model.wan``
    the DiT takes the folder's size and the text encoder is the folder's frozen, shared umT5."""
    if cfg.model.wan:
        text_encoder = wan_text_encoder(cfg.model.wan, cfg.model.text_cache)
        dit = VideoDiT(dit_config(cfg))
        return TextToVideo(text_encoder, dit)
    if not cfg.text.vocab:
        raise ValueError("cfg.text.vocab is empty: fill it with the training data's words (Batches.vocabulary)")
    t = cfg.text
    text_encoder = ShapesTextEncoder(t.vocab, t.dim, t.num_layers, t.num_heads, t.max_len, t.unknown_words)
    codec = build_codec(cfg)
    dit = VideoDiT(dit_config(cfg, codec.latent_channels, t.dim))
    return TextToVideo(text_encoder, dit)


def initial_model(cfg: TrainConfig, device: torch.device | str = "cpu") -> TextToVideo:
    """The model a run starts from, on ``device`` (``cfg.text.vocab`` filled in): a Wan DiT (``init_from`` in any
    layout, its LoRA merged, else the folder's own) with the shared frozen umT5; or a fresh shapes-world model
    loaded from ``init_from``'s EMA weights. With ``lora.rank``, fresh adapters on its DiT and everything
    else frozen."""
    from .models.lora import add_adapters

    torch.manual_seed(cfg.seed)  # weight initialisation
    if cfg.model.wan:
        model = wan_model(cfg, cfg.init_from or cfg.model.wan, cfg.init_lora, cfg.init_lora_alpha).to(device)
        model.dit.requires_grad_(True)
        # umT5 is shared and frozen; in bf16, loaded only for prompts missing from model.text_cache, and on
        # CUDA kept on the CPU between them (LazyUMT5).
        model.text_encoder.shared.place(device)
    else:
        model = build_model(cfg).to(device)
        if cfg.init_from:
            load_network(model, resolve_checkpoint(cfg.init_from), "ema")
    if cfg.lora.rank:
        model.requires_grad_(False)
        add_adapters(model.dit, cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.targets) or None, frozen_dtype(cfg))
    return model


def frozen_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype of a run's weights that never train (``frozen_precision``)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.frozen_precision]


def saved_keys(cfg: TrainConfig, model: torch.nn.Module) -> list[str] | None:
    """The keys of ``model``'s state dict a checkpoint holds: in a LoRA run, a network with adapters holds
    only them; else all (None)."""
    from .models.lora import is_adapter

    if not cfg.lora.rank:
        return None
    return [k for k in model.state_dict() if is_adapter(k)] or None


@dataclass
class Pipeline:
    """A trained text-to-video model with its codec and the config it was trained with."""

    model: TextToVideo
    codec: Codec
    cfg: TrainConfig
    checkpoint: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.dit.parameters()).device

    def open_stream(
        self,
        prompts: list[str],
        seed: int = 0,
        image: torch.Tensor | None = None,
        settings: CausalConfig | None = None,
        height: int | None = None,
        width: int | None = None,
        overlap_decode: bool = False,
        video=None,
        strength: float = 1.0,
    ) -> VideoStream:
        """An open-ended, interactive stream of this causal model (``VideoStream``: iterate it, switch its
        prompt between chunks), at the training size, its cache rolling past the training length.
        ``overlap_decode``: on CUDA, decode each chunk beside the next one's denoising (``Chunk``). ``video``,
        ``strength``: video-to-video (``VideoStream``: an input tensor, or a live source such as a camera)."""
        settings = settings or stream_settings(self.cfg)
        h, w = height or self.cfg.data.height, width or self.cfg.data.width
        guidance = stream_guidance(self.cfg)
        return VideoStream(
            self.model,
            self.codec,
            prompts,
            h,
            w,
            settings,
            seed,
            guidance,
            image,
            overlap_decode=overlap_decode,
            video=video,
            strength=strength,
        )


def load_pipeline(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> Pipeline:
    """Load a checkpoint folder (or a run folder's latest checkpoint). ``weights``: ``ema`` or ``model``."""
    ckpt = resolve_checkpoint(path)
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    cfg = config_from_yaml((ckpt / "config.yaml").read_text())
    if cfg.lora.rank:  # adapters only: on the run's own starting model (init_from must still be there)
        model = initial_model(cfg)
        load_subset(model, read_checkpoint_weights(ckpt, weights), saved_keys(cfg, model), f"{ckpt} ({weights})")
    else:
        model = build_model(cfg)
        load_network(model, ckpt, weights)  # its safetensors file, or assembled from a sharded checkpoint
    return Pipeline(model.to(device).eval().requires_grad_(False), build_codec(cfg), cfg, ckpt)
