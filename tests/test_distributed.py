"""Two CPU processes on the gloo backend: DDP training equals one process with gradient accumulation,
the weights stay identical on both ranks, and every rank's k-th rollout shares its exit step."""

import faulthandler
import os
import random
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfforcing.training.trainer import Trainer


def _free_port() -> int:
    """A free port for the rendezvous store, below the kernel's ephemeral range as torchrun's 29500 is: a port
    from that range could be handed to another socket as its own port before the store binds it, or a client
    retrying to connect to it could connect to itself (Linux TCP self-connect)."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.is_file() else 32768
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.randrange(20_000, max(20_001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port below the ephemeral range")


def spawn_ranks(fn, *args) -> None:
    """``fn(rank, port, *args)`` on 2 processes; a rank that crashes prints where (faulthandler) and fails."""
    mp.spawn(fn, args=(_free_port(), *args), nprocs=2, join=True)


def as_torchrun_rank(rank: int, port: int, world_size: int = 2) -> None:
    """What ``torchrun --nproc-per-node 2`` sets up for process ``rank`` (the trainer then joins the group)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(world_size)
    torch.set_num_threads(1)
    faulthandler.enable()  # a rank that crashes prints where (see spawn_ranks)


def like_two_ranks(cfg) -> Trainer:
    """One process that trains what 2 ranks train: with ``grad_accum_steps=2`` its micro-batch i is rank i's
    first (k = 0) rollout, whose exit step s* every rank shares, so its two micro-batches share it too."""
    trainer = Trainer(cfg)
    draw = trainer.objective.exit_step
    trainer.objective.exit_step = lambda kind, i, step: draw(kind, i % 1, step)
    return trainer


def _train_worker(rank: int, port: int, cfg, out: str) -> None:
    """A torchrun process, then an ordinary training run."""
    as_torchrun_rank(rank, port)
    trainer = Trainer(cfg)
    exit_steps = []
    exit_steps = [trainer.objective.exit_step("generator", 0, step) for step in range(6)]
    trainer.train()
    state = {name: net.state_dict() for name, net in trainer.networks().items()}
    torch.save({**state, "exits": exit_steps}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("loss", ["dmd", "gan"])
def test_two_process_training_equals_one_process_with_accumulation(teacher, tmp_path, loss):
    from tests.test_self_forcing import sf_cfg

    def cfg(name: str, *extra: str):
        return sf_cfg(teacher, tmp_path, f"name={name}", "steps=2", f"distill.loss={loss}", "num_threads=1", *extra)

    out = str(tmp_path / "ddp_state")
    spawn_ranks(_train_worker, cfg("ddp"), out)
    rank0, rank1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    exits = [rank0.pop("exits"), rank1.pop("exits")]
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone logs
    assert exits[0] == exits[1] and len(set(exits[0])) > 1  # every rank's k-th rollout shares its s*
    single = like_two_ranks(cfg("single", "grad_accum_steps=2"))
    single.train()
    start = Trainer(cfg("start"))
    for name, net in single.networks().items():
        for key, value in net.state_dict().items():
            assert torch.equal(rank0[name][key], rank1[name][key]), f"ranks differ: {name}.{key}"
            assert torch.allclose(rank0[name][key], value, atol=1e-6), f"DDP != accumulation: {name}.{key}"
    moved = [not torch.equal(rank0["model"][k], v) for k, v in start.networks()["model"].state_dict().items()]
    assert any(moved)


def _nan_worker(rank: int, port: int, cfg, out: str) -> None:
    """Rank 1 reports a NaN loss at step 1 while its gradient stays finite."""
    from selfforcing.training.trainer import Trainer

    as_torchrun_rank(rank, port)
    trainer = Trainer(cfg)
    loss = trainer.objective.loss

    def nan_on_rank_1(*args):
        value, stats = loss(*args)
        return value + (torch.tensor(float("nan")) if rank == 1 and trainer.step == 1 else 0.0), stats

    trainer.objective.loss = nan_on_rank_1
    trainer.train()
    torch.save({"model": trainer.model.state_dict(), "skipped": trainer.skipped_updates}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_a_bad_update_on_one_rank_is_skipped_on_every_rank(tiny_cfg, tmp_path):
    out = str(tmp_path / "nan")
    spawn_ranks(_nan_worker, tiny_cfg("steps=3", "num_threads=1"), out)
    rank0, rank1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    assert rank0["skipped"] == rank1["skipped"] == 1
    for key, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][key]), key  # the ranks took the same steps
