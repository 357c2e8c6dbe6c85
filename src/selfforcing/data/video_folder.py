"""The user's own videos: a folder of mp4/gif files with a prompt each in ``prompts.jsonl``.

``prompts.jsonl`` holds one JSON object per line, ``{"file": "clip01.mp4", "prompt": "..."}``, with
paths relative to the folder. Every clip must have at least ``frames`` frames of ``height x width``;
the first ``frames`` frames are used.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .video_io import from_uint8, read_video


class VideoFolder:
    def __init__(self, root: str | Path, frames: int, height: int, width: int):
        self.root = Path(root)
        self.frames, self.height, self.width = frames, height, width
        index = self.root / "prompts.jsonl"
        if not index.is_file():
            raise FileNotFoundError(
                f"{index} not found: a video folder needs a prompts.jsonl with lines like "
                '{"file": "clip.mp4", "prompt": "a red circle moving right"}'
            )
        self.items: list[tuple[Path, str]] = []
        for n, line in enumerate(index.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                file, prompt = entry["file"], entry["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f'{index}:{n}: expected {{"file": ..., "prompt": ...}}, got {line!r} ({e})') from e
            path = self.root / file
            if not path.is_file():
                raise FileNotFoundError(f"{index}:{n}: video {path} does not exist")
            self.items.append((path, prompt))
        if not self.items:
            raise ValueError(f"{index} lists no videos")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        """The i-th clip ``[frames, 3, H, W]`` in [-1, 1] and its prompt."""
        path, prompt = self.items[i]
        frames = read_video(path)
        f, h, w, _ = frames.shape
        if (h, w) != (self.height, self.width):
            raise ValueError(
                f"video {path} is {h}x{w} (height x width) but the dataset expects {self.height}x{self.width}: "
                "resize the clips or set data.height/data.width to match"
            )
        if f < self.frames:
            raise ValueError(f"video {path} has {f} frames, fewer than the {self.frames} needed")
        return from_uint8(frames[: self.frames]), prompt

    def sample(self, batch_size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
        """A random batch ``[B, F, 3, H, W]`` and its prompts, deterministic for a seed."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(self), (batch_size,), generator=g).tolist()
        clips = [self[i] for i in idx]
        return torch.stack([c[0] for c in clips]), [c[1] for c in clips]
