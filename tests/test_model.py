import pytest
import torch

from selfforcing.data.shapes import ShapesWorldConfig
from selfforcing.models import DIT_PRESETS, ShapesTextEncoder, VideoDiT, dit_config
from selfforcing.models.attention import SelfAttention
from selfforcing.models.codec import IdentityCodec
from selfforcing.models.rope import apply_rope, rope_3d_angles, rope_axis_dims


def tiny_model(**kw) -> VideoDiT:
    return VideoDiT(dit_config("tiny", **kw)).eval()


def inputs(b=2, f=4, h=8, w=8, text_len=5):
    return torch.randn(b, f, 3, h, w), torch.rand(b) * 1000, torch.randn(b, text_len, 32)


def frame_causal_mask(frames: int, tokens_per_frame: int) -> torch.Tensor:
    """True where a token of frame i may attend a token of frame j <= i."""
    idx = torch.arange(frames).repeat_interleave(tokens_per_frame)
    return idx[:, None] >= idx[None, :]


def test_output_shape_and_untrained_model_predicts_zero():
    m = tiny_model()
    x, t, ctx = inputs()
    out = m(x, t, ctx)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised head
    torch.nn.init.normal_(m.head.head.weight, std=0.02)
    assert m(x, t, ctx).abs().sum() > 0


def test_per_frame_timesteps():
    m = tiny_model()
    torch.nn.init.normal_(m.head.head.weight, std=0.1)
    x, t, ctx = inputs()
    same = m(x, t[:, None].expand(2, 4), ctx)
    assert torch.allclose(same, m(x, t, ctx), atol=1e-6)  # [B] is broadcast over frames
    t2 = t[:, None].repeat(1, 4)
    t2[:, -1] = 999.0
    mask = frame_causal_mask(4, 4)
    a, b = m(x, t[:, None].repeat(1, 4), ctx, attn_mask=mask), m(x, t2, ctx, attn_mask=mask)
    # with a frame-causal mask, the last frame's timestep changes only the last frame's output
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3], b[:, 3], atol=1e-3)
    with pytest.raises(ValueError, match="t must be"):
        m(x, torch.rand(2, 3), ctx)


def test_causal_mask_makes_earlier_frames_independent_of_later_ones():
    m = tiny_model()
    torch.nn.init.normal_(m.head.head.weight, std=0.1)
    x, t, ctx = inputs()
    mask = frame_causal_mask(4, 4)
    x2 = x.clone()
    x2[:, 2:] = torch.randn_like(x2[:, 2:])
    a, b = m(x, t, ctx, attn_mask=mask), m(x2, t, ctx, attn_mask=mask)
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6)
    assert not torch.allclose(a[:, 2:], b[:, 2:], atol=1e-3)
    # without the mask the model is bidirectional
    assert not torch.allclose(m(x, t, ctx)[:, :2], m(x2, t, ctx)[:, :2], atol=1e-4)


def test_attention_with_kv_prefix_equals_masked_full_sequence():
    """The KV-cache hook: attending to earlier tokens' keys/values equals the causal full-sequence pass."""
    attn = SelfAttention(32, 2).eval()
    x = torch.randn(2, 12, 32)  # 3 frames of 4 tokens (a 1 x 2 x 2 grid)
    rope = rope_3d_angles(3, 2, 2, 16)
    full = attn(x, rope, attn_mask=frame_causal_mask(3, 4))
    _, k, v = attn.qkv(x[:, :8], rope[:8])
    last = attn(x[:, 8:], rope[8:], kv_prefix=(k, v))
    assert torch.allclose(full[:, 8:], last, atol=1e-5)


def test_rope_is_relative_in_every_axis():
    d = 24
    assert sum(rope_axis_dims(d)) == d and rope_axis_dims(128) == (44, 42, 42)
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    angles = rope_3d_angles(6, 5, 5, d)  # tokens ordered (frame, row, col)

    def score(i, j):
        return float((apply_rope(q, angles[i : i + 1]) * apply_rope(k, angles[j : j + 1])).sum())

    tok = lambda f, r, c: (f * 5 + r) * 5 + c  # noqa: E731
    assert score(tok(1, 2, 3), tok(0, 1, 1)) == pytest.approx(score(tok(5, 3, 4), tok(4, 2, 2)), abs=1e-5)
    assert score(tok(1, 2, 3), tok(0, 1, 1)) != pytest.approx(score(tok(1, 2, 3), tok(0, 1, 2)), abs=1e-3)
    # frame_offset gives absolute positions
    assert torch.allclose(rope_3d_angles(2, 5, 5, d, frame_offset=4), angles[4 * 25 :], atol=1e-12)


