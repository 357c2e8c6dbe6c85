"""ODE pairs: teacher trajectories stored at exactly the student's few-step noise levels (METHOD.md section 5).

The bidirectional teacher is sampled from noise with many Euler steps and classifier-free guidance.
The student's warped levels (e.g. sigma = 1, 0.9375, 0.8333, 0.625) are inserted into the teacher's
schedule, so the stored latents sit at exactly those levels. Per sample we keep
``trajectory: [S + 1, F, C, H, W]``: the latents at the S student levels, then the clean result.

On disk: ``index.json`` (settings, shard names) and ``shard-00000.safetensors`` ... each holding
``trajectory: [n, S + 1, F, C, H, W]`` with its prompts in the file's metadata. Shards are written
atomically and a rerun skips the finished ones, so an interrupted run resumes. Training reads the
sampled rows only (``ODEPairs.sample``), so the pairs need not fit in memory (42 MB a video at Wan's
81 frames of 832x480).

The teacher is one of this project's bidirectional checkpoints (``generate_ode_pairs``) or a Wan2.1
folder with a prompt file (``generate_wan_ode_pairs``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from tqdm.auto import tqdm

from ..data.latent_shards import read_rows
from ..diffusion.flow_matching import sampling_sigmas, warp_timesteps
from ..diffusion.samplers import sample_euler

INDEX = "index.json"


@dataclass(frozen=True)
class ODEPairSettings:
    num_samples: int = 1024
    shard_size: int = 128
    batch_size: int = 32  # teacher batch (CFG doubles it)
    teacher_steps: int = 48
    teacher_shift: float = 3.0
    guidance_scale: float = 3.0
    student_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)  # before warping
    student_shift: float = 5.0
    seed: int = 0
    negative_prompt: str = ""  # the unconditional prompt of the teacher's CFG (Wan: its negative prompt)

    def student_sigmas(self) -> torch.Tensor:
        """The student's warped noise levels ``[S]``, descending from 1."""
        return (warp_timesteps(list(self.student_steps), self.student_shift) / 1000.0).double()


def teacher_segments(settings: ODEPairSettings) -> list[torch.Tensor]:
    """The teacher's Euler schedule cut at the student's levels: one sigma list per segment.

    Segment j runs from student level j to level j + 1 (the last one to 0), so the latent at the end of
    segment j is the trajectory at exactly student level j + 1.
    """
    student = settings.student_sigmas()
    if student[0] != 1.0:
        raise ValueError(f"the student's first level must be pure noise (sigma 1), got {float(student[0])}")
    grid = sampling_sigmas(settings.teacher_steps, settings.teacher_shift).double()
    bounds = [*student.tolist(), 0.0]
    segments = []
    for hi, lo in zip(bounds[:-1], bounds[1:], strict=True):
        inner = grid[(grid < hi) & (grid > lo)]
        segments.append(torch.cat([torch.tensor([hi]), inner, torch.tensor([lo])]).float())
    return segments


@torch.no_grad()
def teacher_trajectories(model, prompts: list[str], noise: torch.Tensor, settings: ODEPairSettings) -> torch.Tensor:
    """Sample the teacher from ``noise [B, F, C, H, W]``: returns ``[B, S + 1, F, C, H, W]`` (levels, then clean)."""
    cond = model.encode_text(prompts)
    uncond = model.encode_text([settings.negative_prompt] * len(prompts))

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model.velocity_with_cfg(x, sigma, cond, uncond, settings.guidance_scale)

    states = [noise]
    for sigmas in teacher_segments(settings):
        states.append(sample_euler(velocity, states[-1], sigmas.to(noise.device)))
    return torch.stack(states, dim=1)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def generate_ode_pairs(
    teacher_checkpoint: str | Path, out_dir: str | Path, settings: ODEPairSettings, device: str = "cpu"
) -> Path:
    """Write (or finish writing) the ODE-pair folder ``out_dir`` from a teacher checkpoint of this project
    (its data's size and prompts)."""
    from ..pipeline import load_pipeline
    from .batches import Batches

    pipe = load_pipeline(teacher_checkpoint, device=device)
    data = pipe.cfg.data
    shape = pipe.codec.latent_shape(data.frames, data.height, data.width)
    batches = Batches(pipe.cfg)

    def prompts(seed: int, n: int) -> list[str]:
        return batches(seed, n)[1]

    return write_ode_pairs(pipe.model, shape, prompts, str(pipe.checkpoint.resolve()), out_dir, settings)


def generate_wan_ode_pairs(
    folder: str | Path,
    prompt_file: str | Path,
    frames: int,
    height: int,
    width: int,
    out_dir: str | Path,
    settings: ODEPairSettings,
    device: str | torch.device = "auto",
) -> Path:
    """The same from a Wan2.1 folder's bidirectional model (bf16 on CUDA), on prompts drawn from a text
    file (one a line), for videos of ``frames`` x ``height`` x ``width`` pixels."""
    from ..data.prompts import PromptFile
    from ..wan.pipeline import load_wan

    pipe = load_wan(folder, device=device)
    file = PromptFile(prompt_file)
    shape = pipe.codec.latent_shape(frames, height, width)

    def prompts(seed: int, n: int) -> list[str]:
        return file.sample(n, seed)

    return write_ode_pairs(pipe.model, shape, prompts, str(Path(folder).resolve()), out_dir, settings)


