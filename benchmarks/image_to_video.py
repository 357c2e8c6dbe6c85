"""Image-to-video on the shapes world: a student trained on-policy from given first frames
(``distill.image_to_video``) against the zero-shot first-frame commit of the T2V student it started from.

    selfforcing train configs/sf_dmd_i2v_toy.yaml      # the trained I2V student (~8 min on 2 cores)
    selfforcing train configs/sf_dmd_i2v_toy.yaml name=sf_dmd_t2v_more_toy distill.image_to_video=false \
        data.frames=12                                 # the control: the same training as text-to-video
    python benchmarks/image_to_video.py --extra "T2V trained as long=runs/sf_dmd_t2v_more_toy"

Every model streams from the same first frames, those of real videos of held-out prompts, committed clean
to the KV cache as ``selfforcing generate --image`` commits an image, for 1 + 12 x L frames (L = 1: the
training length; 4: four times it, the cache rolling). Per model and length:

- position error at frame k: the distance in pixels between each object's centroid in the generated frame k
  and in the real video's frame k, over the objects the analyser finds in both. The real video is one
  continuation of the first frame (the prompt's direction at a speed drawn in 0.75..1.5 px a frame), so a
  model that moves at another plausible speed still drifts by about 0.25 k px;
- frame ok over the generated frames (the analyser), and the FD of the whole videos to real videos of the
  same prompts (the shipped video encoder); ``real`` (other real continuations) gives the floor.

Writes benchmarks/results/image_to_video.json, docs/image_to_video_position.png and
docs/image_to_video_4x.gif.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from report import print_table, save

ROOT = Path(__file__).resolve().parents[1]
REAL_SEED = 424_242  # the real videos whose first frames start every stream (and that positions are compared to)


def position_errors(videos: torch.Tensor, real: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``[F]`` mean centroid distance (px) per frame between ``videos`` and ``real`` ``[N, F, 3, H, W]``, over
    the objects the analyser finds in both (NaN where none is)."""
    from selfforcing.eval.analyser import analyse_batch

    _, ours = analyse_batch(videos, prompts)
    _, theirs = analyse_batch(real, prompts)
    total, count = torch.zeros(videos.shape[1]), torch.zeros(videos.shape[1])
    for a, b in zip(ours, theirs, strict=True):
        dist = (a.centroid - b.centroid).norm(dim=-1)  # [F, K]: K = the prompt's objects
        found = ~dist.isnan()
        total += torch.where(found, dist, 0).sum(1)
        count += found.sum(1)
    return total / count


