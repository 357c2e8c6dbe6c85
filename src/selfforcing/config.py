"""Run configurations: plain dataclasses, loaded from YAML with ``key=value`` overrides.

Unknown keys and wrong types are errors that name the key. ``load_config("configs/teacher_toy.yaml",
["optim.lr=1e-3"])`` returns a ``TrainConfig``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data.shapes import ShapesWorldConfig
from .diffusion.flow_matching import step_sigmas, zero_step_sigma
from .models.cache_policy import CachePolicy
from .models.causal import check_layout
from .models.dit import DIT_PRESETS, DiTConfig, dit_config


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


@dataclass
class DataConfig(ShapesWorldConfig):
    """The shapes world's parameters, ``source: folder`` for the user's own videos, or ``source: prompts``
    for prompts alone (Self Forcing with DMD / SiD needs no videos)."""

    source: str = "shapes"  # shapes | folder
    folder: str = ""  # with source=folder: a folder with prompts.jsonl (see selfforcing.data.VideoFolder)
    prompts: str = ""  # with source=prompts: a text file, one prompt a line (see selfforcing.data.prompts)
    latents: str = ""  # with source=latents: videos encoded once (selfforcing encode-videos; data.latent_shards)


SOURCES = ("preset", "wan", "text_cache")  # ModelConfig fields that are not DiT size overrides


@dataclass
class ModelConfig:
    """A DiT size preset, with optional per-field overrides (null = the preset's value)."""

    preset: str = "toy"
    wan: str = ""  # a Wan2.1 folder: its DiT size, its frozen umT5 and its VAE (the preset is then unused)
    text_cache: str = ""  # with wan: a folder of umT5 embeddings, one per prompt (selfforcing encode-prompts)
    dim: int | None = None
    ffn_dim: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    freq_dim: int | None = None
    patch_size: tuple[int, int, int] | None = None

    def dit(self, in_channels: int, text_dim: int) -> DiTConfig:
        """The preset's DiT config with the size fields that are set. A Wan folder's DiT config is in the
        folder (``selfforcing.pipeline.dit_config`` reads either)."""
        if self.wan:
            raise ConfigError(f"model.wan={self.wan}: its DiT's size is the folder's (selfforcing.pipeline.dit_config)")
        if self.preset not in DIT_PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; choose one of {sorted(DIT_PRESETS)}")
        overrides = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in SOURCES}
        overrides = {k: (tuple(v) if k == "patch_size" else v) for k, v in overrides.items() if v is not None}
        return dit_config(
            self.preset, in_channels=in_channels, out_channels=in_channels, text_dim=text_dim, **overrides
        )


@dataclass
class TextConfig:
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_len: int = 32
    unknown_words: str = "error"  # error | unk
    vocab: list[str] = field(default_factory=list)  # empty: the data's words (filled in when training starts)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 200
    schedule: str = "cosine"  # constant | cosine (to 10 % of lr at the last step)
    ema_decay: float = 0.999
    ema_start: int = 0  # EMA copies the weights until this step, then averages


@dataclass
class DiffusionConfig:
    timestep_distribution: str = "logit_normal"  # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    train_shift: float = 1.0
    prompt_dropout: float = 0.1  # probability of training on the empty prompt (for CFG)
    sample_steps: int = 30
    sample_shift: float = 3.0
    guidance_scale: float = 3.0


