import pytest
import torch

from selfforcing.config import load_config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY = [
    "model.preset=tiny",
    "text.dim=32",
    "text.num_layers=1",
    "batch_size=4",
    "num_threads=1",
    "data.height=16",
    "data.width=16",
    "data.frames=4",
    "data.max_objects=1",
    "diffusion.sample_steps=3",
    "num_samples=2",
    "optim.warmup_steps=2",
]


@pytest.fixture
def tiny_cfg(tmp_path):
    """A tiny teacher recipe writing into a temporary folder; call with extra key=value overrides."""

    def make(*overrides: str):
        return load_config(None, [*TINY, f"out_dir={tmp_path}", *overrides])

    return make


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """A tiny bidirectional teacher (6 frames of 16x16) trained for 2 steps: its samples need not be good."""
    from selfforcing.training.trainer import Trainer

    out = tmp_path_factory.mktemp("teacher")
    return Trainer(load_config(None, [*TINY, f"out_dir={out}", "name=teacher", "steps=2", "data.frames=6"])).train()
