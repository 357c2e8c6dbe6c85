"""Failures that never lose a run: kill -9 at any moment, a rank that dies or hangs, a full disk during a
save, and damaged checkpoints. The multi-process tests run real torchrun-style processes (gloo, FSDP2,
sharded checkpoints) through tests/rank_faults.py, each bounded in time."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfforcing.training.trainer import Trainer
from selfforcing.weights import latest_checkpoint, load_weights
from tests.conftest import TINY
from tests.test_distributed import _free_port

ROOT = Path(__file__).resolve().parents[1]
TWO_RANKS = ["distributed=fsdp", "checkpoint_format=sharded", "num_threads=1", "sample_every=1000", "ckpt_every=1"]


def launch(out: Path, name: str, *overrides: str, fault: str = "none") -> list[subprocess.Popen]:
    """Two torchrun-style processes training the tiny teacher into ``out/name``; logs in ``out/name.<rank>.log``."""
    port, procs = _free_port(), []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        args = ["train", str(ROOT / "configs/teacher_toy.yaml"), *TINY, f"out_dir={out}", f"name={name}", *overrides]
        log = open(out / f"{name}.{rank}.log", "a")  # noqa: SIM115 (the process owns it)
        cmd = [sys.executable, str(ROOT / "tests/rank_faults.py"), fault, "--", *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Every process's exit code; a process still running after ``timeout`` seconds fails the test."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a process was still running {timeout} s later (hung)")


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "sec_per_step"} for line in lines]


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the run to get going"
        time.sleep(0.05)


def test_kill_9_at_any_moment_of_a_two_process_run_resumes_to_the_same_losses(tmp_path):
    """Sharded checkpoints on 2 processes, killed inside a save, then at random moments (a random rank:
    the other stops on its own), then run to the end: the losses equal an uninterrupted run's exactly,
    and a half-written checkpoint is never the latest."""
    run = [*TWO_RANKS, "steps=6"]
    assert wait(launch(tmp_path, "straight", *run), 180) == [0, 0]
    # killed while writing the checkpoint of step 3: both processes' shards are written, nothing is moved
    assert wait(launch(tmp_path, "killed", *run, fault="kill-in-save:3"), 180) == [-9, -9]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert latest_checkpoint(tmp_path / "killed").name == "step_000002"
    assert (checkpoints / ".tmp_step_000003" / "sharded").is_dir()  # the half-written one, never taken
    rng = random.Random(0)
    for _ in range(2):  # a random moment: start-up, a step, a save, or a resume
        procs = launch(tmp_path, "killed", *run, "collective_timeout_s=60")
        time.sleep(rng.uniform(2.0, 7.0))
        victim = rng.randrange(2)
        procs[victim].send_signal(signal.SIGKILL)
        codes = wait(procs, 90)  # the other one stops by itself, or had finished
        assert codes[victim] in (-9, 0)
    assert wait(launch(tmp_path, "killed", *run), 180) == [0, 0]
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "straight")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000005", "step_000006"]


def test_a_rank_that_fails_dies_or_hangs_stops_the_others_naming_it(tmp_path):
    """A Python error on rank 1, a SIGKILL and a SIGSTOP: rank 0 stops within a bounded time with an error
    naming rank 1 (and its error, when it could leave one), instead of hanging in a collective."""
    run = [*TWO_RANKS, "steps=500", "collective_timeout_s=10"]
    procs = launch(tmp_path, "error", *run, fault="raise-at:2:1")
    assert wait(procs, 90) != [0, 0]
    log0, log1 = ((tmp_path / f"error.{r}.log").read_text() for r in (0, 1))
    assert "injected fault at step 2" in log1
    assert "another process of the run stopped (rank 1: ValueError: injected fault at step 2)" in log0

    for name, sig in (("killed", signal.SIGKILL), ("stopped", signal.SIGSTOP)):
        procs = launch(tmp_path, name, *run)
        wait_for(lambda name=name: latest_checkpoint(tmp_path / name) is not None)
        procs[1].send_signal(sig)
        start = time.monotonic()
        code = wait(procs[:1], 60)[0]
        took = time.monotonic() - start
        procs[1].kill()
        procs[1].wait()
        log0 = (tmp_path / f"{name}.0.log").read_text()
        assert code != 0 and "rank 1: no answer (killed, hung or unreachable)" in log0, log0[-2000:]
        assert took < (10 + 10 if sig == signal.SIGKILL else 10 + 10 + 10)  # (the timeout), the roll call, slack


def fail_writes(monkeypatch, writer: str) -> None:
    """Checkpoint files written by ``writer`` (``save_file``: the weights; ``save``: training_state.pt) get
    half written, then the disk is full."""
    import selfforcing.training.checkpoint as ckpt

    module = ckpt if writer == "save_file" else ckpt.torch
    real = getattr(module, writer)

    def full_disk(obj, path, *args, **kw):
        if not isinstance(path, str | Path) or writer == "save" and Path(path).name != "training_state.pt":
            return real(obj, path, *args, **kw)  # torch.distributed.checkpoint's own use of torch.save
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(module, writer, full_disk)


@pytest.mark.parametrize("fmt,writer", [("full", "save_file"), ("sharded", "save")])
def test_a_full_disk_during_a_save_is_a_clear_error_and_the_previous_checkpoint_stays(
    tiny_cfg, monkeypatch, fmt, writer
):
    from selfforcing.training.checkpoint import CheckpointWriteError

    def cfg(steps: int):
        return tiny_cfg("name=full", f"steps={steps}", "sample_every=1000", f"checkpoint_format={fmt}")

    run = Trainer(cfg(1)).train()
    first = latest_checkpoint(run)
    fail_writes(monkeypatch, writer)
    with pytest.raises(
        CheckpointWriteError, match="no space left on the device while writing the checkpoint of step 2"
    ):
        Trainer(cfg(2)).train()
    assert latest_checkpoint(run) == first  # untouched, and the partial folder is gone
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000001"]
    monkeypatch.undo()
    Trainer(cfg(2)).train()  # space again: the run resumes from step 1 and finishes
    assert latest_checkpoint(run).name == "step_000002"


def test_damaged_checkpoints_are_refused_naming_the_file_and_the_damage(tiny_cfg):
    from safetensors.torch import load_file

    run = Trainer(tiny_cfg("name=dmg", "steps=1", "sample_every=1000")).train()
    ckpt = latest_checkpoint(run)
    model = Trainer(tiny_cfg("name=other")).model
    weights = ckpt / "model.safetensors"
    data, original = weights.read_bytes(), load_file(weights)
    header = 8 + int.from_bytes(data[:8], "little")
    flips = range(8, header, 7)  # a bit flipped in every 7th byte of the JSON header
    refused = 0
    for i in flips:
        weights.write_bytes(data[:i] + bytes([data[i] ^ 0x04]) + data[i + 1 :])
        try:
            load_weights(model, weights)
        except ValueError as e:
            assert str(weights) in str(e)
            refused += 1
        else:  # a flip that leaves a valid header changes nothing the model reads (e.g. the step metadata)
            assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert refused > 0.9 * len(flips)
    weights.write_bytes(data)
    state = ckpt / "training_state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(ValueError, match="training_state.pt .*the checkpoint is damaged"):
        Trainer(tiny_cfg("name=dmg", "steps=2", "sample_every=1000")).train()
