"""Block-causal attention, the KV cache and streaming: cached == masked full sequence, exactly."""

import pytest
import torch

from selfforcing.config import CausalConfig
from selfforcing.inference.stream import stream_video
from selfforcing.models import ShapesTextEncoder, VideoDiT, dit_config
from selfforcing.models.causal import block_causal_mask, frame_visibility
from selfforcing.models.codec import IdentityCodec
from selfforcing.models.kv_cache import KVCache
from selfforcing.models.t2v import TextToVideo
from selfforcing.models.tokens import prompt_vocabulary

TOL = dict(atol=1e-5, rtol=1e-5)


def random_model() -> VideoDiT:
    m = VideoDiT(dit_config("tiny")).eval()
    torch.nn.init.normal_(m.head.head.weight, std=0.1)  # the zero-initialised head would hide differences
    return m


def inputs(frames: int, b: int = 2):
    # 8x8 latents with patch 4 -> 4 tokens per frame
    return torch.randn(b, frames, 3, 8, 8), torch.rand(b, frames) * 1000, torch.randn(b, 5, 32)


def cached_forward(m, x, t, ctx, fpb, window=0, sink=0, grad=False):
    """Chunk by chunk with a KV cache, each chunk committed with its own keys/values. Without ``grad`` each
    layer writes its chunk into the cache's free slots and attends over a view; with it, it concatenates."""
    cache = KVCache.for_model(m, x.shape[0], 4, fpb, window or x.shape[1], sink)
    ptr, end = cache.k.data_ptr(), cache.k.data_ptr() + cache.k.numel() * cache.k.element_size()
    text_kv = m.text_kv(ctx)
    outs = []
    for s in range(0, x.shape[1], fpb):
        with torch.set_grad_enabled(grad):
            out, kv = m(
                x[:, s : s + fpb], t[:, s : s + fpb], text_kv=text_kv, kv_cache=cache, frame_offset=s, return_kv=True
            )
        assert (ptr <= kv[0][0].data_ptr() < end) == (not grad)  # in place in the cache's buffer, or a new tensor
        cache.commit(s, kv)
        outs.append(out)
    assert cache.k.data_ptr() == ptr  # preallocated: never reallocated
    return torch.cat(outs, dim=1), cache


