"""Interactive streaming: prompt switches (keep / recache / reset), a first image, open-ended streams."""

import pytest
import torch

from selfforcing.config import CausalConfig
from selfforcing.diffusion.samplers import sample_few_step
from selfforcing.inference.stream import stream_video
from selfforcing.inference.video_stream import VideoStream, held_runs
from selfforcing.models.codec import IdentityCodec
from tests.test_causal import TOL, tiny_t2v

A, B = "a red circle", "a blue square"


def open_stream(t2v, settings, prompt=A, image=None, seed=3):
    return VideoStream(t2v, IdentityCodec(), [prompt, prompt], 8, 8, settings, seed=seed, image=image)


def recomputed_next_chunk(t2v, stream, history, prompt, blocks):
    """What the stream's next chunk must be if its context is ``history`` [B, F, 3, 8, 8] (clean), cut
    into ``blocks`` (frame counts), under ``prompt``: the full-sequence model over history + chunk with
    the block-causal mask of those blocks (no cache), from the stream's noise."""
    g = torch.Generator()
    g.set_state(stream.generator.get_state())
    fpb, f = stream.settings.frames_per_block, history.shape[1]
    block = torch.repeat_interleave(torch.arange(len(blocks) + 1), torch.tensor([*blocks, fpb]))
    n = 4  # tokens per 8x8 frame with patch 4
    mask = (block[None, :] <= block[:, None]).repeat_interleave(n, 0).repeat_interleave(n, 1)
    text_kv = t2v.dit.text_kv(*t2v.encode_text([prompt, prompt]))

    def velocity(x, sigma):
        sig = torch.cat([torch.zeros(2, f), sigma], dim=1)
        return t2v.dit(torch.cat([history, x], 1), sig * 1000, text_kv=text_kv, attn_mask=mask)[:, f:]

    noise = torch.randn(2, fpb, 3, 8, 8, generator=g)
    return sample_few_step(velocity, noise, stream.sigmas, generator=g)


def test_held_runs():
    assert held_runs([0, 4, 5, 7], 3, 3) == [(4, 6)]
    assert held_runs([0, 2], 0, 3) == [(0, 1), (2, 3)]
    assert held_runs([0, 1], 3, 3) == []


def test_recache_rebuilds_the_cache_under_the_new_prompt():
    """After ``recache`` the next chunk is the one the model computes from the same frames under the new
    prompt (the masked forward, no cache); ``keep`` gives another chunk, since the cache stays the old
    prompt's; the old prompt's stream gives a third."""
    t2v, settings = tiny_t2v(), CausalConfig(3, window=12)
    nexts = {}
    for mode in ("recache", "keep", None):
        stream = open_stream(t2v, settings)
        history = torch.cat([next(stream).latents for _ in range(2)], dim=1)
        if mode:
            stream.switch_prompt(B, mode)
        expected = recomputed_next_chunk(t2v, stream, history, B if mode else A, [3, 3])
        nexts[mode] = next(stream).latents
        if mode != "keep":
            assert torch.allclose(nexts[mode], expected, **TOL), mode
    assert stream.prompts == [A, A]
    assert not torch.allclose(nexts["keep"], nexts["recache"], atol=1e-4)
    assert not torch.allclose(nexts["keep"], nexts[None], atol=1e-4)


