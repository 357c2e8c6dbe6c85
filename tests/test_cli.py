import subprocess
import sys

import pytest

from selfforcing.cli import main


def test_world_command(tmp_path):
    main(
        ["world", "--out", str(tmp_path / "w.gif"), "--num", "1", "--size", "16", "--frames", "4", "--max-objects", "1"]
    )
    assert (tmp_path / "w.gif").is_file()


def test_train_then_generate(tmp_path, capsys):
    from tests.conftest import TINY

    main(
        [
            "train",
            "configs/teacher_demo.yaml",
            *TINY,
            f"out_dir={tmp_path}",
            "name=cli",
            "steps=2",
            "ckpt_every=2",
            "sample_every=100",
        ]
    )
    out = tmp_path / "video.gif"
    main(
        [
            "generate",
            "--checkpoint",
            str(tmp_path / "cli"),
            "--prompt",
            "a small red circle moving left",
            "--out",
            str(out),
            "--steps",
            "2",
            "--analyse",
        ]
    )
    printed = capsys.readouterr().out
    assert out.is_file() and '"found"' in printed


def test_bad_config_key_exits_with_a_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "selfforcing.cli", "train", "configs/teacher_demo.yaml", "optim.lrr=1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "optim.lrr" in proc.stderr


def test_unknown_prompt_word_is_reported(tmp_path, capsys):
    from tests.conftest import TINY

    main(
        [
            "train",
            "configs/teacher_demo.yaml",
            *TINY,
            f"out_dir={tmp_path}",
            "name=cli",
            "steps=1",
            "ckpt_every=1",
            "sample_every=100",
        ]
    )
    with pytest.raises(SystemExit):
        main(
            [
                "generate",
                "--checkpoint",
                str(tmp_path / "cli"),
                "--prompt",
                "a purple blob",
                "--out",
                str(tmp_path / "x.gif"),
            ]
        )
    assert "purple" in capsys.readouterr().err


def test_demo_runs_self_forcing_end_to_end(tmp_path, capsys):
    """The demo trains Self Forcing from the shipped ODE student (2 steps here), streams both students at
    1x and 4x, and writes the scores, the drift curves and the side-by-side gif."""
    from selfforcing.demo import run_demo

    out = tmp_path / "demo"
    report = run_demo(out, steps=2, overrides=["batch_size=2", "num_samples=2"], num_prompts=4)
    assert set(report["scores"]) == {"real videos", "ODE student", "Self Forcing"}
    assert set(report["scores"]["Self Forcing"]) == {"1x", "4x"}
    assert report["scores"]["real videos"]["4x"]["frame_ok"] > 0.9
    assert all(0 <= s[n]["frame_ok"] <= 1 for s in report["scores"].values() for n in s)
    for name in ("report.json", "shapes_world.gif", "compare_4x.gif", "drift_frame_ok.png"):
        assert (out / name).is_file(), name
    assert (out / "self_forcing" / "checkpoints" / "step_000002").is_dir()
    printed = capsys.readouterr().out
    assert "At 4x the training length, Self Forcing gets frame ok" in printed and "ODE student" in printed


def test_a_shipped_model_is_named_and_streams(tmp_path, capsys):
    """`--checkpoint NAME` finds a model that ships with the package; an unknown name lists them."""
    from selfforcing.cli import main
    from selfforcing.data.video_io import read_video
    from selfforcing.pipeline import load_pipeline
    from selfforcing.weights import shipped_models

    assert {"teacher_toy", "student_toy", "sf_dmd_chunk_toy", "sf_dmd_frame_toy"} <= set(shipped_models())
    for name, fpb in [("sf_dmd_chunk_toy", 3), ("sf_dmd_frame_toy", 1)]:  # the Self Forcing students
        cfg = load_pipeline(name).cfg
        assert (cfg.stage, cfg.distill.paradigm, cfg.causal.frames_per_block) == ("causal", "self_forcing", fpb)
    out = tmp_path / "v.gif"
    main(
        [
            "generate",
            "--checkpoint",
            "sf_dmd_chunk_toy",
            "--stream",
            "--frames",
            "24",
            "--prompt",
            "a red circle moving right",
        ]
        + ["--out", str(out)]
    )
    assert read_video(out).shape[0] == 24
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", "no_such_model", "--prompt", "a red circle", "--out", str(out)])
    assert "nor a shipped model (" in capsys.readouterr().err


