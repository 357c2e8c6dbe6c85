"""Video-to-video for every scheme (VideoStream(video=..., strength=...), generate --video): each chunk starts
from its input chunk, encoded chunk by chunk and noised to the first level of the step list scaled by the
strength; checked against a reference written here from that definition."""

import pytest
import torch

from selfforcing.cli import main
from selfforcing.config import CausalConfig
from selfforcing.data.video_io import to_uint8, write_video
from selfforcing.diffusion.samplers import sample_few_step
from selfforcing.inference.stream import stream_video
from selfforcing.inference.video_stream import VideoStream
from selfforcing.models.codec import IdentityCodec

from .test_causal import tiny_t2v

A = "a red circle"


def input_video(frames: int = 12) -> torch.Tensor:
    return torch.rand(1, frames, 3, 8, 8, generator=torch.Generator().manual_seed(9)) * 2 - 1


def reference(t2v, video, settings: CausalConfig, strength: float, seed: int) -> torch.Tensor:
    """Chunk by chunk: x = (1 - s0) input + s0 noise at the first scaled level s0, the few steps, each a
    masked full-sequence pass over [the clean chunks before at t = 0, x]."""
    g, f, done = torch.Generator().manual_seed(seed), settings.frames_per_block, []
    sigmas = settings.sigmas(None, strength)
    text_kv = t2v.dit.text_kv(*t2v.encode_text([A]))
    for start in range(0, video.shape[1], f):
        history = torch.cat(done, dim=1) if done else torch.zeros(1, 0, 3, 8, 8)
        n = history.shape[1]
        chunk = torch.arange(n + f) // f
        mask = (chunk[None, :] <= chunk[:, None]).repeat_interleave(4, 0).repeat_interleave(4, 1)

        def velocity(x, sigma, history=history, n=n, mask=mask):
            t = torch.cat([torch.zeros(1, n), sigma], dim=1) * 1000
            return t2v.dit(torch.cat([history, x], dim=1), t, text_kv=text_kv, attn_mask=mask)[:, n:]

        noise = torch.randn(1, f, 3, 8, 8, generator=g)
        x = (1 - sigmas[0]) * video[:, start : start + f] + sigmas[0] * noise
        done.append(sample_few_step(velocity, x, sigmas, generator=g))
    return torch.cat(done, dim=1)


def test_video_to_video_equals_its_definition():
    t2v, settings, video = tiny_t2v(), CausalConfig(3), input_video()
    ours = torch.cat(
        [
            c.latents
            for c in stream_video(t2v, IdentityCodec(), [A], 12, 8, 8, settings, seed=4, video=video, strength=0.6)
        ],
        dim=1,
    )
    torch.testing.assert_close(ours, reference(t2v, video, settings, 0.6, 4), atol=1e-5, rtol=1e-5)
    assert settings.sigmas(None, 0.6)[0] < 0.95  # a lower start than pure noise (warp of 600)


@pytest.mark.parametrize(
    "settings",
    [
        CausalConfig(3),
        CausalConfig(3, denoising_steps=[1000.0, 750.0, 500.0], window=9, rope="slot", scheme="rolling"),
        CausalConfig(3, denoising_steps=[1000.0, 750.0, 500.0, 250.0, 0.0], window=6, scheme="rebuild"),
    ],
    ids=["chunk", "rolling", "rebuild"],
)
def test_every_scheme_takes_a_video_and_strength_one_is_text_to_video(settings):
    t2v, video = tiny_t2v(), input_video()
    run = lambda **kw: torch.cat(  # noqa: E731
        [c.latents for c in stream_video(t2v, IdentityCodec(), [A], 12, 8, 8, settings, seed=4, **kw)], dim=1
    )
    plain, full, half = run(), run(video=video, strength=1.0), run(video=video, strength=0.5)
    torch.testing.assert_close(full, plain)  # from pure noise the input is unused
    assert not torch.allclose(half, plain, atol=1e-3)
    # the closer to the input the strength, the closer the output
    assert (run(video=video, strength=0.3) - video).abs().mean() < (half - video).abs().mean()


def test_krea_s_strength_rule():
    """floor(t * s) of [1000, 750, 500, 250, 0]: floor(linspace(1000 s, 0, 5)), then warped."""
    settings = CausalConfig(3, denoising_steps=[1000.0, 750.0, 500.0, 250.0, 0.0])
    got = settings.sigmas(None, 0.33).tolist()
    expected = [t / 1000 for t in (330, 247, 165, 82, 0)]
    assert got == pytest.approx([5 * s / (1 + 4 * s) for s in expected])


def test_an_open_stream_ends_with_its_input_and_bad_inputs_are_refused():
    t2v, settings = tiny_t2v(), CausalConfig(3, window=6)
    stream = VideoStream(t2v, IdentityCodec(), [A], 8, 8, settings, seed=0, video=input_video(9), strength=0.5)
    assert [c.latents.shape[1] for c in stream] == [3, 3, 3]
    for kw, message in [
        (dict(video=torch.zeros(1, 6, 3, 16, 16)), "resize it"),
        (dict(video=torch.zeros(1, 6, 3, 8, 8), strength=0.0), "strength must be in"),
        (dict(video=torch.zeros(1, 6, 3, 8, 8), image=torch.zeros(1, 3, 8, 8)), "not both"),
        (dict(video=torch.zeros(8, 3, 8)), "tensor \\[B, F, 3, H, W\\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            VideoStream(t2v, IdentityCodec(), [A], 8, 8, settings, **kw)
    with pytest.raises(ValueError, match="fewer than"):
        stream_video(t2v, IdentityCodec(), [A], 12, 8, 8, settings, video=input_video(9))


def test_generate_video_from_a_file(tmp_path, capsys):
    src = tmp_path / "in.gif"
    clip = torch.rand(14, 3, 24, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    write_video(src, to_uint8(clip), fps=8)
    out = tmp_path / "out.gif"
    main(
        ["generate", "--checkpoint", "sf_dmd_chunk_toy", "--prompt", "a red circle", "--video", str(src)]
        + ["--strength", "0.5", "--family", "reward-forcing", "--out", str(out)]
    )
    text = capsys.readouterr().out
    assert out.is_file() and "12 frames x 1 videos" in text  # 14 frames in: 4 whole chunks of 3
