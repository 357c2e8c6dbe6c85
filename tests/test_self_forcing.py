"""Self Forcing training with DMD / SiD: update ratio, weights that move, exact resume."""

import pytest
import torch

from selfforcing.config import load_config
from selfforcing.training.trainer import Trainer


def sf_cfg(teacher, tmp_path, *extra):
    from tests.conftest import TINY

    return load_config(
        None,
        [
            *TINY,
            f"out_dir={tmp_path}",
            "name=sf",
            "stage=causal",
            f"init_from={teacher}",  # a causal student straight from the teacher's weights
            f"distill.teacher={teacher}",
            "data.frames=6",
            "batch_size=2",
            "causal.frames_per_block=3",
            "distill.critic_steps_per_generator_step=2",
            "optim.lr=1e-3",
            "distill.critic_lr=1e-3",
            "optim.warmup_steps=0",
            "ckpt_every=2",
            "sample_every=1000",
            *extra,
        ],
    )


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


@pytest.mark.parametrize(
    "paradigm,loss",
    [
        ("self_forcing", "dmd"),
        ("self_forcing", "sid"),
        ("self_forcing", "gan"),
        ("teacher_forcing", "dmd"),
        ("diffusion_forcing", "dmd"),
    ],
)
def test_generator_trains_every_kth_step_and_the_critic_every_step(teacher, tmp_path, paradigm, loss):
    t = Trainer(sf_cfg(teacher, tmp_path, f"distill.paradigm={paradigm}", f"distill.loss={loss}"))
    teacher_weights = snapshot(t.objective.teacher)
    for step in range(4):
        gen, critic, ema = snapshot(t.model), snapshot(t.objective.critic.dit), snapshot(t.ema.model)
        stats = t.train_step()
        generator_step = step % 2 == 0
        assert changed(gen, t.model) == generator_step
        assert changed(ema, t.ema.model) == generator_step
        assert ("generator_loss" in stats) == generator_step
        assert changed(critic, t.objective.critic.dit)
        assert torch.isfinite(torch.tensor(list(stats.values()))).all()
    assert not changed(teacher_weights, t.objective.teacher)  # the real score stays frozen
    assert not any(p.requires_grad for p in t.objective.critic.text_encoder.parameters())


@pytest.mark.parametrize("loss", ["dmd", "sid", "gan"])
def test_generator_loss_reaches_only_the_generator(teacher, tmp_path, loss):
    t = Trainer(sf_cfg(teacher, tmp_path, f"distill.loss={loss}", "distill.gan_relativistic=true"))
    g = torch.Generator().manual_seed(0)
    real, prompts = t.batches(0, 2)
    generator_loss, _ = t.objective.generator_loss(t.objective.rollout(prompts, g, grad=True), prompts, g, real)
    generator_loss.backward()
    others = [*t.objective.critic.parameters(), *t.objective.teacher.parameters()]
    others += list(t.objective.discriminator.head.parameters()) if t.objective.discriminator is not None else []
    assert all(p.grad is None for p in others)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.model.dit.parameters())
    assert all(p.requires_grad for p in t.objective.critic.dit.parameters())  # restored for the critic's own update


@pytest.mark.parametrize("loss", ["dmd", "gan"])
def test_resume_is_exact_for_every_network(teacher, tmp_path, loss):
    a = Trainer(sf_cfg(teacher, tmp_path, "steps=4", "name=a", f"distill.loss={loss}"))
    a.train()
    b = Trainer(sf_cfg(teacher, tmp_path, "steps=2", "name=b", f"distill.loss={loss}"))
    b.train()
    b = Trainer(sf_cfg(teacher, tmp_path, "steps=4", "name=b", f"distill.loss={loss}"))
    b.train()
    assert ("discriminator_head" in a.networks()) == (loss == "gan")
    for name, module in a.networks().items():
        other = b.networks()[name]
        for (k, va), vb in zip(module.state_dict().items(), other.state_dict().values(), strict=True):
            assert torch.equal(va, vb), f"{name}.{k}"
    assert a.optimizers["critic"].state_dict()["state"].keys() == b.optimizers["critic"].state_dict()["state"].keys()


def test_teacher_must_be_bidirectional(teacher, tmp_path):
    student = Trainer(sf_cfg(teacher, tmp_path, "steps=1", "name=student")).train()
    with pytest.raises(ValueError, match="bidirectional"):
        Trainer(sf_cfg(teacher, tmp_path, f"distill.teacher={student}", "name=c"))


