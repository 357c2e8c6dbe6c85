"""Many-step Teacher Forcing / Diffusion Forcing baselines: they train, and bad combinations are refused."""

import json
import math

import pytest
import torch

from selfforcing.config import ConfigError, load_config
from selfforcing.training.trainer import Trainer


def cfg(teacher, tmp_path, paradigm, *extra):
    from tests.conftest import TINY

    return load_config(
        None,
        [
            *TINY,
            f"out_dir={tmp_path}",
            f"name={paradigm}",
            "stage=causal",
            f"init_from={teacher}",
            f"distill.paradigm={paradigm}",
            "distill.loss=diffusion",
            "data.frames=6",
            "causal.frames_per_block=3",
            "causal.denoising_steps=[1000,750,500,250,100]",
            "optim.lr=3e-3",
            "optim.schedule=constant",
            "sample_every=1000",
            *extra,
        ],
    )


@pytest.mark.parametrize("paradigm", ["teacher_forcing", "diffusion_forcing"])
def test_many_step_baselines_train(teacher, tmp_path, paradigm):
    t = Trainer(cfg(teacher, tmp_path, paradigm, "steps=30"))
    before = [p.detach().clone() for p in t.model.parameters()]
    t.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters(), strict=True))
    losses = [json.loads(line)["loss"] for line in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-8:]) < sum(losses[:8])
    assert (t.run_dir / "samples" / "step_000030.gif").is_file()  # streamed with its own step list


def test_unimplemented_combinations_are_refused(teacher, tmp_path):
    with pytest.raises(ConfigError, match="not implemented"):
        cfg(teacher, tmp_path, "teacher_forcing", "distill.loss=sid", f"distill.teacher={teacher}")
    with pytest.raises(ConfigError, match="distill.paradigm must be one of"):
        cfg(teacher, tmp_path, "student_forcing")
