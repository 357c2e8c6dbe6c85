"""Which released model's inference rule holds long streams best without retraining? The families' rules
(families.py: cache policy, sink, window, denoising scheme) applied to the shipped Self Forcing toy models,
at 1x, 4x and 16x their training length, scored like `selfforcing eval` (frame ok, FD, flicker, drift).

    python benchmarks/families_toy.py                       # about 25 min on 2 CPU cores
    python benchmarks/families_toy.py --num 16 --lengths 1 4  # a quick look

Each model keeps its own chunk size and step list (what it was trained with); a family brings its rules,
with its sink and window counted in chunks. Families whose rules are Self Forcing's on this model (CausVid,
Causal Forcing: their differences are step lists and weights) are left out. Writes
benchmarks/results/families_toy.json, runs/families_toy/ (results.md, drift_*.png, samples) and prints the
table of docs/models.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from selfforcing.eval.evaluate import EvalSettings, evaluate, markdown_table, write_report

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["self-forcing", "longlive", "longlive-infinite", "reward-forcing", "rolling-forcing", "krea"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=["sf_dmd_chunk_toy", "sf_dmd_frame_toy"])
    p.add_argument("--families", nargs="+", default=FAMILIES)
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--num", type=int, default=64, help="held-out prompts")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default=str(ROOT / "runs" / "families_toy"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "families_toy.json"))
    args = p.parse_args()

    settings = EvalSettings(args.lengths, args.num, args.seeds, samples=4, families=args.families)
    t0 = time.perf_counter()
    summary = write_report(evaluate(args.checkpoint, settings, args.out), args.out)
    table = markdown_table(summary)
    print(table)
    result = {
        "command": "python benchmarks/families_toy.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "checkpoints": args.checkpoint,
        "families": args.families,
        "lengths": args.lengths,
        "num": args.num,
        "seeds": args.seeds,
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": summary,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json} and {args.out}/results.md, drift_*.png ({result['seconds']} s)")


if __name__ == "__main__":
    main()