@dataclass
class CausalConfig:
    """How the causal student generates (METHOD.md sections 3 and 6); absent for a bidirectional teacher."""

    frames_per_block: int = 3  # latent frames per chunk: 3 = chunk-wise, 1 = frame-wise
    denoising_steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])  # before warping
    # the first generated chunk's own step list (Causal Forcing++: 4 steps for the first chunk, then 2 or 1);
    # null = denoising_steps. Streaming only: training draws its exit step from one list
    first_chunk_steps: list[float] | None = None
    shift: float = 5.0  # warp of the step list
    warp_steps: bool = True  # false: the steps are sigma * 1000 as given, not warped (CausVid's [1000, 757, 522])
    context_timestep: float = 0.0  # t_ctx of the cache-commit pass, in [0, 1000)
    # A chunk attends to the last `window` latent frames up to its end (itself included) and to the first
    # `sink` frames: at most sink + window frames. Unset (null) = 0; window 0 = unlimited.
    window: int | None = None
    sink: int | None = None  # first latent frames always attended to (never evicted from a rolling cache)
    # The same, under the names of the official Self Forcing / LongLive / Reward Forcing configs:
    # local_attn_size = frames attended in all, the sink and the current chunk included (-1 = unlimited),
    # sink_size = sink. They become window = local_attn_size - sink_size and sink = sink_size (then null):
    # LongLive's local_attn_size 12, sink_size 3 is window 9, sink 3 (docs/interactive.md).
    local_attn_size: int | None = None
    sink_size: int | None = None
    # how the KV cache stores keys/values: "auto" in the dtype attention computes in (bf16 on GPUs), with
    # slots for the current chunk written in place; "compact" without those slots (the chunk is concatenated
    # per layer: less memory, a copy per layer); "fp8" in e4m3 with one scale per frame and head (half of
    # compact's memory; its cost in docs/streaming.md)
    kv_cache: str = "auto"
    # how cached keys meet RoPE (models/cache_policy.py): "absolute" (stored rotated at their frame's position:
    # Self Forcing, LongLive, CausVid) or "slot" (stored before RoPE, the held frames rotated to 0..n-1 at every
    # read: Reward Forcing, LongLive's infinite mode). Streaming only
    rope: str = "absolute"
    # Reward Forcing's EMA sink: at each eviction sink <- sink_ema * sink + (1 - sink_ema) * evicted (0.999);
    # null = the sink never changes. Streaming only
    sink_ema: float | None = None
    # how chunks are denoised: "chunk" one at a time against the cache (Self Forcing); "rolling": a window of
    # chunks at rising noise levels in one pass, the oldest committed (Rolling Forcing; inference/rolling.py;
    # needs rope: slot); "rebuild": no commit pass, the cache rebuilt from window - frames_per_block context
    # latents before every chunk (Krea Realtime; inference/rebuild.py). Streaming only
    scheme: str = "chunk"

    def __post_init__(self) -> None:
        self.window, self.sink = official_window(self)
        self.local_attn_size = self.sink_size = None  # resolved: window and sink are the settings from here on

    def sigmas(self, chunk: int | None = None, strength: float = 1.0) -> torch.Tensor:
        """The few-step noise levels ``[S]`` of generated chunk ``chunk`` (0 = the first; None = any chunk but
        the first), e.g. [1.0, 0.9375, 0.8333, 0.625]: ``first_chunk_steps`` for chunk 0 when set, else
        ``denoising_steps``, warped by ``shift`` unless ``warp_steps`` is off. ``strength`` < 1 (video-to-video):
        every step t becomes floor(t * strength) first, so the list starts lower (Krea Realtime's rule: its
        [1000, 750, 500, 250, 0] becomes floor(linspace(1000 s, 0, 5)))."""
        steps = self.first_chunk_steps if chunk == 0 and self.first_chunk_steps else self.denoising_steps
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1] (1: from pure noise), got {strength}")
        if strength != 1:
            steps = [float(math.floor(t * strength)) for t in steps]
        return step_sigmas(list(steps), self.shift, self.warp_steps)

    @property
    def zero_sigma(self) -> float:
        """The noise level a final step at t = 0 computes with (a step list ending with 0: Krea Realtime)."""
        return zero_step_sigma(self.shift)

    def cache_options(self) -> dict:
        """``KVCache.for_model``'s options: the storage of ``kv_cache`` and the ``CachePolicy``."""
        return dict(KV_CACHE_KINDS[self.kv_cache], policy=CachePolicy(self.rope, self.sink_ema))

    def validate(self, num_frames: int | None = None) -> None:
        """Raise a ValueError naming the problem (``num_frames``: latent frames to generate)."""
        check_layout(self.frames_per_block, self.window, self.sink)
        if not 0 <= self.context_timestep < 1000:
            raise ValueError(f"causal.context_timestep must be in [0, 1000), got {self.context_timestep}")
        self.sigmas()  # raises on a bad step list
        self.sigmas(0)  # and on a bad first-chunk list
        CachePolicy(self.rope, self.sink_ema)  # raises on a bad rope mode or EMA factor
        if self.scheme not in SCHEMES:
            raise ValueError(f"causal.scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.scheme == "rolling" and self.sigmas()[-1] == 0:
            raise ValueError("causal.scheme: rolling takes no final t = 0 step: end causal.denoising_steps above 0")
        if self.scheme == "rolling" and (self.rope != "slot" or self.sink):
            raise ValueError(
                "causal.scheme: rolling (Rolling Forcing) keeps the video's first chunk as its anchor and rotates "
                "keys by slot: set causal.rope: slot and causal.sink: 0"
            )
        if self.kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"causal.kv_cache must be one of {list(KV_CACHE_KINDS)}, got {self.kv_cache!r}")
        if num_frames is not None and num_frames % self.frames_per_block:
            raise ValueError(
                f"{num_frames} latent frames is not a whole number of chunks of {self.frames_per_block}: "
                "use a multiple of causal.frames_per_block"
            )


