"""ODE pairs at the student's exact levels, and the ODE-regression initialisation of the causal student."""

import json

import pytest
import torch

from selfforcing.config import load_config
from selfforcing.diffusion.flow_matching import sampling_sigmas, warp_timesteps
from selfforcing.training.ode_init import pick_levels
from selfforcing.training.ode_pairs import ODEPairs, ODEPairSettings, generate_ode_pairs, teacher_segments
from selfforcing.training.trainer import Trainer

SETTINGS = ODEPairSettings(num_samples=5, shard_size=2, batch_size=2, teacher_steps=6, guidance_scale=2.0)


def test_teacher_schedule_passes_through_the_student_levels():
    s = ODEPairSettings(teacher_steps=48)
    segments = teacher_segments(s)
    student = (warp_timesteps([1000, 750, 500, 250], 5.0) / 1000).tolist()
    assert [seg[0].item() for seg in segments] == pytest.approx(student)
    assert [seg[-1].item() for seg in segments] == pytest.approx([*student[1:], 0.0])
    joined = torch.cat([seg[:-1] for seg in segments] + [torch.zeros(1)])
    assert (joined[1:] < joined[:-1]).all()  # one strictly decreasing schedule
    grid = sampling_sigmas(48, 3.0)
    assert set(grid.tolist()) <= set(joined.tolist())  # every teacher step is kept


def test_ode_pairs_are_resumable_and_checked(teacher, tmp_path):
    out = generate_ode_pairs(teacher, tmp_path / "pairs", SETTINGS)
    pairs = ODEPairs(out)
    assert pairs.trajectory.shape == (5, 5, 6, 3, 16, 16) and len(pairs.prompts) == 5
    assert torch.allclose(pairs.sigmas, warp_timesteps([1000, 750, 500, 250], 5.0) / 1000)
    # entry 0 is the starting noise, the last the clean sample
    g = torch.Generator().manual_seed(0)
    torch.randint(2**62, (1,), generator=g)
    assert torch.equal(pairs.trajectory[:2, 0], torch.randn(2, 6, 3, 16, 16, generator=g))
    assert pairs.trajectory[:, -1].abs().max() < 5
    # a sampled batch is read row by row from the shards: the same rows, with their own prompts
    sampled, prompts = pairs.sample(4, torch.Generator().manual_seed(3))
    idx = torch.randint(len(pairs), (4,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, pairs.trajectory[idx]) and prompts == [pairs.prompts[i] for i in idx.tolist()]
    # a lost shard is regenerated identically; finished shards are not touched
    before = pairs.trajectory.clone()
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        ODEPairs(out)
    mtime = (out / "shard-00000.safetensors").stat().st_mtime_ns
    generate_ode_pairs(teacher, out, SETTINGS)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == mtime
    assert torch.equal(ODEPairs(out).trajectory, before)
    with pytest.raises(ValueError, match="other settings"):
        generate_ode_pairs(teacher, out, ODEPairSettings(num_samples=5, shard_size=2, student_shift=8.0))
    with pytest.raises(FileNotFoundError, match="ode-pairs"):
        ODEPairs(tmp_path / "nowhere")


def test_pick_levels_puts_each_chunk_at_one_level():
    b, levels, f = 64, 5, 6
    trajectory = torch.arange(levels, dtype=torch.float32).view(1, levels, 1, 1, 1, 1).expand(b, levels, f, 1, 2, 2)
    sig = torch.tensor([1.0, 0.9, 0.8, 0.6, 0.0])
    x_t, sigma = pick_levels(trajectory, sig, 3, True, torch.Generator().manual_seed(0))
    entry = x_t[..., 0, 0, 0].long()  # which entry each frame came from
    assert torch.equal(sigma, sig[entry])
    assert (entry[:, :3] == entry[:, :1]).all() and (entry[:, 3:] == entry[:, 3:4]).all()
    assert (entry[:, 0] != entry[:, 3]).any()  # chunks are drawn independently
    assert set(entry.unique().tolist()) == set(range(5))
    _, sigma = pick_levels(trajectory, sig, 3, False, torch.Generator().manual_seed(0))
    assert (sigma > 0).all()  # without include_clean the clean entry is never picked


def ode_cfg(teacher, pairs, tmp_path, *extra):
    from tests.conftest import TINY

    return load_config(
        None,
        [
            *TINY,
            f"out_dir={tmp_path}",
            "name=student",
            "stage=ode_init",
            f"init_from={teacher}",
            f"ode.pairs={pairs}",
            "data.frames=6",
            "causal.frames_per_block=3",
            "optim.lr=3e-3",
            "optim.schedule=constant",
            "ckpt_every=4",
            "sample_every=1000",
            *extra,
        ],
    )


def test_ode_init_trains_from_the_teacher_and_resumes_exactly(teacher, tmp_path):
    pairs = generate_ode_pairs(teacher, tmp_path / "pairs", SETTINGS)
    trainer = Trainer(ode_cfg(teacher, pairs, tmp_path, "steps=40"))
    from selfforcing.pipeline import load_pipeline

    t = load_pipeline(teacher).model
    assert all(
        torch.equal(a, b) for a, b in zip(trainer.model.state_dict().values(), t.state_dict().values(), strict=True)
    )
    trainer.train()
    losses = [json.loads(line)["loss"] for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8
    assert (trainer.run_dir / "samples" / "step_000040.gif").is_file()  # streamed with the KV cache

    # interrupted at step 4 and resumed == uninterrupted, to the bit
    a = Trainer(ode_cfg(teacher, pairs, tmp_path, "steps=8", "name=a"))
    a.train()
    b = Trainer(ode_cfg(teacher, pairs, tmp_path, "steps=4", "name=b"))
    b.train()
    b = Trainer(ode_cfg(teacher, pairs, tmp_path, "steps=8", "name=b"))
    b.train()
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_ode_init_refuses_pairs_at_other_levels(teacher, tmp_path):
    pairs = generate_ode_pairs(teacher, tmp_path / "pairs", SETTINGS)
    with pytest.raises(ValueError, match="noise levels"):
        Trainer(ode_cfg(teacher, pairs, tmp_path, "causal.shift=8.0"))
    with pytest.raises(ValueError, match="latents"):
        Trainer(ode_cfg(teacher, pairs, tmp_path, "data.frames=3"))


def test_stream_cli_writes_a_long_video_with_the_rolling_cache(teacher, tmp_path, capsys):
    from selfforcing.cli import main
    from selfforcing.data.video_io import read_video

    pairs = generate_ode_pairs(teacher, tmp_path / "pairs", SETTINGS)
    run = Trainer(ode_cfg(teacher, pairs, tmp_path, "steps=2")).train()
    out = tmp_path / "long.mp4"
    # 4x the training length (6 frames): the cache holds 3 past frames and rolls
    main(
        ["generate", "--checkpoint", str(run), "--prompt", "a small red circle moving up", "--stream"]
        + ["--frames", "24", "--out", str(out), "--scale", "1", "--analyse"]
    )
    text = capsys.readouterr().out
    assert (
        sum(line.startswith("chunk ") for line in text.splitlines()) == 8 and "frames/s" in text and "window 6" in text
    )
    assert read_video(out).shape[0] == 24
    from selfforcing.eval.score import score_checkpoint

    assert 0 <= score_checkpoint(run, num=2, frames=12)["found"] <= 1  # a causal checkpoint is streamed
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(teacher), "--prompt", "a small red circle moving up", "--stream"])
    assert "bidirectional" in capsys.readouterr().err
