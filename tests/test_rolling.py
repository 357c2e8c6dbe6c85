"""Rolling Forcing's denoising scheme (inference/rolling.py) against its inference loop and attention written
here from the official code's definition (TencentARC/RollingForcing: pipeline/rolling_forcing_inference.py,
wan/modules/causal_model.py), with keys at their absolute positions and the anchor rotated explicitly."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from selfforcing.config import CausalConfig
from selfforcing.diffusion.flow_matching import add_noise, x0_from_velocity
from selfforcing.inference.stream import stream_video
from selfforcing.inference.video_stream import VideoStream
from selfforcing.models.codec import IdentityCodec
from selfforcing.models.rope import apply_rope, rope_3d_angles

from .test_causal import tiny_t2v

A_PROMPT = "a red circle"
N = 4  # tokens per 8x8 frame (patch 4): a 2x2 grid


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x: [B, heads, frames * N, D]`` rotated with every frame at its position."""
    return apply_rope(x, rope_3d_angles(len(positions), 2, 2, x.shape[-1], frame_positions=positions))


class OfficialRolling:
    """The official loop: window w covers chunks max(0, w-S+1) .. min(n-1, w), chunk b at level w - b; one pass
    over the window; every chunk below the last level re-noised to its next level; the window's first chunk
    committed at t = 0. Its attention: a window pass starting at frame s sees the anchor (chunk 0, keys stored
    before RoPE, rotated to sit just before what follows), the last A - q - f committed frames before s, and
    itself (q frames); a window starting at 0 sees only itself; a commit pass sees the last A frames up to its
    end. Noise: a chunk's noise as it enters, then each re-noise, oldest chunk first."""

    def __init__(self, t2v, budget: int, f: int, sigmas: torch.Tensor, seed: int):
        self.t2v, self.budget, self.f, self.sigmas = t2v, budget, f, sigmas
        self.g = torch.Generator().manual_seed(seed)
        self.text_kv = t2v.dit.text_kv(*t2v.encode_text([A_PROMPT]))
        self.keys: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in t2v.dit.blocks]

    def attend(self, layer: int, attn, x: torch.Tensor, start: int, commit: bool) -> torch.Tensor:
        q, k, v = attn.project(x)
        q_frames = x.shape[1] // N
        own = torch.arange(start, start + q_frames)
        q, k_rot = rotate(q, own), rotate(k, own)
        held = self.keys[layer]
        if commit:  # written first, then the last A frames up to its end are read
            for i in range(q_frames):
                held[start + i] = (k[:, :, i * N : (i + 1) * N], v[:, :, i * N : (i + 1) * N])
            frames = range(max(0, start + q_frames - self.budget), start + q_frames)
            keys = torch.cat([rotate(held[g][0], torch.tensor([g])) for g in frames], dim=2)
            values = torch.cat([held[g][1] for g in frames], dim=2)
        elif start == 0:
            keys, values = k_rot, v
        else:
            working = range(max(self.f, start - (self.budget - q_frames - self.f)), start)
            anchor_at = start - len(working) - self.f
            anchor = torch.cat([held[g][0] for g in range(self.f)], dim=2)
            parts = [rotate(anchor, torch.arange(anchor_at, anchor_at + self.f))]
            parts += [rotate(held[g][0], torch.tensor([g])) for g in working]
            keys = torch.cat([*parts, k_rot], dim=2)
            values = torch.cat([*[held[g][1] for g in [*range(self.f), *working]], v], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values)
        return attn.o(rearrange(out, "b h l d -> b l (h d)"))

    @contextlib.contextmanager
    def patched(self, start: int, commit: bool):
        blocks = self.t2v.dit.blocks
        saved = [b.self_attn.forward for b in blocks]
        for i, b in enumerate(blocks):
            b.self_attn.forward = lambda x, *a, i=i, attn=b.self_attn, **kw: (
                self.attend(i, attn, x, start, commit),
                None,
            )
        try:
            yield
        finally:
            for b, fwd in zip(blocks, saved, strict=True):
                b.self_attn.forward = fwd

    @torch.no_grad()
    def video(self, num_chunks: int) -> list[torch.Tensor]:
        f, s = self.f, len(self.sigmas)
        noisy, out = {}, {}
        for w in range(num_chunks + s - 1):
            first, last = max(0, w - s + 1), min(num_chunks - 1, w)
            if w < num_chunks:
                noisy[w] = torch.randn(1, f, 3, 8, 8, generator=self.g)
            chunks = range(first, last + 1)
            x = torch.cat([noisy[b] for b in chunks], dim=1)
            sig = torch.cat([self.sigmas[w - b].expand(1, f) for b in chunks], dim=1)
            with self.patched(first * f, commit=False):
                v = self.t2v.dit(x, sig * 1000, text_kv=self.text_kv, frame_offset=first * f)
            x0 = x0_from_velocity(x, v, sig).split(f, dim=1)
            for j, b in enumerate(chunks):
                if w - b < s - 1:
                    noisy[b] = add_noise(x0[j], torch.randn(x0[j].shape, generator=self.g), self.sigmas[w - b + 1])
            if w - first == s - 1:  # the first chunk is done (earlier commits of chunk 0 are overwritten unread)
                out[first] = x0[0]
                with self.patched(first * f, commit=True):
                    self.t2v.dit(x0[0], torch.zeros(1, f), text_kv=self.text_kv, frame_offset=first * f)
        return [out[b] for b in range(num_chunks)]


def rolling(window: int, steps=(1000.0, 750.0, 500.0)) -> CausalConfig:
    return CausalConfig(3, denoising_steps=list(steps), window=window, rope="slot", scheme="rolling")


@pytest.mark.parametrize("window", [15, 9])  # 15: one committed chunk besides the anchor; 9: the anchor alone
def test_rolling_window_equals_the_official_loop_chunk_by_chunk(window):
    t2v, settings = tiny_t2v(), rolling(window)
    ours = [c.latents for c in stream_video(t2v, IdentityCodec(), [A_PROMPT], 24, 8, 8, settings, seed=5)]
    reference = OfficialRolling(t2v, window, 3, settings.sigmas(), seed=5).video(8)
    assert len(ours) == 8
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"chunk {i}: {(a - b).abs().max():.2e}"


def test_an_open_ended_rolling_stream_never_drains_and_switches_with_keep_or_reset():
    t2v = tiny_t2v()
    stream = VideoStream(t2v, IdentityCodec(), [A_PROMPT], 8, 8, rolling(15), seed=5)
    finite = [c.latents for c in stream_video(t2v, IdentityCodec(), [A_PROMPT], 24, 8, 8, rolling(15), seed=5)]
    open_ended = [next(stream).latents for _ in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(open_ended[:5], finite[:5], strict=True))  # the same until the end
    assert not torch.allclose(open_ended[7], finite[7], atol=1e-4)  # the finite video's window drained
    with pytest.raises(ValueError, match="'keep' or 'reset'"):
        stream.switch_prompt("a blue square", "recache")
    stream.switch_prompt("a blue square", "keep")
    next(stream)
    stream.switch_prompt("a blue square", "reset")
    assert stream.position == 0 and next(stream).latents.shape == (1, 3, 3, 8, 8)


def test_the_rolling_scheme_needs_slot_rope_and_no_sink():
    with pytest.raises(ValueError, match="set causal.rope: slot and causal.sink: 0"):
        CausalConfig(3, window=9, scheme="rolling").validate()
    with pytest.raises(ValueError, match="causal.scheme must be one of"):
        CausalConfig(3, scheme="ladder").validate()
