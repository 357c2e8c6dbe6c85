"""Do the toy recipes still train exactly as before? Runs a few steps of each and compares the losses.

    python benchmarks/same_losses.py --out benchmarks/results/same_losses_before.json   # before a change
    python benchmarks/same_losses.py --compare benchmarks/results/same_losses_before.json  # after it

Runs the toy recipe files as they are (configs/teacher_toy.yaml, ode_init_toy.yaml, sf_dmd_toy.yaml,
sf_gan_toy.yaml) for ``--steps`` steps each through the command line, starting from the shipped models
(the teacher, and the ODE-initialised student for Self Forcing; the ODE stage regresses 32 fresh pairs
of the shipped teacher). Every number of every ``metrics.jsonl`` line (losses, gradient norms, learning
rates, sample scores; not the timings) is stored, and with ``--compare`` checked for exact equality with
an earlier run's file (keys new since then are listed, not compared). Prints a table; about 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "teacher": "teacher_toy.yaml",
    "ode_init": "ode_init_toy.yaml",
    "sf_dmd": "sf_dmd_toy.yaml",
    "sf_gan": "sf_gan_toy.yaml",
}
TIMINGS = {"sec_per_step"}


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "selfforcing", *cmd], check=True, cwd=ROOT)


def train(recipe: str, work: Path, steps: int, extra: list[str]) -> list[dict]:
    name = Path(recipe).stem
    common = [f"steps={steps}", f"out_dir={work}", f"name={name}", "sample_every=1000", f"ckpt_every={steps}"]
    run(["train", str(ROOT / "configs" / recipe), *common, "num_samples=4", *extra])
    lines = (work / name / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="steps of each recipe (SF: 6 = 2 generator updates)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/same_losses.json"))
    p.add_argument("--compare", default=None, help="an earlier run's JSON: every number must be equal")
    args = p.parse_args()
    teacher = str(ROOT / "src/selfforcing/assets/teacher_toy")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["teacher"] = train(RECIPES["teacher"], work, args.steps, [])
        pairs = work / "pairs"
        run(["ode-pairs", "--teacher", teacher, "--out", str(pairs), "--num", "32", "--shard-size", "16",
             "--batch-size", "16", "--teacher-steps", "8", "--device", "cpu"])  # fmt: skip
        results["ode_init"] = train(RECIPES["ode_init"], work, args.steps, [f"ode.pairs={pairs}"])
        for key in ("sf_dmd", "sf_gan"):
            results[key] = train(RECIPES[key], work, args.steps, [])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{'recipe':10} {'step':>4}  losses")
    for key, lines in results.items():
        for line in lines:
            losses = {k: round(v, 6) for k, v in line.items() if "loss" in k}
            print(f"{key:10} {line['step']:>4}  {losses}")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = [
            f"{key} step {a.get('step')}: {k} {a.get(k)} -> {b.get(k)}"
            for key in before
            for a, b in zip(before[key], results.get(key, []), strict=False)
            for k in sorted(a)
            if a.get(k) != b.get(k)
        ]
        pairs = [(a, b) for key in before for a, b in zip(before[key], results.get(key, []), strict=False)]
        added = sorted({k for a, b in pairs for k in set(b) - set(a)})
        differ += [f"{key}: {len(before[key])} lines -> {len(results.get(key, []))}" for key in before
                   if len(before[key]) != len(results.get(key, []))]  # fmt: skip
        print(f"\ncompared with {args.compare}: " + ("every number equal" if not differ else "DIFFERENT"))
        for line in differ:
            print("  " + line)
        if added:
            print(f"  (new keys, not compared: {', '.join(added)})")
        if differ:
            sys.exit(1)


if __name__ == "__main__":
    main()
