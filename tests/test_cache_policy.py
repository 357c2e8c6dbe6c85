"""Cache policies (models/cache_policy.py) against a reference written here from the published definition:
Reward Forcing's cache (keys stored before RoPE and rotated by slot, an EMA sink at each eviction) and
LongLive's infinite mode (the same rotation, a fixed sink)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from selfforcing.config import CausalConfig, ConfigError, load_config
from selfforcing.models.cache_policy import CachePolicy, slot_positions
from selfforcing.models.kv_cache import KVCache
from selfforcing.models.rope import apply_rope, rope_3d_angles

from .test_causal import inputs, random_model

TOL = dict(atol=1e-5, rtol=1e-5)
N = 4  # tokens per frame of ``inputs`` (8x8 latents, patch 4)


class ReferenceCache:
    """One layer's cache as Reward Forcing's code keeps it: at most ``size`` frames (``local_attn_size``,
    sink and current chunk included) of keys before RoPE and values, in time order, the first ``sink``
    frames the sink. A pass of a new chunk first rolls out the oldest non-sink frames it has no room for
    (blending them into the sink: ``alpha``), then appends its own; a later pass of the same chunk
    overwrites them. Keys are rotated at 0..n-1, the chunk's queries at n-F..n-1."""

    def __init__(self, size: int, sink: int, alpha: float | None):
        self.size, self.sink, self.alpha = size, sink, alpha
        self.frames: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.end = 0  # frames written so far

    def attend(self, attn, x: torch.Tensor, start: int, grid: tuple[int, int]) -> torch.Tensor:
        q, k, v = attn.project(x)
        f = x.shape[1] // N
        new = [(k[:, :, i * N : (i + 1) * N], v[:, :, i * N : (i + 1) * N]) for i in range(f)]
        if start + f > self.end:  # a new chunk
            extra = len(self.frames) + f - self.size
            if extra > 0:
                evicted = self.frames[self.sink : self.sink + extra]
                del self.frames[self.sink : self.sink + extra]
                if self.alpha is not None and len(evicted) == self.sink:
                    a = self.alpha
                    self.frames[: self.sink] = [
                        (a * sk + (1 - a) * ek, a * sv + (1 - a) * ev)
                        for (sk, sv), (ek, ev) in zip(self.frames[: self.sink], evicted, strict=True)
                    ]
                elif self.alpha is not None:
                    for j in range(min(len(evicted), self.sink)):
                        self.frames[j] = evicted[j]
            self.frames += new
            self.end = start + f
        else:  # the same chunk again (another step, or its commit)
            self.frames[-f:] = new
        n, hd = len(self.frames), k.shape[-1]
        keys = torch.cat([fk for fk, _ in self.frames], dim=2)
        values = torch.cat([fv for _, fv in self.frames], dim=2)
        keys = apply_rope(keys, rope_3d_angles(n, *grid, hd, frame_positions=torch.arange(n)))
        q = apply_rope(q, rope_3d_angles(f, *grid, hd, frame_positions=torch.arange(n - f, n)))
        return attn.o(rearrange(F.scaled_dot_product_attention(q, keys, values), "b h l d -> b l (h d)"))


@contextlib.contextmanager
def reference_attention(m, caches: list[ReferenceCache], start: int):
    """Every block's self-attention replaced by its ``ReferenceCache`` for one forward of frames from ``start``."""
    saved = [block.self_attn.forward for block in m.blocks]
    for block, cache in zip(m.blocks, caches, strict=True):
        attn = block.self_attn

        def forward(x, rope, attn_mask=None, kv_prefix=None, return_kv=False, attn=attn, cache=cache):
            return cache.attend(attn, x, start, (2, 2)), None

        block.self_attn.forward = forward
    try:
        yield
    finally:
        for block, fwd in zip(m.blocks, saved, strict=True):
            block.self_attn.forward = fwd


def stream_both(fpb, size, sink, alpha, frames, steps=2):
    """Each chunk denoised ``steps`` times then committed at t = 0, with our cache and with the reference."""
    m = random_model()
    x, t, ctx = inputs(frames)
    clean = torch.randn_like(x)
    text_kv = m.text_kv(ctx)
    policy = CachePolicy("slot", alpha)
    cache = KVCache.for_model(m, 2, N, fpb, size - sink, sink, policy=policy)
    ref = [ReferenceCache(size, sink, alpha) for _ in m.blocks]
    ours, theirs = [], []
    with torch.no_grad():
        for s in range(0, frames, fpb):
            c = slice(s, s + fpb)
            for step in range(steps):
                t_step = t[:, c] * (1 - step / steps)
                ours.append(m(x[:, c], t_step, text_kv=text_kv, kv_cache=cache, frame_offset=s))
                with reference_attention(m, ref, s):
                    theirs.append(m(x[:, c], t_step, text_kv=text_kv))
            zero = torch.zeros(2, fpb)
            m(clean[:, c], zero, text_kv=text_kv, kv_cache=cache, frame_offset=s, commit=True)
            with reference_attention(m, ref, s):
                m(clean[:, c], zero, text_kv=text_kv)
    return m, cache, ours, theirs