def test_generate_switches_the_prompt_and_starts_from_an_image(tmp_path, capsys):
    """`--switch FRAME:PROMPT` and `--image`: the prompt in effect is printed from the chunk where it
    applies; the first frame is the image; malformed flags are refused with the form to use."""
    import imageio.v3 as iio
    import numpy as np

    from selfforcing.data.video_io import read_video

    image = tmp_path / "first.png"
    iio.imwrite(image, np.zeros((24, 24, 3), np.uint8))  # a black frame of the model's size
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    out = tmp_path / "v.gif"
    base = ["generate", "--checkpoint", "sf_dmd_frame_toy", "--prompt", "a red circle moving right", "--out", str(out)]
    main([*base, "--frames", "13", "--image", str(image), "--switch", "7:a blue square moving left"])
    printed = capsys.readouterr().out
    assert "from frame 0: a red circle moving right" in printed and "from frame 7: a blue square" in printed
    assert read_video(out).shape[0] == 13
    for flags, message in [
        (["--frames", "12", "--switch", "a blue square"], "FRAME:PROMPT"),
        (["--frames", "13", "--image", str(tmp_path / "missing.png")], "image file not found"),
        (["--frames", "13", "--image", str(not_an_image)], "could not read"),
        (["--frames", "12", "--switch", "6:a purple hexagon"], "outside the vocabulary"),
    ]:
        with pytest.raises(SystemExit):
            main([*base, *flags])
        assert message in capsys.readouterr().err, flags


def test_serve_and_generate_share_the_model_flags(monkeypatch):
    """`serve --model` takes the same loading flags as `generate --model`, and passes them to load_wan."""
    from selfforcing import cli
    from selfforcing.config import CausalConfig
    from selfforcing.serve import server

    flags = ["--model", "WAN", "--checkpoint", "sf.pt", "--offload-text", "--preview-decoder", "taew.pth", "--compile"]
    flags += ["--family", "longlive", "--lora", "lora.pt", "--lora-alpha", "256"]
    parser = cli.build_parser()
    for command in (["generate", "--prompt", "x"], ["serve"]):
        args = parser.parse_args(command + flags)
        assert cli.wan_options(args) == {
            "device": "auto",
            "offload_text_encoder": True,
            "preview_decoder": "taew.pth",
            "family": "longlive",
            "lora": "lora.pt",
            "lora_alpha": 256.0,
            "merge_lora": False,
        }
        assert args.compile
    seen = {}
    monkeypatch.setattr(server, "wan_source", lambda *a, **kw: seen.update(kw, args=a) or "source")
    monkeypatch.setattr(server, "serve", lambda source, host, port, **kw: seen.update(kw, source=source))
    main(["serve", *flags])
    assert seen["offload_text_encoder"] and seen["preview_decoder"] == "taew.pth" and seen["compile"]
    assert seen["max_streams"] == 1  # one stream by default on a real model (umT5, DiT and a KV cache)
    assert seen["kv_cache"] is None  # the checkpoint's own
    seen.clear()
    main(["serve", "--model", "WAN", "--checkpoint", "sf.pt", "--low-memory"])
    assert seen["offload_text_encoder"] and seen["kv_cache"] == "fp8"
    args = parser.parse_args(["generate", "--prompt", "x", "--kv-cache", "compact"])
    assert cli._causal_overrides(CausalConfig(3, window=6), args).kv_cache == "compact"
    with pytest.raises(SystemExit):
        main(["serve", "--offload-text"])  # the toy model has no umT5 to offload: a clear error
