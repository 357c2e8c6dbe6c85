"""Choosing the device and the autocast precision, the same way for training and inference, and moving
host-made tensors (CPU-drawn noise, RoPE angles) to the device without stalling the host."""

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


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t.to(device, dtype)``, without a host sync when a CPU tensor goes to CUDA.

    A plain copy from pageable memory makes the host wait for every kernel queued so far, so the CPU
    cannot run ahead of the GPU and launch overhead adds to GPU time instead of hiding behind it. A copy
    from pinned memory with ``non_blocking=True`` stays in stream order without that wait.
    """
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device=device, dtype=dtype)


def cpu_randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the CPU from ``generator`` (so a seed gives the
    same noise on any device) and moved to ``x``'s device and dtype with ``to_device``."""
    return to_device(torch.randn(x.shape, generator=generator), x.device, x.dtype)
