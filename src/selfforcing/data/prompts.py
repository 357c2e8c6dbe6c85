"""A prompts-only dataset: Self Forcing with DMD or SiD needs no videos, only what to generate.

A text file, one prompt a line (blank lines and lines starting with ``#`` are skipped), as the reference
trains on. Each micro-batch draws its prompts without replacement from a permutation seeded by the
trainer's (step, micro-batch) seed, so the processes of a run see different prompts and a resumed run
sees exactly the ones the uninterrupted run saw.
"""

from __future__ import annotations

from pathlib import Path

import torch


class PromptFile:
    """``sample(n, seed) -> prompts``: n prompts of the file, drawn from ``seed``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data.prompts: {self.path} does not exist (a text file, one prompt a line)")
        lines = self.path.read_text(encoding="utf-8").splitlines()
        self.prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not self.prompts:
            raise ValueError(f"data.prompts: {self.path} holds no prompts (one a line; # starts a comment)")

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, n: int, seed: int) -> list[str]:
        g = torch.Generator().manual_seed(seed)
        order = torch.cat([torch.randperm(len(self), generator=g) for _ in range(-(-n // len(self)))])
        return [self.prompts[i] for i in order[:n].tolist()]
