"""Reading weights and checkpoint folders: what inference, evaluation, the Wan loaders and training share.

A checkpoint is a folder ``step_000500/`` holding ``model.safetensors`` (the trained weights),
``ema.safetensors`` (their moving average), ``training_state.pt`` (optimizer, step) and ``config.yaml``;
a run folder names its newest in ``checkpoints/latest``. A *sharded* checkpoint holds its networks in
``sharded/`` instead (``torch.distributed.checkpoint``, one piece per process that wrote it), under the keys
``networks.<name>.<param>``; ``read_checkpoint_weights`` assembles one network from it on one process.
Everything read is checked: a damaged file or a tensor that does not fit is an error naming the file.
Writing checkpoints is training's (``training/checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

SHARDED = "sharded"  # the torch.distributed.checkpoint folder inside a sharded checkpoint
ASSETS = Path(__file__).resolve().parent / "assets"  # the models that ship with the package


@contextlib.contextmanager
def single_process_ok():
    """torch.distributed.checkpoint warns that it assumes one process even when told so (no_dist)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def sharded_keys(ckpt: Path) -> set[str]:
    """Every key (tensor or not) of a sharded checkpoint, e.g. ``optimizers.optimizer.state.<param>.step``."""
    return set(sharded_metadata(ckpt).state_dict_metadata)


def sharded_metadata(ckpt: Path) -> Metadata:
    from torch.distributed.checkpoint import FileSystemReader  # (imported when needed: a second to import)

    try:
        return FileSystemReader(str(Path(ckpt) / SHARDED)).read_metadata()
    except Exception as e:  # a missing or damaged .metadata file
        raise ValueError(f"cannot read the sharded checkpoint {Path(ckpt) / SHARDED}: {e}") from e


def sharded_tensors(ckpt: Path) -> dict[str, TensorStorageMetadata]:
    """The checkpoint's tensors, checked whole: the stored pieces of each cover it, and each piece is in a
    shard file that is there and long enough. A ValueError names the first tensor that is not."""
    folder = Path(ckpt) / SHARDED
    meta = sharded_metadata(ckpt)
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

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


def sharded_networks(ckpt: Path) -> list[str]:
    return sorted({k.split(".")[1] for k in sharded_tensors(ckpt) if k.startswith("networks.")})


def checkpoint_networks(ckpt: Path) -> list[str]:
    """The networks a checkpoint holds (``model``, ``ema``, ``critic`` ...), in either format."""
    names = {p.stem for p in Path(ckpt).glob("*.safetensors")}
    if (Path(ckpt) / SHARDED).is_dir():
        names |= set(sharded_networks(ckpt))
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
        for k, m in sharded_tensors(ckpt).items()
        if k.startswith(prefix)
    }
    if not target:
        raise FileNotFoundError(f"{ckpt} holds no network {name!r}; it holds {checkpoint_networks(ckpt)}")
    with single_process_ok():
        import torch.distributed.checkpoint as dcp

        dcp.load({"networks": {name: target}}, checkpoint_id=Path(ckpt) / SHARDED, no_dist=True)
    return target


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


def check_subset(module: nn.Module, tensors: dict[str, torch.Tensor], keys: list[str], source: Path | str) -> None:
    """``tensors`` must be exactly ``keys`` of ``module``'s state dict (a LoRA run's adapters), of their shapes."""
    state = module.state_dict()
    problems = state_mismatches({k: state[k] for k in keys}, tensors)
    if problems:
        raise ValueError("\n".join([f"checkpoint {source} does not match the model's adapters:", *problems]))


def load_subset(module: nn.Module, tensors: dict[str, torch.Tensor], keys: list[str], source: Path | str) -> None:
    """Load ``tensors``, checked by ``check_subset``; the rest of ``module`` stays as it is."""
    check_subset(module, tensors, keys, source)
    module.load_state_dict(tensors, strict=False)
