"""The step schedule: which noise levels each generated chunk is denoised at (issue 26's first piece).

Self Forcing warps one step list through the shift for every chunk; CausVid reads its list as it is
(sigma = t / 1000); Causal Forcing++ gives the first generated chunk a list of its own (4 steps) and
every later chunk a shorter one (2 or 1). The expected levels are written here from those definitions.
"""

import pytest
import torch

from selfforcing.config import CausalConfig, ConfigError, load_config
from selfforcing.diffusion.flow_matching import step_sigmas, warp_timesteps
from selfforcing.diffusion.samplers import sample_few_step
from selfforcing.inference.chunks import causal_chunks
from selfforcing.inference.stream import stream_video
from selfforcing.inference.video_stream import VideoStream
from selfforcing.models.codec import IdentityCodec
from tests.test_causal import tiny_t2v

PROMPT = "a red circle"
CAUSAL_FORCING_PP = dict(denoising_steps=[1000.0, 500.0], first_chunk_steps=[1000.0, 750.0, 500.0, 250.0])


def warped(steps: list[float], shift: float = 5.0) -> list[float]:
    """Self Forcing's warp, from its definition: t read as sigma = t / 1000, then shifted."""
    return [shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) for t in steps]


def test_step_lists_are_warped_or_read_as_they_are():
    torch.testing.assert_close(
        step_sigmas([1000, 750, 500, 250], 5.0), warp_timesteps([1000, 750, 500, 250], 5.0) / 1000
    )
    torch.testing.assert_close(step_sigmas([1000, 750, 500, 250], 5.0), torch.tensor(warped([1000, 750, 500, 250])))
    # CausVid: [1000, 757, 522] are already timesteps of its shift-8 schedule
    torch.testing.assert_close(step_sigmas([1000, 757, 522], 8.0, warp=False), torch.tensor([1.0, 0.757, 0.522]))
    for bad in ([1000, 0, 500], [500, 750], [], [0]):
        with pytest.raises(ValueError, match="timesteps"):
            step_sigmas(bad, 5.0, warp=False)
    settings = CausalConfig(1, **CAUSAL_FORCING_PP)
    torch.testing.assert_close(settings.sigmas(0), torch.tensor(warped([1000, 750, 500, 250])))
    torch.testing.assert_close(settings.sigmas(), torch.tensor(warped([1000, 500])))
    torch.testing.assert_close(CausalConfig(3).sigmas(0), CausalConfig(3).sigmas())  # one list by default


def dit_levels(t2v):
    """Record the noise level of every DiT pass (its timestep / 1000, one per pass)."""
    levels = []

    def hook(module, args, kwargs):
        levels.append(round(float(args[1].flatten()[0]) / 1000, 5))

    return levels, t2v.dit.register_forward_pre_hook(hook, with_kwargs=True)


def expected(chunks: int, first: list[float], later: list[float], image: bool = False) -> list[float]:
    """Every pass of a stream of ``chunks`` generated chunks: each chunk's levels, then (for all but the last)
    its commit at the context timestep 0; an image first is committed clean, without denoising."""
    passes = [0.0] if image else []
    for i in range(chunks):
        passes += [round(s, 5) for s in (first if i == 0 else later)]
        if i + 1 < chunks:
            passes.append(0.0)
    return passes


@pytest.mark.parametrize("context", ["cache", "recompute_chunk", "chunk_loop"])
def test_causal_forcing_runs_its_first_chunk_with_its_own_steps(context):
    """``stream_video`` (a ``VideoStream``), its recompute mode, and ``causal_chunks`` (the rollout's loop)."""
    t2v = tiny_t2v()
    settings = CausalConfig(1, window=3, **CAUSAL_FORCING_PP)
    levels, hook = dit_levels(t2v)
    if context == "chunk_loop":
        text_kv = t2v.dit.text_kv(*t2v.encode_text([PROMPT]))
        chunks = list(causal_chunks(t2v, text_kv, (1, 3, 3, 8, 8), settings, torch.Generator().manual_seed(0)))
    else:
        chunks = list(stream_video(t2v, IdentityCodec(), [PROMPT], 3, 8, 8, settings, seed=0, context=context))
    hook.remove()
    assert len(chunks) == 3
    if context != "recompute_chunk":
        assert levels == expected(3, warped([1000, 750, 500, 250]), warped([1000, 500]))
    else:  # the recomputed context runs other passes too: the denoising levels are the same
        assert [x for x in levels if x > 0] == [
            x for x in expected(3, warped([1000, 750, 500, 250]), warped([1000, 500])) if x > 0
        ]


