"""Quality of a trained teacher by the shapes-world analyser, on held-out prompts.

    python benchmarks/teacher_quality.py --checkpoint src/selfforcing/assets/teacher_toy --num 64

Prints a table, writes JSON (and a sample grid with --samples DIR).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from selfforcing.data.shapes import ShapesWorld
from selfforcing.eval.analyser import analyse_batch
from selfforcing.eval.score import score_checkpoint
from selfforcing.inference.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", default=None, help="folder for a sample grid (gif + mp4)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teacher_quality.json"))
    args = p.parse_args()

    t0 = time.perf_counter()
    generated = score_checkpoint(args.checkpoint, args.num, args.seed, Path(args.samples) if args.samples else None)
    seconds = time.perf_counter() - t0
    batch = ShapesWorld(load_pipeline(args.checkpoint).cfg.data).sample(args.num, seed=args.seed)
    real, _ = analyse_batch(batch.video, batch.prompts)

    keys = list(generated)
    print(f"{'':10}" + "".join(f"{k:>17}" for k in keys))
    for name, s in [("real", real), ("generated", generated)]:
        print(f"{name:10}" + "".join(f"{s[k]:17.3f}" for k in keys))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": str(args.checkpoint),
        "num": args.num,
        "seed": args.seed,
        "torch": torch.__version__,
        "sampling_seconds": round(seconds, 1),
        "real": real,
        "generated": generated,
    }
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
