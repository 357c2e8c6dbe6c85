"""Choosing the device and the autocast precision, the same way for training and inference."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available: use device=cpu or device=auto")
    return device


def autocast(device: torch.device, precision: str):
    """A context for ``fp32`` (nothing), ``bf16`` (any device) or ``fp16`` (CUDA only) autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise RuntimeError("precision=fp16 needs a CUDA device: use bf16 or fp32 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
