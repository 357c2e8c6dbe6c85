"""Prompt switches and image-to-video on the shapes world: how fast a new prompt is obeyed, whether the
scene stays continuous, and whether a stream started from a real first frame keeps its objects.

    python benchmarks/interactive.py --checkpoint sf_dmd_chunk_toy --checkpoint sf_dmd_frame_toy --num 64 \
        --out benchmarks/results/interactive.json --gif docs/interactive_switch.gif

**Switches.** Held-out one-object prompts A stream for ``--frames`` frames; at ``--at`` (the training
length) the prompt becomes B, the same object in another colour (``colour``) or moving the opposite way
(``direction``), in each mode (recache / keep / reset). Per mode and kind, over the videos:
- ``obeyed``: share of videos in which the analyser finds B's object on 3 consecutive frames after the
  switch; ``frames_to_obey``: frames from the switch to the first of them (over the obeying videos);
- ``frame_ok_after``: frame ok under B over the last half of the video (how well B is followed);
- ``direction_ok``: B's direction adherence of the object's track after the switch (direction kind);
- ``jump``: centre displacement (px per frame) from the last frame before the switch to the first frame
  B's object is found (continuity; real objects move at most 1.5 px a frame); ``shape_kept``: B's
  object has A's shape there (its identity).
``B from the start`` streams B without a switch, ``no switch`` keeps A (the floor). ``real videos``
(colour kind) calibrates the figures: one real trajectory drawn in A's colour, then in B's from the
switch on, so its jump is the world's own motion and its shape figure the analyser's own rate.

**Image-to-video.** Each held-out real video's first frame starts a stream of its own prompt
(``--image``); the continuation's frame ok, and the distance of each object's centre from where the real
video has it at frames 1 and 4 (px), against text-only streams of the same prompts.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from selfforcing.data.shapes import DIRECTIONS, SIZES, ShapesWorld, describe
from selfforcing.data.video_io import video_grid, write_video
from selfforcing.eval.analyser import analyse_video
from selfforcing.eval.metrics import direction_adherence
from selfforcing.eval.score import HELD_OUT_SEED
from selfforcing.inference.stream import stream_video
from selfforcing.inference.video_stream import SWITCH_MODES
from selfforcing.pipeline import load_pipeline, stream_settings

ROOT = Path(__file__).resolve().parents[1]
OPPOSITE = {name: next(n for n, v in DIRECTIONS.items() if v == (-d[0], -d[1])) for name, d in DIRECTIONS.items()}


def switched(objects, kind: str, colours: list[str]):
    """B: the same object in the next colour of the world's palette, or moving the opposite way."""
    (o,) = objects
    if kind == "colour":
        return [replace(o, colour=colours[(colours.index(o.colour) + 1) % len(colours)])]
    return [replace(o, direction=OPPOSITE[o.direction])]


def stream(pipe, prompts, frames, seed=0, **kw) -> torch.Tensor:
    """Streamed videos ``[B, frames, 3, H, W]`` with the model's own settings (the cache rolls)."""
    d = pipe.cfg.data
    chunks = stream_video(
        pipe.model, pipe.codec, prompts, frames, d.height, d.width, stream_settings(pipe.cfg), seed, **kw
    )
    return torch.cat([c.frames for c in chunks], dim=1)


def first_run(found: torch.Tensor, start: int, run: int = 3) -> int | None:
    """The first frame >= start that begins ``run`` consecutive frames with ``found`` (bool [F])."""
    for f in range(start, len(found) - run + 1):
        if found[f : f + run].all():
            return f
    return None


def switch_figures(videos, objects_a, objects_b, at: int, kind: str, h: int, w: int) -> dict[str, float]:
    """The switch figures (module docstring) over videos ``[N, F, 3, H, W]``."""
    rows = []
    for video, a, b in zip(videos, objects_a, objects_b, strict=True):
        sb, sa = analyse_video(video, b), analyse_video(video[:at], a)
        start = first_run(sb.found == 1, at)
        half = (at + video.shape[0]) // 2
        row = {"obeyed": float(start is not None), "frame_ok_after": float(sb.frame_ok[half:].mean())}
        if start is not None:
            row["frames_to_obey"] = float(start - at)
            before, after = sa.centroid[at - 1, 0], sb.centroid[start, 0]
            if not torch.isnan(before).any():
                row["jump"] = float((after - before).norm()) / (start - at + 1)
            row["shape_kept"] = float(sb.shape_correct[start] == 1) if not math.isnan(sb.shape_correct[start]) else None
        if kind == "direction":
            r = SIZES[b[0].size] * min(h, w)
            row["direction_ok"] = float(direction_adherence(sb.centroid[at:], [b[0].direction], [r], h, w)[0])
        rows.append(row)
    keys = ["obeyed", "frames_to_obey", "frame_ok_after", "jump", "shape_kept"] + (
        ["direction_ok"] if kind == "direction" else []
    )
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None and not math.isnan(r[k])]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out


