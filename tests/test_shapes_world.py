import json

import numpy as np
import pytest
import torch

from selfforcing.data import ShapesWorld, ShapesWorldConfig, VideoFolder, describe, parse_prompt
from selfforcing.data.video_io import read_video, to_uint8, video_grid, write_video


def test_deterministic_for_a_seed_and_different_across_seeds():
    w = ShapesWorld()
    a, b, c = w.sample(4, seed=7), w.sample(4, seed=7), w.sample(4, seed=8)
    assert torch.equal(a.video, b.video) and a.prompts == b.prompts
    assert not torch.equal(a.video, c.video)
    assert a.video.shape == (4, 12, 3, 32, 32) and a.video.min() >= -1 and a.video.max() <= 1


def test_parameters_shape_the_videos():
    cfg = ShapesWorldConfig(height=16, width=24, frames=5, min_objects=2, max_objects=2, colours=["red", "blue"])
    b = ShapesWorld(cfg).sample(3, seed=0)
    assert b.video.shape == (3, 5, 3, 16, 24)
    assert all(len(o) == 2 and {x.colour for x in o} == {"red", "blue"} for o in b.objects)


def test_prompt_describes_the_objects_and_parses_back():
    b = ShapesWorld().sample(16, seed=3)
    for prompt, objects in zip(b.prompts, b.objects, strict=True):
        assert parse_prompt(prompt) == objects
        assert describe(objects) == prompt
        for o in objects:
            assert f"{o.colour} {o.shape}" in prompt and f"moving {o.direction}" in prompt
    with pytest.raises(ValueError, match="unknown word"):
        parse_prompt("a large purple circle moving right")


def test_objects_move_at_constant_velocity_and_bounce_inside_the_frame():
    cfg = ShapesWorldConfig(frames=40, speed_min=2.0, speed_max=2.0)
    b = ShapesWorld(cfg).sample(8, seed=1)
    c, r = b.centres, b.radii
    used = r > 0
    x, y = c[..., 0][used], c[..., 1][used]  # [N, F]
    rr = r[used][:, None]
    assert (x >= rr - 1e-4).all() and (x <= 32 - rr + 1e-4).all()
    assert (y >= rr - 1e-4).all() and (y <= 32 - rr + 1e-4).all()
    speed = torch.linalg.vector_norm(c[:, :, 1:] - c[:, :, :-1], dim=-1)[used]
    assert (speed <= 2.0 + 1e-4).all()  # never faster than the set speed
    assert (speed > 1.999).float().mean() > 0.8  # and exactly that speed between bounces
    # some objects did hit a wall within 40 frames
    assert (speed < 1.999).any()


def test_rendering_matches_the_object_list():
    b = ShapesWorld(ShapesWorldConfig(max_objects=1)).sample(6, seed=0)
    for i, (o,) in enumerate(b.objects):
        visible = b.visible[i] == 0
        assert visible.any(dim=(1, 2)).all()
        from selfforcing.data.shapes import colour_tensor

        pixels = b.video[i].permute(0, 2, 3, 1)[visible]
        assert torch.allclose(pixels, colour_tensor(o.colour).expand_as(pixels))


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="colours"):
        ShapesWorld(ShapesWorldConfig(colours=["red", "purple"]))
    with pytest.raises(ValueError, match="distinct colours"):
        ShapesWorld(ShapesWorldConfig(colours=["red", "blue"], max_objects=3))
    with pytest.raises(ValueError, match="min_objects"):
        ShapesWorld(ShapesWorldConfig(min_objects=3, max_objects=2))


def test_video_roundtrip_gif_and_mp4(tmp_path):
    b = ShapesWorld(ShapesWorldConfig(height=16, width=16, frames=6)).sample(1, seed=0)
    frames = to_uint8(b.video[0])
    gif = write_video(tmp_path / "a.gif", frames)
    assert np.array_equal(read_video(gif), frames)  # palette colours survive gif exactly
    mp4 = write_video(tmp_path / "a.mp4", frames)
    back = read_video(mp4)
    assert back.shape == frames.shape and np.abs(back.astype(int) - frames.astype(int)).mean() < 12
    grid = video_grid(b.video.repeat(3, 1, 1, 1, 1), ["one", "two", "three"], scale=2)
    assert grid.shape[0] == 6 and grid.dtype == np.uint8


def _make_folder(tmp_path, size=16, frames=6):
    b = ShapesWorld(ShapesWorldConfig(height=size, width=size, frames=frames)).sample(2, seed=0)
    lines = []
    for i in range(2):
        write_video(tmp_path / f"clip{i}.gif", to_uint8(b.video[i]))
        lines.append(json.dumps({"file": f"clip{i}.gif", "prompt": b.prompts[i]}))
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return b


def test_video_folder_loads_clips_and_prompts(tmp_path):
    b = _make_folder(tmp_path)
    ds = VideoFolder(tmp_path, frames=4, height=16, width=16)
    clip, prompt = ds[1]
    assert len(ds) == 2 and prompt == b.prompts[1]
    assert torch.allclose(clip, b.video[1, :4], atol=1 / 127.5)
    video, prompts = ds.sample(3, seed=0)
    assert video.shape == (3, 4, 3, 16, 16) and len(prompts) == 3


def test_video_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts.jsonl"):
        VideoFolder(tmp_path, 4, 16, 16)
    _make_folder(tmp_path)
    with pytest.raises(ValueError, match="16x16 .*expects 32x32"):
        VideoFolder(tmp_path, 4, 32, 32)[0]
    with pytest.raises(ValueError, match="fewer than the 10"):
        VideoFolder(tmp_path, 10, 16, 16)[0]
    (tmp_path / "clip0.gif").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="could not read video"):
        VideoFolder(tmp_path, 4, 16, 16)[0]
    (tmp_path / "prompts.jsonl").write_text('{"file": "missing.mp4", "prompt": "x"}\n')
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        VideoFolder(tmp_path, 4, 16, 16)
    (tmp_path / "prompts.jsonl").write_text('{"path": "clip1.gif"}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:1"):
        VideoFolder(tmp_path, 4, 16, 16)


def test_mp4_falls_back_to_gif_when_ffmpeg_fails(tmp_path, monkeypatch, capsys):
    import selfforcing.data.video_io as vio

    def broken(*args, **kwargs):
        raise RuntimeError("no ffmpeg here")

    monkeypatch.setattr(vio.iio, "imwrite", broken)
    frames = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    frames[:, 0, 0, 0] = [0, 100, 200]  # distinct frames (a GIF stores identical neighbours once)
    out = vio.write_video(tmp_path / "a.mp4", frames)
    assert out == tmp_path / "a.gif" and out.is_file() and "no ffmpeg here" in capsys.readouterr().out
    assert read_video(out).shape == (3, 8, 8, 3)
    with pytest.raises(ValueError, match="unsupported video extension"):
        vio.write_video(tmp_path / "a.avi", frames)
