"""``selfforcing demo``: the built-in pipeline end to end on the shapes world.

1. writes example videos of the shapes world;
2. trains the demo teacher (configs/teacher_demo.yaml) from scratch;
3. samples it on held-out prompts, scores the samples with the shapes-world analyser;
4. does the same with the shipped toy teacher (trained by configs/teacher_toy.yaml), if present.
Everything lands in one folder, named at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import load_config
from .data.shapes import ShapesWorld, ShapesWorldConfig
from .data.video_io import video_grid, write_video
from .eval.analyser import analyse_batch
from .eval.score import score_checkpoint
from .training.teacher import TeacherTrainer

REPO = Path(__file__).resolve().parents[2]
SHIPPED_TEACHER = Path(__file__).resolve().parent / "assets" / "teacher_toy"


def run_demo(out: Path, steps: int | None = None, overrides: list[str] | None = None, num_samples: int = 8) -> dict:
    """Run the demo into ``out``; ``overrides`` (key=value) adjust the demo recipe. Returns the report."""
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    recipe = REPO / "configs" / "teacher_demo.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(f"{recipe} not found: run the demo from a checkout of the repository")

    print("1/4 the shapes world: real example videos")
    batch = ShapesWorld(ShapesWorldConfig(height=24, width=24, frames=12, max_objects=2)).sample(8, seed=0)
    write_video(out / "shapes_world.gif", video_grid(batch.video, batch.prompts))
    real, _ = analyse_batch(batch.video, batch.prompts)

    print("2/4 training the demo teacher")
    overrides = [*(overrides or []), f"out_dir={out}", "name=teacher_demo", "resume=false"]
    run_dir = TeacherTrainer(load_config(recipe, overrides + ([f"steps={steps}"] if steps else []))).train()

    print("3/4 sampling the demo teacher on held-out prompts")
    report = {
        "real_videos": real,
        "demo_teacher": score_checkpoint(run_dir, num=num_samples, out=out, tag="demo_teacher_samples"),
    }
    if SHIPPED_TEACHER.is_dir():
        print("4/4 sampling the shipped toy teacher")
        report["toy_teacher"] = score_checkpoint(SHIPPED_TEACHER, num=num_samples, out=out, tag="toy_teacher_samples")
    else:
        print(f"4/4 skipped: no shipped toy teacher at {SHIPPED_TEACHER}")
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))

    keys = ["found", "colour_fidelity", "shape_correct", "background_clean", "frame_ok"]
    print(f"\n{'':16}" + "".join(f"{k:>17}" for k in keys))
    for name, s in report.items():
        if isinstance(s, dict):
            print(f"{name:16}" + "".join(f"{s[k]:17.3f}" for k in keys))
    print(f"\ndemo finished in {report['seconds'] / 60:.1f} min; outputs are in {out.resolve()}")
    return report