@pytest.mark.parametrize("stage", ["teacher", "self_forcing"])
def test_gradient_accumulation_averages_the_micro_batches(teacher, tmp_path, stage):
    from tests.conftest import TINY

    if stage == "teacher":
        t = Trainer(load_config(None, [*TINY, f"out_dir={tmp_path}", "grad_accum_steps=2", "data.frames=6"]))
    else:
        t = Trainer(sf_cfg(teacher, tmp_path, "grad_accum_steps=2"))
    params = list(t.model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for k in range(2):  # each micro-batch on its own
        t.optimizers["generator"].zero_grad(set_to_none=True)
        loss, _ = t.micro_loss("generator", k)
        loss.backward()
        expected = [e + (p.grad if p.grad is not None else 0) / 2 for e, p in zip(expected, params, strict=True)]
    t.accumulate("generator")
    for e, p in zip(expected, params, strict=True):
        assert torch.allclose(e, p.grad if p.grad is not None else torch.zeros_like(e), atol=1e-7)
    assert any(e.abs().sum() > 0 for e in expected)
    t.cfg.grad_accum_steps = 1  # one micro-batch: a different gradient (the two micro-batches differ)
    t.accumulate("generator")
    assert any(not torch.allclose(e, p.grad) for e, p in zip(expected, params, strict=True) if p.grad is not None)


def test_critic_warmup_trains_the_critic_alone_first(teacher, tmp_path):
    t = Trainer(sf_cfg(teacher, tmp_path, "distill.critic_warmup_steps=3"))
    updates = []
    for _ in range(6):
        gen, critic = snapshot(t.model), snapshot(t.objective.critic.dit)
        stats = t.train_step()
        assert changed(critic, t.objective.critic.dit)
        updates.append(changed(gen, t.model))
        assert ("generator_loss" in stats) == updates[-1]
    assert updates == [False, False, False, True, False, True]  # ratio 2 from step 3 on


def test_regression_anchor_adds_the_weighted_ode_loss_to_the_generator_loss(teacher, tmp_path):
    from selfforcing.config import ConfigError
    from selfforcing.training.ode_init import ode_regression_loss
    from selfforcing.training.ode_pairs import generate_ode_pairs
    from tests.test_ode import SETTINGS

    pairs = generate_ode_pairs(teacher, tmp_path / "pairs", SETTINGS)
    plain = Trainer(sf_cfg(teacher, tmp_path, "name=plain"))
    anchored = Trainer(
        sf_cfg(teacher, tmp_path, "name=anchored", "distill.regression_weight=2.5", f"ode.pairs={pairs}")
    )
    base, base_stats = plain.micro_loss("generator", 0)
    total, stats = anchored.micro_loss("generator", 0)
    assert "regression" not in base_stats
    # the same DMD part (same draws) + 2.5 x the ODE loss on the pairs drawn next from the same stream
    assert torch.allclose(total, base + 2.5 * stats["regression"], atol=1e-5)
    # ... and that term is the ODE loss of the generator on those pairs, recomputed by hand
    g = anchored.micro_generator("generator", 0)
    anchored.objective.generator_loss(*anchored.objective.videos(g, False, "critic", 0, 0)[:2], g)
    trajectory, prompts = anchored.objective.pairs.sample(anchored.cfg.batch_size, g)
    with torch.no_grad():
        regression = ode_regression_loss(
            anchored.model, trajectory, anchored.objective.levels, prompts, anchored.cfg, g
        )
    assert regression > 0 and abs(float(regression) - stats["regression"]) < 1e-6
    with pytest.raises(ConfigError, match="ode.pairs"):
        sf_cfg(teacher, tmp_path, "distill.regression_weight=1")


def test_each_rollout_draws_its_own_exit_step(teacher, tmp_path):
    """Gradient-accumulation micro-batches do not share one s*: each rollout draws its own, and the
    trainer's rollouts run with exactly those."""
    t = Trainer(sf_cfg(teacher, tmp_path, "grad_accum_steps=4", "distill.critic_steps_per_generator_step=1"))
    draws = [[t.objective.exit_step("generator", k, step) for k in range(4)] for step in range(8)]
    assert any(len(set(d)) > 1 for d in draws)  # micro-batches of one step differ
    assert draws == [
        [t.objective.exit_step("generator", k, step) for k in range(4)] for step in range(8)
    ]  # deterministic
    used = []
    rollout = t.objective.rollout
    t.objective.rollout = lambda prompts, g, grad, exit_step=None, frames=0, first=None: (
        used.append((grad, exit_step)) or rollout(prompts, g, grad, exit_step, frames, first)
    )
    t.step = 0
    t.train_step()
    t.step = 0
    want = [(True, t.objective.exit_step("generator", k, 0)) for k in range(4)] + [
        (False, t.objective.exit_step("critic", k, 0)) for k in range(4)
    ]
    assert used == want


@pytest.mark.parametrize("loss", ["dmd", "gan"])
def test_a_long_rollout_is_scored_on_its_last_frames_only(teacher, tmp_path, loss):
    """rollout_frames=12, score_frames=6: the generator rolls out 4 chunks, gradient reaches only the last
    2, and every loss (generator, critic, GAN real side) sees only the last 6 frames."""
    t = Trainer(
        sf_cfg(teacher, tmp_path, f"distill.loss={loss}", "distill.rollout_frames=12", "distill.score_frames=6")
    )
    seen = {}

    def spy(name, fn):  # record the video a loss is given, then compute it
        def wrapped(video, *args):
            seen[name] = video
            return fn(video, *args)

        return wrapped

    t.objective.generator_loss = spy("generator", t.objective.generator_loss)
    if loss == "gan":
        t.objective.gan_critic_loss = spy("critic", t.objective.gan_critic_loss)
    else:
        t.objective.critic_loss = spy("critic", t.objective.critic_loss)
    calls = []
    t.model.dit.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    t.step = 0
    g = t.micro_generator("generator", 0)
    t.micro_loss("generator", 0)
    exit_step = t.objective.exit_step("generator", 0, 0)
    chunk = [False] * (exit_step - 1)
    assert calls == (chunk + [False, False]) * 2 + (chunk + [True, False]) + (chunk + [True])  # grad: last 2 chunks
    assert seen["generator"].shape[1] == 6
    with torch.no_grad():  # the scored frames are the rollout's last 6
        _, prompts = t.batches(int(torch.randint(2**62, (1,), generator=g)))
        full = t.objective.rollout(prompts, g, False, exit_step)
    assert full.shape[1] == 12
    torch.testing.assert_close(seen["generator"].detach(), full[:, -6:])
    t.micro_loss("critic", 0)
    assert seen["critic"].shape[1] == 6


def test_a_chunk_straddling_the_scored_window_is_trained_and_scored_on_its_frames_in_it(teacher, tmp_path, monkeypatch):
    """rollout_frames=9, score_frames=4 in chunks of 3: the scored window (frames 5..8) starts inside the
    second chunk. The generator's loss reaches exactly frames 5..8 of its rollout, the second and third
    chunks carry gradient, the first none, and the gradient is that of a rollout in which every chunk
    carries it: nothing is lost at the window's edge."""
    import selfforcing.training.self_forcing as sf

    t = Trainer(sf_cfg(teacher, tmp_path, "distill.rollout_frames=9", "distill.score_frames=4"))
    rollouts = []
    rollout = t.objective.rollout

    def keep(*args):  # the whole rollout, its gradient kept
        video = rollout(*args)
        video.retain_grad()
        rollouts.append(video)
        return video

    t.objective.rollout = keep
    calls = []
    t.model.dit.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    t.step = 0
    t.micro_loss("generator", 0)[0].backward()
    exit_step, video = t.objective.exit_step("generator", 0, 0), rollouts[0]
    chunk = [False] * (exit_step - 1)
    assert calls == (chunk + [False, False]) + (chunk + [True, False]) + (chunk + [True])
    per_frame = video.grad.abs().flatten(2).sum(-1)  # [B, 9]
    assert video.shape[1] == 9 and not per_frame[:, :5].any() and (per_frame[:, 5:] > 0).all()
    got = [p.grad.clone() for p in t.model.dit.parameters()]
    t.model.zero_grad(set_to_none=True)
    every_chunk = sf.self_forcing_rollout
    monkeypatch.setattr(sf, "self_forcing_rollout", lambda *a, grad_frames, **kw: every_chunk(*a, **kw))
    t.micro_loss("generator", 0)[0].backward()
    for a, p in zip(got, t.model.dit.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-7, rtol=1e-6)


def test_a_random_score_window_rolls_out_to_a_random_chunk_boundary(teacher, tmp_path):
    """score_window=random (Self-Forcing++): each rollout stops at a chunk boundary drawn from
    score_frames..rollout_frames (deterministic per step and micro-batch), and the losses see its last
    score_frames, so windows at every depth of the long rollout are scored."""
    t = Trainer(
        sf_cfg(
            teacher,
            tmp_path,
            "distill.rollout_frames=12",
            "distill.score_frames=5",
            "distill.score_window=random",
            "grad_accum_steps=2",
        )
    )
    ends = [
        [t.objective.rollout_end(kind, k, step) for kind in ("generator", "critic") for k in range(2)]
        for step in range(12)
    ]
    assert {e for step in ends for e in step} == {6, 9, 12}  # chunk boundaries at or past 5 frames
    assert ends == [
        [t.objective.rollout_end(kind, k, step) for kind in ("generator", "critic") for k in range(2)]
        for step in range(12)
    ]
    lengths, scored = [], []
    rollout, generator_loss = t.objective.rollout, t.objective.generator_loss
    t.objective.rollout = lambda *a: (lambda v: lengths.append(v.shape[1]) or v)(rollout(*a))
    t.objective.generator_loss = lambda video, *a: scored.append(video.shape[1]) or generator_loss(video, *a)
    t.step = next(i for i, step in enumerate(ends) if step[1] < 12)  # a window short of the rollout's end
    t.micro_loss("generator", 1)
    assert lengths == [t.objective.rollout_end("generator", 1, t.step)] and scored == [5]
    default = Trainer(sf_cfg(teacher, tmp_path, "distill.rollout_frames=12", "distill.score_frames=5"))
    assert {default.objective.rollout_end("generator", 0, step) for step in range(12)} == {12}


def test_rollout_and_score_windows_are_checked(teacher, tmp_path):
    from selfforcing.config import ConfigError

    with pytest.raises(ConfigError, match="not a whole number of chunks of 3"):
        Trainer(sf_cfg(teacher, tmp_path, "distill.rollout_frames=10"))
    with pytest.raises(ConfigError, match=r"score_frames=15 must be in 1..12"):
        Trainer(sf_cfg(teacher, tmp_path, "distill.rollout_frames=12", "distill.score_frames=15"))
    with pytest.raises(ConfigError, match="rollout_frames is for self_forcing"):
        Trainer(sf_cfg(teacher, tmp_path, "distill.paradigm=teacher_forcing", "distill.rollout_frames=12"))
    with pytest.raises(ConfigError, match="score_window='middle'"):
        Trainer(sf_cfg(teacher, tmp_path, "distill.rollout_frames=12", "distill.score_window=middle"))
    with pytest.raises(ConfigError, match="needs a rollout longer than the scored window"):
        Trainer(sf_cfg(teacher, tmp_path, "distill.score_window=random"))
    with pytest.raises(ConfigError, match="longer than the real videos"):
        Trainer(sf_cfg(teacher, tmp_path, "distill.loss=gan", "distill.rollout_frames=12"))


def test_self_forcing_trains_on_a_prompt_file_alone(teacher, tmp_path):
    """DMD needs no videos: data.source=prompts trains from a text file of prompts, each micro-batch drawing
    its own (seeded by step and micro-batch, so a resumed run sees the same ones)."""
    from selfforcing.config import ConfigError
    from selfforcing.data.prompts import PromptFile

    lines = ["# prompts, one a line", "a large red circle moving right", "", "a small blue square moving up"]
    lines += ["a large green triangle moving left"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines))
    file = PromptFile(tmp_path / "prompts.txt")
    assert len(file) == 3 and sorted(file.sample(3, 0)) == sorted(file.prompts)  # without replacement
    assert file.sample(5, 1) == file.sample(5, 1) and len(file.sample(7, 2)) == 7
    source = ("data.source=prompts", f"data.prompts={tmp_path / 'prompts.txt'}")
    t = Trainer(sf_cfg(teacher, tmp_path, *source, "steps=2"))
    seen = []
    batches = t.batches
    t.batches = lambda seed, n=None: seen.append(batches(seed, n)) or seen[-1]
    before = snapshot(t.model)
    t.train()
    assert changed(before, t.model)
    assert all(video is None and set(p) <= set(file.prompts) for video, p in seen)
    for bad in [("distill.loss=gan",), ("distill.paradigm=teacher_forcing",), ("stage=teacher",)]:
        with pytest.raises(ConfigError, match="data.source=prompts has no videos"):
            sf_cfg(teacher, tmp_path, *source, *bad)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        PromptFile(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptFile(tmp_path / "missing.txt")
