"""Two CPU processes on the gloo backend: DDP training equals one process with gradient accumulation,
the weights stay identical on both ranks, and the exit step is rank 0's on every rank."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfforcing.training.rollout import draw_exit_step
from selfforcing.training.self_forcing import SelfForcingTrainer


def _exit_steps_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(100 + rank)  # different random streams on purpose
    steps = [draw_exit_step(4, g) for _ in range(20)]
    torch.save(steps, f"{out}.{rank}")
    dist.destroy_process_group()


def test_exit_step_is_shared_across_ranks(tmp_path):
    mp.spawn(_exit_steps_worker, args=(str(tmp_path / "init"), str(tmp_path / "steps")), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"steps.{r}") for r in (0, 1))
    assert rank0 == rank1
    own = [int(torch.randint(1, 5, (1,), generator=g)) for g in [torch.Generator().manual_seed(101)] for _ in range(20)]
    assert rank1 != own  # rank 1 did not keep its own draws
    assert len(set(rank0)) > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_worker(rank: int, port: int, cfg, out: str) -> None:
    """What ``torchrun --nproc-per-node 2`` sets up, then an ordinary training run."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    torch.set_num_threads(1)
    trainer = SelfForcingTrainer(cfg)
    exit_steps = []
    for trainer.step in range(2):
        exit_steps.append(trainer.exit_step("generator"))
    trainer.step = 0
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
    mp.spawn(_train_worker, args=(_free_port(), cfg("ddp"), out), nprocs=2, join=True)
    rank0, rank1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    assert rank0.pop("exits") == rank1.pop("exits")
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone logs
    single = SelfForcingTrainer(cfg("single", "grad_accum_steps=2"))
    single.train()
    start = SelfForcingTrainer(cfg("start"))
    for name, net in single.networks().items():
        for key, value in net.state_dict().items():
            assert torch.equal(rank0[name][key], rank1[name][key]), f"ranks differ: {name}.{key}"
            assert torch.allclose(rank0[name][key], value, atol=1e-6), f"DDP != accumulation: {name}.{key}"
    moved = [not torch.equal(rank0["model"][k], v) for k, v in start.networks()["model"].state_dict().items()]
    assert any(moved)
