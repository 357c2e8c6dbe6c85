"""``selfforcing demo``: Self Forcing end to end on the shapes world, in about 10 minutes on 2 cores.

1. writes example videos of the shapes world;
2. trains Self Forcing + DMD (configs/sf_dmd_toy.yaml, a short budget): the shipped ODE-initialised
   causal student rolls out its own videos with the KV cache, as at inference, and the shipped
   bidirectional teacher (the real score) and a critic (the fake score) supervise them;
3. streams the ODE student and the new Self Forcing model chunk by chunk, at 1x and at 4x the training
   length (the KV cache rolls), on the same held-out prompts and seed, and scores them with
   ``selfforcing eval``'s figures: frame ok, drift, late drift, FD;
4. writes the drift curves (PNG), the samples side by side (gif) and a summary.
Everything lands in one folder, named at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .config import load_config
from .data.shapes import ShapesWorld, ShapesWorldConfig
from .data.video_io import video_grid, write_video
from .eval.evaluate import EvalSettings, evaluate, write_report
from .training.trainer import Trainer
from .weights import ASSETS

REPO = Path(__file__).resolve().parents[2]
SHIPPED_TEACHER = ASSETS / "teacher_toy"
SHIPPED_STUDENT = ASSETS / "student_toy"  # the ODE-initialised causal student Self Forcing starts from
DEMO_STEPS = 300  # critic steps: 60 generator updates, about 5 minutes on 2 cores
NAMES = {"real": "real videos", "student_toy": "ODE student", "self_forcing": "Self Forcing"}
FIGURES = [  # (column, figure of selfforcing eval)
    ("frame ok", "frame_ok"),
    ("drift", "frame_ok_change"),
    ("late drift", "frame_ok_late_change"),
    ("FD", "fd"),
]


def run_demo(out: Path, steps: int | None = None, overrides: list[str] | None = None, num_prompts: int = 32) -> dict:
    """Run the demo into ``out``; ``overrides`` (key=value) adjust the Self Forcing recipe. Returns the
    report (also ``out/report.json``)."""
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = REPO / "configs" / "sf_dmd_toy.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(f"{recipe} not found: run the demo from a checkout of the repository")
    for asset in (SHIPPED_TEACHER, SHIPPED_STUDENT):
        if not asset.is_dir():
            raise FileNotFoundError(f"{asset} is missing: the demo needs the shipped toy teacher and ODE student")

    print("1/4 the shapes world: real example videos")
    batch = ShapesWorld(ShapesWorldConfig(height=24, width=24, frames=12, max_objects=2)).sample(8, seed=0)
    write_video(out / "shapes_world.gif", video_grid(batch.video, batch.prompts))

    budget = steps or DEMO_STEPS
    print(f"2/4 Self Forcing + DMD from the ODE student: {budget} steps ({recipe.name})")
    settings = [f"out_dir={out}", "name=self_forcing", "resume=false", f"steps={budget}", f"sample_every={budget}"]
    cfg = load_config(recipe, [*(overrides or []), *settings, f"ckpt_every={budget}"])
    t0 = time.perf_counter()
    run_dir = Trainer(cfg).train()
    train_s = time.perf_counter() - t0

    print("3/4 streaming both students at 1x and 4x the training length (rolling KV cache) and scoring them")
    t0 = time.perf_counter()
    scoring = EvalSettings(lengths=[1, 4], num=num_prompts, seeds=[0], samples=4)
    summary = write_report(evaluate([str(SHIPPED_STUDENT), str(run_dir)], scoring, out=out / "eval"), out / "eval")
    eval_s = time.perf_counter() - t0

    print("4/4 pictures and summary")
    shutil.copy(out / "eval" / "drift_frame_ok.png", out / "drift_frame_ok.png")
    shutil.copy(out / "eval" / "compare_4x.gif", out / "compare_4x.gif")
    scores: dict[str, dict[str, dict[str, float]]] = {}  # model -> length -> figure
    for r in summary:
        scores.setdefault(NAMES.get(r["model"], r["model"]), {})[f"{r['length']}x"] = {k: r[k] for _, k in FIGURES}
    report = {
        "scores": scores,
        "prompts": num_prompts,
        "self_forcing_steps": budget,
        "seconds": {"training": round(train_s, 1), "scoring": round(eval_s, 1)},
    }
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print_summary(report, out)
    return report


def print_summary(report: dict, out: Path) -> None:
    """One screen: each model's figures at 1x and 4x, what Self Forcing changed, and where the files are."""
    print(f"\n{'':14}{'length':>8}" + "".join(f"{name:>12}" for name, _ in FIGURES))
    for model, by_length in report["scores"].items():
        for length, figures in by_length.items():
            print(f"{model:14}{length:>8}" + "".join(f"{figures[key]:12.3f}" for _, key in FIGURES))
    sf, ode = report["scores"]["Self Forcing"]["4x"], report["scores"]["ODE student"]["4x"]
    print(
        f"\nAt 4x the training length, Self Forcing gets frame ok {sf['frame_ok']:.3f} against the ODE student's "
        f"{ode['frame_ok']:.3f} ({sf['frame_ok'] - ode['frame_ok']:+.3f}), after {report['self_forcing_steps']} steps. "
        "Drift is the last quarter's frame ok minus the first's (0 is ideal)."
    )
    s = report["seconds"]
    minutes = {k: f"{v / 60:.1f}" for k, v in s.items()}
    print(f"demo finished in {minutes['total']} min (training {minutes['training']}, scoring {minutes['scoring']})")
    print(f"outputs: {out.resolve()} (compare_4x.gif, drift_frame_ok.png, report.json, self_forcing/, eval/)")
