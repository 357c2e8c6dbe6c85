"""Has the DMD critic learned the generator's distribution? A diagnostic of a Self Forcing / DMD run.

    python benchmarks/critic_fit.py runs/experiment/sf_dmd_frame runs/experiment/sf_dmd_chunk \\
        --num 64 --out benchmarks/results/critic_fit.json

The critic is the fake score: it should denoise the generator's own videos better than the frozen
teacher does (the teacher models real videos), and real videos no better than the teacher. For each
run's latest checkpoint this measures the flow-matching loss ``mse(v(x_t, sigma), noise - x0)`` of the
critic and of the teacher (conditional, no guidance) at several noise levels, on the generator's
streamed videos (its full few-step sampling, no gradient) and on real videos of the same prompts,
with the same noise for both networks. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from selfforcing.config import load_config
from selfforcing.device import cpu_randn_like
from selfforcing.training.teacher import velocity_loss
from selfforcing.training.trainer import Trainer
from selfforcing.weights import latest_checkpoint

SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def denoising_loss(model, x0: torch.Tensor, sigma: float, text, seed: int) -> float:
    """Flow-matching loss of ``model`` on ``x0: [B, F, C, H, W]`` noised to ``sigma`` (fixed noise per seed)."""
    noise = cpu_randn_like(x0, torch.Generator().manual_seed(seed))
    return float(velocity_loss(model, x0, noise, torch.full((x0.shape[0],), sigma, device=x0.device), text))


def critic_fit(run: Path, num: int, seed: int) -> dict:
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise SystemExit(f"{run} has no checkpoint; give the run folder of a finished DMD/SiD training")
    cfg = load_config(run / "config.yaml", ["resume=false"])
    if cfg.distill.loss == "gan":
        raise SystemExit(f"{run} trains a GAN: its critic is a discriminator, not a score; give a DMD/SiD run")
    trainer = Trainer(cfg)
    trainer.load(ckpt)
    trainer.model.eval()
    s = len(cfg.causal.denoising_steps)
    fake, real, prompts = [], [], []
    g = torch.Generator().manual_seed(seed)
    while sum(len(p) for p in prompts) < num:
        videos, batch_prompts = trainer.batches(int(torch.randint(2**62, (1,), generator=g)))
        fake.append(trainer.objective.rollout(batch_prompts, g, grad=False, exit_step=s))
        real.append(trainer.codec.encode(videos.to(trainer.device)))
        prompts.append(batch_prompts)
    videos_measured = sum(len(p) for p in prompts)
    rows = []
    for sigma in SIGMAS:
        row = {"sigma": sigma}
        for side, videos in (("fake", fake), ("real", real)):
            for name, net in (("critic", trainer.objective.critic), ("teacher", trainer.objective.teacher)):
                losses = [
                    denoising_loss(net, x, sigma, net.encode_text(p), seed + i)
                    for i, (x, p) in enumerate(zip(videos, prompts, strict=True))
                ]
                row[f"{name}_on_{side}"] = sum(losses) / len(losses)
            row[f"ratio_on_{side}"] = row[f"critic_on_{side}"] / row[f"teacher_on_{side}"]
        rows.append(row)
    return {"run": str(run), "checkpoint": ckpt.name, "videos": videos_measured, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders of DMD/SiD trainings")
    p.add_argument("--num", type=int, default=64, help="videos per side (rounded up to whole batches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = p.parse_args()
    results = [critic_fit(run, args.num, args.seed) for run in args.runs]
    print("| run | sigma | generated: critic / teacher loss | ratio | real: critic / teacher loss | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        for row in r["rows"]:
            cells = [
                f"{row[f'critic_on_{side}']:.4f} / {row[f'teacher_on_{side}']:.4f} | {row[f'ratio_on_{side}']:.2f}"
                for side in ("fake", "real")
            ]
            print(f"| {Path(r['run']).name} | {row['sigma']} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
