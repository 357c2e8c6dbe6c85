"""``selfforcing demo``: the built-in pipeline end to end on the shapes world.

1. writes example videos of the shapes world;
2. trains the demo teacher (configs/teacher_demo.yaml) from scratch;
3. samples it on held-out prompts, scores the samples with the shapes-world analyser;
4. does the same with the shipped toy teacher (trained by configs/teacher_toy.yaml), if present;
5. streams the shipped causal student (ODE-initialised from that teacher, configs/ode_init_toy.yaml)
   chunk by chunk at 4x its training length with the rolling KV cache, and scores that.
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
from .inference.pipeline import load_pipeline
from .training.teacher import TeacherTrainer

REPO = Path(__file__).resolve().parents[2]
SHIPPED_TEACHER = Path(__file__).resolve().parent / "assets" / "teacher_toy"
SHIPPED_STUDENT = Path(__file__).resolve().parent / "assets" / "student_toy"


def run_demo(out: Path, steps: int | None = None, overrides: list[str] | None = None, num_samples: int = 8) -> dict:
    """Run the demo into ``out``; ``overrides`` (key=value) adjust the demo recipe. Returns the report."""
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    recipe = REPO / "configs" / "teacher_demo.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(f"{recipe} not found: run the demo from a checkout of the repository")

    print("1/5 the shapes world: real example videos")
    batch = ShapesWorld(ShapesWorldConfig(height=24, width=24, frames=12, max_objects=2)).sample(8, seed=0)
    write_video(out / "shapes_world.gif", video_grid(batch.video, batch.prompts))
    real, _ = analyse_batch(batch.video, batch.prompts)

    print("2/5 training the demo teacher")
    overrides = [*(overrides or []), f"out_dir={out}", "name=teacher_demo", "resume=false"]
    run_dir = TeacherTrainer(load_config(recipe, overrides + ([f"steps={steps}"] if steps else []))).train()

    print("3/5 sampling the demo teacher on held-out prompts")
    report = {
        "real_videos": real,
        "demo_teacher": score_checkpoint(run_dir, num=num_samples, out=out, tag="demo_teacher_samples"),
    }
    if SHIPPED_TEACHER.is_dir():
        print("4/5 sampling the shipped toy teacher")
        report["toy_teacher"] = score_checkpoint(SHIPPED_TEACHER, num=num_samples, out=out, tag="toy_teacher_samples")
    else:
        print(f"4/5 skipped: no shipped toy teacher at {SHIPPED_TEACHER}")
    if SHIPPED_STUDENT.is_dir():
        print("5/5 streaming the shipped causal student (4 steps, KV cache) at 4x its training length")
        t0 = time.perf_counter()
        frames = 4 * load_pipeline(SHIPPED_STUDENT).cfg.data.frames
        scores = score_checkpoint(SHIPPED_STUDENT, num=num_samples, out=out, tag="student_stream_4x", frames=frames)
        report["student_4x_length"] = {**scores, "seconds": round(time.perf_counter() - t0, 2)}
    else:
        print(f"5/5 skipped: no shipped causal student at {SHIPPED_STUDENT}")
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))

    keys = ["found", "colour_fidelity", "shape_correct", "background_clean", "frame_ok"]
    print(f"\n{'':16}" + "".join(f"{k:>17}" for k in keys))
    for name, s in report.items():
        if isinstance(s, dict):
            print(f"{name:16}" + "".join(f"{s[k]:17.3f}" for k in keys))
    print(f"\ndemo finished in {report['seconds'] / 60:.1f} min; outputs are in {out.resolve()}")
    return report
