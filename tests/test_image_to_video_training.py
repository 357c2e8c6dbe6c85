"""Image-to-video Self Forcing (``distill.image_to_video``): each rollout starts from the first frame of a real
video of the batch, committed clean as a stream commits an image; the generated frames follow and the losses
score the video with its given first frame."""

import json

import pytest
import torch

from selfforcing.config import ConfigError
from selfforcing.training.samples import sample_videos
from selfforcing.training.trainer import Trainer
from tests.test_self_forcing import sf_cfg

I2V = ("distill.image_to_video=true", "data.frames=7")  # the given frame and two chunks of 3


def test_the_rollout_starts_from_the_real_first_frame_and_only_the_generator_learns(teacher, tmp_path):
    t = Trainer(sf_cfg(teacher, tmp_path, *I2V))
    sf = t.objective
    assert (sf.rollout_frames, sf.score_frames, sf.given) == (6, 6, 1)
    g = torch.Generator().manual_seed(3)
    video, prompts, real = sf.videos(g, grad=True, kind="generator", k=0, step=0)
    assert video.shape[1] == 7 and torch.equal(video[:, 0], sf.latents(real[:, :1])[:, 0])
    assert not torch.allclose(video[:, 1:], real[:, 1:].to(video), atol=1e-2)  # the rest is generated
    assert sf.scored(video).shape[1] == 7  # the losses see the given frame with what follows it
    loss, _ = sf.generator_loss(sf.scored(video), prompts, g, real)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.model.dit.parameters())
    others = [*sf.critic.parameters(), *sf.teacher.parameters()]
    assert all(p.grad is None for p in others)


def test_an_image_to_video_run_trains_and_resumes_exactly(teacher, tmp_path):
    a = Trainer(sf_cfg(teacher, tmp_path, *I2V, "steps=3", "name=a"))
    run = a.train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    real, _ = a.batches(10_000 + a.cfg.seed, a.cfg.num_samples)  # the samples start from real first frames too
    assert torch.equal(a.sample_images, real[:, 0])
    samples = sample_videos(a.cfg, a.ema.model, a.codec, a.sample_prompts, a.sample_images)
    assert samples.shape[1] == 7 and torch.equal(samples[:, 0], a.sample_images)
    Trainer(sf_cfg(teacher, tmp_path, *I2V, "steps=2", "name=b")).train()
    b = Trainer(sf_cfg(teacher, tmp_path, *I2V, "steps=3", "name=b"))
    b.train()
    for name, net in a.networks().items():
        other = b.networks()[name].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in net.state_dict().items()), name


def test_image_to_video_settings_that_cannot_work_are_refused(teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"not a whole number of chunks of 3: use data.frames=7"):
        Trainer(sf_cfg(teacher, tmp_path, "distill.image_to_video=true", "data.frames=6"))
    with pytest.raises(ConfigError, match="leave distill.rollout_frames"):
        sf_cfg(teacher, tmp_path, *I2V, "distill.rollout_frames=12").validate()
    with pytest.raises(ConfigError, match="distill.paradigm self_forcing"):
        sf_cfg(teacher, tmp_path, *I2V, "distill.paradigm=teacher_forcing").validate()
