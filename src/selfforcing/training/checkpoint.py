"""Atomic checkpoints: weights in safetensors, optimizer and step state beside them.

A checkpoint is a folder ``step_000500/`` holding ``model.safetensors`` (the trained weights),
``ema.safetensors`` (their moving average), ``training_state.pt`` (optimizer, step) and
``config.yaml``. It is written under a temporary name and renamed into place, and the run's
``latest`` file is replaced atomically afterwards, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, nn.Module | dict[str, torch.Tensor]],
    training_state: dict,
    config_yaml: str,
    keep: int = 2,
) -> Path:
    """Write ``run_dir/checkpoints/step_{step}`` atomically; keep the ``keep`` newest. ``weights`` maps
    file stems (``model``, ``ema``) to modules or their state dicts."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stem, module in weights.items():
        state = module.state_dict() if isinstance(module, nn.Module) else module
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, tmp / f"{stem}.safetensors", metadata={"step": str(step)})
    torch.save(training_state, tmp / "training_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``run_dir/checkpoints/step_{step:06d}``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint folder holds (the inverse of ``checkpoint_path``)."""
    return int(Path(ckpt).name.removeprefix("step_"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder named by ``run_dir/checkpoints/latest``, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist: the run folder is damaged")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder (then its latest checkpoint)."""
    path = Path(path)
    if (path / "config.yaml").is_file() and any(path.glob("*.safetensors")):
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint folder (with config.yaml and *.safetensors) nor a run folder "
            "with checkpoints/latest"
        )
    return found


def state_mismatches(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    """Lines naming the keys of ``got`` missing from, unexpected in or shaped unlike ``expected`` ([] if none)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and got[k].shape != v.shape
    ]
    lines = []
    for title, items in [("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)]:
        if items:
            lines.append(f"  {title} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
    return lines


def read_weights(module: nn.Module, file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, checked against ``module``: every missing, unexpected or mis-shaped
    key is reported."""
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read checkpoint weights {file}: {e} (the file is corrupt or truncated)") from e
    problems = state_mismatches(module.state_dict(), tensors)
    if problems:
        lines = [f"checkpoint {file} does not match the model:", *problems]
        lines.append("  Build the model from the checkpoint's own config.yaml (load_pipeline does this).")
        raise ValueError("\n".join(lines))
    return tensors


def load_weights(module: nn.Module, file: Path) -> None:
    """Load a safetensors file into ``module`` (``read_weights`` checks it first)."""
    module.load_state_dict(read_weights(module, file))