SCHEMES = ("chunk", "rolling", "rebuild")
KV_CACHE_KINDS = {"auto": {}, "compact": {"in_place": False}, "fp8": {"dtype": torch.float8_e4m3fn}}


def official_window(c: CausalConfig) -> tuple[int, int]:
    """``(window, sink)`` of a causal config that may use the official names ``local_attn_size`` / ``sink_size``
    (see ``CausalConfig``); a ConfigError names both keys and the mapping when they contradict ``window``/``sink``."""
    sink = c.sink
    if c.sink_size is not None:
        if sink is not None and sink != c.sink_size:
            raise ConfigError(
                f"causal.sink={sink} and causal.sink_size={c.sink_size} disagree: both are the number of first "
                "frames always attended to (sink_size is the official name); give one"
            )
        sink = c.sink_size
    sink = sink or 0
    if c.local_attn_size is None:
        return c.window or 0, sink
    size, fpb = c.local_attn_size, c.frames_per_block
    if size == -1:
        window = 0  # unlimited: the official cache never evicts, so the sink changes nothing
    elif size < 1:
        raise ConfigError(f"causal.local_attn_size must be -1 (unlimited) or >= 1 frames, got {size}")
    else:
        window = size - sink
        if window < fpb:
            raise ConfigError(
                f"causal.local_attn_size={size} with sink_size={sink} leaves window = local_attn_size - sink_size = "
                f"{window} frames, less than a chunk (frames_per_block={fpb}): a chunk must see itself; use "
                f"local_attn_size >= sink_size + frames_per_block = {sink + fpb}, or -1 (unlimited)"
            )
    if c.window is not None and c.window != window:
        raise ConfigError(
            f"causal.window={c.window} and causal.local_attn_size={size} disagree: local_attn_size (the official "
            "Self Forcing / LongLive name) counts the sink frames and the current chunk, window counts the current "
            f"chunk but not the sink, so window = local_attn_size - sink_size = {size} - {sink} = {window} here "
            "(local_attn_size -1 is window 0, unlimited); give one of them"
        )
    return window, sink


@dataclass
class ODEConfig:
    """ODE-regression initialisation of the causal student (``stage: ode_init``)."""

    pairs: str = ""  # folder written by `selfforcing ode-pairs`
    include_clean: bool = True  # also draw the clean level (t = 0) per chunk: teaches clean context


@dataclass
class DistillConfig:
    """Training a causal student on a video-level loss (``stage: causal``, METHOD.md sections 2 and 4)."""

    paradigm: str = "self_forcing"  # self_forcing | teacher_forcing | diffusion_forcing
    loss: str = "dmd"  # dmd | sid (self_forcing) | diffusion (many-step teacher/diffusion forcing)
    teacher: str = ""  # bidirectional teacher checkpoint: the frozen real score and the critic's start
    guidance_scale: float = 3.0  # CFG of the real score
    negative_prompt: str = ""  # the real score's unconditional prompt (the Wan recipes: Wan's negative prompt)
    guidance_rescale: float = 0.0  # phi: pull the guided real score's std back to the conditional one's
    guidance_min_sigma: float = 0.0  # CFG only at noise levels in [min, max] (limited-interval guidance)
    guidance_max_sigma: float = 1.0
    critic_lr: float = 1e-4
    critic_steps_per_generator_step: int = 5  # the critic trains every step, the generator every 5th
    critic_warmup_steps: int = 0  # critic-only steps first, so the fake score fits the student before it is used
    timestep_shift: float = 5.0  # DMD/SiD noise levels: uniform, shifted, clamped to [min_t, max_t]
    min_t: float = 20.0
    max_t: float = 980.0
    sid_alpha: float = 1.0
    gan_taps: list[int] = field(default_factory=list)  # critic blocks the GAN head reads; [] = 1/3, 2/3, last
    gan_relativistic: bool = False
    gan_penalty_weight: float = 0.1  # weight of the finite-difference R1 (real) + R2 (fake) penalties
    # Long rollouts (Self-Forcing++ / LongLive style): the generator rolls out rollout_frames latent frames
    # (0 = the data's length) and DMD / SiD / the critic / the GAN score only its last score_frames (0 = all),
    # as a video of their own (RoPE positions 0..score_frames-1, as the teacher was trained). Gradient reaches
    # only the chunks that overlap the scored window.
    rollout_frames: int = 0
    score_frames: int = 0
    # "last": the window is the rollout's end. "random" (Self-Forcing++): each rollout stops at a chunk
    # boundary drawn uniformly from score_frames..rollout_frames, and its last score_frames are scored, so
    # every depth of a long stream is trained, at the cost of a rollout of that depth only
    score_window: str = "last"
    # + regression_weight x the ODE-regression loss on ode.pairs (DMD1's regression term): anchors the
    # generator to the teacher's ODE outputs while it trains on DMD/SiD/GAN; 0 = off
    regression_weight: float = 0.0
    # image-to-video: each rollout starts from the first latent frame of a real video of the batch (the data's
    # first frame, encoded alone), committed clean as a stream commits an image; the generated frames follow
    # (data.frames' latent frames minus that one: a whole number of chunks) and the losses score the video
    # with its given first frame. Self Forcing, on videos (not data.source=prompts)
    image_to_video: bool = False


