"""A video folder encoded once by a codec (the Wan VAE) into sharded latent files: ``data.source: latents``.

    out/index.json                 {"frames", "height", "width", "latent_shape", "num", "shards": [...]}
    out/latents_00000.safetensors  latents [n, f, C, h, w] (normalised, as the DiT sees them) + prompts

Encoding a video with the Wan VAE at 832x480 takes seconds, so the recipes that need real videos (the
GAN's real side, Teacher / Diffusion Forcing, the teacher) read latents encoded once instead. Each shard
is written under a temporary name and renamed, and ``index.json`` last, so an interrupted encoding
resumes at the first missing shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..models.codec import Codec
from .video_folder import VideoFolder

INDEX = "index.json"


def shard_name(i: int) -> str:
    return f"latents_{i:05d}.safetensors"


@torch.no_grad()
def encode_video_folder(
    codec: Codec, folder: VideoFolder, out: str | Path, shard_size: int = 64, batch_size: int = 1
) -> Path:
    """Encode every clip of ``folder`` into ``out`` (a rerun keeps the shards already written)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shape = codec.latent_shape(folder.frames, folder.height, folder.width)
    shards = []
    for s, start in enumerate(tqdm(range(0, len(folder), shard_size), desc="encoding", unit="shard")):
        path = out / shard_name(s)
        items = range(start, min(start + shard_size, len(folder)))
        if not path.is_file():
            latents, prompts = [], []
            for i in range(items.start, items.stop, batch_size):
                clips = [folder[j] for j in range(i, min(i + batch_size, items.stop))]
                latents.append(codec.encode(torch.stack([c[0] for c in clips])).float().cpu())
                prompts += [c[1] for c in clips]
            tmp = path.with_suffix(".tmp")
            save_file({"latents": torch.cat(latents).contiguous()}, tmp, metadata={"prompts": json.dumps(prompts)})
            os.replace(tmp, path)
        shards.append(path.name)
    index = dict(frames=folder.frames, height=folder.height, width=folder.width, latent_shape=list(shape))
    index.update(num=len(folder), shards=shards)
    (out / (INDEX + ".tmp")).write_text(json.dumps(index, indent=1))
    os.replace(out / (INDEX + ".tmp"), out / INDEX)
    return out


def read_rows(root: Path, rows: list[tuple[str, int]], key: str) -> torch.Tensor:
    """Rows ``(shard file, row)`` of tensor ``key`` across safetensors shards, stacked; nothing else is read."""
    out = []
    for name, row in rows:
        with safe_open(root / name, "pt") as f:
            out.append(f.get_slice(key)[row : row + 1])
    return torch.cat(out)


class LatentShards:
    """``sample(n, seed) -> (latents [n, f, C, h, w], prompts)`` from ``encode_video_folder``'s output."""

    def __init__(self, root: str | Path, frames: int, height: int, width: int):
        self.root = Path(root)
        index = self.root / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{index} not found: encode the videos first (selfforcing encode-videos)")
        self.index = json.loads(index.read_text())
        if (self.index["frames"], self.index["height"], self.index["width"]) != (frames, height, width):
            raise ValueError(
                f"{self.root} holds latents of {self.index['frames']} frames of {self.index['height']}x"
                f"{self.index['width']}, the run expects {frames} of {height}x{width}: set data.frames/height/width "
                "to match or encode again"
            )
        self.rows: list[tuple[str, int]] = []  # (shard, row) of every clip; latents are read when sampled
        self.prompts: list[str] = []
        for name in self.index["shards"]:
            with safe_open(self.root / name, "pt") as f:
                prompts = json.loads(f.metadata()["prompts"])
            self.rows += [(name, r) for r in range(len(prompts))]
            self.prompts += prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, batch_size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(self), (batch_size,), generator=g).tolist()
        return read_rows(self.root, [self.rows[i] for i in idx], "latents"), [self.prompts[i] for i in idx]
