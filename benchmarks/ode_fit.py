"""Does the ODE student fit unseen teacher trajectories as well as the ones it was regressed on?

    selfforcing ode-pairs --teacher src/selfforcing/assets/teacher_toy --out runs/ode_fit/train_shard0 \\
        --num 128 --seed 0
    selfforcing ode-pairs --teacher src/selfforcing/assets/teacher_toy --out runs/ode_fit/heldout \\
        --num 128 --seed 1
    python benchmarks/ode_fit.py --checkpoint src/selfforcing/assets/student_toy \\
        --pairs runs/ode_fit/train_shard0 --pairs runs/ode_fit/heldout --out benchmarks/results/ode_fit.json

The shipped student was regressed on the 1280 pairs of seed 0. Shard 0 of a pair folder is a function
of (seed, 0) only, so the 128 pairs of ``--seed 0 --num 128`` are the first 128 it saw; seed 1's it
never saw. For each folder this measures the x0 MSE ``mse(x_t - sigma * v, x0_teacher)`` with every
chunk at one of the student's levels (the per-level table of docs/student_toy.md) and with each chunk
at its own random level (the training loss, a fixed draw). A gap between the folders means the student
memorises its trajectories and more of them would help; none means its capacity or its few steps
limit it. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from selfforcing.pipeline import load_pipeline
from selfforcing.training.ode_init import ode_regression_loss, x0_mse
from selfforcing.training.ode_pairs import ODEPairs


@torch.no_grad()
def fit(pipe, folder: Path, batch_size: int, seed: int) -> dict:
    """Per-level and random-level x0 MSE of ``pipe``'s causal student on the pairs in ``folder``."""
    cfg, model = pipe.cfg, pipe.model
    if cfg.causal is None:
        raise SystemExit(f"{pipe.checkpoint} is not a causal student: give an ODE-initialised checkpoint")
    pairs = ODEPairs(folder)
    want = cfg.causal.sigmas()
    if len(want) != len(pairs.sigmas) or not torch.allclose(want, pairs.sigmas, atol=1e-6):
        raise SystemExit(f"{folder} holds levels {pairs.sigmas.tolist()}, the student uses {want.tolist()}")
    levels = torch.cat([pairs.sigmas, torch.zeros(1)])
    trajectory, prompts = pairs.trajectory, pairs.prompts  # [N, S + 1, F, C, H, W]
    per_level = [0.0] * len(pairs.sigmas)
    random_level = 0.0
    g = torch.Generator().manual_seed(seed)
    for s in range(0, len(prompts), batch_size):
        traj, text = trajectory[s : s + batch_size], prompts[s : s + batch_size]
        share = len(text) / len(prompts)
        x0 = traj[:, -1]
        for j, sigma in enumerate(pairs.sigmas.tolist()):
            x_t = traj[:, j]
            sig = torch.full(x_t.shape[:2], sigma)  # [B, F]: every chunk at level j
            per_level[j] += share * float(x0_mse(model, x_t, sig, x0, text, cfg))
        random_level += share * float(ode_regression_loss(model, traj, levels, text, cfg, g))
    return {
        "pairs": str(folder),
        "num": len(prompts),
        "sigmas": pairs.sigmas.tolist(),
        "per_level": per_level,
        "random_level": random_level,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an ODE-initialised causal student")
    p.add_argument("--pairs", action="append", type=Path, required=True, help="ODE-pair folder (repeatable)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the random-level draw")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = p.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline(args.checkpoint)
    rows = [fit(pipe, folder, args.batch_size, args.seed) for folder in args.pairs]
    levels = " | ".join(f"sigma {s:.3f}" for s in rows[0]["sigmas"])
    print(f"| pairs | n | {levels} | random levels |")
    print("| --- | --- |" + " --- |" * (len(rows[0]["sigmas"]) + 1))
    for r in rows:
        cells = " | ".join(f"{m:.4f}" for m in r["per_level"])
        print(f"| {r['pairs']} | {r['num']} | {cells} | {r['random_level']:.4f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
