"""FSDP2 (distributed: fsdp) on two CPU processes (gloo): the same training as one process with gradient
accumulation, checkpoints in the single-process layout, and an exact resume."""

import pytest
import torch
import torch.distributed as dist

from selfforcing.training.self_forcing import SelfForcingTrainer
from selfforcing.training.teacher import TeacherTrainer
from tests.test_distributed import as_torchrun_rank, spawn_ranks


def _worker(rank: int, port: int, cfgs, kind: str) -> None:
    as_torchrun_rank(rank, port)
    for cfg in cfgs:  # several runs in one process group (e.g. a run, then its resumption)
        trainer = (SelfForcingTrainer if kind == "sf" else TeacherTrainer)(cfg)
        assert trainer.sharded
        trainer.train()
    dist.destroy_process_group()


def _weights(run_dir):
    from safetensors.torch import load_file

    from selfforcing.training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    return {f.stem: load_file(f) for f in ckpt.glob("*.safetensors")}, ckpt


def assert_same(a: dict, b: dict, atol: float = 1e-6):
    assert a.keys() == b.keys()
    for name in a:
        for key, value in a[name].items():
            assert torch.allclose(value, b[name][key], atol=atol), f"{name}.{key}: {(value - b[name][key]).abs().max()}"


@pytest.mark.parametrize("loss,checkpointing", [("dmd", False), ("sid", False), ("gan", False), ("dmd", True)])
def test_fsdp_self_forcing_equals_one_process_and_resumes_exactly(teacher, tmp_path, loss, checkpointing):
    from tests.test_self_forcing import sf_cfg

    def cfg(name: str, *extra: str):
        flags = (f"distill.loss={loss}", f"gradient_checkpointing={str(checkpointing).lower()}", "causal.window=4")
        return sf_cfg(teacher, tmp_path, f"name={name}", "num_threads=1", *flags, *extra)

    fsdp = ("distributed=fsdp", "ckpt_every=1")
    runs = [cfg("fsdp", "steps=3", *fsdp), cfg("resumed", "steps=2", *fsdp), cfg("resumed", "steps=3", *fsdp)]
    spawn_ranks(_worker, runs, "sf", fresh=(tmp_path / "fsdp", tmp_path / "resumed"))
    single = SelfForcingTrainer(cfg("single", "steps=3", "grad_accum_steps=2"))
    draw = single.exit_step  # the two ranks' first rollouts share s*: so do the single process's two
    single.exit_step = lambda kind, i: draw(kind, i % 1)
    single.train()
    sharded, ckpt = _weights(tmp_path / "fsdp")
    reference, _ = _weights(tmp_path / "single")
    assert set(sharded) == {"model", "ema", "critic"} | ({"discriminator_head"} if loss == "gan" else set())
    # FSDP over 2 ranks == accumulation over 2 micro-batches in 1 process (the GAN's finite-difference R1/R2
    # divides by 0.01: float noise in the summation order grows 100x)
    assert_same(sharded, reference, atol=1e-5 if loss == "gan" else 1e-6)
    resumed, _ = _weights(tmp_path / "resumed")
    assert_same(resumed, sharded, atol=0)  # stopped at step 2 and resumed: the uninterrupted run, exactly
    start = SelfForcingTrainer(cfg("start"))
    assert any(not torch.equal(start.model.state_dict()[k], v) for k, v in sharded["model"].items())
    # a sharded run's checkpoint is an ordinary one: it loads without FSDP
    from selfforcing.inference.pipeline import load_pipeline

    assert load_pipeline(ckpt).model.dit.cfg == single.model.dit.cfg


def test_fsdp_teacher_with_accumulation_equals_one_process(tmp_path):
    from selfforcing.config import load_config
    from tests.conftest import TINY

    def cfg(name, *extra):
        return load_config(None, [*TINY, f"out_dir={tmp_path}", f"name={name}", "steps=2", "num_threads=1", *extra])

    spawn_ranks(_worker, [cfg("fsdp", "distributed=fsdp", "grad_accum_steps=2")], "t", fresh=(tmp_path / "fsdp",))
    TeacherTrainer(cfg("single", "grad_accum_steps=4")).train()
    assert_same(_weights(tmp_path / "fsdp")[0], _weights(tmp_path / "single")[0])


def test_an_unknown_distributed_engine_is_refused(tiny_cfg):
    from selfforcing.config import ConfigError

    with pytest.raises(ConfigError, match="distributed must be ddp or fsdp"):
        tiny_cfg("distributed=deepspeed")


def test_sharded_checkpoints_resume_exactly_on_two_processes_or_one(teacher, tmp_path):
    """checkpoint_format=sharded under FSDP: each rank writes its shards (no safetensors); the run resumes
    exactly on 2 ranks and on 1 process (a different world size), and its gathered networks equal the
    uninterrupted single-process run's."""
    from selfforcing.training.checkpoint import checkpoint_path, read_checkpoint_weights
    from tests.test_self_forcing import sf_cfg

    def cfg(name: str, *extra: str):
        return sf_cfg(teacher, tmp_path, f"name={name}", "num_threads=1", "causal.window=4", "ckpt_every=1", *extra)

    sharded = ("distributed=fsdp", "checkpoint_format=sharded")
    runs = [cfg("two", "steps=2", *sharded), cfg("two", "steps=3", *sharded)]
    spawn_ranks(_worker, runs, "sf", fresh=(tmp_path / "two",))
    step2 = checkpoint_path(tmp_path / "two", 2)
    assert not list(step2.glob("*.safetensors")) and len(list((step2 / "sharded").glob("*.distcp"))) == 2

    def single(name: str, steps: int) -> SelfForcingTrainer:
        t = SelfForcingTrainer(cfg(name, f"steps={steps}", "grad_accum_steps=2"))
        draw = t.exit_step  # the two ranks' first rollouts share s*: so do the single process's two
        t.exit_step = lambda kind, i: draw(kind, i % 1)
        return t

    single("straight", 3).train()
    import shutil

    shutil.copytree(tmp_path / "two", tmp_path / "one")  # the 2-rank run, resumed on 1 process from step 2
    (tmp_path / "one" / "checkpoints" / "latest").write_text(step2.name)
    single("one", 3).train()
    reference, _ = _weights(tmp_path / "straight")
    resumed = {name: read_checkpoint_weights(checkpoint_path(tmp_path / "two", 3), name) for name in reference}
    assert_same(resumed, reference)
    assert_same(_weights(tmp_path / "one")[0], reference)
