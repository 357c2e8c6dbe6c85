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
    for alpha in (0.0, 1.0, 1.5):
        x = torch.randn(1, 3, 5, dtype=torch.float64, requires_grad=True)
        sid_loss(x, a * x, b * x, alpha).backward()
        n = abs(1 - a) * x.detach().abs().mean()
        expected = 2 * (a - b) * ((a - 1) - alpha * (a - b)) * x.detach() / (x.numel() * n)
        assert torch.allclose(x.grad, expected, atol=1e-6)


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