def stream_from(pipe, prompts: list[str], images: torch.Tensor, frames: int, seed: int, batch: int) -> torch.Tensor:
    """``pipe``'s videos ``[N, frames, 3, H, W]`` streamed from first frames ``images [N, 3, H, W]``."""
    from selfforcing.inference.stream import generate_stream
    from selfforcing.pipeline import stream_settings

    d = pipe.cfg.data
    out = []
    for i in range(0, len(prompts), batch):
        settings = stream_settings(pipe.cfg)
        out.append(
            generate_stream(
                pipe.model,
                pipe.codec,
                prompts[i : i + batch],
                frames,
                d.height,
                d.width,
                settings,
                seed + i,
                image=images[i : i + batch],
            )
        )
    return torch.cat(out).cpu()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trained", default="runs/sf_dmd_i2v_toy", help="the image-to-video run (or checkpoint)")
    p.add_argument("--zero-shot", default=str(ROOT / "src/selfforcing/assets/sf_dmd_chunk_toy"))
    p.add_argument("--extra", nargs="*", default=[], help="more runs to compare, as NAME=RUN")
    p.add_argument("--num", type=int, default=256, help="held-out prompts")
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 4], help="multiples of the 12 generated frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/image_to_video.json"))
    p.add_argument("--figures", default=str(ROOT / "docs"), help="folder for the PNG and the gif ('' = none)")
    args = p.parse_args(argv)

    from selfforcing.data.shapes import ShapesWorld
    from selfforcing.eval.analyser import analyse_batch
    from selfforcing.eval.encoder import encode_videos, frechet_distance, load_encoder
    from selfforcing.eval.evaluate import REFERENCE_SEED, check_world
    from selfforcing.eval.score import held_out_prompts
    from selfforcing.pipeline import load_pipeline

    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = {"zero-shot": args.zero_shot, "trained I2V": args.trained}
    models |= dict(e.split("=", 1) if "=" in e else (Path(e).name, e) for e in args.extra)
    pipes = {name: load_pipeline(path) for name, path in models.items()}
    encoder, world_cfg = load_encoder()
    for pipe in pipes.values():
        check_world(world_cfg, pipe.cfg.data)
    cfg = pipes["zero-shot"].cfg
    generated = cfg.data.frames if not cfg.distill.image_to_video else cfg.data.frames - 1
    world, prompts = ShapesWorld(cfg.data), held_out_prompts(cfg, args.num)
    rows, curves, clips = [], {}, {}
    for mult in args.lengths:
        frames = 1 + generated * mult
        real = world.sample_for_prompts(prompts, REAL_SEED + args.seed, frames).video
        reference = encode_videos(encoder, world.sample_for_prompts(prompts, REFERENCE_SEED, frames).video)
        others = world.sample_for_prompts(prompts, REFERENCE_SEED + 1 + args.seed, frames).video
        fd_real = frechet_distance(reference, encode_videos(encoder, others))
        rows.append({"model": "real", "length": mult, "frames": frames, "fd": round(fd_real, 3)})
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            videos = stream_from(pipe, prompts, real[:, 0], frames, 1000 * args.seed, args.batch)
            assert torch.allclose(videos[:, 0], real[:, 0], atol=1e-5)  # the given first frame, as it is
            err = position_errors(videos, real, prompts)
            _, scores = analyse_batch(videos, prompts)
            ok = torch.stack([s.frame_ok[1:].float() for s in scores]).mean()  # the generated frames
            row = {"model": name, "length": mult, "frames": frames}
            row |= {f"pos_err_f{k}": round(float(err[k]), 3) for k in (1, 3, 6, 12) if k < frames}
            row |= {"pos_err_mean": round(float(err[1:].nanmean()), 3), "frame_ok": round(float(ok), 4)}
            row |= {"fd": round(frechet_distance(reference, encode_videos(encoder, videos)), 3)}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            curves[f"{name} {mult}x"] = [None if math.isnan(v) else round(v, 3) for v in err.tolist()]
            clips[(name, mult)] = videos[:4]
            print({k: v for k, v in row.items()}, flush=True)
        clips[("real", mult)] = real[:4]
    cols = [
        "model",
        "length",
        "pos_err_f1",
        "pos_err_f3",
        "pos_err_f6",
        "pos_err_f12",
        "pos_err_mean",
        "frame_ok",
        "fd",
    ]
    print_table(rows, cols)
    if args.figures:
        write_figures(Path(args.figures), curves, clips, prompts[:4], max(args.lengths), list(pipes))
    meta = {"models": models, "num": args.num, "seed": args.seed, "curves": curves}
    return save(Path(args.out), "image_to_video.py", argv, meta, rows)


def write_figures(folder: Path, curves: dict, clips: dict, prompts: list[str], mult: int, names: list[str]) -> None:
    """The position error per frame (one panel per length) and a gif: per prompt, real | each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selfforcing.data.video_io import video_grid, write_video

    lengths = sorted({int(k.rsplit(" ", 1)[1][:-1]) for k in curves})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.6), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        for name in names:
            curve = curves[f"{name} {length}x"]
            ax.plot(range(1, len(curve)), curve[1:], label=name, lw=1.5)
        ax.set(xlabel="frame (0 = the given image)", title=f"{length}x the training length")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("object position error (px)")
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / "image_to_video_position.png", dpi=100)
    plt.close(fig)
    columns = ["real", *names]
    tiles = torch.stack([clips[(c, mult)][i] for i in range(len(prompts)) for c in columns])
    captions = [f"{c}: {p}" if c == "real" else c for p in prompts for c in columns]
    write_video(folder / f"image_to_video_{mult}x.gif", video_grid(tiles, captions, scale=3, columns=len(columns)))


if __name__ == "__main__":
    sys.exit(main() and 0)
