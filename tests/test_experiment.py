"""The ablation experiment: its stages, budgets, a tiny end-to-end run, and a rerun that redoes nothing."""

import json

import pytest

from selfforcing.config import ConfigError
from selfforcing.data.shapes import ShapesWorldConfig
from selfforcing.data.video_io import read_video
from selfforcing.eval.encoder import EncoderConfig, train_encoder
from selfforcing.experiment import ExperimentSettings, run_experiment, stage_configs
from tests.conftest import TINY

TINY_STAGES = [*TINY, "data.frames=6", "batch_size=2", "sample_every=1000", "ckpt_every=1000"]
TINY_PAIRS = ["shard_size=2", "batch_size=2", "teacher_steps=4"]


def test_every_method_gets_the_same_generator_updates_from_the_teacher(tmp_path):
    s = ExperimentSettings(ode_steps=50, updates=7)
    configs = stage_configs(tmp_path, s, tmp_path / "teacher")
    assert len(configs) == 2 + 2 * 7
    for name, cfg in configs.items():
        gran = name.rsplit("_", 1)[1]
        assert cfg.causal.frames_per_block == {"chunk": 3, "frame": 1}[gran]
        if name.startswith("ode_init"):
            assert cfg.steps == 50 and cfg.init_from == str(tmp_path / "teacher")
        elif "diffusion" in name:  # many-step: ODE-init updates + the same updates, from the teacher
            assert cfg.steps == 57 and cfg.init_from == str(tmp_path / "teacher")
        else:  # few-step: 7 generator updates = 7 x ratio critic steps, from this granularity's ODE student
            assert cfg.steps == 7 * cfg.distill.critic_steps_per_generator_step
            assert cfg.init_from == str(tmp_path / f"ode_init_{gran}")
    with pytest.raises(ConfigError, match="unknown method"):
        ExperimentSettings(methods=["sf_ppo"]).validate()


def test_tiny_experiment_runs_end_to_end_and_a_rerun_redoes_nothing(teacher, tmp_path):
    world = ShapesWorldConfig(height=16, width=16, frames=6, max_objects=1)
    train_encoder(world, tmp_path / "enc", steps=2, batch_size=2, cfg=EncoderConfig([8], 4), progress=False)
    settings = ExperimentSettings(
        ode_steps=2,
        updates=1,
        methods=["tf_diffusion", "sf_dmd"],
        num_pairs=4,
        eval_num=2,
        eval_seeds=[0],
        eval_lengths=[1, 2],
        encoder=str(tmp_path / "enc"),
        overrides=TINY_STAGES,
        pair_overrides=TINY_PAIRS,
    )
    out = tmp_path / "exp"
    with pytest.raises(ConfigError, match="trained first"):
        run_experiment(out, settings, teacher, only=["eval"])
    with pytest.raises(ConfigError, match="unknown experiment stage"):
        run_experiment(out, settings, teacher, only=["sf_ppo_chunk"])
    chunk = ["pairs", "ode_init_chunk", "tf_diffusion_chunk", "sf_dmd_chunk", "eval_chunk"]
    run_experiment(out, settings, teacher, only=chunk)  # one granularity's evaluation rows on their own
    rows = {p.name: p.stat().st_mtime_ns for p in (out / "eval" / "rows").iterdir()}
    assert "sf_dmd_chunk_2x_seed0.json" in rows and not any("frame" in r or "teacher" in r for r in rows)
    done = run_experiment(out, settings, teacher)
    assert all((out / "eval" / "rows" / r).stat().st_mtime_ns == t for r, t in rows.items())  # reused
    assert set(done) == {"pairs", "eval", "eval_chunk", "eval_frame"} | {
        f"{m}_{g}" for m in ("ode_init", *settings.methods) for g in ("chunk", "frame")
    }
    summary = json.loads((out / "eval" / "results.json").read_text())["summary"]
    models = {(r["model"], r["length"]) for r in summary}
    assert ("sf_dmd_frame", 2) in models and ("teacher", 1) in models and ("real", 2) in models
    assert (out / "eval" / "drift_frame_ok.png").is_file() and (out / "eval" / "drift_chunk.png").is_file()
    assert read_video(out / "eval" / "compare_frame_2x.gif").shape[0] == 12  # real, ode_init + 2 methods
    ablation = (out / "eval" / "ablation.md").read_text()
    assert "## 2x the training length" in ablation
    for method in ("real", "teacher", "ode_init", "tf_diffusion", "sf_dmd"):
        assert f"| {method} |" in ablation
    assert "| sf_gan |" not in ablation  # not trained here

    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "eval" not in p.parts}
    run_experiment(out, settings, teacher, only=[f"{m}_{g}" for m in settings.methods for g in ("chunk", "frame")])
    assert files == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "eval" not in p.parts}
