"""A Wan2.1 model folder (+ optionally a Self Forcing checkpoint) as one streaming text-to-video pipeline.

    pipe = load_wan("wan_models/Wan2.1-T2V-1.3B-Diffusers", checkpoint="checkpoints/self_forcing_dmd.pt")
    for chunk in pipe.stream(["a corgi surfing a wave"], frames=81):
        ...  # chunk.frames: [1, 9 or 12, 3, 480, 832] in [-1, 1]

The folder supplies the VAE and the umT5 text encoder, and the DiT unless a causal checkpoint
replaces its weights. With a checkpoint the DiT is a causal student and streams chunk by chunk
(``RELEASED_CAUSAL``: the released Self Forcing settings); without one it is Wan's bidirectional
model, sampled with many Euler steps and classifier-free guidance (the teacher).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import CausalConfig, config_from_yaml
from ..device import resolve_device
from ..families import Family, detect_family, family
from ..inference.chunks import Chunk
from ..inference.generate import generate_videos
from ..inference.stream import stream_video
from ..inference.video_stream import VideoStream
from ..models.dit import DIT_PRESETS
from ..models.t2v import TextToVideo
from ..weights import resolve_checkpoint
from .dit_weights import CheckpointError, check_same_size, detect_layout, folder_config, load_dit
from .tae import TAEW21, load_tae
from .text_encoder import load_text_encoder
from .vae import WanVAE, load_vae

# The released Self Forcing checkpoints: chunks of 3 latent frames, the 4-step list warped with shift 5,
# the cache committed from the clean chunk (t = 0), and a 21-latent-frame (81-frame) window that rolls
# once a video is longer.
RELEASED_CAUSAL = CausalConfig(
    frames_per_block=3, denoising_steps=[1000.0, 750.0, 500.0, 250.0], shift=5.0, context_timestep=0.0, window=21
)
# Wan2.1's own T2V sampling (wan/configs): 50 steps, shift 5, guidance 5, and its negative prompt.
TEACHER_STEPS, TEACHER_SHIFT, TEACHER_GUIDANCE = 50, 5.0, 5.0
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class WanPipeline:
    """The umT5 text encoder and the DiT (``model``), the VAE (``codec``), and how to sample them."""

    model: TextToVideo
    codec: WanVAE | TAEW21  # the VAE, or the TAEW2.1 preview decoder
    causal: CausalConfig | None  # None: the bidirectional teacher
    folder: Path
    checkpoint: Path | None = None
    family: Family | None = None  # the released model it is (settings and rules), if one

    @property
    def switch_mode(self) -> str:
        """The prompt-switch rule of its family (LongLive: one-pass), else ``recache``."""
        return self.family.switch if self.family else "recache"

    def check_size(self, frames: int, height: int, width: int) -> None:
        """Raise unless the VAE and the DiT's patches divide the video exactly."""
        ph, pw = self.model.dit.cfg.patch_size[1:]
        s = self.codec.spatial_compression
        if height % (s * ph) or width % (s * pw):
            raise ValueError(
                f"height and width must be multiples of {s * ph} (VAE {s}x, patch {ph}), got {height}x{width}: "
                f"e.g. {height // (s * ph) * s * ph}x{width // (s * pw) * s * pw}"
            )
        self.codec.latent_shape(frames, height, width)  # frames = 1 + 4k

    def stream(
        self,
        prompts: list[str],
        frames: int = 81,
        height: int = 480,
        width: int = 832,
        seed: int = 0,
        settings: CausalConfig | None = None,
        image: torch.Tensor | None = None,
        switches: dict[int, list[str] | str] | None = None,
        switch_mode: str | None = None,
        video: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> Iterator[Chunk]:
        """Stream a causal student chunk by chunk (see ``inference.stream.stream_video``: a first image,
        prompt switches at given frames); each chunk is decoded by the VAE's streaming decoder as soon as
        it is denoised. A bad request raises here, before the first chunk is asked for."""
        self._check_causal()
        self.check_size(frames, height, width)
        interaction = dict(image=image, switches=switches, switch_mode=switch_mode or self.switch_mode)
        interaction |= dict(video=video, strength=strength)
        settings = settings or self.causal
        return stream_video(self.model, self.codec, prompts, frames, height, width, settings, seed, **interaction)

    def open_stream(
        self,
        prompts: list[str],
        height: int = 480,
        width: int = 832,
        seed: int = 0,
        settings: CausalConfig | None = None,
        image: torch.Tensor | None = None,
        overlap_decode: bool = False,
        video=None,
        strength: float = 1.0,
    ) -> VideoStream:
        """An open-ended, interactive stream (``VideoStream``: iterate it, switch its prompt between chunks);
        the cache rolls past its window (21 latent frames unless the settings say otherwise).
        ``overlap_decode``: on CUDA, decode each chunk beside the next one's denoising (``Chunk``)."""
        self._check_causal()
        self.check_size(1, height, width)
        settings = settings or self.causal
        settings = replace(settings, window=settings.window or RELEASED_CAUSAL.window)
        return VideoStream(
            self.model,
            self.codec,
            prompts,
            height,
            width,
            settings,
            seed,
            image=image,
            overlap_decode=overlap_decode,
            video=video,
            strength=strength,
        )

    def _check_causal(self) -> None:
        if self.causal is None:
            raise ValueError(
                f"{self.folder} holds Wan's bidirectional model: streaming needs a causal checkpoint "
                "(checkpoint=self_forcing_dmd.pt); sample the teacher with generate()"
            )

    def generate(
        self,
        prompts: list[str],
        frames: int = 81,
        height: int = 480,
        width: int = 832,
        seed: int = 0,
        steps: int = TEACHER_STEPS,
        shift: float = TEACHER_SHIFT,
        guidance_scale: float = TEACHER_GUIDANCE,
        negative_prompt: str = WAN_NEGATIVE_PROMPT,
        progress: bool = True,
        return_latents: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The whole video at once, ``[B, frames, 3, H, W]`` in [-1, 1] (and with ``return_latents`` its
        latents): a causal student streams and the chunks are joined; the teacher samples with Euler +
        classifier-free guidance."""
        if self.causal is not None:
            chunks = list(self.stream(prompts, frames, height, width, seed))
            video = torch.cat([c.frames for c in chunks], dim=1)
            return (video, torch.cat([c.latents for c in chunks], dim=1)) if return_latents else video
        self.check_size(frames, height, width)
        return generate_videos(
            self.model,
            self.codec,
            prompts,
            frames,
            height,
            width,
            seed=seed,
            steps=steps,
            shift=shift,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            progress=progress,
            return_latents=return_latents,
        )


def trained_causal(checkpoint: str | Path) -> CausalConfig | None:
    """The causal settings a run of this project trained with (None for a checkpoint of another layout)."""
    if detect_layout(Path(checkpoint)) != "run":
        return None
    return config_from_yaml((resolve_checkpoint(checkpoint) / "config.yaml").read_text()).causal


def load_wan(
    folder: str | Path,
    checkpoint: str | Path | None = None,
    weights: str | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    offload_text_encoder: bool = False,
    causal: CausalConfig | None = None,
    preview_decoder: str | Path | None = None,
    family: str | Family | None = None,
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    merge_lora: bool = False,
) -> WanPipeline:
    """Load a Wan2.1 folder (diffusers ``WanPipeline`` layout, or the original layout with its
    ``google/umt5-xxl`` tokenizer and ``models_t5_umt5-xxl-enc-bf16.pth``) and, optionally, a causal
    checkpoint (Self Forcing / CausVid ``.pt``, a run of this project, or any DiT layout) whose weights
    replace the folder's DiT.

    ``weights``: which network of a training checkpoint (default ``generator_ema``); ``dtype``: bf16
    on CUDA, fp32 on the CPU by default; ``offload_text_encoder``: keep umT5 on the CPU between prompts;
    ``causal``: the student's sampling settings (default: a run's own, else ``RELEASED_CAUSAL``); ``preview_decoder``:
    ``taew2_1.pth`` decodes instead of the Wan VAE (much faster, lower quality; the VAE is not loaded).

    ``family``: a released model's name (``families.FAMILIES``: ``longlive``, ``reward-forcing``, ...) whose
    official settings, switch rule and network the checkpoint runs with; by default recognised from the
    checkpoint's file name. ``lora``: a PEFT LoRA file on the DiT (LongLive's ``models/lora.pt``; ``"none"``:
    run a family that ships one without it), alpha ``lora_alpha`` (default: the family's, else the rank), run
    unmerged unless ``merge_lora``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected a downloaded Wan2.1-T2V folder)")
    device = resolve_device(str(device)) if isinstance(device, str) else device
    dtype = dtype or default_dtype(device)
    cfg = folder_config(folder)
    fam = family_of(family, checkpoint, cfg, folder)
    if checkpoint is None:
        dit = load_dit(folder, dtype=dtype, device=device)
    else:
        weights = weights or (fam.weights if fam else None)
        dit = load_dit(checkpoint, weights=weights, num_heads=cfg.num_heads, dtype=dtype, device=device)
        check_same_size(dit.cfg, cfg, checkpoint, folder)
    dit = with_lora(dit, fam, lora, lora_alpha, merge_lora)
    text_encoder = load_text_encoder(folder, dtype=dtype, device=device, offload=offload_text_encoder)
    if text_encoder.dim != dit.cfg.text_dim:
        raise CheckpointError(f"the text encoder is {text_encoder.dim} wide, the DiT expects {dit.cfg.text_dim}")
    if preview_decoder is None:
        codec = load_vae(folder, dtype=dtype, device=device)
    else:
        codec = load_tae(preview_decoder, dtype=dtype, device=device)
    if codec.latent_channels != dit.cfg.in_channels:
        raise CheckpointError(f"the VAE has {codec.latent_channels} latent channels, the DiT {dit.cfg.in_channels}")
    model = TextToVideo(text_encoder, dit)
    if checkpoint is not None:  # its family's, or the settings it was trained with (a run of ours), else the release's
        causal = causal or (fam.causal_config() if fam else None) or trained_causal(checkpoint) or RELEASED_CAUSAL
    return WanPipeline(model, codec, causal, folder, Path(checkpoint) if checkpoint else None, fam)


