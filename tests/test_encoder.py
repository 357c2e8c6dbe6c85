"""The video encoder behind the Frechet distance: the distance itself, training, saving, and that the
shipped encoder separates real shapes-world videos from corrupted ones."""

import pytest
import torch

from selfforcing.data.shapes import BACKGROUND, ShapesWorld, ShapesWorldConfig
from selfforcing.eval.encoder import (
    EncoderConfig,
    encode_videos,
    frechet_distance,
    load_encoder,
    train_encoder,
)


def exact_samples(mean: torch.Tensor, std: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples whose sample mean is ``mean`` and sample covariance exactly diag(std^2)."""
    x = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))  # orthonormal, zero-mean columns
    return mean + q * (n - 1) ** 0.5 * std


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 0.0])
    s_a, s_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.0, 1.0])
    a, b = exact_samples(mu_a, s_a, 50, 0), exact_samples(mu_b, s_b, 80, 1)
    expected = float((mu_a - mu_b).square().sum() + (s_a - s_b).square().sum())  # 4.25 + 4 + 0.25
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, b[:, :2])


def test_training_lowers_the_loss_and_the_saved_encoder_loads_identically(tmp_path):
    # a narrow world, so that a few steps of a tiny encoder show learning
    world = ShapesWorldConfig(
        height=16, width=16, frames=6, colours=["red", "green"], max_objects=1, shapes=["circle"], sizes=["large"]
    )
    cfg = EncoderConfig(channels=[8, 8], feature_dim=8)
    encoder, losses = train_encoder(world, tmp_path / "enc", steps=80, batch_size=16, cfg=cfg, progress=False)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    loaded, loaded_world = load_encoder(tmp_path / "enc")
    assert loaded_world == world
    videos = ShapesWorld(world).sample(4, seed=9).video
    assert torch.allclose(encode_videos(encoder.eval(), videos), encode_videos(loaded, videos), atol=1e-5)
    (tmp_path / "enc" / "encoder.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="corrupt"):
        load_encoder(tmp_path / "enc")
    with pytest.raises(FileNotFoundError, match="train-encoder"):
        load_encoder(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def shipped():
    """The shipped encoder and the features of real videos for 256 prompts (as ``selfforcing eval`` compares
    models: against real videos of the same prompts), and another real draw of those prompts."""
    encoder, world = load_encoder()
    shapes = ShapesWorld(world)
    prompts = shapes.sample(256, seed=1).prompts
    reference = encode_videos(encoder, shapes.sample_for_prompts(prompts, seed=10).video)
    return encoder, reference, shapes.sample_for_prompts(prompts, seed=11).video


def corrupt(video: torch.Tensor, kind: str) -> torch.Tensor:
    bg = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    if kind == "noise":
        return (video + 0.3 * torch.randn(video.shape, generator=g)).clamp(-1, 1)
    if kind == "colour":
        objects = (video - bg).abs().sum(-3, keepdim=True) > 1e-3
        return torch.where(objects, video.roll(1, dims=-3), video)  # RGB -> BRG on the objects
    if kind == "frozen":
        return video[:, :1].expand_as(video).clone()  # no motion
    if kind == "vanished":
        out = video.clone()
        out[:, video.shape[1] // 2 :] = bg
        return out
    if kind == "blur":
        return torch.nn.functional.avg_pool3d(video.transpose(1, 2), (1, 3, 3), 1, (0, 1, 1)).transpose(1, 2)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["noise", "colour", "frozen", "vanished", "blur"])
def test_shipped_encoder_separates_real_from_corrupted_videos(shipped, kind):
    encoder, reference, real = shipped
    real_fd = frechet_distance(reference, encode_videos(encoder, real))
    corrupted_fd = frechet_distance(reference, encode_videos(encoder, corrupt(real, kind)))
    assert corrupted_fd > 3 * real_fd, (kind, real_fd, corrupted_fd)
