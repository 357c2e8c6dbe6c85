"""``selfforcing eval``: the evidence on checkpoints of any paradigm, at 1x, 2x and 4x the training length.

For each checkpoint, length and evaluation seed, videos for the same held-out prompts are generated
(a causal student streams with the rolling KV cache beyond its training length) and measured:
the analyser's figures, their drift curve over frame index (first vs last quarter), motion error and
direction adherence, and the Frechet distance (FD) on the shipped video encoder's features to real
videos of the same prompts. Real videos of those prompts (another draw) give the ceiling.
Results: one row per (model, length, seed), then mean and spread over seeds.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.shapes import ShapesWorld, ShapesWorldConfig
from ..data.video_io import from_uint8, to_uint8, video_grid, write_video
from ..families import family
from ..pipeline import load_pipeline
from ..weights import resolve_checkpoint
from .analyser import analyse_batch
from .encoder import TOY_ENCODER, encode_videos, frechet_distance, load_encoder
from .metrics import FRAME_FIGURES, drift_curve, flicker, quarters, video_motion
from .score import held_out_prompts, sample_videos

REFERENCE_SEED = 777_000  # real videos the FD compares against; the real ceiling draws with other seeds
CURVES = ("frame_ok", "found", "colour_fidelity")
SUMMARY = (*FRAME_FIGURES, "frame_ok_first_quarter", "frame_ok_last_quarter", "frame_ok_change", "frame_ok_late_change")
SUMMARY += ("motion_error", "direction_ok", "flicker", "fd")


@dataclass
class EvalSettings:
    lengths: list[int] = field(default_factory=lambda: [1, 2, 4])  # multiples of the training length
    num: int = 256  # held-out prompts (the same for every model); the FD needs a few hundred
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # generation seeds: mean and spread
    batch_size: int = 16
    encoder: str = str(TOY_ENCODER)
    samples: int = 8  # videos per (model, length) kept in out/samples (seed 0; gif + tensors); 0 = none
    sink: int | None = None  # stream every causal model with this many sink frames (None: its own setting)
    # stream every causal model by each of these released models' rules (families.py), one row each
    # (``model@family``); empty: by its own settings
    families: list[str] = field(default_factory=list)


def measure(videos: torch.Tensor, prompts: list[str], encoder, reference: torch.Tensor) -> dict:
    """Every figure of ``videos: [N, F, 3, H, W]`` against their prompts; ``reference``: encoder features
    of real videos of the same prompts. Returns scalars and ``curves`` (per-frame means, lists)."""
    h, w = videos.shape[-2:]
    summary, per_video = analyse_batch(videos, prompts)
    motion = [video_motion(s, p, h, w) for s, p in zip(per_video, prompts, strict=True)]
    row = dict(summary)
    for key in ("motion_error", "direction_ok"):
        vals = [m[key] for m in motion if not math.isnan(m[key])]
        row[key] = sum(vals) / len(vals) if vals else math.nan
    row["flicker"] = flicker(videos)
    q = quarters(drift_curve(per_video, "frame_ok"))
    row.update({f"frame_ok_{k}": v for k, v in q.items()})
    row["fd"] = frechet_distance(reference, encode_videos(encoder, videos))
    row["curves"] = {c: drift_curve(per_video, c).tolist() for c in CURVES}
    return row


def model_name(checkpoint: str | Path) -> str:
    """A checkpoint's name in the tables: its run folder's name (``runs/sf_dmd_toy/checkpoints/step_001000``
    and ``runs/sf_dmd_toy`` are both ``sf_dmd_toy``), else its own folder's."""
    path = Path(checkpoint)
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def check_world(encoder_world: ShapesWorldConfig, data) -> None:
    for name in ("height", "width", "colours", "shapes", "sizes", "directions"):
        if getattr(encoder_world, name) != getattr(data, name):
            raise ValueError(
                f"the video encoder was trained on a world with {name}={getattr(encoder_world, name)} but the "
                f"checkpoint's has {getattr(data, name)}: train one for it with `selfforcing train-encoder --config`"
            )


