"""Training batches as a pure function of a seed, whatever the data source."""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..data.latent_shards import LatentShards
from ..data.prompts import PromptFile
from ..data.shapes import ShapesWorld
from ..data.video_folder import VideoFolder
from ..models.tokens import prompt_vocabulary


class Batches:
    """``batches(seed) -> (video [B, F, 3, H, W], prompts)`` for ``data.source``: the shapes world, a video
    folder, pre-encoded latents (then the video is already latents) or a prompt file (then it is None)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.data.source == "shapes":
            self.world = ShapesWorld(cfg.data)
        elif cfg.data.source == "prompts":
            self.prompt_file = PromptFile(cfg.data.prompts)
        elif cfg.data.source == "latents":
            self.shards = LatentShards(cfg.data.latents, cfg.data.frames, cfg.data.height, cfg.data.width)
        else:
            self.folder = VideoFolder(cfg.data.folder, cfg.data.frames, cfg.data.height, cfg.data.width)

    def __call__(self, seed: int, batch_size: int | None = None) -> tuple[torch.Tensor | None, list[str]]:
        n = batch_size or self.cfg.batch_size
        if self.cfg.data.source == "latents":
            return self.shards.sample(n, seed)
        if self.cfg.data.source == "shapes":
            b = self.world.sample(n, seed)
            return b.video, b.prompts
        if self.cfg.data.source == "prompts":
            return None, self.prompt_file.sample(n, seed)
        return self.folder.sample(n, seed)

    def vocabulary(self) -> list[str]:
        """Every word the training prompts can contain."""
        if self.cfg.data.source == "shapes":
            return self.cfg.data.vocabulary()
        if self.cfg.data.source == "prompts":
            return prompt_vocabulary(self.prompt_file.prompts)
        if self.cfg.data.source == "latents":
            return prompt_vocabulary(self.shards.prompts)
        return prompt_vocabulary([p for _, p in self.folder.items])
