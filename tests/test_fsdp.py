"""FSDP2 (distributed: fsdp) on two CPU processes (gloo): the same training as one process with gradient
accumulation, checkpoints in the single-process layout, and an exact resume."""

import pytest
import torch
import torch.distributed as dist

from selfforcing.training.trainer import Trainer
from tests.test_distributed import as_torchrun_rank, like_two_ranks, spawn_ranks


def _worker(rank: int, port: int, cfgs, kind: str) -> None:
    as_torchrun_rank(rank, port)
    for cfg in cfgs:  # several runs in one process group (e.g. a run, then its resumption)
        trainer = (Trainer if kind == "sf" else Trainer)(cfg)
        assert trainer.sharded
        trainer.train()
    dist.destroy_process_group()


def _weights(run_dir):
    from safetensors.torch import load_file

    from selfforcing.weights import latest_checkpoint

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
    spawn_ranks(_worker, runs, "sf")
    single = like_two_ranks(cfg("single", "steps=3", "grad_accum_steps=2"))
    single.train()
    sharded, ckpt = _weights(tmp_path / "fsdp")
    reference, _ = _weights(tmp_path / "single")
    assert set(sharded) == {"model", "ema", "critic"} | ({"discriminator_head"} if loss == "gan" else set())
    # FSDP over 2 ranks == accumulation over 2 micro-batches in 1 process (the GAN's finite-difference R1/R2
    # divides by 0.01: float noise in the summation order grows 100x)
    assert_same(sharded, reference, atol=1e-5 if loss == "gan" else 1e-6)
    resumed, _ = _weights(tmp_path / "resumed")
    assert_same(resumed, sharded, atol=0)  # stopped at step 2 and resumed: the uninterrupted run, exactly
    start = Trainer(cfg("start"))
    assert any(not torch.equal(start.model.state_dict()[k], v) for k, v in sharded["model"].items())
    # a sharded run's checkpoint is an ordinary one: it loads without FSDP
    from selfforcing.pipeline import load_pipeline

    assert load_pipeline(ckpt).model.dit.cfg == single.model.dit.cfg


def test_fsdp_teacher_with_accumulation_equals_one_process(tmp_path):
    from selfforcing.config import load_config
    from tests.conftest import TINY

    def cfg(name, *extra):
        return load_config(None, [*TINY, f"out_dir={tmp_path}", f"name={name}", "steps=2", "num_threads=1", *extra])

    spawn_ranks(_worker, [cfg("fsdp", "distributed=fsdp", "grad_accum_steps=2")], "t")
    Trainer(cfg("single", "grad_accum_steps=4")).train()
    assert_same(_weights(tmp_path / "fsdp")[0], _weights(tmp_path / "single")[0])


def test_an_unknown_distributed_engine_is_refused(tiny_cfg):
    from selfforcing.config import ConfigError

    with pytest.raises(ConfigError, match="distributed must be ddp or fsdp"):
        tiny_cfg("distributed=deepspeed")


def test_sharded_checkpoints_resume_exactly_on_two_processes_or_one(teacher, tmp_path):
    """checkpoint_format=sharded under FSDP: each rank writes its shards (no safetensors); the run resumes
    exactly on 2 ranks and on 1 process (a different world size), and its gathered networks equal the
    uninterrupted single-process run's."""
    from selfforcing.weights import checkpoint_path, read_checkpoint_weights
    from tests.test_self_forcing import sf_cfg

    def cfg(name: str, *extra: str):
        return sf_cfg(teacher, tmp_path, f"name={name}", "num_threads=1", "causal.window=4", "ckpt_every=1", *extra)

    sharded = ("distributed=fsdp", "checkpoint_format=sharded")
    runs = [cfg("two", "steps=2", *sharded), cfg("two", "steps=3", *sharded)]
    spawn_ranks(_worker, runs, "sf")
    step2 = checkpoint_path(tmp_path / "two", 2)
    assert not list(step2.glob("*.safetensors")) and len(list((step2 / "sharded").glob("*.distcp"))) == 2

    def single(name: str, steps: int) -> Trainer:
        return like_two_ranks(cfg(name, f"steps={steps}", "grad_accum_steps=2"))

    single("straight", 3).train()
    import shutil

    shutil.copytree(tmp_path / "two", tmp_path / "one")  # the 2-rank run, resumed on 1 process from step 2
    (tmp_path / "one" / "checkpoints" / "latest").write_text(step2.name)
    single("one", 3).train()
    reference, _ = _weights(tmp_path / "straight")
    resumed = {name: read_checkpoint_weights(checkpoint_path(tmp_path / "two", 3), name) for name in reference}
    assert_same(resumed, reference)
    assert_same(_weights(tmp_path / "one")[0], reference)
    # one tensor missing from one shard (a rank's half of a weight) is refused and named, not loaded half new
    from tests.test_training import damaged

    key = "networks.model.dit.blocks.0.self_attn.q.weight"
    bad = damaged(step2, "half_lost", lambda meta: meta.state_dict_metadata[key].chunks.pop())
    with pytest.raises(ValueError, match=f"pieces of {key} cover 512 of its 1024 elements"):
        single("bad", 3).load(bad)