def evaluate(checkpoints: list[str], settings: EvalSettings, out: str | Path | None = None) -> list[dict]:
    """Rows ``{model, length, seed, frames, <figures>, curves}`` for every checkpoint and for real videos
    (``model: real``). All checkpoints must share one world; prompts are that world's held-out ones.

    With ``out``, each row is also written to ``out/rows/`` as it is finished, and a later call with the
    same settings and checkpoints reuses it: an interrupted evaluation resumes where it stopped. A row
    that lacks one of today's figures (written by an older version) is measured again."""
    encoder, encoder_world = load_encoder(settings.encoder)
    names = [model_name(c) for c in checkpoints]
    if len(set(names)) != len(names):
        raise ValueError(
            f"two checkpoints share a model name in {names}: evaluate them from run folders with distinct names"
        )
    loaded = {name: load_pipeline(c) for name, c in zip(names, checkpoints, strict=True)}
    sources = {name: str(resolve_checkpoint(c).resolve()) for name, c in zip(names, checkpoints, strict=True)}
    for f in settings.families:
        family(f).check_runnable()  # an unknown or unbuilt family fails before any video is made
    # every model once, or a causal one once per family whose rules it streams by: name -> (pipe, family)
    pipes, rules = {}, {}
    for name, pipe in loaded.items():
        for f in (settings.families or [None]) if pipe.cfg.causal is not None else [None]:
            label = f"{name}@{f}" if f else name
            pipes[label], rules[label], sources[label] = pipe, f, sources[name]
    first = next(iter(pipes.values())).cfg
    for name, pipe in loaded.items():
        check_world(encoder_world, pipe.cfg.data)
        if pipe.cfg.data.frames != first.data.frames or pipe.cfg.data.height != first.data.height:
            raise ValueError(f"{name} was trained on another video size than {checkpoints[0]}: evaluate them apart")
    world = ShapesWorld(first.data)
    prompts = held_out_prompts(first, settings.num)
    jobs = [
        (mult, seed, name)
        for mult in settings.lengths
        for seed in settings.seeds
        for name in ["real", *pipes]
        if name == "real" or pipes[name].cfg.causal is not None or mult == 1  # a teacher has one length
    ]
    rows, references = [], {}
    for mult, seed, name in tqdm(jobs, desc="eval", dynamic_ncols=True):
        frames = first.data.frames * mult
        key = {"num": settings.num, "encoder": str(Path(settings.encoder).resolve()), "source": sources.get(name)}
        key |= {"sink": settings.sink} if settings.sink is not None and name != "real" else {}
        key |= {"family": rules[name]} if rules.get(name) else {}
        cached = Path(out) / "rows" / f"{name}_{mult}x_seed{seed}.json" if out is not None else None
        keep = out is not None and seed == settings.seeds[0] and settings.samples  # this job's videos are kept
        has_samples = not keep or (Path(out) / "samples" / f"{name}_{mult}x.safetensors").is_file()
        entry = json.loads(cached.read_text()) if cached is not None and cached.is_file() else {}
        # reuse a row of the same key that has every figure (one written before a figure existed is redone)
        if entry.get("key") == key and has_samples and all(k in entry["row"] for k in SUMMARY):
            rows.append(entry["row"])
            continue
        if mult not in references:
            real_ref = world.sample_for_prompts(prompts, REFERENCE_SEED, frames).video
            references[mult] = encode_videos(encoder, real_ref)
        if name == "real":
            videos = world.sample_for_prompts(prompts, REFERENCE_SEED + 1 + seed, frames).video
        else:
            videos = sample_videos(
                pipes[name],
                prompts,
                frames,
                seed=1000 * seed,
                batch_size=settings.batch_size,
                sink=settings.sink,
                family=rules[name],
            )
        rows.append({"model": name, "length": mult, "seed": seed, "frames": frames})
        rows[-1].update(measure(videos, prompts, encoder, references[mult]))
        if keep:
            save_samples(Path(out) / "samples", name, mult, videos[: settings.samples], prompts[: settings.samples])
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "row": rows[-1]}))
            os.replace(tmp, cached)
    return rows


