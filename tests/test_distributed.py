"""Two CPU processes on the gloo backend: the exit step is rank 0's on every rank."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfforcing.training.rollout import draw_exit_step


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(100 + rank)  # different random streams on purpose
    steps = [draw_exit_step(4, g) for _ in range(20)]
    torch.save(steps, f"{out}.{rank}")
    dist.destroy_process_group()


def test_exit_step_is_shared_across_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "steps")), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"steps.{r}") for r in (0, 1))
    assert rank0 == rank1
    own = [int(torch.randint(1, 5, (1,), generator=g)) for g in [torch.Generator().manual_seed(101)] for _ in range(20)]
    assert rank1 != own  # rank 1 did not keep its own draws
    assert len(set(rank0)) > 1
