"""Krea Realtime's scheme (inference/rebuild.py) and its prompt blend, against references written here from
the definition (krea-ai/realtime-video release_server.py): every chunk is the full-sequence model over
[its context, itself] with the block-causal mask, the context rebuilt from the latents made so far."""

import pytest
import torch

from selfforcing.config import CausalConfig
from selfforcing.diffusion.samplers import sample_few_step
from selfforcing.inference.recache import blend_weights
from selfforcing.inference.stream import stream_video
from selfforcing.inference.video_stream import VideoStream
from selfforcing.models.causal import block_causal_mask
from selfforcing.models.codec import IdentityCodec

from .test_causal import tiny_t2v

A, B = "a red circle", "a blue square"
KREA = dict(denoising_steps=[1000.0, 750.0, 500.0, 250.0, 0.0], window=6, scheme="rebuild")


class ClampCodec(IdentityCodec):
    """Pixel space whose decode clamps to [-0.5, 0.5]: a re-encoded frame differs from its latent."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-0.5, 0.5)


def context_of(latents: list[torch.Tensor], position: int, k: int = 3, f: int = 3) -> torch.Tensor:
    """The definition: latent 0 and the last latents while position < K + f; afterwards the re-encode of the
    last pixel frame of latent position - K (``ClampCodec``: the latent, clamped as decoded) and the last
    K - 1 latents."""
    if position <= k:
        return torch.cat(latents[:position], dim=1)
    if position < k + f:
        return torch.cat([latents[0], *latents[position - k + 1 : position]], dim=1)
    return torch.cat([latents[position - k].clamp(-0.5, 0.5), *latents[position - k + 1 : position]], dim=1)


def reference(t2v, settings: CausalConfig, chunks: int, seed: int) -> list[torch.Tensor]:
    """Chunk by chunk: noise, then the few steps (t = 0 last), each a masked full-sequence pass over [its
    context at t = 0, the chunk], block-causal by chunks of 3 (the context sees no later frame)."""
    g, f, latents, out = torch.Generator().manual_seed(seed), 3, [], []
    text_kv = t2v.dit.text_kv(*t2v.encode_text([A]))
    for i in range(chunks):
        ctx = context_of(latents, i * f) if i else torch.zeros(1, 0, 3, 8, 8)
        k = ctx.shape[1]

        def velocity(x, sigma, ctx=ctx, k=k):
            t = torch.cat([torch.zeros(1, k), sigma], dim=1) * 1000
            mask = block_causal_mask(k + f, 4, f)
            return t2v.dit(torch.cat([ctx, x], dim=1), t, text_kv=text_kv, attn_mask=mask)[:, k:]

        noise = torch.randn(1, f, 3, 8, 8, generator=g)
        x0 = sample_few_step(velocity, noise, settings.sigmas(), generator=g, zero_sigma=settings.zero_sigma)
        latents += list(x0.split(1, dim=1))
        out.append(x0)
    return out


def prefixed(dit, x, t, text_kv, kv, k):
    """The chunk attending to fixed context keys/values ``kv`` (per layer) at positions 0..k-1, itself after."""
    from selfforcing.models.kv_cache import KVCache

    cache = KVCache.for_model(dit, 1, 4, 3, k + 3)
    cache.commit(0, kv)
    return dit(x, t, text_kv=text_kv, kv_cache=cache, frame_offset=k)


def test_rebuild_equals_the_definition_chunk_by_chunk():
    t2v, settings = tiny_t2v(), CausalConfig(3, **KREA)
    ours = [c.latents for c in stream_video(t2v, ClampCodec(), [A], 15, 8, 8, settings, seed=2)]
    theirs = reference(t2v, settings, 5, 2)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"chunk {i}: {(a - b).abs().max():.2e}"


def test_a_blend_moves_the_text_over_four_chunks_and_the_context_reads_the_text_before():
    """Krea's switch: embeddings lerp(old, new, w) with w = 0, 1/3, 2/3, 1 over the next four chunks."""
    t2v, settings = tiny_t2v(), CausalConfig(3, **KREA)
    stream = VideoStream(t2v, ClampCodec(), [A], 8, 8, settings, seed=2)
    ours = [next(stream).latents for _ in range(2)]
    stream.switch_prompt(B, "blend")
    ours += [next(stream).latents for _ in range(5)]
    assert stream.prompts == [B] and blend_weights() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    (ea, ma), (eb, mb) = t2v.encode_text([A]), t2v.encode_text([B])
    texts = [ea, ea, *[torch.lerp(ea, eb, w) for w in blend_weights()], eb]
    mask = ma | mb
    g, f, latents = torch.Generator().manual_seed(2), 3, []
    for i, emb in enumerate(texts):  # the reference, with each chunk's text (and the one before for its context)
        p = i * f
        ctx = context_of(latents, p) if p else torch.zeros(1, 0, 3, 8, 8)
        k = ctx.shape[1]
        text_kv = t2v.dit.text_kv(emb, mask if i >= 2 else ma)
        before = t2v.dit.text_kv(texts[max(i - 1, 0)], mask if i >= 3 else ma)

        def velocity(x, sigma, ctx=ctx, k=k, text_kv=text_kv, before=before):
            t = torch.cat([torch.zeros(1, k), sigma], dim=1) * 1000
            if k == 0:
                return t2v.dit(x, t, text_kv=text_kv)
            _, kv = t2v.dit(ctx, t[:, :k], text_kv=before, attn_mask=block_causal_mask(k, 4, f), return_kv=True)
            return prefixed(t2v.dit, x, t[:, k:], text_kv, kv, k)

        noise = torch.randn(1, f, 3, 8, 8, generator=g)
        x0 = sample_few_step(velocity, noise, settings.sigmas(), generator=g, zero_sigma=settings.zero_sigma)
        latents += list(x0.split(1, dim=1))
        assert torch.allclose(ours[i], x0, atol=1e-5, rtol=1e-5), f"chunk {i}"


def test_rebuild_refusals():
    t2v = tiny_t2v()
    with pytest.raises(ValueError, match="keeps no sink"):
        VideoStream(t2v, IdentityCodec(), [A], 8, 8, CausalConfig(3, **KREA, sink=3), seed=0)


def test_the_history_keeps_latent_zero_while_it_can_still_be_context():
    """With K = 2 and a one-frame image chunk first, the chunk at position 4 still takes latent 0 as its first
    context frame (4 < K + f), so latent 0 outlives the older latents after it."""
    from selfforcing.inference.rebuild import Rebuild
    from selfforcing.models.kv_cache import KVCache

    t2v = tiny_t2v()
    cache = KVCache.for_model(t2v.dit, 1, 4, 3, 5)  # window 5, chunks of 3: K = 2
    rebuild = Rebuild(t2v, cache, IdentityCodec())
    latents = torch.randn(1, 4, 3, 8, 8)
    rebuild.keep(latents[:, :1], latents[:, :1])  # the image chunk
    rebuild.keep(latents[:, 1:], latents[:, 1:])
    kept = torch.cat(rebuild.latents, dim=1)
    assert torch.equal(kept, latents[:, [0, 2, 3]])
    text_kv = t2v.dit.text_kv(*t2v.encode_text([A]))
    assert rebuild.prepare(text_kv, 4) == 2 and cache.frames == [0, 1]  # latent 0 and latent 3
