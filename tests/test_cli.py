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


def test_demo_runs_end_to_end(tmp_path):
    from selfforcing.demo import SHIPPED_STUDENT, SHIPPED_TEACHER, run_demo
    from tests.conftest import TINY

    report = run_demo(tmp_path / "demo", steps=2, overrides=[*TINY, "ckpt_every=2"], num_samples=2)
    assert report["real_videos"]["found"] == 1.0
    assert 0 <= report["demo_teacher"]["found"] <= 1
    assert (tmp_path / "demo" / "report.json").is_file() and (tmp_path / "demo" / "demo_teacher_samples.gif").is_file()
    assert ("toy_teacher" in report) == SHIPPED_TEACHER.is_dir()
    assert ("student_4x_length" in report) == SHIPPED_STUDENT.is_dir()
