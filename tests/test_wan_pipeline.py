"""A Wan folder + a Self Forcing checkpoint stream end to end (tiny random models in the real layouts)."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from selfforcing.cli import main  # noqa: E402
from selfforcing.data.video_io import read_video  # noqa: E402
from selfforcing.wan.dit_weights import CheckpointError  # noqa: E402
from selfforcing.wan.pipeline import RELEASED_CAUSAL, load_wan  # noqa: E402

from .wan_tiny import diffusers_dit, wan_state_dict, write_diffusers_pipeline  # noqa: E402

SIZE = dict(height=32, width=48)  # latents 4 x 6, tokens 2 x 3


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    folder = write_diffusers_pipeline(root / "Wan2.1-T2V-tiny-Diffusers")
    student = wan_state_dict(diffusers_dit(seed=7, in_channels=16, out_channels=16))
    ckpt = root / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in student.items()}}, ckpt)
    return folder, ckpt, student


def test_the_checkpoint_replaces_the_folders_dit_and_streams(wan):
    folder, ckpt, student = wan
    pipe = load_wan(folder, ckpt)
    assert pipe.causal == RELEASED_CAUSAL and pipe.causal.window == 21
    for k, v in pipe.model.dit.state_dict().items():
        assert torch.equal(v, student[k]), k
    chunks = list(pipe.stream(["a red circle moving right"], frames=21, **SIZE))
    assert [c.frames.shape[1] for c in chunks] == [9, 12]  # 3 latent frames a chunk, frame 0 decoded alone
    assert chunks[0].frames.shape == (1, 9, 3, 32, 48) and chunks[0].latents.shape == (1, 3, 16, 4, 6)
    video = torch.cat([c.frames for c in chunks], dim=1)
    # the streaming decode of chunk after chunk equals one decode of the whole latents
    whole = pipe.codec.decode(torch.cat([c.latents for c in chunks], dim=1))
    torch.testing.assert_close(video, whole, atol=1e-5, rtol=1e-5)
    assert video.std() > 0.01


def test_a_wan_stream_starts_from_an_image_through_the_vae_and_switches_prompts(wan):
    """The same ``VideoStream`` as the shapes world: the first image is encoded by the Wan VAE (one
    latent frame, decoded alone as frame 0), and the umT5 prompt switches between chunks."""
    folder, ckpt, _ = wan
    pipe = load_wan(folder, ckpt)
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    stream = pipe.open_stream(["a red circle moving right"], image=image, **SIZE)
    first = next(stream)
    torch.testing.assert_close(first.latents, pipe.codec.encode(image[:, None]))
    assert first.frames.shape == (1, 1, 3, 32, 48)
    stream.switch_prompt("the cat walks on grass", "recache")
    second = next(stream)
    assert second.start == 1 and second.frames.shape[1] == 12 and second.prompts == ["the cat walks on grass"]
    assert stream.cache.frames == [0]
    chunks = list(pipe.stream(["a red circle moving right"], 25, image=image, switches={13: "a cat"}, **SIZE))
    assert [c.frames.shape[1] for c in chunks] == [1, 12, 12]  # latents 0 | 1-3 | 4-6: pixels 0 | 1-12 | 13-24
    assert [c.prompts for c in chunks][1:] == [["a red circle moving right"], ["a cat"]]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/device_wan.sh)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_an_overlapped_decode_gives_the_same_frames(wan, device):
    """``overlap_decode``: on CUDA each chunk is decoded on a stream of its own while the next one is
    committed and denoised, so chunks are handed over before their frames are ready (here three are
    queued before any is read); once waited for, they equal a stream decoded in line, as uint8 on the
    host too. On the CPU the option changes nothing."""
    folder, ckpt, _ = wan
    pipe = load_wan(folder, ckpt, device=device)
    plain = pipe.open_stream(["a red circle moving right"], **SIZE)
    lapped = pipe.open_stream(["a red circle moving right"], overlap_decode=True, **SIZE)
    inline = [next(plain) for _ in range(3)]
    overlapped = [next(lapped) for _ in range(3)]
    for a, b in zip(inline, overlapped, strict=True):
        assert a.ready is None and (b.ready is not None) == (device == "cuda")
        assert (b.uint8_frames() == a.uint8_frames()).all()
        torch.testing.assert_close(b.wait().frames, a.frames)
        assert b.uint8_frames().shape == (b.frames.shape[1], 32, 48, 3)


def test_the_original_wan_layout_streams_the_same_video(wan, tmp_path):
    """config.json + diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth and
    google/umt5-xxl/: the same weights as the diffusers folder, so the same video."""
    from .wan_tiny import write_original_wan_folder

    folder, ckpt, _ = wan
    original = write_original_wan_folder(folder, tmp_path / "Wan2.1-T2V-tiny")
    prompts = ["a red circle moving right", "the cat walks on grass"]
    for dit_from in [None, ckpt]:  # the folder's own DiT (the teacher) and the student's
        a = load_wan(original, dit_from)
        b = load_wan(folder, dit_from)
        assert a.model.dit.cfg == b.model.dit.cfg
        if dit_from is None:
            va = a.generate(prompts, frames=5, steps=2, progress=False, **SIZE)
            vb = b.generate(prompts, frames=5, steps=2, progress=False, **SIZE)
        else:
            va, vb = (p.generate(prompts, frames=9, **SIZE) for p in (a, b))
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)


def test_the_preview_decoder_replaces_the_vae(wan, tmp_path, capsys):
    from selfforcing.wan.tae import TAEDecoder

    folder, ckpt, _ = wan
    sd = {f"decoder.{k}": v * 0.5 for k, v in TAEDecoder().layers.state_dict().items()}
    torch.save(sd, tmp_path / "taew2_1.pth")
    pipe = load_wan(folder, ckpt, preview_decoder=tmp_path / "taew2_1.pth")
    assert type(pipe.codec).__name__ == "TAEW21"
    chunks = list(pipe.stream(["a cat"], frames=21, **SIZE))
    assert [c.frames.shape[1] for c in chunks] == [9, 12] and chunks[0].frames.shape[-2:] == (32, 48)
    out = tmp_path / "preview.mp4"
    main(
        ["generate", "--model", str(folder), "--checkpoint", str(ckpt), "--prompt", "a cat", "--frames", "9"]
        + ["--height", "32", "--width", "48", "--preview-decoder", str(tmp_path / "taew2_1.pth"), "--out", str(out)]
    )
    assert read_video(out).shape == (9, 32, 48, 3)
    with pytest.raises(ValueError, match="TAEW21 cannot encode the first image"):
        pipe.open_stream(["a cat"], image=torch.zeros(1, 3, 32, 48), **SIZE)


def test_without_a_checkpoint_the_folder_samples_as_the_teacher(wan):
    folder, _, _ = wan
    pipe = load_wan(folder)
    assert pipe.causal is None
    video, latents = pipe.generate(["a cat"], frames=5, steps=2, progress=False, return_latents=True, **SIZE)
    assert video.shape == (1, 5, 3, 32, 48) and latents.shape == (1, 2, 16, 4, 6)
    with pytest.raises(ValueError, match="streaming needs a causal checkpoint"):
        next(pipe.stream(["a cat"], frames=9, **SIZE))


def test_generate_command_streams_an_mp4_and_saves_latents(wan, tmp_path, capsys):
    folder, ckpt, _ = wan
    out = tmp_path / "video.mp4"
    main(
        ["generate", "--model", str(folder), "--checkpoint", str(ckpt), "--prompt", "a small blue triangle"]
        + ["--frames", "21", "--height", "32", "--width", "48", "--stream", "--out", str(out), "--save-latents"]
    )
    printed = capsys.readouterr().out
    assert "chunk   0  frames    0-8" in printed and "chunk   1  frames    9-20" in printed
    frames = read_video(out)
    assert frames.shape == (21, 32, 48, 3)
    from safetensors import safe_open

    with safe_open(tmp_path / "video.latents.safetensors", "pt") as f:
        assert f.get_tensor("latents").shape == (1, 6, 16, 4, 6)
        assert json.loads(f.metadata()["prompts"]) == ["a small blue triangle"]


def test_bad_requests_are_refused_with_the_fix(wan, tmp_path, capsys):
    folder, ckpt, _ = wan
    pipe = load_wan(folder, ckpt)
    with pytest.raises(ValueError, match=r"frame count must be 1 \+ 4 \* k"):
        next(pipe.stream(["a"], frames=20, **SIZE))
    with pytest.raises(ValueError, match="multiples of 16 .VAE 8x, patch 2., got 40x48: e.g. 32x48"):
        next(pipe.stream(["a"], frames=9, height=40, width=48))
    with pytest.raises(ValueError, match="whole number of chunks of 3"):
        next(pipe.stream(["a"], frames=17, **SIZE))
    other = wan_state_dict(diffusers_dit(in_channels=16, out_channels=16, ffn_dim=64))
    torch.save({"generator": {f"model.{k}": v for k, v in other.items()}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="use the checkpoint with the Wan folder it was trained from"):
        load_wan(folder, tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_wan(tmp_path / "nope")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(folder), "--prompt", "a", "--stream", "--out", str(tmp_path / "x.mp4")])
    assert e.value.code == 2 and "--stream needs a causal student" in capsys.readouterr().err


def test_the_pipeline_benchmark_runs_end_to_end_at_a_tiny_size(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "wan_streaming.py"
    spec = importlib.util.spec_from_file_location("wan_streaming", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--lengths", "1", "2", "--fpb", "3", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert [r["video_frames"] for r in rows] == [21, 45] and all(0 < r["decode_share"] < 1 for r in rows)


def test_serve_streams_a_wan_folder(wan):
    """`selfforcing serve --model WAN --checkpoint CKPT`: the same server over the Wan pipeline."""
    pytest.importorskip("aiohttp")
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from selfforcing.serve.server import StreamServer, wan_source

    folder, ckpt, _ = wan
    source = wan_source(str(folder), str(ckpt), height=32, width=48, device="cpu")

    async def scenario():
        async with TestClient(TestServer(StreamServer(source).app())) as client:
            ws = await client.ws_connect("/ws")
            await ws.send_json({"type": "start", "prompt": "a cat"})
            assert (await ws.receive_json())["type"] == "started"
            chunk = await ws.receive_json()
            assert chunk["type"] == "chunk" and len(chunk["frames"]) == 9  # latent frames 0-2: 1 + 4 + 4 frames
            await ws.send_json({"type": "switch", "prompt": "a dog", "mode": "recache"})
            msgs = [await ws.receive_json() for _ in range(2)]
            assert msgs[0]["type"] in ("chunk", "switched")
            await ws.close()

    asyncio.run(asyncio.wait_for(scenario(), 120))
    with pytest.raises(ValueError, match="multiples of 16"):
        wan_source(str(folder), str(ckpt), height=30, width=48, device="cpu")