def family_of(name: str | Family | None, checkpoint: str | Path | None, cfg, folder: Path) -> Family | None:
    """The family asked for, or the one the checkpoint's file name tells; refused when this project cannot run
    it yet or its model size is not the folder's."""
    fam = family(name) if isinstance(name, str) else name
    if fam is None and checkpoint is not None:
        fam = detect_family(checkpoint)
    if fam is None:
        return None
    fam.check_runnable()
    sizes = {name: (c.dim, c.num_layers) for name, c in DIT_PRESETS.items() if name.startswith("wan")}
    folder_size = next((name for name, dims in sizes.items() if dims == (cfg.dim, cfg.num_layers)), None)
    if folder_size is not None and folder_size != fam.size:  # (a folder of another size is a test's tiny model)
        raise CheckpointError(
            f"{fam.title} is a {fam.size} model, but {folder} holds a DiT of width {cfg.dim} and {cfg.num_layers} "
            f"layers: use a Wan folder of that size"
        )
    return fam


def with_lora(dit, fam: Family | None, lora, alpha: float | None, merge: bool):
    """``dit`` with ``lora`` (or the LoRA its family runs with: then ``lora`` must be given, or ``"none"``)."""
    if lora is None and fam is not None and fam.lora:
        raise ValueError(
            f"{fam.title} runs with its LoRA ({fam.lora}, from {fam.files[-1]}): pass lora=PATH (--lora PATH), or "
            "lora='none' (--lora none) to run its base weights alone"
        )
    if lora is None or str(lora) == "none":
        return dit
    from .lora_weights import load_lora

    return load_lora(dit, lora, alpha or (fam.lora_alpha if fam else None), merge)
