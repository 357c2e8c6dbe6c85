"""The Wan2.1 VAE: both checkpoint layouts, encode/decode equal diffusers', streamed decode equals one decode."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKLWan  # noqa: E402

from selfforcing.wan.dit_weights import CheckpointError  # noqa: E402
from selfforcing.wan.vae import load_vae, original_vae_key  # noqa: E402

from .wan_tiny import diffusers_vae, original_vae_state_dict  # noqa: E402

DATA = Path(__file__).parent / "data"


def test_the_real_original_layout_maps_onto_the_real_diffusers_vae():
    """Every key of the released Wan2.1_VAE.pth (listed from Wan's own module) renames to the diffusers
    AutoencoderKLWan key of the same shape, one to one."""
    original = {k: tuple(s) for k, s in json.loads((DATA / "wan2.1_vae_keys.json").read_text())["keys"]}
    assert len(original) == 194
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in AutoencoderKLWan().state_dict().items()}
    assert {original_vae_key(k): s for k, s in original.items()} == theirs


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    ref = diffusers_vae()
    root = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(root / "pipe" / "vae")
    (root / "wan").mkdir()
    torch.save(original_vae_state_dict(ref), root / "wan" / "Wan2.1_VAE.pth")
    (root / "legacy").mkdir()  # the pre-zip torch format, which cannot be memory-mapped
    torch.save(original_vae_state_dict(ref), root / "legacy" / "Wan2.1_VAE.pth", _use_new_zipfile_serialization=False)
    return ref, root


def test_encode_and_decode_equal_diffusers_in_both_layouts(vae_files):
    ref, root = vae_files
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 9, 3, 16, 24, generator=g) * 2 - 1  # [B, F, 3, H, W]
    with torch.no_grad():
        mu = ref.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mode().permute(0, 2, 1, 3, 4)
    mean = torch.tensor(ref.config.latents_mean).view(1, 1, -1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, 1, -1, 1, 1)
    z = torch.randn(2, 3, 16, 2, 3, generator=g)
    with torch.no_grad():
        frames = ref.decode((z * std + mean).permute(0, 2, 1, 3, 4)).sample.permute(0, 2, 1, 3, 4)
    assert frames.shape == (2, 9, 3, 16, 24) and frames.std() > 0.05
    for layout in ["pipe", "pipe/vae", "wan", "wan/Wan2.1_VAE.pth", "legacy"]:
        codec = load_vae(root / layout)
        latents = codec.encode(video)
        assert latents.shape == (2, 3, 16, 2, 3)
        torch.testing.assert_close(latents, (mu - mean) / std, atol=1e-5, rtol=1e-5, msg=layout)
        torch.testing.assert_close(codec.decode(z), frames, atol=1e-5, rtol=1e-5, msg=layout)


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1], [3, 2], [2, 3], [1, 4], [5]])
def test_streamed_decode_equals_one_decode(vae_files, chunks):
    ref, root = vae_files
    codec = load_vae(root / "wan")
    z = torch.randn(1, sum(chunks), 16, 2, 2, generator=torch.Generator().manual_seed(1))
    whole = codec.decode(z)
    decoder = codec.stream_decoder()
    parts, start = [], 0
    for n in chunks:
        part = decoder(z[:, start : start + n])
        assert part.shape[1] == (1 + 4 * (n - 1) if start == 0 else 4 * n)
        parts.append(part)
        start += n
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-6, rtol=1e-6)
    # a decoder that forgot its cache between chunks would differ
    if len(chunks) > 1:
        fresh = codec.stream_decoder()
        fresh(z[:, : chunks[0]])
        forgetful = codec.stream_decoder()(z[:, chunks[0] :])
        assert (forgetful[:, -1] - whole[:, -1]).abs().max() > 1e-3


def test_vae_errors_name_the_problem(vae_files, tmp_path):
    _, root = vae_files
    codec = load_vae(root / "wan")
    with pytest.raises(ValueError, match=r"frame count must be 1 \+ 4 \* k"):
        codec.encode(torch.zeros(1, 8, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode(torch.zeros(1, 5, 3, 12, 16))
    with pytest.raises(ValueError, match=r"expected latents \[B, f, 16, h, w\]"):
        codec.decode(torch.zeros(1, 2, 4, 2, 2))
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="weights-only torch checkpoint"):
        load_vae(tmp_path / "Wan2.1_VAE.pth")
    torch.save({"encoder.conv1.weight": torch.zeros(8, 3, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="lacks 'conv2.weight'"):
        load_vae(tmp_path / "partial.pth")
    state = original_vae_state_dict(diffusers_vae())
    del state["decoder.head.2.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing \(1\): decoder.conv_out.bias"):
        load_vae(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a Wan VAE: expected Wan2.1_VAE.pth"):
        load_vae(tmp_path / "empty")


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1], [3, 2], [1, 4]])
def test_streamed_encode_equals_one_encode(vae_files, chunks):
    """Video-to-video reads its input chunk by chunk: latent chunks of ``chunks`` frames (the first from
    1 + 4 (n - 1) pixel frames, the later from 4 n) encode to exactly the whole video's latents."""
    ref, root = vae_files
    codec = load_vae(root / "wan")
    video = torch.rand(1, 17, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    whole = codec.encode(video)
    encoder, parts, start = codec.stream_encoder(), [], 0
    for i, n in enumerate(chunks):
        frames = 1 + 4 * (n - 1) if i == 0 else 4 * n
        parts.append(encoder(video[:, start : start + frames]))
        start += frames
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="4k frames"):
        encoder(video[:, :3])
