"""``python tests/rank_faults.py FAULT -- selfforcing-args...``: one torchrun-style training process with a
fault injected, for tests/test_failures.py. Run with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.

FAULT is ``none``, ``kill-in-save:STEP`` (SIGKILL this process once its shards of the sharded checkpoint
of STEP are written, before the checkpoint is moved into place) or ``raise-at:STEP:RANK`` (rank RANK raises
a ValueError at the start of step STEP).
"""

from __future__ import annotations

import os
import re
import signal
import sys


def inject(fault: str) -> None:
    kind, *args = fault.split(":")
    if kind == "kill-in-save":
        import torch.distributed.checkpoint as dcp

        step, save = int(args[0]), dcp.save

        def save_then_die(state, checkpoint_id, **kw):
            save(state, checkpoint_id=checkpoint_id, **kw)
            if int(re.search(r"tmp_step_(\d+)", str(checkpoint_id)).group(1)) == step:
                os.kill(os.getpid(), signal.SIGKILL)

        dcp.save = save_then_die
    elif kind == "raise-at":
        from selfforcing.training.trainer import Trainer

        step, rank, train_step = int(args[0]), int(args[1]), Trainer.train_step

        def faulty(self):
            if self.step == step and self.rank == rank:
                raise ValueError(f"injected fault at step {step}")
            return train_step(self)

        Trainer.train_step = faulty
    elif kind != "none":
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    fault, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: rank_faults.py FAULT -- selfforcing-args..."
    inject(fault)
    from selfforcing.cli import main

    main(argv)