def test_frame_visibility():
    v = frame_visibility(6, 3)
    assert v[:3, :3].all() and not v[:3, 3:].any() and v[3:].all()  # chunk-wise: full within and before
    assert torch.equal(frame_visibility(4, 1), torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    w = frame_visibility(9, 3, window=4, sink=1)
    # the chunk [6, 9) sees frames [5, 9) and the sink frame 0
    assert w[6].nonzero().flatten().tolist() == [0, 5, 6, 7, 8]
    assert block_causal_mask(2, 3, 1).shape == (6, 6)
    with pytest.raises(ValueError, match="shorter than one chunk"):
        frame_visibility(6, 3, window=2)


@pytest.mark.parametrize("fpb", [1, 3])
@pytest.mark.parametrize("grad", [False, True])
def test_cached_chunks_equal_masked_full_sequence(fpb, grad):
    m = random_model()
    x, t, ctx = inputs(9)
    full = m(x, t, ctx, attn_mask=block_causal_mask(9, 4, fpb))
    cached, cache = cached_forward(m, x, t, ctx, fpb, grad=grad)
    assert torch.allclose(cached, full, **TOL)
    assert cache.frames == list(range(9 - cache.capacity, 9))  # the last window - fpb frames
    assert not torch.allclose(full, m(x, t, ctx), atol=1e-3)  # the mask matters


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("fpb,window,sink", [(3, 6, 0), (3, 6, 3), (1, 3, 0), (1, 4, 2), (3, 4, 1), (3, 5, 0)])
def test_rolling_cache_equals_sliding_window_mask(fpb, window, sink, grad):
    """A sequence 4x longer than the window: eviction keeps exactly the frames the mask shows."""
    m = random_model()
    frames = 24 if fpb == 3 else 16
    x, t, ctx = inputs(frames)
    full = m(x, t, ctx, attn_mask=block_causal_mask(frames, 4, fpb, window, sink))
    cached, cache = cached_forward(m, x, t, ctx, fpb, window, sink, grad)
    assert torch.allclose(cached, full, **TOL)
    assert cache.num_frames == cache.capacity == sink + window - fpb
    assert cache.frames[:sink] == list(range(sink))  # sink frames survive
    # the window matters: the unwindowed mask gives something else
    assert not torch.allclose(full, m(x, t, ctx, attn_mask=block_causal_mask(frames, 4, fpb)), atol=1e-3)


@pytest.mark.parametrize("window,sink", [(0, 0), (6, 3)])
def test_later_chunks_never_change_earlier_outputs(window, sink):
    m = random_model()
    x, t, ctx = inputs(12)
    mask = block_causal_mask(12, 4, 3, window, sink)
    x2, t2 = x.clone(), t.clone()
    x2[:, 6:], t2[:, 6:] = torch.randn_like(x2[:, 6:]), torch.rand_like(t2[:, 6:]) * 1000
    a, b = m(x, t, ctx, attn_mask=mask), m(x2, t2, ctx, attn_mask=mask)
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_cache_errors_and_recommit():
    m = random_model()
    x, t, ctx = inputs(6)
    cache = KVCache.for_model(m, 2, 4, 3, 6)
    with pytest.raises(ValueError, match="starts at frame 3"):
        m(x[:, 3:], t[:, 3:], ctx, kv_cache=cache, frame_offset=3)
    with pytest.raises(ValueError, match="skip back"):
        cache.skip_to(-1)
    with pytest.raises(ValueError, match="tokens per frame"):
        m(torch.randn(2, 3, 3, 16, 16), t[:, :3], ctx, kv_cache=cache)
    with pytest.raises(ValueError, match="finite window"):
        KVCache.for_model(m, 2, 4, 3, 0)
    # recommitting the latest chunk (e.g. at another context level) replaces its entries
    _, kv_a = m(x[:, :3], t[:, :3], ctx, kv_cache=cache, return_kv=True)
    _, kv_b = m(x[:, :3], torch.zeros(2, 3), ctx, kv_cache=cache, return_kv=True)
    cache.commit(0, kv_a)
    cache.commit(0, kv_b)
    assert cache.frames == [0, 1, 2] and cache.next_frame == 3
    assert torch.equal(cache.context(0)[0], kv_b[0][0])
    cache.reset()
    assert cache.num_frames == 0 and cache.context(0) is None


@pytest.mark.parametrize("commit", [False, True])
def test_a_pass_of_several_chunks_attends_without_a_mask_among_its_frames(commit):
    """After chunk 0 is cached, one pass over frames 3..8 equals the full sequence where those frames see
    every frame up to 8 (LongLive's one-pass re-cache), and with ``commit`` the cache then holds them."""
    m = random_model()
    x, t, ctx = inputs(9)
    mask = block_causal_mask(9, 4, 3)
    mask[12:] = True  # frames 3..8 (tokens 12..35) see frames 0..8
    full, kv_full = m(x, t, ctx, attn_mask=mask, return_kv=True)
    cache = KVCache.for_model(m, 2, 4, 3, 9)
    text_kv = m.text_kv(ctx)
    with torch.no_grad():
        _, kv0 = m(x[:, :3], t[:, :3], text_kv=text_kv, kv_cache=cache, return_kv=True)
        cache.commit(0, kv0)
        wide = m(x[:, 3:], t[:, 3:], text_kv=text_kv, kv_cache=cache, frame_offset=3, commit=commit)
    assert torch.allclose(wide, full[:, 3:], **TOL)
    if commit:  # capacity 6: the oldest frames were evicted within the same commit
        assert cache.frames == [3, 4, 5, 6, 7, 8] and cache.next_frame == 9
        k_full = kv_full[1][0].unflatten(2, (9, 4))
        held = cache.k[1, :, :, : 6 * 4].unflatten(2, (6, 4))
        for slot, frame in enumerate(cache.frame_of_slot):
            assert torch.allclose(held[:, :, slot], k_full[:, :, frame], **TOL)


def tiny_t2v() -> TextToVideo:
    vocab = prompt_vocabulary(["a red circle", "a blue square"])
    t2v = TextToVideo(ShapesTextEncoder(vocab, 32, 1, 2, 8), random_model()).eval()
    return t2v


@pytest.mark.parametrize("settings", [CausalConfig(3), CausalConfig(1, window=3, sink=1, context_timestep=50)])
def test_streaming_with_cache_equals_recomputed_context(settings):
    """The streamed video is the same whether the context is cached (and rolled) or recomputed."""
    t2v = tiny_t2v()
    prompts = ["a red circle", "a blue square"]
    runs = {
        mode: list(stream_video(t2v, IdentityCodec(), prompts, 9, 8, 8, settings, seed=3, context=mode))
        for mode in ("cache", "recompute_step", "recompute_chunk")
    }
    videos = {mode: torch.cat([c.frames for c in chunks], dim=1) for mode, chunks in runs.items()}
    assert videos["cache"].shape == (2, 9, 3, 8, 8)
    assert [c.start for c in runs["cache"]] == list(range(0, 9, settings.frames_per_block))
    assert torch.allclose(videos["cache"], videos["recompute_step"], **TOL)
    assert torch.allclose(videos["cache"], videos["recompute_chunk"], **TOL)
    other = torch.cat([c.frames for c in stream_video(t2v, IdentityCodec(), prompts, 9, 8, 8, settings, seed=4)], 1)
    assert not torch.allclose(videos["cache"], other, atol=1e-3)


def test_compiled_blocks_stream_the_same_video():
    """``compile_blocks`` (dynamo graph capture, a context whose length grows chunk by chunk) changes
    nothing in the streamed video. The eager backend keeps the test free of a C compiler."""
    t2v = tiny_t2v()
    settings = CausalConfig(3, window=6)
    ref = torch.cat([c.frames for c in stream_video(t2v, IdentityCodec(), ["a red circle"], 12, 8, 8, settings)], 1)
    t2v.dit.compile_blocks(backend="eager")
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None for b in t2v.dit.blocks)
    out = torch.cat([c.frames for c in stream_video(t2v, IdentityCodec(), ["a red circle"], 12, 8, 8, settings)], 1)
    assert torch.allclose(out, ref, **TOL)


