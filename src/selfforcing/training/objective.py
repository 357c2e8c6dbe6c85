"""What a training method is to the ``Trainer``: the updates it makes each step and their losses.

An objective names its update kinds (``generator``; distillation adds ``critic``), the networks each
kind trains, the networks it adds to a checkpoint, and one micro-batch's loss of a kind. The Trainer
does the rest (processes, accumulation, precision, the non-finite guard, EMA, checkpoints) and never
asks which method it runs. Every random draw of a loss comes from the generator it is given, seeded
by (seed, step, update kind, micro-batch): a resumed run replays an uninterrupted one exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..config import TrainConfig
from ..models.codec import Codec
from ..models.t2v import TextToVideo
from .batches import Batches
from .fsdp import shard_text_to_video

STREAMS = {"generator": 0, "critic": 1}  # independent random streams of a step's two kinds of update


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to 10 % of the peak at the last step."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    return o.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class Setup:
    """What the Trainer hands an objective: the run's config, the generator it trains (built, on its
    device, FSDP-sharded over ``mesh`` when ``distributed: fsdp`` runs on several processes), the codec
    and the data."""

    cfg: TrainConfig
    model: TextToVideo
    codec: Codec
    batches: Batches
    device: torch.device
    mesh: DeviceMesh | None = None


class Objective:
    """The base: one ``generator`` update a step, at the scheduled learning rate (``lr_at``)."""

    kinds: tuple[str, ...] = ("generator",)  # every update kind it makes, each with its own optimizer

    def __init__(self, setup: Setup):
        self.cfg, self.model, self.codec = setup.cfg, setup.model, setup.codec
        self.batches, self.device, self.mesh = setup.batches, setup.device, setup.mesh

    def loss(self, kind: str, k: int, step: int, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Micro-batch ``k``'s loss of update ``kind`` at ``step`` (and stats to log); draws only from ``g``."""
        raise NotImplementedError

    def updates(self, step: int) -> tuple[str, ...]:
        """The update kinds of ``step``, in order."""
        return ("generator",)

    def generator_updates(self, step: int) -> int:
        """Generator updates made in steps 0..``step`` (the EMA's clock)."""
        return step + 1

    def learning_rate(self, kind: str, step: int) -> float:
        return lr_at(step, self.cfg)

    def trainable(self, kind: str) -> list[nn.Module]:
        """The networks an update of ``kind`` trains."""
        return [self.model]

    def networks(self) -> dict[str, nn.Module]:
        """The networks this objective adds to a checkpoint (the generator and its EMA are the Trainer's)."""
        return {}

    # -- helpers the objectives share --------------------------------------------------------------
    def shard(self, model: nn.Module) -> nn.Module:
        """FSDP2: shard a text-to-video network like the generator (nothing on one process)."""
        return model if self.mesh is None else shard_text_to_video(model, self.mesh, self.cfg.precision)

    def batch(self, g: torch.Generator) -> tuple[torch.Tensor | None, list[str]]:
        """A training batch ``(video, prompts)`` drawn from ``g``."""
        return self.batches(int(torch.randint(2**62, (1,), generator=g)))

    def latents(self, video: torch.Tensor) -> torch.Tensor:
        """Real videos as the DiT's latents: encoded by the codec, or as they are for ``data.source: latents``."""
        video = video.to(self.device)
        return video if self.cfg.data.source == "latents" else self.codec.encode(video)
