"""Quality of trained checkpoints by the shapes-world analyser, on held-out prompts, at several lengths.

    python benchmarks/quality.py --checkpoint src/selfforcing/assets/teacher_toy --num 64 \\
        --out benchmarks/results/teacher_quality.json
    python benchmarks/quality.py --checkpoint src/selfforcing/assets/teacher_toy \\
        --checkpoint runs/ode_init_toy --lengths 1 2 4 --num 64 --out benchmarks/results/student_quality.json

A teacher samples with its recipe's many Euler steps and guidance; a causal student streams with its
few steps and the KV cache, rolling beyond the training length. Real shapes-world videos of the same
length are scored as the ceiling. Prints a table, writes JSON (and sample grids with --samples DIR).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from selfforcing.config import CausalConfig
from selfforcing.data.shapes import ShapesWorld
from selfforcing.eval.analyser import analyse_batch
from selfforcing.eval.score import score_checkpoint
from selfforcing.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint or run folder (repeatable)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1], help="multiples of the training length")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", default=None, help="folder for sample grids (gif + mp4)")
    p.add_argument(
        "--as-causal", action="append", default=[], help="also stream this bidirectional checkpoint as a causal student"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    args = p.parse_args()

    rows = []
    for ckpt, as_causal in [(c, False) for c in args.checkpoint] + [(c, True) for c in args.as_causal]:
        cfg = load_pipeline(ckpt).cfg
        causal = CausalConfig() if as_causal else None  # chunk-wise, 4 warped steps
        lengths = args.lengths if cfg.causal or as_causal else [1]  # a bidirectional teacher has a fixed length
        for mult in lengths:
            frames = cfg.data.frames * mult
            name = Path(ckpt).name + ("_as_causal" if as_causal else "")
            tag = f"{name}_{mult}x"
            t0 = time.perf_counter()
            samples = Path(args.samples) if args.samples else None
            scores = score_checkpoint(ckpt, args.num, args.seed, samples, tag=tag, frames=frames, as_causal=causal)
            kind = "causal" if cfg.causal or as_causal else "teacher"
            row = {"model": name, "kind": kind, "length": f"{mult}x"}
            rows.append({**row, "frames": frames, "seconds": round(time.perf_counter() - t0, 1), **scores})
            print(json.dumps(rows[-1]), flush=True)
            batch = ShapesWorld(cfg.data).sample(args.num, seed=args.seed, frames=frames)
            real, _ = analyse_batch(batch.video, batch.prompts)
            if not any(r["model"] == "real" and r["frames"] == frames for r in rows):
                rows.append({"model": "real", "kind": "data", "length": f"{mult}x", "frames": frames, **real})

    keys = [k for k in rows[0] if k not in ("kind", "seconds")]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print(
            "| " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"checkpoints": args.checkpoint, "num": args.num, "seed": args.seed, "torch": torch.__version__}
    out.write_text(json.dumps({**record, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
