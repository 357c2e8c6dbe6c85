"""The field's causal Wan2.1 models as data: one ``Family`` per released model, its inference settings at
the official values (read from each official repository: ``../shared/FAMILIES.md`` cites file and line).

A family is a ``CausalConfig`` (chunk size, step list and schedule, window and sink, cache policy), a
prompt-switch rule (``inference/recache.py``), a denoising scheme, and the files it ships in. Nothing
downstream asks which family it runs: ``generate``/``serve``/``eval`` take the settings and rules a
family gives, each still overridable.

    settings = family("reward-forcing").causal_config()          # the official values, Wan's latent frames
    settings = family("longlive").rules_for(toy_settings)        # its rules on another model (the toy)

``rules_for`` answers "what would this model's inference rule do to mine": the model keeps its own
chunk size and step list (what it was trained with), and takes the family's cache policy, switch rule
and scheme, with the window and sink counted in chunks (LongLive: a sink of 1 chunk and 3 more chunks).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import CausalConfig


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    repo: str  # the official code
    licence: str
    files: tuple[str, ...]  # what to download: "huggingface repo: path"
    differs: str  # what differs from Self Forcing at inference
    causal: dict = field(default_factory=dict)  # CausalConfig fields at the official values (Wan2.1 latent frames)
    switch: str = "recache"  # the prompt-switch rule (inference/recache.py); "recache" where the model has none
    size: str = "wan2.1-1.3b"  # the DiT preset its weights have
    weights: str | None = None  # the network of a training .pt its inference script reads (None: ours)
    lora: str | None = None  # the LoRA file it runs with (unmerged): ``--lora``
    lora_alpha: float | None = None  # that LoRA's alpha (not stored in a PEFT state dict)
    checkpoint_names: tuple[str, ...] = ()  # the official file names (with a folder where the name is common)
    missing: str | None = None  # what this project does not run yet (the family is refused until then)

    @property
    def scheme(self) -> str:
        """The denoising scheme: ``chunk`` (one chunk at a time), ``rolling`` or ``rebuild``."""
        return self.causal.get("scheme", "chunk")

    def causal_config(self, **overrides) -> CausalConfig:
        """The official inference settings, with ``overrides`` (any ``CausalConfig`` field) applied."""
        self.check_runnable()
        settings = CausalConfig(**{**self.causal, **overrides})
        settings.validate()
        return settings

    def rules_for(self, settings: CausalConfig) -> CausalConfig:
        """This family's rules applied to a model streaming with ``settings`` (its own chunk size and steps):
        the cache policy and the denoising scheme, and a sink and window counted in this family's chunks (a
        family without a sink keeps the model's window: its training length)."""
        self.check_runnable()
        fpb = self.causal.get("frames_per_block", 3)
        rope, ema = self.causal.get("rope", "absolute"), self.causal.get("sink_ema")
        out = replace(settings, rope=rope, sink_ema=ema, scheme=self.scheme)
        f = settings.frames_per_block
        if self.causal.get("sink"):  # a sink and a window of its own
            out = replace(out, sink=self.causal["sink"] // fpb * f, window=self.causal["window"] // fpb * f)
        elif self.scheme == "rebuild":  # its context, in chunks
            out = replace(out, sink=0, window=self.causal["window"] // fpb * f)
        elif self.scheme == "rolling":
            out = replace(out, sink=0)
        out.validate()
        return out

    def check_runnable(self) -> None:
        if self.missing:
            raise NotImplementedError(
                f"{self.title} (--family {self.name}) needs {self.missing}, which this project does not run yet; "
                f"the families that stream today: {', '.join(f.name for f in FAMILIES.values() if not f.missing)}"
            )


_SF_STEPS = [1000.0, 750.0, 500.0, 250.0]
# Self Forcing's release; every other family is these settings with what it changes
_SELF_FORCING = dict(frames_per_block=3, denoising_steps=_SF_STEPS, shift=5.0, context_timestep=0.0, window=21)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "self-forcing",
            "Self Forcing",
            "guandeh17/Self-Forcing",
            "Apache-2.0 (code)",
            ("gdhe17/Self-Forcing: checkpoints/self_forcing_dmd.pt",),
            "the reference: chunks of 3 latent frames, 4 steps [1000, 750, 500, 250] warped with shift 5, the "
            "chunk committed clean; a video longer than 21 latent frames rolls the cache (window 21, no sink)",
            _SELF_FORCING,
            checkpoint_names=("self_forcing_dmd.pt", "self_forcing_sid.pt"),
        ),
        Family(
            "causvid",
            "CausVid",
            "tianweiy/CausVid",
            "CC BY-NC-SA 4.0",
            ("tianweiy/CausVid: autoregressive_checkpoint/model.pt",),
            "3 steps [1000, 757, 522] used as they are (not warped) on a shift-8 schedule; a 21-frame cache. "
            "(Its long-video script restarts the cache from a re-encoded frame every 21 latent frames; here "
            "the cache rolls instead.)",
            {**_SELF_FORCING, "denoising_steps": [1000.0, 757.0, 522.0], "shift": 8.0, "warp_steps": False},
            weights="generator",
            checkpoint_names=("autoregressive_checkpoint/model.pt",),
        ),
        Family(
            "causal-forcing",
            "Causal Forcing (chunk-wise)",
            "thu-ml/Causal-Forcing",
            "Apache-2.0",
            ("zhuhz22/Causal-Forcing: chunkwise/causal_forcing.pt",),
            "the Self Forcing sampler on a student distilled from an autoregressive teacher; attention over "
            "the whole video (21 latent frames)",
            _SELF_FORCING,
            checkpoint_names=("chunkwise/causal_forcing.pt",),
        ),
        Family(
            "causal-forcing-frame",
            "Causal Forcing (frame-wise)",
            "thu-ml/Causal-Forcing",
            "Apache-2.0",
            ("zhuhz22/Causal-Forcing: framewise/causal_forcing.pt",),
            "frame-wise: chunks of 1 latent frame, 4 steps",
            {**_SELF_FORCING, "frames_per_block": 1},
            checkpoint_names=("framewise/causal_forcing.pt",),
        ),
        Family(
            "causal-forcing++2",
            "Causal Forcing++ (frame-wise, 2 steps)",
            "thu-ml/Causal-Forcing",
            "Apache-2.0",
            ("zhuhz22/Causal-Forcing: causal-forcing++/framewise-2step.pt",),
            "frame-wise with 2 steps [1000, 500]; the first frame takes the 4-step list",
            {
                **_SELF_FORCING,
                "frames_per_block": 1,
                "denoising_steps": [1000.0, 500.0],
                "first_chunk_steps": _SF_STEPS,
            },
            checkpoint_names=("framewise-2step.pt",),
        ),
        Family(
            "causal-forcing++1",
            "Causal Forcing++ (frame-wise, 1 step)",
            "thu-ml/Causal-Forcing",
            "Apache-2.0",
            ("zhuhz22/Causal-Forcing: causal-forcing++/framewise-1step.pt",),
            "frame-wise with 1 step [1000]; the first frame takes the 4-step list",
            {**_SELF_FORCING, "frames_per_block": 1, "denoising_steps": [1000.0], "first_chunk_steps": _SF_STEPS},
            checkpoint_names=("framewise-1step.pt",),
        ),
        Family(
            "longlive",
            "LongLive 1.0",
            "NVlabs/LongLive (branch v1.0)",
            "Apache-2.0 (code; changed from CC BY-NC-SA 4.0 on 2025-11-01)",
            ("Efficient-Large-Model/LongLive-1.3B: models/longlive_base.pt", "... models/lora.pt"),
            "attends to 12 latent frames: a sink of the first 3 and the last 9 (the chunk's own 3 included); "
            "runs a rank-256 LoRA unmerged; at a prompt switch it re-caches the last 12 frames in one pass "
            "(--switch-mode one-pass)",
            {**_SELF_FORCING, "window": 9, "sink": 3},
            switch="one-pass",
            weights="generator",
            lora="lora.pt",
            lora_alpha=256.0,
            checkpoint_names=("longlive_base.pt",),
        ),
        Family(
            "longlive-infinite",
            "LongLive 1.0 (infinite)",
            "NVlabs/LongLive (branch v1.0)",
            "Apache-2.0 (code)",
            ("Efficient-Large-Model/LongLive-1.3B: models/longlive_base.pt", "... models/lora.pt"),
            "LongLive with its infinite-attention model: keys cached before RoPE and rotated by slot, so the "
            "positions never grow",
            {**_SELF_FORCING, "window": 9, "sink": 3, "rope": "slot"},
            switch="one-pass",
            weights="generator",
            lora="lora.pt",
            lora_alpha=256.0,
        ),
        Family(
            "reward-forcing",
            "Reward Forcing",
            "JaydenLyh/Reward-Forcing",
            "Apache-2.0",
            ("JaydenLu666/Reward-Forcing-T2V-1.3B: rewardforcing.pt",),
            "attends to 9 latent frames, a sink of 3 and the last 6; keys cached before RoPE and rotated by "
            "slot; at every eviction the sink becomes 0.999 sink + 0.001 evicted frames",
            {**_SELF_FORCING, "window": 6, "sink": 3, "rope": "slot", "sink_ema": 0.999},
            checkpoint_names=("rewardforcing.pt",),
        ),
        Family(
            "rolling-forcing",
            "Rolling Forcing",
            "TencentARC/RollingForcing",
            "academic use only, no commercial use (its LICENSE)",
            ("TencentARC/RollingForcing: checkpoints/rolling_forcing_dmd.pt",),
            "denoises a window of 5 chunks jointly, at 5 noise levels from oldest to newest, and commits only "
            "the oldest; the first chunk is an anchor rotated to sit just before the window",
            {
                **_SELF_FORCING,
                "denoising_steps": [1000.0, 800.0, 600.0, 400.0, 200.0],
                "rope": "slot",
                "scheme": "rolling",
            },
            weights="generator_ema",
            checkpoint_names=("rolling_forcing_dmd.pt",),
        ),
        Family(
            "krea",
            "Krea Realtime 14B",
            "krea-ai/realtime-video",
            "CC BY-NC-SA 4.0",
            ("krea/krea-realtime-video: krea-realtime-video-14b.safetensors", "Wan-AI/Wan2.1-T2V-14B (the folder)"),
            "Wan2.1-14B; 5 steps ending with one at t = 0 and no commit pass: every chunk rebuilds the cache "
            "from 3 context latents (the first a VAE re-encode of an earlier decoded frame); a prompt switch "
            "blends the text over 4 chunks; video-to-video",
            {**_SELF_FORCING, "denoising_steps": [*_SF_STEPS, 0.0], "window": 6, "scheme": "rebuild"},
            switch="blend",
            size="wan2.1-14b",
            checkpoint_names=("krea-realtime-video-14b.safetensors",),
        ),
    ]
}


def family(name: str) -> Family:
    """The family called ``name``; a ValueError lists them all."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect_family(checkpoint: str | Path) -> Family | None:
    """The family whose official file ``checkpoint`` is, by its name (and folder, where the name is as common
    as ``model.pt``), else None."""
    path = Path(checkpoint)
    tails = {path.name, f"{path.parent.name}/{path.name}"}
    return next((f for f in FAMILIES.values() if tails & set(f.checkpoint_names)), None)
