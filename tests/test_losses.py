"""DMD and SiD against hand computations on tiny examples."""

import math

import torch

from selfforcing.training.dmd import dmd_gradient, dmd_loss, dmd_sigma
from selfforcing.training.sid import sid_loss


def test_dmd_gradient_is_the_normalised_score_difference():
    x = torch.randn(2, 3, 4, requires_grad=True)
    real, fake = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    dmd_loss(x, real, fake).backward()
    for i in range(2):  # by hand, one sample at a time
        norm = (x[i] - real[i]).abs().mean()
        expected = (fake[i] - real[i]) / norm / x.numel()
        assert torch.allclose(x.grad[i], expected.detach(), atol=1e-7)
    # a step against the gradient moves x towards the teacher's prediction, away from the critic's
    step = -x.grad
    assert all(float((step[i] * (real[i] - fake[i])).sum()) > 0 for i in range(2))
    assert torch.equal(dmd_gradient(real.clone(), real, fake), torch.zeros_like(real))  # 0/0 -> 0


def test_dmd_timesteps_are_shifted_and_clamped():
    s = dmd_sigma(20_000, torch.Generator().manual_seed(0))
    assert s.min() >= 0.02 and s.max() <= 0.98
    # shift 5 pushes towards high noise: E[5u / (1 + 4u)] = 5/4 (1 - ln(5) / 4) = 0.747 (unshifted: 0.5)
    assert abs(s.mean() - 1.25 * (1 - math.log(5) / 4)) < 0.01


def test_sid_gradient_matches_the_analytic_one():
    """With x0_real = a x and x0_fake = b x, L = mean((a-b) x ((a-1) x - alpha (a-b) x)) / n with the
    detached n = |1 - a| mean|x|, so dL/dx = 2 (a - b) ((a - 1) - alpha (a - b)) x / (N n)."""
    a, b = 0.7, 0.4
    scale = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64).view(3, 1, 1)  # per-sample normalisers differ
    for alpha in (0.0, 1.0, 1.5):
        x = (torch.randn(3, 3, 5, dtype=torch.float64) * scale).requires_grad_(True)
        sid_loss(x, a * x, b * x, alpha).backward()
        for i in range(3):  # each sample with its own normaliser
            n = abs(1 - a) * x[i].detach().abs().mean()
            expected = 2 * (a - b) * ((a - 1) - alpha * (a - b)) * x[i].detach() / (x.numel() * n)
            assert torch.allclose(x.grad[i], expected, atol=1e-9)


def test_finite_difference_penalty_estimates_the_squared_gradient_norm():
    from selfforcing.training.gan import finite_difference_penalty, gan_discriminator_loss, gan_generator_loss

    w = torch.randn(6)

    def disc(x):
        return x @ w  # a linear D: its gradient is w everywhere

    x = torch.randn(20_000, 6)
    penalty = finite_difference_penalty(disc, x, disc(x), torch.Generator().manual_seed(0))
    assert abs(float(penalty) / float(w.square().sum()) - 1) < 0.05
    # the losses: a confident, correct discriminator has a small loss and the generator a large one
    real, fake = torch.full((4,), 5.0), torch.full((4,), -5.0)
    assert gan_discriminator_loss(real, fake) < 0.02 and gan_generator_loss(fake) > 4.9
    assert gan_generator_loss(fake, real) > 9.9  # relativistic: softplus(-(fake - real))


class _AffineScore(torch.nn.Module):
    """A stand-in text-to-video model whose velocity is c * x_t for the prompt and u * x_t without it."""

    def forward(self, x, sigma, text):
        return x * text

    def cond_uncond_velocities(self, x, sigma, cond, uncond):
        return self(x, sigma, cond), self(x, sigma, uncond)

    def velocity_with_cfg(self, x, sigma, cond, uncond, scale):
        v_c, v_u = self.cond_uncond_velocities(x, sigma, cond, uncond)
        return v_u + scale * (v_c - v_u)


def test_guidance_rescale_pulls_the_guided_std_back_to_the_conditional_one():
    from selfforcing.training.dmd import score_x0

    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.5, 0.8])
    s = sigma.view(2, 1, 1, 1, 1)
    cond, uncond, w = torch.tensor(0.3), torch.tensor(-0.4), 3.0
    x0_c, x0_u = x_t - s * 0.3 * x_t, x_t + s * 0.4 * x_t  # x0 = x_t - sigma v
    guided = x0_u + w * (x0_c - x0_u)
    model = _AffineScore()
    assert torch.allclose(score_x0(model, x_t, sigma, cond, uncond, w), guided, atol=1e-6)
    assert torch.allclose(score_x0(model, x_t, sigma, cond, uncond, w, rescale=0.0), guided, atol=1e-6)
    full = score_x0(model, x_t, sigma, cond, uncond, w, rescale=1.0)
    dims = (1, 2, 3, 4)
    assert torch.allclose(full.std(dim=dims), x0_c.std(dim=dims), atol=1e-5)
    assert not torch.allclose(guided.std(dim=dims), x0_c.std(dim=dims), atol=1e-2)  # CFG did inflate it
    half = score_x0(model, x_t, sigma, cond, uncond, w, rescale=0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * guided, atol=1e-6)


def test_limited_interval_guidance_guides_only_videos_inside_the_interval():
    from selfforcing.training.dmd import guidance_per_video, score_x0

    sigma = torch.tensor([0.2, 0.5, 0.9])
    assert guidance_per_video(sigma, 3.0, 0.0, 1.0) == 3.0
    assert guidance_per_video(sigma, 3.0, 0.0, 0.6).tolist() == [3.0, 3.0, 1.0]
    assert guidance_per_video(sigma, 3.0, 0.3, 0.6).tolist() == [1.0, 3.0, 1.0]
    w = guidance_per_video(sigma, 3.0, 0.5)
    assert w.tolist() == [1.0, 3.0, 3.0]
    x_t = torch.randn(3, 2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    cond, uncond, model = torch.tensor(0.3), torch.tensor(-0.4), _AffineScore()
    per_video = score_x0(model, x_t, sigma, cond, uncond, w)
    for i, wi in enumerate(w.tolist()):  # each video as if scored alone with its own scale
        alone = score_x0(model, x_t[i : i + 1], sigma[i : i + 1], cond, uncond, wi)
        assert torch.allclose(per_video[i : i + 1], alone, atol=1e-6)