def test_stream_rejects_partial_chunks():
    with pytest.raises(ValueError, match="whole number of chunks"):
        next(stream_video(tiny_t2v(), IdentityCodec(), ["a red circle"], 8, 8, 8, CausalConfig(3)))


def test_streaming_a_bf16_model_keeps_fp32_sampler_state():
    t2v = tiny_t2v()
    settings = CausalConfig(3)
    ref = torch.cat([c.frames for c in stream_video(t2v, IdentityCodec(), ["a red circle"], 6, 8, 8, settings)], 1)
    chunks = list(stream_video(t2v.to(torch.bfloat16), IdentityCodec(), ["a red circle"], 6, 8, 8, settings))
    assert chunks[0].latents.dtype == torch.float32
    low = torch.cat([c.frames for c in chunks], 1)
    assert (low - ref).abs().max() < 0.1


@pytest.mark.parametrize(
    "fpb,window,sink,t_ctx", [(1, 0, 0, 0), (3, 0, 0, 0), (3, 6, 0, 0), (1, 3, 1, 0), (3, 6, 0, 200)]
)
def test_teacher_forcing_pass_equals_denoising_against_a_cache_of_the_real_video(fpb, window, sink, t_ctx):
    """Teacher Forcing's one pass over [context, noisy] == each noisy chunk denoised against a KV cache of
    the real chunks before it, committed as streaming commits them (re-noised to t_ctx, rolling with the
    window and sink): Teacher Forcing trains what inference runs when the context is ground truth."""
    from types import SimpleNamespace

    from selfforcing.diffusion.flow_matching import add_noise
    from selfforcing.training.causal_diffusion import forced_velocity

    t2v = tiny_t2v()
    causal = CausalConfig(fpb, window=window, sink=sink, context_timestep=float(t_ctx))
    cfg = SimpleNamespace(causal=causal, distill=SimpleNamespace(paradigm="teacher_forcing"))
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(2, 12, 3, 8, 8, generator=g), torch.randn(2, 12, 3, 8, 8, generator=g)
    sigma = torch.rand(2, 12, generator=g)
    text = t2v.encode_text(["a red circle", "a blue square"])
    full = forced_velocity(t2v, x0, x_t, sigma, text, cfg, torch.Generator().manual_seed(1))

    context = add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), t_ctx / 1000)
    cache = KVCache.for_model(t2v.dit, 2, 4, fpb, window or 12, sink)
    text_kv = t2v.dit.text_kv(*text)
    outs = []
    for s in range(0, 12, fpb):
        outs.append(
            t2v.dit(x_t[:, s : s + fpb], sigma[:, s : s + fpb] * 1000, text_kv=text_kv, kv_cache=cache, frame_offset=s)
        )
        t = torch.full((2, fpb), float(t_ctx))
        _, kv = t2v.dit(context[:, s : s + fpb], t, text_kv=text_kv, kv_cache=cache, frame_offset=s, return_kv=True)
        cache.commit(s, kv)
    assert torch.allclose(torch.cat(outs, 1), full, **TOL)