def test_an_interactive_stream_uses_the_first_list_for_its_first_generated_chunk_and_after_a_reset():
    """A first image is committed, not generated: the first generated chunk still takes the first list. A
    ``reset`` cuts to a new scene, which starts with the first list again; ``keep`` does not."""
    t2v = tiny_t2v()
    settings = CausalConfig(1, window=3, **CAUSAL_FORCING_PP)
    first, later = warped([1000, 750, 500, 250]), warped([1000, 500])
    stream = VideoStream(t2v, IdentityCodec(), [PROMPT], 8, 8, settings, seed=0, image=torch.zeros(1, 3, 8, 8))
    levels, hook = dit_levels(t2v)
    for _ in range(3):  # the image, then two generated chunks
        next(stream)
    assert levels == expected(2, first, later, image=True)
    levels.clear()
    stream.switch_prompt("a blue square", "keep")
    next(stream)
    assert levels == [0.0] + [round(s, 5) for s in later]  # the last chunk's commit, then the later list
    levels.clear()
    stream.switch_prompt("a blue square", "reset")
    next(stream)
    hook.remove()
    assert levels == [round(s, 5) for s in first]  # a new scene: nothing to commit, the first list


def test_training_refuses_a_first_chunk_list():
    with pytest.raises(ConfigError, match="first_chunk_steps is a streaming setting"):
        load_config("configs/sf_dmd_toy.yaml", ["causal.first_chunk_steps=[1000,750,500,250]"])
    cfg = load_config("configs/sf_dmd_toy.yaml", ["causal.warp_steps=false", "causal.denoising_steps=[1000,757,522]"])
    torch.testing.assert_close(cfg.causal.sigmas(), torch.tensor([1.0, 0.757, 0.522]))


def test_a_list_ending_at_zero_gives_a_final_step_at_t_zero():
    """Krea Realtime's [1000, 750, 500, 250, 0]: the model sees t = 0 at the last step; the re-noise before it
    and its x0 use the schedule's smallest level, shift(1/1000) (0.00498 at shift 5), as the reference
    schedulers' nearest-timestep lookup does."""
    settings = CausalConfig(3, denoising_steps=[1000.0, 750.0, 500.0, 250.0, 0.0])
    sigmas, floor = settings.sigmas(), settings.zero_sigma
    assert sigmas.tolist()[-1] == 0 and floor == pytest.approx(5 * 0.001 / (1 + 4 * 0.001))
    seen = []

    def velocity(x, sigma):
        seen.append(float(sigma.flatten()[0]))
        return 0.5 * x + sigma[..., None, None, None]

    noise = torch.randn(1, 3, 3, 4, 4)
    got = sample_few_step(velocity, noise, sigmas, generator=torch.Generator().manual_seed(1), zero_sigma=floor)
    g, x = torch.Generator().manual_seed(1), noise  # the definition, step by step
    levels = [*sigmas.tolist()[:-1], floor]
    for i, (s, t) in enumerate(zip(levels, sigmas.tolist(), strict=True)):
        x0 = x - s * (0.5 * x + t)
        if i + 1 < len(levels):
            x = (1 - levels[i + 1]) * x0 + levels[i + 1] * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(got, x0)
    assert seen == pytest.approx(sigmas.tolist()) and seen[-1] == 0
    with pytest.raises(ValueError, match="needs zero_sigma"):
        sample_few_step(velocity, noise, sigmas)
    with pytest.raises(ConfigError, match="ends at t = 0"):
        load_config("configs/sf_dmd_toy.yaml", ["causal.denoising_steps=[1000,500,0]"])
    t2v = tiny_t2v()
    levels, hook = dit_levels(t2v)
    list(stream_video(t2v, IdentityCodec(), [PROMPT], 6, 8, 8, settings))
    hook.remove()
    assert levels == expected(2, sigmas.tolist(), sigmas.tolist())  # each chunk's passes end at t = 0
