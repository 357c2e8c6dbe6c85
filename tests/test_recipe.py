"""The one-command recipe: teacher -> ODE pairs -> ODE init -> Self Forcing, skipping finished stages."""

import pytest

from selfforcing.cli import main
from selfforcing.recipe import run_recipe
from selfforcing.weights import latest_checkpoint
from tests.conftest import TINY

TRAIN = [*TINY, "data.frames=6", "batch_size=2", "steps=2", "ckpt_every=2", "sample_every=1000", "num_threads=1"]
OVERRIDES = {
    "teacher": TRAIN,
    "pairs": ["num_samples=4", "shard_size=2", "batch_size=4", "teacher_steps=4"],
    "ode_init": TRAIN,
    "self_forcing": [*TRAIN, "distill.critic_steps_per_generator_step=2"],
}


def test_recipe_runs_every_stage_then_skips_what_is_done(tmp_path, capsys):
    out = run_recipe(tmp_path, overrides=OVERRIDES, device="cpu")
    assert list(out) == ["teacher", "pairs", "ode_init", "self_forcing"]
    checkpoints = {k: latest_checkpoint(out[k]) for k in ("teacher", "ode_init", "self_forcing")}
    assert all(c is not None and c.name.endswith("_000002") for c in checkpoints.values())
    assert len(list(out["pairs"].glob("shard-*.safetensors"))) == 2
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()

    run_recipe(tmp_path, overrides=OVERRIDES, device="cpu")  # everything is done: nothing is redone
    log = capsys.readouterr().out
    assert log.count("skipped") == 4, log
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps

    longer = {**OVERRIDES, "self_forcing": [*OVERRIDES["self_forcing"], "steps=4"]}
    run_recipe(tmp_path, overrides=longer, device="cpu")  # only the last stage has work left: it resumes
    log = capsys.readouterr().out
    assert log.count("skipped") == 3 and "resumed from" in log
    assert latest_checkpoint(out["self_forcing"]).name.endswith("_000004")
    assert len((out["self_forcing"] / "metrics.jsonl").read_text().splitlines()) == 4


def test_recipe_with_a_given_teacher_and_bad_settings(teacher, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["recipe", "--out", str(tmp_path), "--set", "student:steps=3"])
    assert e.value.code == 2 and "STAGE:key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["recipe", "--out", str(tmp_path), "--teacher", str(teacher), "--set", "pairs:colour=red"])
    assert "not an ODE-pair setting" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["recipe", "--out", str(tmp_path), "--teacher", str(teacher), "--set", "teacher:steps=3"])
    assert "not trained" in capsys.readouterr().err


def test_recipe_starts_self_forcing_from_a_given_causal_student(teacher, tmp_path, capsys):
    """--init: no ODE pairs, no ODE init; the Self Forcing stage starts from the given student's weights.
    A bidirectional model, or overrides for the stages it skips, are refused."""
    from selfforcing.training.trainer import Trainer
    from tests.test_self_forcing import sf_cfg

    student = latest_checkpoint(Trainer(sf_cfg(teacher, tmp_path / "s", "steps=1", "name=student")).train())
    sf = [*TRAIN, "data.frames=6", "distill.critic_steps_per_generator_step=2"]
    out = run_recipe(tmp_path / "r", teacher=teacher, init=student, overrides={"self_forcing": sf}, device="cpu")
    assert list(out) == ["teacher", "ode_init", "self_forcing"] and out["ode_init"] == student
    assert not (tmp_path / "r" / "pairs").exists()
    assert f"init_from: {student}" in (out["self_forcing"] / "config.yaml").read_text()
    with pytest.raises(SystemExit):
        main(["recipe", "--out", str(tmp_path / "x"), "--teacher", str(teacher), "--init", str(teacher)])
    assert "is a bidirectional teacher model; give a causal student" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["recipe", "--out", str(tmp_path / "x"), "--teacher", str(teacher), "--init", str(student), "--set",
              "pairs:num_samples=4"])  # fmt: skip
    assert "stages that --init skips" in capsys.readouterr().err