def test_guided_streaming_combines_the_cond_and_uncond_branches():
    """CFG while streaming: one step of one chunk is exactly uncond + w (cond - uncond) (x0 is linear in v);
    over several chunks a scale of ~1 reproduces the unguided stream, so each branch reads its own cache."""
    t2v, prompts = tiny_t2v(), ["a red circle", "a blue square"]

    def video(prompts, frames, settings, w=1.0):
        chunks = stream_video(t2v, IdentityCodec(), prompts, frames, 8, 8, settings, seed=5, guidance_scale=w)
        return torch.cat([c.latents for c in chunks], dim=1)  # latents: decoded frames are clamped

    one_step = CausalConfig(3, denoising_steps=[1000.0])
    cond, uncond = video(prompts, 3, one_step), video(["", ""], 3, one_step)
    assert torch.allclose(video(prompts, 3, one_step, 2.5), uncond + 2.5 * (cond - uncond), **TOL)
    settings = CausalConfig(3, window=6)
    plain = video(prompts, 12, settings)
    assert torch.allclose(video(prompts, 12, settings, 1 + 1e-6), plain, atol=1e-4)
    assert not torch.allclose(video(prompts, 12, settings, 3.0), plain, atol=1e-3)
    with pytest.raises(ValueError, match="cache"):
        next(stream_video(t2v, IdentityCodec(), prompts, 3, 8, 8, settings, context="recompute_step", guidance_scale=2))


def test_the_cache_is_stored_in_the_dtype_attention_computes_in():
    """fp32 master weights under bf16 autocast (or FSDP mixed precision) compute attention in bf16: the
    cache stores bf16 (half the memory of fp32), and streaming with it matches the masked sequence."""
    m = random_model()
    assert KVCache.for_model(m, 2, 4, 3, 9).k.dtype == torch.float32
    x, t, ctx = inputs(9)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert KVCache.for_model(m, 2, 4, 3, 9).k.dtype == torch.bfloat16
        full = m(x, t, ctx, attn_mask=block_causal_mask(9, 4, 3))
        cached, cache = cached_forward(m, x, t, ctx, 3)
    assert cache.k.dtype == torch.bfloat16 and cache.k.element_size() == 2
    assert torch.allclose(cached.float(), full.float(), atol=0.05)
    m.compute_dtype = torch.bfloat16  # what FSDP mixed precision sets on the DiT it shards
    assert KVCache.for_model(m, 2, 4, 3, 9).k.dtype == torch.bfloat16


