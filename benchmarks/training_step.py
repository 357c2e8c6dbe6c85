"""Wall-clock and peak memory of one training step per paradigm, same batch.

    python benchmarks/training_step.py                     # SF + DMD vs TF vs DF (toy recipes, CPU), batch 8
    python benchmarks/training_step.py --batch 16 --device cuda
    python benchmarks/training_step.py --frames-per-block 1 --recipes sf_dmd_toy.yaml tf_dmd_toy.yaml \
        --out benchmarks/results/training_step_framewise.json   # frame-wise

The distillation recipes (DMD, SiD, GAN) alternate generator steps (rollout with gradient + loss, then
a critic or discriminator update) with critic-only steps; their figure per step is the mean over whole
cycles (1 generator + 4 critic steps by default), and both kinds are reported too. Each recipe runs
in its own process so its peak memory is its own. Prints a table and writes
benchmarks/results/training_step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["sf_dmd_toy.yaml", "tf_diffusion_toy.yaml", "df_diffusion_toy.yaml"]


def run_one(recipe: str, args: argparse.Namespace) -> dict:
    from selfforcing.cli import trainer_for
    from selfforcing.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"out_dir={tmp}",
            f"device={args.device}",
            f"batch_size={args.batch}",
            f"num_threads={args.threads}",
            f"causal.frames_per_block={args.frames_per_block}",
        ]
        cfg = load_config(ROOT / "configs" / recipe, overrides)
        trainer = trainer_for(cfg)(cfg)
        cycle = cfg.distill.critic_steps_per_generator_step if cfg.distill.loss != "diffusion" else 1
        for _ in range(cycle):  # warm-up: one whole cycle
            trainer.train_step()
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, kinds = [], []
        for _ in range(args.cycles * cycle):
            sync()
            t0 = time.perf_counter()
            stats = trainer.train_step()
            sync()
            times.append(time.perf_counter() - t0)
            kinds.append("generator" if "generator_loss" in stats else "critic")
        peak = (
            torch.cuda.max_memory_allocated() / 2**20
            if trainer.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
    row = {
        "recipe": recipe,
        "paradigm": cfg.distill.paradigm,
        "loss": cfg.distill.loss,
        "batch": args.batch,
        "frames_per_block": args.frames_per_block,
        "sec_per_step": round(sum(times) / len(times), 4),
        "peak_memory_mb": round(peak, 1),
    }
    if cycle > 1:
        gen = [t for t, k in zip(times, kinds, strict=True) if k == "generator"]
        crit = [t for t, k in zip(times, kinds, strict=True) if k == "critic"]
        row["sec_generator_step"] = round(sum(gen) / len(gen), 4)
        row["sec_critic_step"] = round(sum(crit) / len(crit), 4)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--frames-per-block", type=int, default=3, help="3 = chunk-wise (the recipes), 1 = frame-wise")
    p.add_argument("--cycles", type=int, default=4, help="timed generator/critic cycles (or steps) per recipe")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training_step.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    rows = []
    for recipe in args.recipes:
        res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", recipe], capture_output=True, text=True)
        if res.returncode:
            print(f"{recipe} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["paradigm"] == "teacher_forcing"), None)
    for r in rows:
        r["vs_teacher_forcing"] = round(r["sec_per_step"] / base["sec_per_step"], 2) if base else None
    cols = ["recipe", "batch", "sec_per_step", "sec_generator_step", "sec_critic_step", "peak_memory_mb"]
    cols.append("vs_teacher_forcing")
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    meta = {"torch": torch.__version__, "device": args.device, "machine": platform.machine(), "threads": args.threads}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