def test_patch_size_mismatch_is_a_clear_error():
    m = tiny_model()
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(torch.randn(1, 2, 3, 6, 8), torch.rand(1), torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, 2, 4, 8, 8), torch.rand(1), torch.randn(1, 3, 32))


def test_wan_presets_have_the_reference_sizes():
    cfg = DIT_PRESETS["wan2.1-1.3b"]
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.ffn_dim) == (1536, 30, 12, 128, 8960)
    with torch.device("meta"):
        n13 = VideoDiT(cfg).num_params()
        n14 = VideoDiT(DIT_PRESETS["wan2.1-14b"]).num_params()
    assert n13 == pytest.approx(1.419e9, rel=1e-3)  # Wan2.1 counts it as "1.3B"
    assert n14 == pytest.approx(14.29e9, rel=1e-3)
    with torch.device("meta"):
        m = VideoDiT(cfg)
    names = dict(m.named_parameters())
    assert names["blocks.0.self_attn.norm_q.weight"].shape == (1536,)
    assert names["blocks.0.modulation"].shape == (1, 6, 1536) and names["head.modulation"].shape == (1, 2, 1536)
    assert names["patch_embedding.weight"].shape == (1536, 16, 1, 2, 2)
    assert names["text_embedding.0.weight"].shape == (1536, 4096)


def test_text_encoder_vocabulary_and_cfg_prompt():
    vocab = ShapesWorldConfig().vocabulary()
    enc = ShapesTextEncoder(vocab, dim=32, num_layers=1)
    emb, mask = enc(["a large red circle moving right", ""])
    assert emb.shape == (2, 6, 32) and mask.tolist() == [[True] * 6, [True] + [False] * 5]
    with pytest.raises(ValueError, match=r"outside the vocabulary: \['purple'\]"):
        enc(["a large purple circle"])
    lenient = ShapesTextEncoder(vocab, dim=32, num_layers=1, unknown_words="unk")
    ids, _ = lenient.token_ids(["purple circle"])
    assert ids[0, 0] == lenient.index["<unk>"]


def test_identity_codec_and_frame_count_checks():
    codec = IdentityCodec()
    x = torch.rand(1, 5, 3, 8, 8) * 2 - 1
    assert torch.equal(codec.decode(codec.encode(x)), x)
    assert codec.latent_shape(5, 8, 8) == (5, 3, 8, 8)

    class WanLike(IdentityCodec):
        latent_channels, spatial_compression, temporal_compression, keeps_first_frame = 16, 8, 4, True

    assert WanLike().latent_shape(81, 480, 832) == (21, 16, 60, 104)
    assert WanLike().pixel_frames(21) == 81
    with pytest.raises(ValueError, match="1 \\+ 4 \\* k"):
        WanLike().latent_shape(80, 480, 832)


def test_cross_attention_with_precomputed_text_kv_is_identical():
    """The text keys/values can be computed once per prompt and reused for every chunk."""
    from selfforcing.models.attention import CrossAttention

    attn = CrossAttention(32, 2).eval()
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 5, 32)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    assert torch.equal(attn(x, ctx, mask), attn(x, ctx, mask, text_kv=attn.text_kv(ctx)))
    # padded text positions are ignored
    ctx2 = ctx.clone()
    ctx2[1, 3:] = torch.randn(2, 32)
    assert torch.allclose(attn(x, ctx, mask)[1], attn(x, ctx2, mask)[1], atol=1e-6)


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    m = tiny_model()
    torch.nn.init.normal_(m.head.head.weight, std=0.1)
    x, t, ctx = inputs()
    grads, calls = [], []
    m.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    for flag in (False, True):
        m.gradient_checkpointing = flag
        m.zero_grad()
        calls.clear()
        out = m(x, t, ctx)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in m.parameters()], len(calls)))
    assert (grads[0][2], grads[1][2]) == (1, 2)  # with checkpointing the block runs again in backward
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
