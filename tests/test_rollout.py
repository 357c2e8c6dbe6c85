"""The Self Forcing rollout: the inference code path, with gradient only through each chunk's exit step."""

import copy
import dataclasses

import pytest
import torch

from selfforcing.config import CausalConfig
from selfforcing.inference.stream import stream_video
from selfforcing.models.codec import IdentityCodec
from selfforcing.models.kv_cache import KVCache
from selfforcing.training.rollout import draw_exit_step, self_forcing_rollout
from tests.test_causal import tiny_t2v

PROMPTS = ["a red circle", "a blue square"]
SHAPE = (2, 6, 3, 8, 8)  # two chunks of 3 frames, 4 tokens per frame


def grad_enabled_calls(model):
    """Record, for every DiT forward, whether it ran with gradient."""
    calls = []
    handle = model.dit.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return calls, handle


@pytest.mark.parametrize("fpb,window,sink", [(1, 0, 0), (3, 0, 0), (3, 6, 0), (1, 3, 1)])
def test_rollout_at_the_last_step_is_the_streamed_video(fpb, window, sink):
    """The rollout against the one code path that shares none of its chunk loop: streaming with the
    context re-run at every step in one masked full-sequence pass (no cache)."""
    t2v = tiny_t2v()
    causal = CausalConfig(fpb, window=window, sink=sink)
    with torch.no_grad():
        text_kv = t2v.dit.text_kv(*t2v.encode_text(PROMPTS))
        video = self_forcing_rollout(t2v, text_kv, (2, 12, 3, 8, 8), causal, 4, torch.Generator().manual_seed(5))
        chunks = stream_video(t2v, IdentityCodec(), PROMPTS, 12, 8, 8, causal, seed=5, context="recompute_step")
        recomputed = torch.cat([c.latents for c in chunks], dim=1)
    torch.testing.assert_close(video, recomputed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("exit_step", [1, 3])
def test_only_the_exit_step_carries_gradient(exit_step):
    t2v = tiny_t2v()
    text_kv = t2v.dit.text_kv(*t2v.encode_text(PROMPTS))
    calls, handle = grad_enabled_calls(t2v)
    video = self_forcing_rollout(t2v, text_kv, SHAPE, CausalConfig(3), exit_step, torch.Generator().manual_seed(0))
    handle.remove()
    # per chunk: exit_step denoising forwards (only the last with gradient), then one commit without;
    # the last chunk is not committed (nothing reads it)
    chunk = [False] * (exit_step - 1) + [True]
    assert calls == chunk + [False] + chunk
    assert video.requires_grad
    video.square().sum().backward()
    assert all(p.grad is not None for p in t2v.dit.parameters() if p.requires_grad)


def test_gradient_equals_the_exit_forwards_with_frozen_context():
    """Nothing flows through the context or earlier steps: the rollout's gradient equals the sum of
    the exit-step forwards' gradients, each recomputed on its recorded (detached) inputs and cache."""
    t2v = tiny_t2v()
    text = t2v.encode_text(PROMPTS)
    recorded = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():  # an exit-step forward: keep its inputs and a copy of the cache
            recorded.append((args[0].detach().clone(), args[1].detach().clone(), copy.deepcopy(kwargs["kv_cache"])))

    handle = t2v.dit.register_forward_pre_hook(record, with_kwargs=True)
    video = self_forcing_rollout(t2v, t2v.dit.text_kv(*text), SHAPE, CausalConfig(3), 2, torch.Generator())
    handle.remove()
    weights = torch.randn_like(video)
    params = list(t2v.dit.parameters())
    rollout_grads = torch.autograd.grad((video * weights).sum(), params)

    assert len(recorded) == 2  # one forward with gradient per chunk
    total = [torch.zeros_like(p) for p in params]
    for x, t, cache in recorded:
        s = cache.next_frame
        v = t2v.dit(x, t, text_kv=t2v.dit.text_kv(*text), kv_cache=cache, frame_offset=s)
        x0 = x - (t[..., None, None, None] / 1000) * v
        part = torch.autograd.grad((x0 * weights[:, s : s + 3]).sum(), params)
        total = [a + b for a, b in zip(total, part, strict=True)]
    for a, b in zip(rollout_grads, total, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_grad_frames_limits_the_trained_chunks():
    t2v = tiny_t2v()
    text_kv = t2v.dit.text_kv(*t2v.encode_text(PROMPTS))
    calls, handle = grad_enabled_calls(t2v)
    self_forcing_rollout(t2v, text_kv, (2, 9, 3, 8, 8), CausalConfig(3), 2, torch.Generator(), grad_frames=3)
    handle.remove()
    assert calls == [False, False, False] * 2 + [False, True]  # only the last chunk is trained (and not committed)


def test_exit_step_is_uniform_and_checked():
    g = torch.Generator().manual_seed(0)
    draws = [draw_exit_step(4, g) for _ in range(400)]
    assert set(draws) == {1, 2, 3, 4} and min(draws.count(s) for s in range(1, 5)) > 70
    with pytest.raises(ValueError, match="exit_step"):
        self_forcing_rollout(tiny_t2v(), None, SHAPE, CausalConfig(3), 5, torch.Generator())


def test_a_rollout_without_grad_builds_no_graph():
    """The critic's fresh rollouts: no forward runs with gradient, even at the exit step."""
    t2v = tiny_t2v()
    text_kv = t2v.dit.text_kv(*t2v.encode_text(PROMPTS))
    calls, handle = grad_enabled_calls(t2v)
    video = self_forcing_rollout(t2v, text_kv, SHAPE, CausalConfig(3), 2, torch.Generator(), grad=False)
    handle.remove()
    assert calls and not any(calls) and not video.requires_grad


@pytest.mark.parametrize("fpb,window,sink", [(3, 6, 0), (1, 3, 1), (3, 0, 0), (1, 2, 0)])
def test_gradient_checkpointing_gives_the_same_gradients_with_a_rolling_cache(fpb, window, sink):
    """Recomputing a block in backward must read the cache as it was in forward, although later commits
    evict and overwrite those slots in place."""
    t2v = tiny_t2v()
    causal = CausalConfig(fpb, window=window, sink=sink)
    shape = (2, 12, 3, 8, 8)
    grads = []
    for checkpointing in (False, True):
        t2v.dit.gradient_checkpointing = checkpointing
        text_kv = t2v.dit.text_kv(*t2v.encode_text(PROMPTS))
        video = self_forcing_rollout(t2v, text_kv, shape, causal, 2, torch.Generator().manual_seed(3))
        weights = torch.randn(video.shape, generator=torch.Generator().manual_seed(4))
        grads.append(torch.autograd.grad((video * weights).sum(), list(t2v.dit.parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_a_rollout_that_fits_keeps_views_and_an_append_only_cache_refuses_to_overwrite():
    """A rollout whose frames all fit its window marks its cache append-only, so a checkpointed exit step
    keeps views of the context instead of copying it (the test above: the same gradients); such a cache
    raises rather than overwrite a frame a view may still read in backward."""
    t2v = tiny_t2v()
    text_kv = t2v.dit.text_kv(*t2v.encode_text(PROMPTS))
    clones = []

    class CountClones(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            clones.append(func is torch.ops.aten.clone.default)
            return func(*args, **(kwargs or {}))

    def copies(window: int, checkpointing: bool) -> int:
        t2v.dit.gradient_checkpointing = checkpointing
        clones.clear()
        with CountClones():
            self_forcing_rollout(t2v, text_kv, (2, 12, 3, 8, 8), CausalConfig(3, window=window), 2, torch.Generator())
        return sum(clones)

    plain = copies(0, checkpointing=False)
    assert copies(0, checkpointing=True) == plain  # the whole video fits: views, no copy of the context
    assert copies(6, checkpointing=True) > plain  # a rolling window: each trained chunk copies its context
    cache = KVCache(1, 1, 1, 1, 1, 1, 2)
    cache.append_only = True
    kv = [(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))]
    cache.commit(0, kv)
    for overwrite in (lambda: cache.commit(0, kv), lambda: cache.commit(1, kv), cache.reset):
        with pytest.raises(RuntimeError, match="append-only"):
            overwrite()  # a recommit, an eviction (capacity 1), a reset


def test_a_chunk_straddling_the_grad_window_is_trained():
    """grad_frames=4 of 9 frames in chunks of 3: the window starts inside the second chunk, which is trained
    (its last frame is in the window); the first is not. A loss on the last 4 frames gets exactly the
    gradient of a rollout in which every chunk carries gradient, and the first chunk gives the generator none."""
    t2v = tiny_t2v()
    shape = (2, 9, 3, 8, 8)

    def rollout(grad_frames: int | None) -> torch.Tensor:
        text_kv = t2v.dit.text_kv(*t2v.encode_text(PROMPTS))
        return self_forcing_rollout(
            t2v, text_kv, shape, CausalConfig(3), 2, torch.Generator().manual_seed(0), grad_frames
        )

    calls, handle = grad_enabled_calls(t2v)
    video = rollout(4)
    handle.remove()
    assert calls == [False, False, False] + [False, True, False] + [False, True]  # chunks 2 and 3 trained
    params = list(t2v.dit.parameters())
    first = torch.autograd.grad(video[:, :3].sum(), params, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in first)  # the untrained first chunk
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    weights[:, :5] = 0  # the loss sees frames 5..8: the straddling chunk's last frame and the last chunk
    got = torch.autograd.grad((video * weights).sum(), params)
    want = torch.autograd.grad((rollout(None) * weights).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("fpb,window,sink,context", [(3, 0, 0, 0), (1, 3, 1, 0), (3, 0, 0, 100), (3, 0, 0, -1)])
def test_a_rollout_from_a_given_first_frame_is_the_image_to_video_stream(fpb, window, sink, context):
    """``first``: the given latent committed clean at position 0 as VideoStream commits an image, the rollout
    then generating at positions 1, 1 + fpb, ... : the same video as the stream with that image (whatever
    the window, sink or context noise), starting with the given frame."""
    from selfforcing.inference.video_stream import VideoStream

    t2v = tiny_t2v()
    first_steps = [1000.0, 750.0, 500.0, 100.0] if context < 0 else []  # -1: the first generated chunk its own steps
    causal = CausalConfig(
        fpb, window=window, sink=sink, context_timestep=max(context, 0), first_chunk_steps=first_steps
    )
    image = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        text_kv = t2v.dit.text_kv(*t2v.encode_text(PROMPTS))
        g = torch.Generator().manual_seed(5)
        video = self_forcing_rollout(t2v, text_kv, (2, 6, 3, 8, 8), causal, 4, g, first=image[:, None])
        settings = dataclasses.replace(causal, window=causal.window or 7)  # a stream of 7 frames, the image first
        stream = VideoStream(t2v, IdentityCodec(), PROMPTS, 8, 8, settings, seed=5, image=image, length=7)
        streamed = torch.cat([next(stream).latents for _ in range(1 + 6 // fpb)], dim=1)
        plain = self_forcing_rollout(t2v, text_kv, (2, 6, 3, 8, 8), causal, 4, torch.Generator().manual_seed(5))
    assert video.shape == (2, 7, 3, 8, 8) and torch.equal(video[:, 0], image)
    torch.testing.assert_close(video, streamed, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(video[:, 1:], plain, atol=1e-3)  # the first frame conditions what follows
