"""LoRA files: a PEFT state dict as LongLive ships it (``models/lora.pt``: ``{"generator_lora": ..., "critic_lora":
..., "step"}``), a plain one, or a ``.safetensors`` file; ``load_lora`` puts it on a DiT (``models.lora``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.dit import VideoDiT
from ..models.lora import LoRAError, apply_lora
from .dit_weights import load_torch_file


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """The PEFT state dict in ``path``: a ``.pt`` (LongLive's ``{"generator_lora": ..., "critic_lora": ...,
    "step"}``, or the state dict itself) or a ``.safetensors`` file. Read weights-only: no pickled code runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a LoRA state dict, e.g. LongLive's models/lora.pt)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    data = load_torch_file(path, "a LoRA state dict (LongLive's models/lora.pt)")
    if isinstance(data, dict) and isinstance(data.get("generator_lora"), dict):
        data = data["generator_lora"]
    if not isinstance(data, dict) or not data or not all(torch.is_tensor(v) for v in data.values()):
        keys = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise LoRAError(f"{path} is not a LoRA state dict (its top level: {keys}); expected generator_lora or tensors")
    return data


def load_lora(dit: VideoDiT, path: str | Path, alpha: float | None = None, merge: bool = False) -> VideoDiT:
    """``apply_lora`` with the state dict of ``path`` (``read_lora``)."""
    return apply_lora(dit, read_lora(path), alpha, merge, source=str(path))