def save_samples(folder: Path, name: str, mult: int, videos: torch.Tensor, prompts: list[str]) -> None:
    """``{name}_{mult}x.gif`` (a captioned grid) and ``.safetensors`` (the videos ``[N, F, 3, H, W]`` as
    uint8, for ``write_comparison``)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_video(folder / f"{name}_{mult}x.gif", video_grid(videos, prompts))
    frames = torch.from_numpy(np.stack([to_uint8(v) for v in videos]))  # [N, F, H, W, 3]
    save_file({"video": frames.contiguous()}, folder / f"{name}_{mult}x.safetensors", {"prompts": json.dumps(prompts)})


def write_comparison(
    out: str | Path, models: list[str], mult: int, path: str | Path, num: int = 4, scale: int = 3
) -> Path:
    """Side-by-side gif from ``out/samples``: one row per prompt (the first ``num``), one column per model
    (captioned with its name), every model's video of the same prompt and seed in one row."""
    folder = Path(out) / "samples"
    missing = [m for m in models if not (folder / f"{m}_{mult}x.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"no {mult}x samples of {missing} in {folder}: evaluate them with samples > 0")
    clips = [load_file(folder / f"{m}_{mult}x.safetensors")["video"][:num].numpy() for m in models]
    n = min(len(c) for c in clips)
    tiles = torch.stack([from_uint8(clips[j][i]) for i in range(n) for j in range(len(models))])  # prompt, model
    grid = video_grid(tiles, [m for _ in range(n) for m in models], scale=scale, columns=len(models))
    return write_video(path, grid)


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (model, length): ``{key: mean, key_std: std}``; curves
    averaged."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["length"]), []).append(r)
    out = []
    for (model, length), group in groups.items():
        row = {"model": model, "length": length, "frames": group[0]["frames"], "seeds": len(group)}
        for key in SUMMARY:
            vals = torch.tensor([g[key] for g in group], dtype=torch.float64)
            vals = vals[~vals.isnan()]
            row[key] = float(vals.mean()) if len(vals) else math.nan
            row[f"{key}_std"] = float(vals.std(unbiased=False)) if len(vals) else math.nan
        row["curves"] = {c: torch.tensor([g["curves"][c] for g in group]).nanmean(0).tolist() for c in CURVES}
        out.append(row)
    return out


def markdown_table(summary: list[dict]) -> str:
    """One row per (model, length): mean ± spread over seeds."""
    cols = [
        ("frame ok", "frame_ok", 3),
        ("drift (last-first quarter)", "frame_ok_change", 3),
        ("late drift (last-second quarter)", "frame_ok_late_change", 3),
        ("found", "found", 3),
        ("colour", "colour_fidelity", 3),
        ("size", "size_ratio", 2),
        ("shape", "shape_correct", 3),
        ("motion err (px/f^2)", "motion_error", 2),
        ("direction ok", "direction_ok", 3),
        ("flicker", "flicker", 4),
        ("FD", "fd", 2),
    ]
    lines = ["| model | length | " + " | ".join(c[0] for c in cols) + " |", "|" + " --- |" * (len(cols) + 2)]
    for r in summary:
        cells = [f"{r[k]:.{d}f} ± {r[k + '_std']:.{d}f}" for _, k, d in cols]
        lines.append(f"| {r['model']} | {r['length']}x | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], out: str | Path) -> list[dict]:
    """``out/results.json`` (per-seed rows and the summary), ``results.md`` (the table),
    ``drift_{frame_ok,found,colour_fidelity}.png`` and, where every model has samples, the side-by-side
    ``compare_{length}x.gif``; returns the summary."""
    from .plots import plot_drift_curves

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = aggregate(rows)
    (out / "results.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    (out / "results.md").write_text(markdown_table(summary))
    for figure in CURVES:
        plot_drift_curves(summary, out / f"drift_{figure}.png", figure)
    for length in sorted({r["length"] for r in summary}):
        models = [r["model"] for r in summary if r["length"] == length]
        if all((out / "samples" / f"{m}_{length}x.safetensors").is_file() for m in models):
            write_comparison(out, models, length, out / f"compare_{length}x.gif")
    return summary
