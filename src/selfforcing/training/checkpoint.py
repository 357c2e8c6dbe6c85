"""Atomic checkpoints: weights in safetensors, optimizer and step state beside them.

A checkpoint is a folder ``step_000500/`` holding ``model.safetensors`` (the trained weights),
``ema.safetensors`` (their moving average), ``training_state.pt`` (optimizer, step) and
``config.yaml``. It is written under a temporary name and renamed into place, and the run's
``latest`` file is replaced atomically afterwards, so a crash never leaves a half-written checkpoint.

A *sharded* checkpoint (``checkpoint_format: sharded``) holds the networks and optimizers in
``sharded/`` instead, written by every process at once with ``torch.distributed.checkpoint`` (each its
own shards: nothing is gathered, so it scales to any model size), under the keys
``networks.<name>.<param>`` and ``optimizers.<name>....``. It resumes on any number of processes, and
``read_checkpoint_weights`` / ``gather_checkpoint`` assemble one network from it on a single process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner

from ..weights import (
    SHARDED,
    checkpoint_path,
    checkpoint_step,
    latest_checkpoint,
    read_sharded_network,
    resolve_checkpoint,
    sharded_networks,
    sharded_tensors,
    single_process_ok,
)
from .distributed import barrier


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tmp_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is renamed into place."""
    return Path(run_dir) / "checkpoints" / f".tmp_step_{step:06d}"


def _fresh_tmp(run_dir: Path, step: int) -> Path:
    tmp = _tmp_path(run_dir, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit(run_dir: Path, step: int, tmp: Path, training_state: dict, config_yaml: str, keep: int) -> Path:
    """Finish ``tmp`` (step state, config), rename it into place, point ``latest`` at it, prune: the ``keep``
    newest up to ``step`` stay; folders past ``step`` (left by a run that crashed after writing them and
    before moving ``latest``) are from another history and go."""
    torch.save(training_state, tmp / "training_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    final = checkpoint_path(run_dir, step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    root = final.parent
    _atomic_write_text(root / "latest", final.name)
    folders = sorted(p for p in root.glob("step_*") if p.is_dir())
    stale = [p for p in folders if checkpoint_step(p) > step]
    for old in [p for p in folders if checkpoint_step(p) <= step][:-keep] + stale:
        shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space left, ...); the previous one is intact."""


def _no_space(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it, or a process's failure inside a sharded save) is a full disk."""
    seen = set()
    todo = [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "failures", {}).values()]  # dcp's CheckpointException
    return False


@contextlib.contextmanager
def _writing(run_dir: Path, step: int, tmp: Path, is_main: bool = True):
    """Turn a failed checkpoint write into an error that says what happened and what is intact; the
    partial folder is removed (by rank 0)."""
    try:
        yield
    except Exception as e:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = latest_checkpoint(run_dir)
        intact = (
            f"the previous checkpoint {latest} is intact, and the run resumes from it"
            if latest is not None
            else "there is no earlier checkpoint"
        )
        if _no_space(e):
            raise CheckpointWriteError(
                errno.ENOSPC,
                f"no space left on the device while writing the checkpoint of step {step} into {tmp}: the partial "
                f"files are removed and {intact}. Free space in {Path(run_dir)} (or lower keep_checkpoints) and "
                "run the same command again",
            ) from e
        raise CheckpointWriteError(
            f"writing the checkpoint of step {step} into {tmp} failed ({type(e).__name__}: {e}); {intact}"
        ) from e


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
    tmp = _fresh_tmp(run_dir, step)
    with _writing(run_dir, step, tmp):
        for stem, module in weights.items():
            state = module.state_dict() if isinstance(module, nn.Module) else module
            tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(tensors, tmp / f"{stem}.safetensors", metadata={"step": str(step)})
        return _commit(run_dir, step, tmp, training_state, config_yaml, keep)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def save_sharded_checkpoint(
    run_dir: Path, step: int, state: dict, training_state: dict, config_yaml: str, keep: int, is_main: bool
) -> Path:
    """A collective: every process writes its shards of ``state`` (``{"networks": ..., "optimizers": ...}``,
    as ``fsdp.sharded_state`` returns it) into ``step_{step}/sharded``; rank 0 then adds the step state and
    config and renames the folder into place (atomically, as ``save_checkpoint``). Needs a file system
    that every process sees."""
    tmp = _tmp_path(run_dir, step)
    if is_main:
        _fresh_tmp(run_dir, step)
    barrier()
    with _writing(run_dir, step, tmp, is_main), single_process_ok():
        dcp.save(state, checkpoint_id=tmp / SHARDED, no_dist=not _distributed())
    final = checkpoint_path(run_dir, step)
    if is_main:
        with _writing(run_dir, step, tmp):
            final = _commit(run_dir, step, tmp, training_state, config_yaml, keep)
    barrier()
    return final


def load_sharded_checkpoint(ckpt: Path, state: dict, partial: bool = False) -> None:
    """Fill ``state`` (this process's tensors, shards or whole) from ``ckpt/sharded`` in place, whatever
    the number of processes that wrote it. A tensor of ``state`` the checkpoint lacks is an error naming
    it, unless ``partial`` (then it is kept as it is)."""
    tensors = sharded_tensors(ckpt)  # a damaged checkpoint fails here, with its name
    missing = [k for k in _tensor_keys(state) if k not in tensors]
    if missing and not partial:
        raise ValueError(
            f"the sharded checkpoint {Path(ckpt) / SHARDED} lacks {len(missing)} tensors this run holds: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (it is damaged, or from another model)"
        )
    with single_process_ok():
        dcp.load(
            state,
            checkpoint_id=Path(ckpt) / SHARDED,
            planner=DefaultLoadPlanner(allow_partial_load=partial),
            no_dist=not _distributed(),
        )


def _tensor_keys(state: dict, prefix: str = "") -> list[str]:
    """The keys torch.distributed.checkpoint gives the tensors of a nested state dict (``a.b.0.c``)."""
    keys = []
    for k, v in state.items() if isinstance(state, dict) else enumerate(state):
        if isinstance(v, torch.Tensor):
            keys.append(f"{prefix}{k}")
        elif isinstance(v, dict | list):
            keys += _tensor_keys(v, f"{prefix}{k}.")
    return keys


def gather_checkpoint(ckpt: Path) -> list[Path]:
    """Write every network of a sharded checkpoint as one ``<name>.safetensors`` beside ``sharded/``
    (each written atomically), so that it loads like an ordinary checkpoint. Returns the files."""
    ckpt = resolve_checkpoint(ckpt)
    if not (ckpt / SHARDED).is_dir():
        raise ValueError(f"{ckpt} is not a sharded checkpoint (no {SHARDED}/ folder): its networks are files already")
    step = checkpoint_step(ckpt) if ckpt.name.startswith("step_") else -1
    files = []
    for name in sharded_networks(ckpt):
        tensors = read_sharded_network(ckpt, name)
        file = ckpt / f"{name}.safetensors"
        tmp = file.with_name(file.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"step": str(step)})
        os.replace(tmp, file)
        files.append(file)
    return files