@pytest.mark.parametrize("fpb,window,sink", [(3, 6, 0), (1, 4, 2)])
def test_an_fp8_cache_holds_the_same_frames_in_a_byte_with_a_scale_per_frame(fpb, window, sink):
    """``kv_cache: fp8``: the rolling cache keeps the same frames, one byte per value (half of bf16, a quarter
    of fp32) with one scale per frame and head, and the video stays close to the exact cache's."""
    from selfforcing.models.kv_cache import FP8KVCache

    m = random_model()
    x, t, ctx = inputs(12)
    exact, exact_cache = cached_forward(m, x, t, ctx, fpb, window, sink)
    fp8 = KVCache.for_model(m, 2, 4, fpb, window, sink, torch.float8_e4m3fn)
    assert isinstance(fp8, FP8KVCache) and fp8.k.element_size() == 1
    assert fp8.k.shape[3] == fp8.capacity * 4  # no in-place slots for the chunk: it is concatenated
    text_kv, outs = m.text_kv(ctx), []
    with torch.no_grad():
        for s in range(0, 12, fpb):
            out, kv = m(
                x[:, s : s + fpb], t[:, s : s + fpb], text_kv=text_kv, kv_cache=fp8, frame_offset=s, return_kv=True
            )
            fp8.commit(s, kv)
            outs.append(out)
    assert fp8.frames == exact_cache.frames
    k8, k = fp8.context(0)[0], exact_cache.context(0)[0]
    assert k8.dtype == torch.float32 and (k8 - k).abs().max() <= 0.07 * k.abs().max()  # e4m3: 3 mantissa bits
    err = (torch.cat(outs, 1) - exact).norm() / exact.norm()
    assert 0 < err < 0.05, err


def test_committing_a_chunk_written_in_place_copies_nothing(monkeypatch):
    """Until the cache rolls, a chunk's keys/values already sit in the slots a commit gives them."""
    m = random_model()
    x, t, ctx = inputs(6, b=1)
    cache = KVCache.for_model(m, 1, 4, 3, 9)
    copies = []
    copy = torch.Tensor.copy_
    with torch.no_grad():
        for s in (0, 3):
            _, kv = m(x[:, s : s + 3], t[:, s : s + 3], ctx, kv_cache=cache, frame_offset=s, return_kv=True)
            monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: copies.append(1) or copy(self, src))
            cache.commit(s, kv)
            monkeypatch.setattr(torch.Tensor, "copy_", copy)
    assert copies == [] and cache.frames == list(range(6))


@pytest.mark.parametrize("options", [{}, {"in_place": False}, {"dtype": torch.float8_e4m3fn}])
def test_a_commit_pass_stores_each_layer_as_it_goes(options):
    """``commit=True``: every layer stores its chunk's keys/values once its attention is done, so the pass
    never holds all layers' keys/values; the cache ends exactly as with ``return_kv`` + ``commit``."""
    m = random_model()
    x, t, ctx = inputs(15)
    a = KVCache.for_model(m, 2, 4, 3, 6, 1, **options)
    b = KVCache.for_model(m, 2, 4, 3, 6, 1, **options)
    text_kv = m.text_kv(ctx)
    with torch.no_grad():
        for s in range(0, 15, 3):  # rolls from the third chunk on, keeping the sink frame
            chunk = (x[:, s : s + 3], t[:, s : s + 3])
            _, kv = m(*chunk, text_kv=text_kv, kv_cache=a, frame_offset=s, return_kv=True)
            a.commit(s, kv)
            m(*chunk, text_kv=text_kv, kv_cache=b, frame_offset=s, commit=True)
            assert a.frames == b.frames and a.next_frame == b.next_frame == s + 3
            assert torch.equal(a.k.float(), b.k.float()) and torch.equal(a.v.float(), b.v.float())
    assert b.frames[0] == 0 and len(b.frames) == b.capacity
    with pytest.raises(ValueError, match="commit=True is the cache-commit pass"):
        m(*chunk, text_kv=text_kv, kv_cache=b, frame_offset=15, commit=True)  # with gradient


def test_rope_is_built_once_a_forward_and_the_residual_stream_is_dense(monkeypatch):
    """cos/sin of the RoPE angles once per forward (not in every layer), and the tokens that enter every
    block are a contiguous tensor (not the transposed view the patch embedding leaves)."""
    m = VideoDiT(dit_config("tiny", num_layers=4)).eval()
    x, t, ctx = inputs(3)
    calls, dense = [], []
    cos = torch.cos
    monkeypatch.setattr(torch, "cos", lambda a: calls.append(a.shape) or cos(a))
    for block in m.blocks:
        block.register_forward_pre_hook(lambda mod, args: dense.append(args[0].is_contiguous()))
    m(x, t, ctx)
    rope_calls = [s for s in calls if s[-1] == m.cfg.head_dim // 2]
    assert len(rope_calls) == 1 and dense == [True] * 4