@pytest.mark.parametrize(
    "settings", [CausalConfig(3, window=6), CausalConfig(1, window=3, sink=1, context_timestep=50)]
)
def test_recache_with_the_same_prompt_in_a_window_that_never_rolled_changes_nothing(settings):
    """Nothing evicted yet: recomputing every held frame under the same prompt gives the same cache, so
    the video goes on exactly as the unswitched one. Once the cache has rolled it keeps the same frames."""
    t2v = tiny_t2v()
    plain, switched = open_stream(t2v, settings), open_stream(t2v, settings)
    fpb = settings.frames_per_block
    for _ in range(max(1, (settings.window - fpb) // fpb)):  # fill the cache without evicting
        next(plain), next(switched)
    switched.switch_prompt(A, "recache")
    assert torch.allclose(next(switched).latents, next(plain).latents, **TOL)
    for _ in range(4):  # past the window: the rolled cache is rebuilt with the frames it held
        next(plain), next(switched)
    plain.commit()
    switched.switch_prompt(B, "recache")
    frames = plain.cache.frames
    assert switched.cache.frames == frames != [] and switched.cache.next_frame == plain.cache.next_frame
    assert switched.switches[-1] == (switched.latent_frames, [B, B], "recache")


def test_recache_of_a_rolled_cache_recomputes_exactly_the_frames_it_holds():
    """Chunk-wise with one sink frame: after rolling, the cache holds frame 0 of the first chunk and the
    latest frames. Recache recomputes just those, each run attending to the held runs before it (the
    full-sequence pass over the held frames at their own positions, block-causal by run)."""
    t2v, settings = tiny_t2v(), CausalConfig(3, window=6, sink=1)
    stream = open_stream(t2v, settings)
    video = torch.cat([next(stream).latents for _ in range(4)], 1)  # context_timestep 0: commit inputs = x0
    stream.switch_prompt(B, "recache")
    held = stream.cache.frames
    assert held == [0, 9, 10, 11]
    runs = torch.tensor([0, 1, 1, 1])  # [0, 1) then [9, 12)
    mask = (runs[None, :] <= runs[:, None]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    text_kv = t2v.dit.text_kv(*t2v.encode_text([B, B]))
    _, kv = t2v.dit(
        video[:, held],
        torch.zeros(2, 4),
        text_kv=text_kv,
        attn_mask=mask,
        return_kv=True,
        frame_positions=torch.tensor(held),
    )
    slot_of = {f: s for s, f in enumerate(stream.cache.frame_of_slot)}
    for layer, (k, _) in enumerate(kv):
        for i, f in enumerate(held):
            s = slot_of[f]
            cached = stream.cache.k[layer, :, :, s * 4 : (s + 1) * 4]
            assert torch.allclose(cached, k[:, :, i * 4 : (i + 1) * 4], **TOL), (layer, f)


def test_keep_continues_on_the_old_cache():
    t2v, settings = tiny_t2v(), CausalConfig(3, window=9)
    plain, kept = open_stream(t2v, settings), open_stream(t2v, settings)
    for _ in range(2):
        next(plain), next(kept)
    kept.switch_prompt(B, "keep")
    plain.commit()
    assert torch.equal(kept.cache.k, plain.cache.k) and kept.cache.frames == plain.cache.frames


def test_reset_is_a_hard_cut_to_a_fresh_stream_of_the_new_prompt():
    t2v, settings = tiny_t2v(), CausalConfig(3, window=6)
    stream = open_stream(t2v, settings)
    next(stream), next(stream)
    stream.switch_prompt([B, B], "reset")
    fresh = open_stream(t2v, settings, prompt=B)
    fresh.generator.set_state(stream.generator.get_state())
    chunk = next(stream)
    assert chunk.start == 6 and stream.position == 3 and stream.cache.frames == []
    assert torch.allclose(chunk.latents, next(fresh).latents, **TOL)


def test_the_first_image_is_the_first_chunk_and_the_context_of_the_next():
    t2v, settings = tiny_t2v(), CausalConfig(3, window=12)
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    stream = open_stream(t2v, settings, image=image)
    first = next(stream)
    assert first.latents.shape == (2, 1, 3, 8, 8) and torch.equal(first.frames[:, 0], image.expand(2, -1, -1, -1))
    expected = recomputed_next_chunk(t2v, stream, first.latents, A, [1])
    second = next(stream)
    assert second.start == 1 and stream.cache.frames == [0]
    assert torch.allclose(second.latents, expected, **TOL)
    assert not torch.allclose(second.latents, next(open_stream(t2v, settings)).latents, atol=1e-3)


def test_stream_video_applies_switches_and_the_image_at_chunk_boundaries():
    t2v, settings = tiny_t2v(), CausalConfig(3, window=6)
    chunks = list(stream_video(t2v, IdentityCodec(), [A], 12, 8, 8, settings, switches={4: B}, switch_mode="keep"))
    assert [c.start for c in chunks] == [0, 3, 6, 9]  # frame 4 lies in the second chunk: the switch waits for 6
    video = torch.cat([c.frames for c in chunks], 1)
    plain = torch.cat([c.frames for c in stream_video(t2v, IdentityCodec(), [A], 12, 8, 8, settings)], 1)
    assert torch.equal(video[:, :6], plain[:, :6]) and not torch.allclose(video[:, 6:], plain[:, 6:], atol=1e-4)
    image = torch.zeros(1, 3, 8, 8)
    chunks = list(stream_video(t2v, IdentityCodec(), [A], 7, 8, 8, settings, image=image))
    assert [c.start for c in chunks] == [0, 1, 4]


def test_an_open_ended_stream_rolls_its_cache_forever():
    t2v = tiny_t2v()
    stream = open_stream(t2v, CausalConfig(1, window=3, sink=1))
    for _ in range(20):
        chunk = next(stream)
    assert chunk.start == 19 and stream.cache.frames == [0, 17, 18]
    assert torch.isfinite(chunk.frames).all()


def test_bad_requests_name_the_problem():
    t2v, settings = tiny_t2v(), CausalConfig(3, window=6)
    stream = open_stream(t2v, settings)
    with pytest.raises(ValueError, match="switch mode"):
        stream.switch_prompt(B, "fade")
    with pytest.raises(ValueError, match="2 videos, got 1 prompts"):
        stream.switch_prompt([B])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stream.switch_prompt("a purple hexagon")
    assert stream.prompts == [A, A] and stream.switches == []  # a refused switch changes nothing
    with pytest.raises(ValueError, match="finite attention window"):
        open_stream(t2v, CausalConfig(3))
    with pytest.raises(ValueError, match="at least one prompt"):
        VideoStream(t2v, IdentityCodec(), [], 8, 8, settings)
    with pytest.raises(ValueError, match="first image is 16x8"):
        open_stream(t2v, settings, image=torch.zeros(1, 3, 8, 16))
    with pytest.raises(ValueError, match=r"tensor \[B, 3, H, W\]"):
        open_stream(t2v, settings, image=torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"must lie in 1 \.\. 3 .*chunks start at frames \[0, 3\]"):
        stream_video(t2v, IdentityCodec(), [A], 6, 8, 8, settings, switches={4: B})  # chunks start at 0, 3
    with pytest.raises(ValueError, match="whole number of chunks"):  # with an image: 1 + a multiple of 3
        stream_video(t2v, IdentityCodec(), [A], 6, 8, 8, settings, image=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="need context='cache'"):
        stream_video(t2v, IdentityCodec(), [A], 6, 8, 8, settings, context="recompute_step", switches={3: B})


def expected_recache_keys(t2v, stream, video, prompt):
    """Every layer's keys of the frames the cache holds, recomputed under ``prompt`` in one full-sequence
    pass at their own positions: the held frames of one chunk attend to each other and to those of the
    chunks before (block-causal by chunk, as when they were first committed)."""
    held, fpb = stream.cache.frames, stream.settings.frames_per_block
    run = torch.tensor([f // fpb for f in held])
    mask = (run[None, :] <= run[:, None]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    text_kv = t2v.dit.text_kv(*t2v.encode_text([prompt, prompt]))
    _, kv = t2v.dit(
        video[:, held],
        torch.zeros(2, len(held)),
        text_kv=text_kv,
        attn_mask=mask,
        return_kv=True,
        frame_positions=torch.tensor(held),
    )
    return held, kv


def assert_cache_holds(stream, held, kv):
    slot_of = {f: s for s, f in enumerate(stream.cache.frame_of_slot)}
    for layer, (k, _) in enumerate(kv):
        for i, f in enumerate(held):
            s = slot_of[f]
            assert torch.allclose(stream.cache.k[layer, :, :, s * 4 : (s + 1) * 4], k[:, :, i * 4 : (i + 1) * 4], **TOL)


@pytest.mark.parametrize("window,sink", [(5, 0), (4, 1), (7, 2)])
def test_recache_when_the_window_is_not_a_whole_number_of_chunks(window, sink):
    """A window of 5 frames with chunks of 3 holds 2 past frames: the roll cuts chunks, and recache must
    recompute exactly the frames held (parts of chunks), each attending only to what came before it."""
    t2v, settings = tiny_t2v(), CausalConfig(3, window=window, sink=sink)
    stream = open_stream(t2v, settings)
    video = torch.cat([next(stream).latents for _ in range(5)], 1)
    stream.switch_prompt(B, "recache")
    held, kv = expected_recache_keys(t2v, stream, video, B)
    assert len(held) == stream.cache.capacity and any(f % 3 for f in held[sink:])  # a chunk cut by the roll
    assert_cache_holds(stream, held, kv)


def test_the_first_image_is_committed_clean_whatever_the_context_timestep():
    """With a context timestep above 0, generated chunks are committed re-noised, but the given image is
    committed as it is, at t = 0 (as the reference's image-to-video does), also after a recache."""
    t2v, settings = tiny_t2v(), CausalConfig(3, window=12, context_timestep=500.0)
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    stream = open_stream(t2v, settings, image=image)
    first = next(stream)
    stream.commit()
    text_kv = t2v.dit.text_kv(*t2v.encode_text([A, A]))
    _, kv = t2v.dit(first.latents, torch.zeros(2, 1), text_kv=text_kv, return_kv=True)
    assert_cache_holds(stream, [0], kv)
    next(stream), next(stream)
    stream.switch_prompt(B, "recache")
    _, kv = t2v.dit(first.latents, torch.zeros(2, 1), text_kv=t2v.dit.text_kv(*t2v.encode_text([B, B])), return_kv=True)
    assert_cache_holds(stream, [0], kv)


def test_a_batch_of_distinct_first_images():
    """Each video of a batch starts from its own image, and continues as if streamed alone."""
    t2v, settings = tiny_t2v(), CausalConfig(3, window=12)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    stream = open_stream(t2v, settings, image=images)
    first, second = next(stream), next(stream)
    assert torch.equal(first.frames[:, 0], images)
    assert not torch.allclose(second.latents[0], second.latents[1], atol=1e-3)
    expected = recomputed_next_chunk(t2v, open_stream(t2v, settings, image=images), first.latents, A, [1])
    assert torch.allclose(second.latents, expected, **TOL)
    for i in range(2):  # video i alone, from the same noise
        alone = open_stream(t2v, settings, image=images[i : i + 1].expand(2, -1, -1, -1))
        next(alone)
        assert torch.allclose(next(alone).latents[i], second.latents[i], **TOL)


@pytest.mark.parametrize("kind", ["compact", "fp8"])
def test_kv_cache_kinds_stream_the_same_video(kind):
    """``causal.kv_cache``: compact (no slots for the chunk, concatenated per layer) streams exactly the same
    video as the default, in fewer bytes; fp8 a close one, in a quarter of fp32's bytes."""
    settings = CausalConfig(3, window=6, sink=1)
    t2v = tiny_t2v()
    auto, other = open_stream(t2v, settings), open_stream(t2v, CausalConfig(3, window=6, sink=1, kv_cache=kind))
    a = torch.cat([next(auto).latents for _ in range(5)], 1)
    b = torch.cat([next(other).latents for _ in range(5)], 1)
    assert other.cache.k.numel() * other.cache.k.element_size() < auto.cache.k.numel() * auto.cache.k.element_size()
    if kind == "compact":
        assert other.cache.k.shape[3] == other.cache.capacity * 4 and torch.allclose(a, b, **TOL)
    else:
        assert 0 < (a - b).norm() / a.norm() < 0.05
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        CausalConfig(3, window=6, kv_cache="int4").validate()


def one_pass_reference(t2v, latents, start, prompt, sink_kv):
    """LongLive's re-cache as published, written here: the frames from ``start`` run once under ``prompt`` at
    t = 0, at their absolute positions; at every layer they attend, without a mask, to the kept sink's
    keys/values (``sink_kv[layer]``, or none) and to each other. Returns every layer's (keys, values)."""
    dit, record = t2v.dit, []
    saved = [block.self_attn.forward for block in dit.blocks]

    def attention(attn, layer):
        def forward(x, rope, attn_mask=None, kv_prefix=None, return_kv=False):
            q, k, v = attn.qkv(x, rope)
            record.append((k, v))
            if sink_kv is not None:
                k, v = torch.cat([sink_kv[layer][0], k], 2), torch.cat([sink_kv[layer][1], v], 2)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return attn.o(out.transpose(1, 2).flatten(2)), None

        return forward

    for layer, block in enumerate(dit.blocks):
        block.self_attn.forward = attention(block.self_attn, layer)
    try:
        text_kv = dit.text_kv(*t2v.encode_text([prompt, prompt]))
        dit(latents, torch.zeros(latents.shape[:2]), text_kv=text_kv, frame_offset=start)
    finally:
        for block, fwd in zip(dit.blocks, saved, strict=True):
            block.self_attn.forward = fwd
    return record


@pytest.mark.parametrize("chunks,start", [(2, 0), (5, 9)])
def test_one_pass_recache_equals_longlive_s_definition(chunks, start):
    """Window 6 + sink 3 (local_attn_size 9). A switch at frame 6 recomputes frames 0..5 together, the sink
    too; at frame 15 it recomputes 9..14 against the old sink, which keeps its keys; the cache then holds the
    sink and the last frames, and its positions do not move."""
    t2v = tiny_t2v()
    stream = open_stream(t2v, CausalConfig(3, window=6, sink=3))
    video = torch.cat([next(stream).latents for _ in range(chunks)], 1)
    stream.commit()
    sink_before = [stream.cache.context(i) for i in range(len(t2v.dit.blocks))]
    sink_before = [(k[:, :, :12].clone(), v[:, :, :12].clone()) for k, v in sink_before]  # slots 0..2
    stream.switch_prompt(B, "one-pass")
    frame = 3 * chunks
    assert stream.cache.next_frame == frame and stream.position == frame
    kv = one_pass_reference(t2v, video[:, start:], start, B, sink_before if start else None)
    held = stream.cache.frames
    assert held == [0, 1, 2, *range(frame - 3, frame)]
    recomputed = [f for f in held if f >= start]
    assert_cache_holds(stream, recomputed, [(k[:, :, (recomputed[0] - start) * 4 :], v) for k, v in kv])
    if start:  # the sink kept the old prompt's keys and values
        for layer, (k, v) in enumerate(sink_before):
            assert torch.equal(stream.cache.k[layer, :, :, :12], k) and torch.equal(stream.cache.v[layer, :, :, :12], v)
    next(stream)  # and the stream goes on


def test_one_pass_differs_from_the_causal_recache():
    nexts = {}
    for mode in ("one-pass", "recache"):
        torch.manual_seed(0)
        t2v = tiny_t2v()
        stream = open_stream(t2v, CausalConfig(3, window=6, sink=3))
        for _ in range(4):
            next(stream)
        stream.switch_prompt(B, mode)
        nexts[mode] = next(stream).latents
    assert not torch.allclose(nexts["one-pass"], nexts["recache"], atol=1e-4)