def write_ode_pairs(
    model,
    latent_shape: tuple[int, int, int, int],
    sample_prompts: Callable[[int, int], list[str]],
    teacher: str,
    out_dir: str | Path,
    settings: ODEPairSettings,
) -> Path:
    """Sample ``model`` (a bidirectional TextToVideo) into ``out_dir``: shard i holds the trajectories of
    ``sample_prompts(seed_i, n)`` from noise ``[n, *latent_shape]``, both functions of (seed, i)."""
    f, c, h, w = latent_shape
    device = next(model.dit.parameters()).device
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = -(-settings.num_samples // settings.shard_size)
    index = {
        "settings": _settings_json(settings),
        "teacher": teacher,
        "student_sigmas": settings.student_sigmas().tolist(),
        "latent_shape": [f, c, h, w],
        "shards": [_shard_name(i) for i in range(num_shards)],
    }
    if (out / INDEX).is_file():
        old = json.loads((out / INDEX).read_text())
        if old["settings"] != index["settings"] or old["latent_shape"] != index["latent_shape"]:
            raise ValueError(
                f"{out} already holds ODE pairs made with other settings ({old['settings']}, latent shape "
                f"{old['latent_shape']}): choose another --out folder or delete it"
            )
    (out / INDEX).write_text(json.dumps(index, indent=1))

    todo = [i for i in range(num_shards) if not _shard_ok(out / _shard_name(i))]
    bar = tqdm(total=settings.num_samples, desc="ODE pairs", dynamic_ncols=True)
    bar.update(settings.num_samples - sum(_shard_len(i, settings) for i in todo))
    for i in todo:
        n = _shard_len(i, settings)
        g = torch.Generator().manual_seed(settings.seed * 1_000_003 + i)  # each shard a function of (seed, i)
        prompts = sample_prompts(int(torch.randint(2**62, (1,), generator=g)), n)
        noise = torch.randn(n, f, c, h, w, generator=g)
        parts = []
        for s in range(0, n, settings.batch_size):
            sl = slice(s, s + settings.batch_size)
            parts.append(teacher_trajectories(model, prompts[sl], noise[sl].to(device), settings).float().cpu())
            bar.update(len(prompts[sl]))
        tmp = out / f".{_shard_name(i)}.tmp"
        save_file({"trajectory": torch.cat(parts).contiguous()}, tmp, metadata={"prompts": json.dumps(prompts)})
        os.replace(tmp, out / _shard_name(i))
    bar.close()
    return out


def is_complete(out_dir: str | Path, settings: ODEPairSettings) -> bool:
    """True when ``out_dir`` holds every shard of the pairs ``settings`` describe."""
    out = Path(out_dir)
    if not (out / INDEX).is_file():
        return False
    index = json.loads((out / INDEX).read_text())
    return index["settings"] == _settings_json(settings) and all(_shard_ok(out / name) for name in index["shards"])


def _settings_json(settings: ODEPairSettings) -> dict:
    """The settings as ``index.json`` stores them (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


def _shard_len(i: int, settings: ODEPairSettings) -> int:
    return min(settings.shard_size, settings.num_samples - i * settings.shard_size)


def _shard_ok(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(path, "pt") as fh:
            return "trajectory" in list(fh.keys()) and "prompts" in (fh.metadata() or {})
    except (SafetensorError, OSError):
        return False


class ODEPairs:
    """A finished ODE-pair folder: ``prompts``, ``sigmas [S]``, and trajectories ``[S + 1, F, C, H, W]``
    read from disk as they are sampled."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / INDEX).is_file():
            raise FileNotFoundError(f"{folder} has no {INDEX}: make ODE pairs first with `selfforcing ode-pairs`")
        self.index = json.loads((folder / INDEX).read_text())
        missing = [s for s in self.index["shards"] if not _shard_ok(folder / s)]
        if missing:
            raise ValueError(
                f"{folder} is incomplete ({len(missing)} of {len(self.index['shards'])} shards missing or corrupt, "
                f"e.g. {missing[0]}): rerun `selfforcing ode-pairs` with the same settings to finish it"
            )
        self.folder = folder
        self.rows: list[tuple[str, int]] = []  # (shard, row) of every pair; trajectories are read when sampled
        self.prompts: list[str] = []
        for name in self.index["shards"]:
            with safe_open(folder / name, "pt") as fh:
                prompts = json.loads(fh.metadata()["prompts"])
            self.rows += [(name, r) for r in range(len(prompts))]
            self.prompts += prompts
        self.sigmas = torch.tensor(self.index["student_sigmas"], dtype=torch.float32)

    @property
    def trajectory(self) -> torch.Tensor:
        """Every trajectory ``[N, S + 1, F, C, H, W]``, read from disk (for small folders)."""
        return torch.cat([load_file(self.folder / name)["trajectory"] for name in self.index["shards"]])

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """A random batch: ``(trajectory [B, S + 1, F, C, H, W], prompts)``; only its rows are read."""
        idx = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        return read_rows(self.folder, [self.rows[i] for i in idx], "trajectory"), [self.prompts[i] for i in idx]