def _adam(seed: int = 0):
    """A small model and its AdamW, the same for a given seed."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _update(model, optimizer) -> list[torch.Tensor]:
    model(torch.linspace(-1, 1, 12).view(3, 4)).square().sum().backward()
    optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fmt", ["sharded", "full"])
def test_saving_before_the_first_update_changes_nothing(tmp_path, fmt):
    """An optimizer saved before its first step (the generator's, during the critic's warm-up) keeps no
    state, and its checkpoint holds none: its first update, straight on or resumed, is the one of a run
    that never saved (torch's state-dict API would give it state by a step at lr 0, which Adam counts)."""
    from selfforcing.training.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
    from selfforcing.training.fsdp import load_optimizer_state, load_sharded_state, optimizer_state, sharded_state
    from selfforcing.weights import checkpoint_path, sharded_keys

    reference = _update(*_adam())
    model, opt = _adam()
    if fmt == "sharded":
        state = sharded_state({"model": model}, {"optimizer": ([model], opt)})
        save_sharded_checkpoint(tmp_path, 0, state, {}, "", keep=1, is_main=True)
    else:
        saved = optimizer_state([model], opt)
    assert not opt.state and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(_update(model, opt), reference, strict=True))  # bitwise
    resumed, opt = _adam(seed=1)  # other weights: the checkpoint's replace them
    if fmt == "sharded":
        ckpt = checkpoint_path(tmp_path, 0)
        state = sharded_state({"model": resumed}, {"optimizer": ([resumed], opt)}, saved=sharded_keys(ckpt))
        load_sharded_checkpoint(ckpt, state)
        load_sharded_state({"model": resumed}, {"optimizer": ([resumed], opt)}, state)
    else:
        resumed.load_state_dict(_adam()[0].state_dict())
        load_optimizer_state([resumed], opt, saved)
    assert not opt.state
    assert all(torch.equal(a, b) for a, b in zip(_update(resumed, opt), reference, strict=True))


def test_a_sharded_checkpoint_before_the_generators_first_update_leaves_the_run_unchanged(teacher, tmp_path):
    """The critic warms up for a step, a sharded checkpoint is written, then the generator takes its first
    update: the run, and the run resumed from that checkpoint, equal the one that never saved then."""
    from tests.test_self_forcing import sf_cfg

    def run(name: str, *extra: str) -> None:
        flags = ("checkpoint_format=sharded", "distill.critic_warmup_steps=1", "num_threads=1")
        Trainer(sf_cfg(teacher, tmp_path, f"name={name}", *flags, *extra)).train()

    run("straight", "steps=2", "ckpt_every=1000")  # saves at its end only
    run("saved", "steps=2", "ckpt_every=1")  # saves at step 1, before the generator's first update
    run("resumed", "steps=1", "ckpt_every=1")
    run("resumed", "steps=2", "ckpt_every=1")
    from selfforcing.weights import latest_checkpoint, read_checkpoint_weights

    def weights(name: str) -> dict:
        ckpt = latest_checkpoint(tmp_path / name)
        return {net: read_checkpoint_weights(ckpt, net) for net in ("model", "ema", "critic")}

    straight = weights("straight")
    assert_same(weights("saved"), straight, atol=0)
    assert_same(weights("resumed"), straight, atol=0)


def test_fsdp_mixed_precision_streams_its_kv_cache_in_bf16(tmp_path):
    """Sharded with bf16 mixed precision, the DiT keeps fp32 master weights but computes in bf16: a rollout's
    KV cache is allocated in bf16 (half the memory), not in the master dtype."""
    import subprocess
    import sys

    script = f"""
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from selfforcing.models import ShapesTextEncoder, VideoDiT, dit_config
from selfforcing.models.kv_cache import KVCache
from selfforcing.models.t2v import TextToVideo
from selfforcing.training.fsdp import shard_text_to_video
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
model = TextToVideo(ShapesTextEncoder(["red", "circle"], dim=32), VideoDiT(dit_config("tiny")))
shard_text_to_video(model, init_device_mesh("cpu", (1,)), "bf16")
assert next(model.dit.parameters()).dtype == torch.float32
print(KVCache.for_model(model.dit, 1, 4, 3, 6).k.dtype)
dist.destroy_process_group()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "torch.bfloat16"
