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
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from .distributed import barrier

SHARDED = "sharded"  # the torch.distributed.checkpoint folder inside a sharded checkpoint
ASSETS = Path(__file__).resolve().parents[1] / "assets"  # the models that ship with the package


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
    """Finish ``tmp`` (step state, config), rename it into place, point ``latest`` at it, prune old ones."""
    torch.save(training_state, tmp / "training_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    final = checkpoint_path(run_dir, step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    root = final.parent
    _atomic_write_text(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    for stem, module in weights.items():
        state = module.state_dict() if isinstance(module, nn.Module) else module
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, tmp / f"{stem}.safetensors", metadata={"step": str(step)})
    return _commit(run_dir, step, tmp, training_state, config_yaml, keep)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_ok():
    """torch.distributed.checkpoint warns that it assumes one process even when told so (no_dist)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


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
    with _single_process_ok():
        dcp.save(state, checkpoint_id=tmp / SHARDED, no_dist=not _distributed())
    final = checkpoint_path(run_dir, step)
    if is_main:
        final = _commit(run_dir, step, tmp, training_state, config_yaml, keep)
    barrier()
    return final


def load_sharded_checkpoint(ckpt: Path, state: dict, partial: bool = False) -> None:
    """Fill ``state`` (this process's tensors, shards or whole) from ``ckpt/sharded`` in place, whatever
    the number of processes that wrote it. A tensor of ``state`` the checkpoint lacks is an error naming
    it, unless ``partial`` (then it is kept as it is)."""
    tensors = _sharded_tensors(ckpt)  # a damaged checkpoint fails here, with its name
    missing = [k for k in _tensor_keys(state) if k not in tensors]
    if missing and not partial:
        raise ValueError(
            f"the sharded checkpoint {Path(ckpt) / SHARDED} lacks {len(missing)} tensors this run holds: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (it is damaged, or from another model)"
        )
    with _single_process_ok():
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


def sharded_keys(ckpt: Path) -> set[str]:
    """Every key (tensor or not) of a sharded checkpoint, e.g. ``optimizers.optimizer.state.<param>.step``."""
    return set(_sharded_metadata(ckpt).state_dict_metadata)


def _sharded_metadata(ckpt: Path) -> Metadata:
    try:
        return FileSystemReader(str(Path(ckpt) / SHARDED)).read_metadata()
    except Exception as e:  # a missing or damaged .metadata file
        raise ValueError(f"cannot read the sharded checkpoint {Path(ckpt) / SHARDED}: {e}") from e


def _sharded_tensors(ckpt: Path) -> dict[str, TensorStorageMetadata]:
    """The checkpoint's tensors, checked whole: the stored pieces of each cover it, and each piece is in a
    shard file that is there and long enough. A ValueError names the first tensor that is not."""
    folder = Path(ckpt) / SHARDED
    meta = _sharded_metadata(ckpt)
    tensors = {k: m for k, m in meta.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    sizes: dict[str, int] = {}  # shard file -> bytes
    for name, m in tensors.items():
        covered = 0
        for chunk in m.chunks:
            if any(o < 0 or o + n > d for o, n, d in zip(chunk.offsets, chunk.sizes, m.size, strict=True)):
                raise ValueError(f"{folder}: a piece of {name} lies outside its shape {tuple(m.size)}: damaged")
            covered += math.prod(chunk.sizes)
            where = meta.storage_data.get(MetadataIndex(name, chunk.offsets)) if meta.storage_data else None
            if where is None:
                raise ValueError(f"{folder}: the piece of {name} at {tuple(chunk.offsets)} is in no shard file")
            file = folder / where.relative_path
            if file.name not in sizes:
                sizes[file.name] = file.stat().st_size if file.is_file() else -1
            if sizes[file.name] < where.offset + where.length:
                state = "missing" if sizes[file.name] < 0 else "truncated"
                raise ValueError(f"{folder}: the shard file {file.name} holding {name} is {state}")
        if covered != math.prod(m.size):
            raise ValueError(
                f"{folder}: the stored pieces of {name} cover {covered} of its {math.prod(m.size)} elements "
                f"(shape {tuple(m.size)}): a shard of it is missing, the checkpoint is damaged"
            )
    return tensors


def _sharded_networks(ckpt: Path) -> list[str]:
    return sorted({k.split(".")[1] for k in _sharded_tensors(ckpt) if k.startswith("networks.")})


def checkpoint_networks(ckpt: Path) -> list[str]:
    """The networks a checkpoint holds (``model``, ``ema``, ``critic`` ...), in either format."""
    names = {p.stem for p in Path(ckpt).glob("*.safetensors")}
    if (Path(ckpt) / SHARDED).is_dir():
        names |= set(_sharded_networks(ckpt))
    return sorted(names)


def read_checkpoint_weights(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    """Network ``name``'s whole state dict on the CPU: its safetensors file, else assembled from the
    sharded checkpoint's pieces (on this one process; the full network must fit in memory)."""
    ckpt = Path(ckpt)
    file = ckpt / f"{name}.safetensors"
    if file.is_file():
        return read_safetensors_file(file)
    if (ckpt / SHARDED).is_dir():
        return read_sharded_network(ckpt, name)
    raise FileNotFoundError(f"{ckpt} has no {file.name}; it holds networks {checkpoint_networks(ckpt)}: pass one")


def read_sharded_network(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    """Network ``name``'s whole state dict assembled from ``ckpt/sharded`` (whoever wrote the shards)."""
    prefix = f"networks.{name}."
    target = {
        k.removeprefix(prefix): torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in _sharded_tensors(ckpt).items()
        if k.startswith(prefix)
    }
    if not target:
        raise FileNotFoundError(f"{ckpt} holds no network {name!r}; it holds {checkpoint_networks(ckpt)}")
    with _single_process_ok():
        dcp.load({"networks": {name: target}}, checkpoint_id=Path(ckpt) / SHARDED, no_dist=True)
    return target


def gather_checkpoint(ckpt: Path) -> list[Path]:
    """Write every network of a sharded checkpoint as one ``<name>.safetensors`` beside ``sharded/``
    (each written atomically), so that it loads like an ordinary checkpoint. Returns the files."""
    ckpt = resolve_checkpoint(ckpt)
    if not (ckpt / SHARDED).is_dir():
        raise ValueError(f"{ckpt} is not a sharded checkpoint (no {SHARDED}/ folder): its networks are files already")
    step = checkpoint_step(ckpt) if ckpt.name.startswith("step_") else -1
    files = []
    for name in _sharded_networks(ckpt):
        tensors = read_sharded_network(ckpt, name)
        file = ckpt / f"{name}.safetensors"
        tmp = file.with_name(file.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"step": str(step)})
        os.replace(tmp, file)
        files.append(file)
    return files


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


def shipped_models() -> list[str]:
    """The names of the models that ship with the package (``src/selfforcing/assets``)."""
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.yaml").is_file())


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a run folder (then its latest checkpoint), or the name of a shipped
    model (``sf_dmd_chunk_toy``, ...: ``shipped_models()``)."""
    path = Path(path)
    if not path.exists() and len(path.parts) == 1 and (ASSETS / path.name / "config.yaml").is_file():
        path = ASSETS / path.name
    if (path / "config.yaml").is_file() and (any(path.glob("*.safetensors")) or (path / SHARDED).is_dir()):
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint folder (config.yaml with *.safetensors or {SHARDED}/), a run folder "
            f"with checkpoints/latest, nor a shipped model ({', '.join(shipped_models())})"
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


def read_safetensors_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read checkpoint weights {file}: {e} (the file is corrupt or truncated)") from e


def check_weights(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path | str) -> dict[str, torch.Tensor]:
    """``tensors`` if they match ``module``'s state dict; else every missing, unexpected or mis-shaped key is
    reported."""
    problems = state_mismatches(module.state_dict(), tensors)
    if problems:
        lines = [f"checkpoint {source} does not match the model:", *problems]
        lines.append("  Build the model from the checkpoint's own config.yaml (load_pipeline does this).")
        raise ValueError("\n".join(lines))
    return tensors


def read_weights(module: nn.Module, file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, checked against ``module``."""
    return check_weights(module, read_safetensors_file(file), file)


def load_weights(module: nn.Module, file: Path) -> None:
    """Load a safetensors file into ``module`` (``read_weights`` checks it first)."""
    module.load_state_dict(read_weights(module, file))


def load_network(module: nn.Module, ckpt: Path, name: str) -> None:
    """Load network ``name`` of a checkpoint folder (either format) into ``module``, checked."""
    module.load_state_dict(check_weights(module, read_checkpoint_weights(ckpt, name), f"{ckpt} ({name})"))
