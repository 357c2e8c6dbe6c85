"""Wall-clock and peak memory of one teacher training step, per recipe.

    python benchmarks/teacher_step.py                       # the demo and toy recipes on the CPU
    python benchmarks/teacher_step.py --device cuda --precision bf16

Prints a table and writes benchmarks/results/teacher_step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from selfforcing.config import load_config
from selfforcing.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench(recipe: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"out_dir={tmp}", f"device={args.device}", f"precision={args.precision}", *args.overrides]
        trainer = Trainer(load_config(ROOT / "configs" / recipe, overrides))
        for _ in range(args.warmup):
            trainer.train_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / args.steps
        c = trainer.cfg
        return {
            "recipe": recipe,
            "dit_params_m": round(sum(p.numel() for p in trainer.model.dit.parameters()) / 1e6, 3),
            "batch": c.batch_size,
            "video": f"{c.data.frames}x{c.data.height}x{c.data.width}",
            "sec_per_step": round(sec, 4),
            "videos_per_sec": round(c.batch_size / sec, 2),
            "peak_memory_mb": round(peak_memory_mb(trainer.device), 1),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["teacher_demo.yaml", "teacher_toy.yaml"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teacher_step.json"))
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every recipe")
    args = p.parse_args()
    rows = [bench(r, args) for r in args.recipes]
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "device": args.device,
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
