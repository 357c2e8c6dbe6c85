"""TAEW2.1, the preview decoder: the taew2_1.pth layout, a decode equal to one written from the published
definition (frame by frame, straight from the state dict), and a streamed decode equal to the whole."""

import pytest
import torch
import torch.nn.functional as F

from selfforcing.wan.dit_weights import CheckpointError
from selfforcing.wan.tae import TAEDecoder, load_tae

# The published decoder, layer by layer (index in its nn.Sequential, kind, TGrow stride).
PUBLISHED = [(0, "clamp"), (1, "conv"), (2, "relu")]
for _stage, (_first, _stride) in enumerate([(3, 1), (9, 2), (15, 2)]):
    PUBLISHED += [(_first + j, "mem") for j in range(3)]
    PUBLISHED += [(_first + 3, "up"), (_first + 4, ("grow", _stride)), (_first + 5, "conv")]
PUBLISHED += [(21, "relu"), (22, "conv")]


def reference_decode(sd: dict, z: torch.Tensor) -> torch.Tensor:
    """TAEHV's decode of latents z [N, T, 16, h, w] one frame at a time: frames [N, 4T - 3, 3, 8h, 8w] in [-1, 1]."""
    memory, out = {}, []
    for t in range(z.shape[1]):
        frames = [z[:, t]]
        for i, kind in PUBLISHED:
            nxt = []
            for x in frames:
                if kind == "clamp":
                    x = torch.tanh(x / 3) * 3
                elif kind == "relu":
                    x = F.relu(x)
                elif kind == "up":
                    x = F.interpolate(x, scale_factor=2, mode="nearest")
                elif kind == "conv":
                    x = F.conv2d(x, sd[f"decoder.{i}.weight"], sd.get(f"decoder.{i}.bias"), padding=1)
                elif kind == "mem":
                    past = memory.get(i, torch.zeros_like(x))
                    memory[i] = x
                    h = torch.cat([x, past], 1)
                    for j in (0, 2, 4):
                        h = F.conv2d(h, sd[f"decoder.{i}.conv.{j}.weight"], sd[f"decoder.{i}.conv.{j}.bias"], padding=1)
                        h = F.relu(h) if j < 4 else h
                    x = F.relu(h + x)
                else:  # grow: the last stride x C output channels, split into consecutive frames
                    stride, w = kind[1], sd[f"decoder.{i}.conv.weight"]
                    nxt.extend(F.conv2d(x, w[-stride * x.shape[1] :]).chunk(stride, 1))
                    continue
                nxt.append(x)
            frames = nxt
        out.extend(frames)
    return torch.stack(out, 1).clamp(0, 1)[:, 3:] * 2 - 1


@pytest.fixture(scope="module")
def taew2_1(tmp_path_factory):
    """A random TAEW2.1 in the released layout: encoder.* and decoder.* keys, the first TGrow 2x wider."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in TAEDecoder().layers.state_dict().items():
        shape = (2 * v.shape[0], *v.shape[1:]) if k == "7.conv.weight" else v.shape
        sd[f"decoder.{k}"] = torch.randn(shape, generator=g) / max(1, v[0].numel()) ** 0.5
    sd["decoder.22.weight"] *= 0.05  # frames centred in [0, 1], so the final clamp saturates none of them
    sd["decoder.22.bias"] = torch.full((3,), 0.5)
    sd["encoder.0.weight"] = torch.randn(64, 3, 3, 3, generator=g)  # present in the file, not used
    path = tmp_path_factory.mktemp("tae") / "taew2_1.pth"
    torch.save(sd, path)
    return path, sd


def test_decode_equals_the_published_definition(taew2_1):
    path, sd = taew2_1
    codec = load_tae(path)
    z = torch.randn(2, 3, 16, 2, 3, generator=torch.Generator().manual_seed(1))
    want = reference_decode(sd, z)
    got = codec.decode(z)
    assert got.shape == (2, 9, 3, 16, 24)
    assert want.std() > 0.1 and (want.abs() < 0.99).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [3, 1], [1, 3], [2, 2]])
def test_streamed_preview_equals_the_whole_decode(taew2_1, chunks):
    codec = load_tae(taew2_1[0], dtype=torch.float64)  # exact: fp32 convolutions differ with the batch size
    z = torch.randn(1, sum(chunks), 16, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    whole = codec.decode(z)
    decode, parts, start = codec.stream_decoder(), [], 0
    for n in chunks:
        parts.append(decode(z[:, start : start + n]))
        start += n
    assert [p.shape[1] for p in parts] == [4 * n - (3 if i == 0 else 0) for i, n in enumerate(chunks)]
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-12, rtol=1e-12)


def test_the_safetensors_copy_loads_the_same(taew2_1, tmp_path):
    from safetensors.torch import save_file

    path, sd = taew2_1
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "taew2_1.safetensors")
    z = torch.randn(1, 2, 16, 2, 2)
    torch.testing.assert_close(load_tae(tmp_path / "taew2_1.safetensors").decode(z), load_tae(path).decode(z))


def test_tae_errors(taew2_1, tmp_path):
    torch.save({"encoder.0.weight": torch.zeros(1)}, tmp_path / "enc.pth")
    with pytest.raises(CheckpointError, match="no decoder.. weights"):
        load_tae(tmp_path / "enc.pth")
    sd = dict(taew2_1[1])
    del sd["decoder.22.bias"]
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"missing \(1\): 22.bias"):
        load_tae(tmp_path / "cut.pth")
    with pytest.raises(NotImplementedError, match="encode with the Wan VAE"):
        load_tae(taew2_1[0]).encode(torch.zeros(1, 5, 3, 16, 16))


def test_the_stream_decoder_runs_one_latent_frame_at_a_time(taew2_1):
    """A third of the working memory for a chunk of 3 latent frames: the decoder sees one at a time."""
    codec = load_tae(taew2_1[0])
    seen = []
    codec.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    decode = codec.stream_decoder()
    decode(torch.randn(1, 3, 16, 4, 6)), decode(torch.randn(1, 3, 16, 4, 6))
    assert seen == [1] * 6
