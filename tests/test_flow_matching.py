import pytest
import torch

from selfforcing.diffusion import (
    add_noise,
    sample_euler,
    sample_few_step,
    sample_training_sigmas,
    sampling_sigmas,
    shift_sigma,
    velocity_from_x0,
    velocity_target,
    warp_timesteps,
    x0_from_velocity,
)


def test_warped_few_step_list_matches_the_paper():
    t = warp_timesteps([1000, 750, 500, 250], shift=5.0)
    assert torch.allclose(t, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), atol=1e-3)


def test_warp_rejects_bad_lists():
    with pytest.raises(ValueError, match="decreasing"):
        warp_timesteps([500, 750], 5.0)
    with pytest.raises(ValueError, match="lie in"):
        warp_timesteps([1200, 500], 5.0)


def test_shift_formula_and_endpoints():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = shift_sigma(s, 3.0)
    assert torch.allclose(out, 3 * s / (1 + 2 * s))
    assert out[0] == 0 and out[-1] == 1
    assert torch.equal(shift_sigma(s, 1.0), s)
    with pytest.raises(ValueError):
        shift_sigma(s, 0.0)


def test_noising_velocity_and_x0_are_consistent():
    x0, noise = torch.randn(2, 3, 3, 4, 4), torch.randn(2, 3, 3, 4, 4)
    sigma = torch.rand(2, 3)  # per-frame levels
    xt = add_noise(x0, noise, sigma)
    v = velocity_target(x0, noise)
    assert torch.allclose(x0_from_velocity(xt, v, sigma), x0, atol=1e-5)
    assert torch.allclose(velocity_from_x0(xt, x0, sigma), v, atol=1e-4)
    assert torch.allclose(add_noise(x0, noise, 0.0), x0) and torch.allclose(add_noise(x0, noise, 1.0), noise)
    # per-frame sigma really is per frame
    assert torch.allclose(xt[1, 2], (1 - sigma[1, 2]) * x0[1, 2] + sigma[1, 2] * noise[1, 2])


def test_sampling_sigmas():
    s = sampling_sigmas(10, shift=3.0)
    assert s.shape == (11,) and s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()


def test_euler_with_the_exact_velocity_recovers_the_data_point():
    """For a single data point x*, the ideal velocity at x_t is (x_t - x*) / sigma; Euler follows the straight
    path exactly, so any number of steps lands on x*."""
    target = torch.randn(1, 2, 3, 4, 4)

    def oracle(x, sigma):
        return (x - target) / sigma[:, :, None, None, None]

    seen = []
    out = sample_euler(
        oracle, torch.randn_like(target), sampling_sigmas(5, 2.0), callback=lambda i, n, x0: seen.append(i)
    )
    assert torch.allclose(out, target, atol=1e-5)
    assert seen == list(range(5))


def test_few_step_sampler_returns_the_last_x0_prediction():
    target = torch.randn(2, 3, 3, 4, 4)

    def oracle(x, sigma):
        return (x - target) / sigma[:, :, None, None, None]

    sigmas = warp_timesteps([1000, 750, 500, 250], 5.0) / 1000
    out = sample_few_step(oracle, torch.randn_like(target), sigmas, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target, atol=1e-5)


def test_few_step_sampler_renoises_to_the_next_level_with_fresh_noise():
    """Each step: x0 = x - sigma_i v; then x = (1 - sigma_{i+1}) x0 + sigma_{i+1} eps_i with eps_i a fresh
    draw. A model whose prediction depends on x makes a wrong level or reused noise visible."""
    shape = (2, 3, 3, 4, 4)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    sigmas = warp_timesteps([1000, 750, 500, 250], 5.0) / 1000
    seen = []

    def model(x, sigma):
        seen.append((x.clone(), sigma.clone()))
        return 0.3 * x + sigma[:, :, None, None, None]  # depends on x and on the level

    out = sample_few_step(model, noise, sigmas, generator=torch.Generator().manual_seed(0))
    draws = torch.Generator().manual_seed(0)
    x = noise
    for i, (x_in, sigma_in) in enumerate(seen):
        torch.testing.assert_close(x_in, x)
        assert torch.equal(sigma_in, sigmas[i].expand(2, 3))
        x0 = x - sigmas[i] * (0.3 * x + sigmas[i])
        if i + 1 < len(sigmas):
            eps = torch.randn(shape, generator=draws)
            x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * eps
    assert len(seen) == 4
    torch.testing.assert_close(out, x0)


def test_training_sigmas_distributions():
    g = torch.Generator().manual_seed(0)
    u = sample_training_sigmas(20000, g, "uniform")
    ln = sample_training_sigmas(20000, g, "logit_normal")
    shifted = sample_training_sigmas(20000, g, "uniform", shift=5.0)
    assert 0.48 < u.mean() < 0.52 and 0.48 < ln.mean() < 0.52 and ln.std() < u.std()
    assert shifted.mean() > 0.7  # shift pushes towards high noise
    with pytest.raises(ValueError, match="unknown timestep distribution"):
        sample_training_sigmas(2, g, "beta")
