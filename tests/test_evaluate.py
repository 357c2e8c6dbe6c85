"""`selfforcing eval`: rows for every model, length and seed, the real ceiling, the table and the plots."""

import json

import pytest

from selfforcing.cli import main
from selfforcing.data.shapes import ShapesWorldConfig
from selfforcing.data.video_io import read_video
from selfforcing.eval.encoder import EncoderConfig, train_encoder
from selfforcing.eval.evaluate import EvalSettings, aggregate, evaluate, markdown_table, write_comparison
from selfforcing.training.trainer import Trainer
from tests.test_self_forcing import sf_cfg


@pytest.fixture(scope="module")
def setup(teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    student = Trainer(sf_cfg(teacher, tmp, "steps=2", "name=student")).train()
    world = ShapesWorldConfig(height=16, width=16, frames=6, max_objects=1)
    train_encoder(world, tmp / "enc", steps=3, batch_size=4, cfg=EncoderConfig([8], 4), progress=False)
    return teacher, student, tmp / "enc", tmp


def test_eval_measures_every_model_length_and_seed_with_the_real_ceiling(setup, monkeypatch):
    teacher, student, encoder, tmp = setup
    settings = EvalSettings(lengths=[1, 2], num=4, seeds=[0, 1], encoder=str(encoder), batch_size=4, samples=2)
    rows = evaluate([str(teacher), str(student)], settings, tmp / "out")
    keys = [(r["model"], r["length"], r["seed"]) for r in rows]
    # the bidirectional teacher has one length; the streamed student and real videos have both
    assert sorted(keys) == sorted(
        [("real", m, s) for m in (1, 2) for s in (0, 1)]
        + [("student", m, s) for m in (1, 2) for s in (0, 1)]
        + [("teacher", 1, s) for s in (0, 1)]
    )
    for r in rows:
        assert len(r["curves"]["frame_ok"]) == r["frames"] == 6 * r["length"]
    real = [r for r in rows if r["model"] == "real"]
    assert all(r["found"] > 0.9 and r["colour_fidelity"] > 0.99 for r in real)
    student_rows = [r for r in rows if r["model"] == "student"]
    assert student_rows[0]["fd"] > 0 and student_rows[0]["fd"] != student_rows[1]["fd"]  # seeds differ
    summary = aggregate(rows)
    assert len(summary) == 5 and all(s["seeds"] == 2 for s in summary)
    one = next(s for s in summary if s["model"] == "student" and s["length"] == 2)
    pair = [r["fd"] for r in student_rows if r["length"] == 2]
    assert one["fd"] == pytest.approx(sum(pair) / 2) and one["fd_std"] == pytest.approx(abs(pair[0] - pair[1]) / 2)
    table = markdown_table(summary)
    assert table.count("\n") == 2 + 5 and "| student | 2x |" in table
    assert (tmp / "out" / "samples" / "student_2x.gif").is_file()
    # side by side: one row per prompt, one column per model, every clip as long as the length
    gif = write_comparison(tmp / "out", ["real", "student"], 2, tmp / "cmp.gif", scale=2)
    frames = read_video(gif)
    assert frames.shape[0] == 12 and frames.shape[2] == 2 * (16 * 2 + 2)
    with pytest.raises(FileNotFoundError, match="teacher"):  # the bidirectional teacher has no 2x videos
        write_comparison(tmp / "out", ["real", "teacher"], 2, tmp / "cmp2.gif")
    # an interrupted or repeated evaluation reuses the finished rows: nothing is generated again
    import selfforcing.eval.evaluate as ev

    def no_sampling(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(ev, "sample_videos", no_sampling)
    again = evaluate([str(teacher), str(student)], settings, tmp / "out")
    assert json.dumps(again) == json.dumps(rows)  # (NaN-safe comparison)
    with pytest.raises(AssertionError, match="generated again"):  # other prompts: the rows do not apply
        evaluate([str(teacher), str(student)], EvalSettings(**{**settings.__dict__, "num": 3}), tmp / "out")
    with pytest.raises(AssertionError, match="generated again"):  # streamed with sink frames: not the same rows
        evaluate([str(student)], EvalSettings(**{**settings.__dict__, "sink": 1}), tmp / "out")
    stale = tmp / "out" / "rows" / "student_2x_seed1.json"  # as written before a figure existed
    entry = json.loads(stale.read_text())
    del entry["row"]["frame_ok_late_change"]
    stale.write_text(json.dumps(entry))
    with pytest.raises(AssertionError, match="generated again"):  # a row without every figure is redone
        evaluate([str(teacher), str(student)], settings, tmp / "out")
    (tmp / "out" / "samples" / "student_1x.safetensors").unlink()  # a lost sample is made again
    with pytest.raises(AssertionError, match="generated again"):
        evaluate([str(teacher), str(student)], settings, tmp / "out")
    monkeypatch.undo()

    step = sorted((student / "checkpoints").glob("step_*"))[-1]  # named after its run, so it collides
    with pytest.raises(ValueError, match="share a model name"):
        evaluate([str(student), str(step)], settings)


def test_sink_frames_change_the_streamed_videos_past_the_window(setup):
    """``sample_videos(sink=...)``: past the training length the cache rolls, and a kept first frame changes
    what later chunks see; within the window it changes nothing."""
    import torch

    from selfforcing.eval.score import sample_videos
    from selfforcing.pipeline import load_pipeline

    pipe = load_pipeline(setup[1])
    prompts = ["a large red circle moving right"] * 2
    plain, sunk = (sample_videos(pipe, prompts, 12, sink=s) for s in (None, 3))
    assert torch.equal(plain[:, :6], sunk[:, :6]) and not torch.allclose(plain[:, 6:], sunk[:, 6:])


def test_eval_cli_writes_json_table_and_drift_plots(setup, capsys):
    teacher, student, encoder, tmp = setup
    out = tmp / "cli"
    args = ["eval", "--checkpoint", str(student), "--lengths", "1", "--num", "2", "--seeds", "0"]
    main([*args, "--encoder", str(encoder), "--samples", "0", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert {r["model"] for r in saved["summary"]} == {"real", "student"}
    assert (out / "drift_frame_ok.png").stat().st_size > 1000 and "| real | 1x |" in (out / "results.md").read_text()
    train_encoder(ShapesWorldConfig(height=8, width=8, frames=2), tmp / "enc8", steps=1, batch_size=2)
    with pytest.raises(SystemExit):  # an encoder of another world is refused with a clear message
        main([*args, "--encoder", str(tmp / "enc8"), "--out", str(out)])
    assert "train-encoder" in capsys.readouterr().err


def test_drift_plot_keeps_each_models_colour_across_panels(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from selfforcing.eval import plots

    def row(model, length):
        return {"model": model, "length": length, "curves": {"frame_ok": [0.5] * (6 * length)}}

    # panels list the models in different orders, and the teacher only has the 1x panel
    summary = [row("teacher", 1), row("real", 1), row("a", 1), row("b", 1)]
    summary += [row("b", 2), row("real", 2), row("a", 2), row("a", 4), row("b", 4), row("real", 4)]
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figure to look at it
    assert plots.plot_drift_curves(summary, tmp_path / "drift.png").is_file()
    (fig,) = figures
    colours: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) == {"teacher", "real", "a", "b"}
    assert all(len(c) == 1 for c in colours.values()), colours  # one colour per model, in every panel
    assert len({next(iter(c)) for c in colours.values()}) == 4  # and a different one for each
    assert colours["real"] == {"black"}
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["real", "teacher", "a", "b"]  # real first
    plt.close(fig)


def test_eval_streams_a_causal_model_by_each_family_s_rules(setup):
    """``eval --families self-forcing reward-forcing``: one row per family for the causal model (the teacher
    once), each family's rules applied to it."""
    teacher, student, encoder, tmp = setup
    settings = EvalSettings([2], 2, [0], encoder=str(encoder), samples=0, families=["self-forcing", "reward-forcing"])
    rows = evaluate([str(teacher), str(student)], settings)
    assert {r["model"] for r in rows} == {"real", "student@self-forcing", "student@reward-forcing"}  # teacher: 1x only
    by = {r["model"]: r for r in rows}
    assert by["student@self-forcing"]["fd"] != by["student@reward-forcing"]["fd"]
    with pytest.raises(ValueError, match="unknown family 'wan'"):
        evaluate([str(student)], EvalSettings([1], 2, [0], encoder=str(encoder), families=["wan"]))