@pytest.mark.parametrize(
    "fpb,size,sink,alpha",
    [
        (3, 9, 3, 0.999),  # Reward Forcing's release: local_attn_size 9, sink 3, chunks of 3
        (3, 9, 3, 0.5),  # a strong blend, so a wrong sink shows
        (3, 12, 3, None),  # LongLive's infinite mode: by slot, the sink fixed
        (1, 4, 2, 0.5),  # frame-wise: one evicted frame replaces the first sink frame
        (3, 6, 0, None),  # no sink at all
    ],
)
def test_slot_rope_and_ema_sink_equal_the_reference_chunk_by_chunk(fpb, size, sink, alpha):
    frames = 8 * fpb if fpb > 1 else 12  # several evictions
    _, cache, ours, theirs = stream_both(fpb, size, sink, alpha, frames)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.allclose(a, b, **TOL), f"pass {i}: {(a - b).abs().max():.2e}"
    assert cache.num_frames == cache.capacity == size - fpb


def test_an_ema_sink_changes_the_video_only_after_the_first_eviction():
    runs = {}
    for alpha in (None, 0.5):
        torch.manual_seed(0)
        runs[alpha] = stream_both(3, 9, 3, alpha, 15, steps=1)[2]
    before, after = slice(0, 3), slice(3, 5)  # the commit of chunk 2 evicts chunk 1 (frames 3..5) first
    assert all(torch.equal(a, b) for a, b in zip(runs[None][before], runs[0.5][before], strict=True))
    assert not torch.allclose(runs[None][after][0], runs[0.5][after][0], atol=1e-4)


def test_slot_positions_equal_absolute_ones_until_the_cache_rolls():
    """While no frame has been evicted the held frames sit at their absolute positions, so both policies give
    the same video; after the first eviction they differ, when there is a sink (without one every position
    shifts alike, and RoPE sees only differences: the same video again)."""
    m = random_model()
    x, t, ctx = inputs(12)
    text_kv = m.text_kv(ctx)
    outs = {}
    for rope, sink in (("absolute", 3), ("slot", 3), ("slot, no sink", 0), ("absolute, no sink", 0)):
        cache = KVCache.for_model(m, 2, N, 3, 6, sink, policy=CachePolicy(rope.split(",")[0]))
        outs[rope] = []
        with torch.no_grad():
            for s in range(0, 12, 3):
                outs[rope].append(m(x[:, s : s + 3], t[:, s : s + 3], text_kv=text_kv, kv_cache=cache, frame_offset=s))
                m(x[:, s : s + 3], torch.zeros(2, 3), text_kv=text_kv, kv_cache=cache, frame_offset=s, commit=True)
    a, b = outs["absolute"], outs["slot"]
    assert all(torch.allclose(a[i], b[i], **TOL) for i in (0, 1, 2))  # chunk 2 sees frames 3..5 at 3..5 both ways
    assert not torch.allclose(a[3], b[3], atol=1e-4)  # chunk 3 sits at 6..8 by slot, at 9..11 absolutely
    for c, d in zip(outs["slot, no sink"], outs["absolute, no sink"], strict=True):
        assert torch.allclose(c, d, atol=1e-5)


def test_slot_positions_rank_the_held_frames():
    assert slot_positions([0, 1, 9, 7, 8, -1]).tolist() == [0, 1, 4, 2, 3]


def test_policy_errors():
    with pytest.raises(ValueError, match="causal.rope must be one of"):
        CausalConfig(rope="relative").validate()
    with pytest.raises(ValueError, match="sink_ema must be in"):
        CausalConfig(sink_ema=1.5).validate()
    with pytest.raises(ConfigError, match="streaming rules"):
        load_config("configs/sf_dmd_toy.yaml", ["causal.rope=slot"])
    m = random_model()
    m.gradient_checkpointing = True
    x, t, ctx = inputs(3)
    cache = KVCache.for_model(m, 2, N, 3, 6, 0, policy=CachePolicy("slot"))
    with pytest.raises(ValueError, match="rope='slot' is for inference"):
        m(x, t, ctx, kv_cache=cache)
    with torch.no_grad(), pytest.raises(ValueError, match="pass no frame_positions"):
        m(x, t, ctx, kv_cache=cache, frame_positions=torch.arange(3))


def test_an_fp8_cache_keeps_the_policy():
    """The fp8 cache dequantises the sink to blend it and rotates its held keys by slot: close to fp32."""
    m = random_model()
    x, t, ctx = inputs(15)
    text_kv = m.text_kv(ctx)
    outs = []
    for dtype in (None, torch.float8_e4m3fn):
        cache = KVCache.for_model(m, 2, N, 3, 6, 3, dtype=dtype, policy=CachePolicy("slot", 0.5))
        with torch.no_grad():
            for s in range(0, 15, 3):
                out = m(x[:, s : s + 3], t[:, s : s + 3], text_kv=text_kv, kv_cache=cache, frame_offset=s)
                m(x[:, s : s + 3], torch.zeros(2, 3), text_kv=text_kv, kv_cache=cache, frame_offset=s, commit=True)
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max() < 0.1 * outs[0].abs().max()