def measure_switches(pipe, name: str, num: int, frames: int, at: int) -> tuple[list[dict], torch.Tensor]:
    d = pipe.cfg.data
    world = ShapesWorld(replace(d, min_objects=1, max_objects=1))
    real = world.sample(num, seed=HELD_OUT_SEED, frames=frames)
    prompts_a, objects_a = real.prompts, real.objects
    rows, examples = [], []
    for kind in ("colour", "direction"):
        objects_b = [switched(o, kind, list(d.colours)) for o in objects_a]
        prompts_b = [describe(o) for o in objects_b]
        cases = {"no switch": dict(prompts=prompts_a), "B from the start": dict(prompts=prompts_b)}
        for mode in SWITCH_MODES:
            cases[mode] = dict(prompts=prompts_a, switches={at: prompts_b}, switch_mode=mode)
        if kind == "colour":  # the ceiling: one real trajectory, drawn in A's colour, then in B's from the switch
            real_a, real_b = (world.sample_for_prompts(p, seed=1, frames=frames).video for p in (prompts_a, prompts_b))
            cases["real videos"] = dict(real=torch.cat([real_a[:, :at], real_b[:, at:]], dim=1))
        for case, kw in cases.items():
            videos = kw["real"] if "real" in kw else stream(pipe, frames=frames, **kw)
            figures = switch_figures(videos, objects_a, objects_b, at, kind, d.height, d.width)
            rows.append({"model": name, "kind": kind, "case": case, **figures})
            if kind == "colour" and case in SWITCH_MODES:
                examples.append(videos[:3])
    return rows, torch.cat(examples)


def measure_image_start(pipe, name: str, num: int, frames: int) -> list[dict]:
    d = pipe.cfg.data
    real = ShapesWorld(d).sample(num, seed=HELD_OUT_SEED + 1, frames=frames)
    fpb = stream_settings(pipe.cfg).frames_per_block
    n = 1 + (frames - 1) // fpb * fpb  # 1 + whole chunks
    rows = []
    for case, kw in [("text only", {}), ("first image", {"image": real.video[:, 0]})]:
        videos = stream(pipe, real.prompts, n if kw else n - 1, **kw)
        ok, dist = [], {1: [], 4: []}
        for i, video in enumerate(videos):
            s = analyse_video(video, real.prompts[i])
            ok.append(float(s.frame_ok[1:].mean()))
            for f in dist:
                centre = real.centres[i, : s.centroid.shape[1], f]  # [K, 2] where the real video has them
                err = (s.centroid[f] - centre).norm(dim=-1)
                dist[f] += [float(e) for e in err if not math.isnan(e)]
        rows.append(
            {
                "model": name,
                "case": case,
                "frame_ok": sum(ok) / len(ok),
                **{f"centre_error_frame{f}": sum(v) / len(v) if v else math.nan for f, v in dist.items()},
            }
        )
    return rows


def table(rows: list[dict], keys: list[str]) -> str:
    head = "| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys)
    cells = [
        " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) for r in rows
    ]
    return head + "\n" + "\n".join(f"| {c} |" for c in cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="causal students (shipped names too)")
    p.add_argument("--num", type=int, default=64, help="held-out one-object prompts")
    p.add_argument("--frames", type=int, default=24, help="video length (pixel frames)")
    p.add_argument("--at", type=int, default=12, help="the switch frame (default: the training length)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "interactive.json"))
    p.add_argument(
        "--gif", default=None, help="side-by-side colour switches of the first model (recache | keep | reset)"
    )
    args = p.parse_args()
    switches, images = [], []
    for i, ckpt in enumerate(args.checkpoint):
        pipe = load_pipeline(ckpt)
        rows, examples = measure_switches(pipe, Path(ckpt).name, args.num, args.frames, args.at)
        switches += rows
        images += measure_image_start(pipe, Path(ckpt).name, args.num, args.frames)
        if args.gif and i == 0:
            captions = [f"{m} at frame {args.at}" for m in SWITCH_MODES for _ in range(3)]
            write_video(args.gif, video_grid(examples, captions, scale=4, columns=3), fps=8)
            print(f"wrote {args.gif}")
    keys = ["model", "kind", "case", "obeyed", "frames_to_obey", "frame_ok_after", "direction_ok", "jump", "shape_kept"]
    print(table(switches, keys))
    print()
    print(table(images, ["model", "case", "frame_ok", "centre_error_frame1", "centre_error_frame4"]))
    out = {"num": args.num, "frames": args.frames, "at": args.at, "switches": switches, "image_start": images}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