PARADIGMS = ("self_forcing", "teacher_forcing", "diffusion_forcing")
LOSSES = ("dmd", "sid", "gan", "diffusion")
# paradigm x loss combinations implemented so far
COMBINATIONS = {
    ("self_forcing", "dmd"),
    ("self_forcing", "sid"),
    ("self_forcing", "gan"),
    ("teacher_forcing", "diffusion"),
    ("diffusion_forcing", "diffusion"),
    ("teacher_forcing", "dmd"),  # TF + DMD
    ("diffusion_forcing", "dmd"),  # DF + DMD = CausVid
}
STAGES = ("teacher", "ode_init", "causal")


@dataclass
class LoRAConfig:
    """Train LoRA adapters on the generator's DiT instead of its weights (``rank`` > 0): the base stays frozen
    and is stored once; only the adapters are in the optimizer and in the checkpoints."""

    rank: int = 0  # 0: train every weight
    alpha: float | None = None  # adapters scale by alpha / rank (null: alpha = rank)
    targets: list[str] = field(default_factory=list)  # DiT Linear names (empty: every Linear of the blocks)
    critic: bool = False  # distillation: adapters on the critic too, its base the frozen teacher's own weights


@dataclass
class TrainConfig:
    name: str = "teacher"
    stage: str = "teacher"  # teacher (bidirectional flow matching) | ode_init (causal student on ODE pairs)
    init_from: str = ""  # checkpoint/run folder whose EMA weights (and vocabulary) initialise the model
    # with model.wan: a PEFT LoRA merged into init_from's DiT before training (LongLive's models/lora.pt), its
    # alpha (null: the family's, else the rank)
    init_lora: str = ""
    init_lora_alpha: float | None = None
    out_dir: str = "runs"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 16  # videos per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step (effective batch = batch_size x this)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs CUDA)
    # the dtype of the weights that never train: the distillation teacher, and with lora.rank the generator's
    # and critic's bases (the adapters stay fp32). bf16 halves them; they then compute in bf16
    frozen_precision: str = "fp32"  # fp32 | bf16
    num_threads: int = 0  # torch CPU threads, 0 = torch's default
    gradient_checkpointing: bool = False  # recompute DiT block activations in backward (less memory, ~1.3x time)
    log_every: int = 10
    sample_every: int = 500
    num_samples: int = 8
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    checkpoint_format: str = "full"  # full (one safetensors per network) | sharded (each process its shards)
    distributed: str = "ddp"  # ddp | fsdp (FSDP2: weights, gradients and optimizer sharded) under torchrun
    max_nonfinite_steps: int = 5  # halt after this many updates in a row with a non-finite loss or gradient
    collective_timeout_s: float = 1800.0  # under torchrun: a collective waiting longer than this fails the run
    resume: bool = True  # continue from the run folder's latest checkpoint if there is one
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    causal: CausalConfig | None = None  # set for causal students
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (
                not self.init_lora or bool(self.model.wan),
                "init_lora merges a LoRA into a Wan DiT: set model.wan (and init_from: LongLive's longlive_base.pt)",
            ),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum_steps >= 1, "grad_accum_steps must be >= 1"),
            (self.distributed in ("ddp", "fsdp"), f"distributed must be ddp or fsdp, got {self.distributed!r}"),
            (self.max_nonfinite_steps >= 1, "max_nonfinite_steps must be >= 1 (1 halts at the first bad update)"),
            (self.collective_timeout_s > 0, "collective_timeout_s must be > 0 (seconds a collective may wait)"),
            (self.lora.rank >= 0, f"lora.rank must be >= 0 (0: no adapters), got {self.lora.rank}"),
            (not self.lora.critic or self.lora.rank > 0, "lora.critic needs lora.rank > 0 (the adapters' rank)"),
            (
                not self.lora.critic or self.distributed == "ddp",
                "lora.critic shares the teacher's weights, which FSDP2 cannot shard as two networks: use "
                "distributed: ddp with lora.critic (or a whole critic under fsdp)",
            ),
            (
                self.precision in ("fp32", "bf16", "fp16"),
                f"precision must be fp32, bf16 or fp16, got {self.precision!r}",
            ),
            (
                self.frozen_precision in ("fp32", "bf16"),
                f"frozen_precision must be fp32 or bf16 (the frozen weights' dtype), got {self.frozen_precision!r}",
            ),
            (
                self.data.source in ("shapes", "folder", "prompts", "latents"),
                f"data.source must be 'shapes', 'folder', 'prompts' or 'latents', got {self.data.source!r}",
            ),
            (self.data.source != "latents" or bool(self.data.latents), "data.source=latents needs data.latents=DIR"),
            (self.data.source != "folder" or bool(self.data.folder), "data.source=folder needs data.folder=PATH"),
            (self.data.source != "prompts" or bool(self.data.prompts), "data.source=prompts needs data.prompts=FILE"),
            (
                self.data.source != "prompts"
                or self.stage == "ode_init"  # the ODE pairs are its videos; the prompts caption the samples
                or (
                    self.stage == "causal"
                    and self.distill.paradigm == "self_forcing"
                    and self.distill.loss in ("dmd", "sid")
                ),
                f"data.source=prompts has no videos: only Self Forcing with DMD or SiD (or ODE init, on its "
                f"pairs) trains on prompts alone "
                f"(stage {self.stage}, {self.distill.paradigm} + {self.distill.loss} needs real videos)",
            ),
            (
                self.optim.schedule in ("constant", "cosine"),
                f"optim.schedule must be constant or cosine, got {self.optim.schedule!r}",
            ),
            (0 <= self.diffusion.prompt_dropout < 1, "diffusion.prompt_dropout must be in [0, 1)"),
            (
                self.log_every >= 1 and self.sample_every >= 1 and self.ckpt_every >= 1,
                "log/sample/ckpt_every must be >= 1",
            ),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (
                self.checkpoint_format in ("full", "sharded"),
                f"checkpoint_format must be full or sharded, got {self.checkpoint_format!r}",
            ),
        ]
        checks += [
            (self.stage in STAGES, f"stage must be one of {STAGES}, got {self.stage!r}"),
            (self.stage == "teacher" or self.causal is not None, f"stage {self.stage} needs a causal: section"),
            (self.stage != "ode_init" or bool(self.ode.pairs), "stage ode_init needs ode.pairs=FOLDER"),
            (self.distill.regression_weight >= 0, "distill.regression_weight must be >= 0"),
            (
                self.stage != "causal" or self.distill.regression_weight == 0 or bool(self.ode.pairs),
                "distill.regression_weight > 0 needs ode.pairs=FOLDER (made by `selfforcing ode-pairs`)",
            ),
            (
                self.stage != "causal"
                or self.distill.loss == "diffusion"
                or bool(self.distill.teacher or self.model.wan),
                "stage causal with a distillation loss needs distill.teacher=CHECKPOINT (or model.wan=FOLDER)",
            ),
            (
                self.distill.paradigm in PARADIGMS,
                f"distill.paradigm must be one of {PARADIGMS}, got {self.distill.paradigm!r}",
            ),
            (self.distill.loss in LOSSES, f"distill.loss must be one of {LOSSES}, got {self.distill.loss!r}"),
            (
                self.stage != "causal" or (self.distill.paradigm, self.distill.loss) in COMBINATIONS,
                f"distill.paradigm={self.distill.paradigm} with distill.loss={self.distill.loss} is not implemented; "
                f"choose one of {sorted(COMBINATIONS)}",
            ),
            (
                not self.distill.image_to_video
                or self.stage == "causal"
                and self.distill.paradigm == "self_forcing"
                and self.data.source != "prompts",
                "distill.image_to_video trains a Self Forcing rollout from the first frames of real videos: it needs "
                "stage causal, distill.paradigm self_forcing and a data.source with videos (shapes, folder, latents)",
            ),
            (
                not self.distill.image_to_video or not (self.distill.rollout_frames or self.distill.score_frames),
                "distill.image_to_video rolls out and scores the data's length: leave distill.rollout_frames and "
                "distill.score_frames at 0",
            ),
            (self.distill.critic_steps_per_generator_step >= 1, "distill.critic_steps_per_generator_step must be >= 1"),
            (self.distill.critic_warmup_steps >= 0, "distill.critic_warmup_steps must be >= 0"),
            (
                0.0 <= self.distill.guidance_rescale <= 1.0,
                f"distill.guidance_rescale must be in [0, 1], got {self.distill.guidance_rescale}",
            ),
            (
                0.0 <= self.distill.guidance_min_sigma < self.distill.guidance_max_sigma <= 1.0,
                "need 0 <= distill.guidance_min_sigma < distill.guidance_max_sigma <= 1, got "
                f"{self.distill.guidance_min_sigma}, {self.distill.guidance_max_sigma}",
            ),
            (0 <= self.distill.min_t < self.distill.max_t <= 1000, "need 0 <= distill.min_t < distill.max_t <= 1000"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            self.data.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if self.causal is not None:
            try:
                # image-to-video: the objective checks the generated latent frames (the codec knows how many)
                self.causal.validate(None if self.distill.image_to_video else self.data.frames)
            except ValueError as e:
                raise ConfigError(str(e)) from e
            if self.causal.first_chunk_steps:
                raise ConfigError(
                    "causal.first_chunk_steps is a streaming setting (Causal Forcing++'s first chunk): training "
                    "draws every chunk's exit step from causal.denoising_steps. Remove it from the training "
                    "config and give it to the stream (CausalConfig(first_chunk_steps=...))"
                )
            if self.causal.sigmas()[-1] == 0:
                raise ConfigError(
                    "causal.denoising_steps ends at t = 0 (a final refining step, Krea Realtime's list): a streaming "
                    "setting; training draws its exit step from levels above 0. End the training list above 0"
                )
            if self.causal.rope != "absolute" or self.causal.sink_ema is not None or self.causal.scheme != "chunk":
                raise ConfigError(
                    "causal.rope: slot, causal.sink_ema and causal.scheme: rolling or rebuild are streaming rules "
                    "(Reward Forcing, Rolling Forcing, Krea): training rolls out chunk by chunk with keys at absolute "
                    "positions and a fixed sink. Remove them from the training config and give them to the stream "
                    "(generate --family, or CausalConfig(rope=..., sink_ema=..., scheme=...))"
                )
        if self.model.wan:  # the DiT's size is the folder's, and the Wan VAE checks the video's size
            sizes = [f.name for f in fields(self.model) if f.name not in SOURCES]
            sizes = [name for name in sizes if getattr(self.model, name) is not None]
            if sizes:
                raise ConfigError(
                    f"model.wan takes the DiT's size from {self.model.wan}: drop model.{', model.'.join(sizes)}"
                )
            return
        dit = self.model.dit(in_channels=3, text_dim=self.text.dim)
        pf, ph, pw = dit.patch_size
        if self.data.frames % pf or self.data.height % ph or self.data.width % pw:
            raise ConfigError(
                f"data size (frames={self.data.frames}, height={self.data.height}, width={self.data.width}) is not "
                f"divisible by model patch_size {dit.patch_size}: change data.* or model.patch_size"
            )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, checked against the ``TrainConfig`` schema."""
    try:
        cfg = OmegaConf.structured(TrainConfig)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides or [])))
        out: TrainConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        where = f" (in {path})" if path else ""
        msg = str(e).splitlines()[0]
        hint = " (valid keys are the fields of TrainConfig in selfforcing/config.py)" if "not in" in msg else ""
        raise ConfigError(f"config key {key!r}{where}: {msg}{hint}") from None
    out.validate()
    return out


def config_to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml(text: str) -> TrainConfig:
    """Inverse of ``config_to_yaml`` (used to rebuild a model from a checkpoint)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(text)))
