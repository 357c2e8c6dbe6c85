"""Frame ok, drift and FD against generator updates, from the checkpoints a run keeps.

    python benchmarks/budget_curve.py runs/budget/sf_dmd_chunk_long runs/budget/tf_dmd_chunk_long \
        --num 64 --lengths 1 4 --out benchmarks/results/budget_curve.json --plot docs/results_budget.png

Train with ``keep_checkpoints`` large enough to keep every ``ckpt_every`` checkpoint. Each checkpoint is
evaluated like ``selfforcing eval`` (held-out prompts, the causal student streamed with the rolling
cache, one seed) and counted in generator updates (critic steps / ``critic_steps_per_generator_step``);
the run's ``init_from`` is its point at 0 updates. Evaluations are cached under ``--cache`` (a rerun
measures only new checkpoints). Prints a table, writes JSON and a PNG (one panel per figure and length).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from selfforcing.config import config_from_yaml
from selfforcing.eval.evaluate import EvalSettings, aggregate, evaluate
from selfforcing.weights import checkpoint_step, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIGURES = [("frame_ok", "frame ok"), ("frame_ok_change", "drift"), ("fd", "FD")]


def run_points(run: Path) -> list[tuple[int, Path]]:
    """(generator updates, checkpoint) for the run's init and every checkpoint it kept."""
    cfg = config_from_yaml((run / "config.yaml").read_text())
    d = cfg.distill
    ratio = d.critic_steps_per_generator_step if cfg.stage == "causal" and d.loss != "diffusion" else 1
    points = [(0, resolve_checkpoint(cfg.init_from))] if cfg.init_from else []
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        since = max(0, checkpoint_step(ckpt) - (d.critic_warmup_steps if ratio > 1 else 0))
        points.append((-(-since // ratio), ckpt))  # generator steps at since = 0, ratio, 2 ratio, ...
    return points


def measure_run(run: Path, settings: EvalSettings, cache: Path) -> list[dict]:
    rows = []
    for updates, ckpt in run_points(run):
        out = cache / run.name / f"updates_{updates:05d}"
        for r in aggregate(evaluate([str(ckpt)], settings, out=out)):
            if r["model"] == "real" and updates:
                continue  # real videos once per run
            figures = {k: r[k] for k, _ in FIGURES} | {f"{k}_std": r[f"{k}_std"] for k, _ in FIGURES}
            name = "real" if r["model"] == "real" else run.name
            rows.append({"run": name, "updates": updates, "length": r["length"], **figures})
    return rows


def plot(rows: list[dict], path: Path, lengths: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = (4.2 * len(FIGURES), 3.2 * len(lengths))
    fig, axes = plt.subplots(len(lengths), len(FIGURES), figsize=size, squeeze=False)
    runs = list(dict.fromkeys(r["run"] for r in rows if r["run"] != "real"))
    for i, length in enumerate(lengths):
        for j, (key, title) in enumerate(FIGURES):
            ax = axes[i][j]
            for run in runs:
                pts = sorted((r["updates"], r[key]) for r in rows if r["run"] == run and r["length"] == length)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run)
            real = [r[key] for r in rows if r["run"] == "real" and r["length"] == length]
            if real:
                ax.axhline(real[0], color="black", linestyle="--", label="real videos")
            ax.set_title(f"{title}, {length}x the training length")
            ax.set_xlabel("generator updates")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--num", type=int, default=64, help="held-out prompts")
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 4])
    p.add_argument("--cache", default="runs/budget_eval", help="evaluations, reused by a rerun")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "budget_curve.json"))
    p.add_argument("--plot", default=None, help="PNG of the curves")
    args = p.parse_args()
    settings = EvalSettings(lengths=args.lengths, num=args.num, seeds=[0], samples=0)
    rows = [r for run in args.runs for r in measure_run(Path(run), settings, Path(args.cache))]
    seen, unique = set(), []
    for r in rows:  # real videos: once per length
        key = (r["run"], r["updates"], r["length"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    print("| run | updates | length | " + " | ".join(t for _, t in FIGURES) + " |\n|" + " --- |" * (3 + len(FIGURES)))
    for r in unique:
        cells = " | ".join(f"{r[k]:.3f}" for k, _ in FIGURES)
        print(f"| {r['run']} | {r['updates']} | {r['length']}x | {cells} |")
    Path(args.out).write_text(json.dumps({"num": args.num, "rows": unique}, indent=1))
    print(f"wrote {args.out}")
    if args.plot:
        plot(unique, Path(args.plot), args.lengths)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
