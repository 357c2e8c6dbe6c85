"""Self Forcing with LoRA adapters on the generator (``lora.rank``): only the adapters train, are averaged and
are checkpointed; the base is frozen and stored once; resume is exact; a run loads for streaming; merging
the adapters into the weights changes nothing."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from selfforcing.config import ConfigError
from selfforcing.models.dit import VideoDiT, dit_config
from selfforcing.models.lora import add_adapters, is_adapter, merged_state
from selfforcing.pipeline import load_pipeline
from selfforcing.training.trainer import Trainer
from selfforcing.weights import latest_checkpoint
from tests.test_self_forcing import sf_cfg


def lora_cfg(teacher, tmp_path, *extra):
    return sf_cfg(teacher, tmp_path, "lora.rank=4", "lora.alpha=8", *extra)


def test_only_the_adapters_train_and_are_checkpointed(teacher, tmp_path):
    t = Trainer(lora_cfg(teacher, tmp_path, "steps=2"))
    named = dict(t.model.named_parameters())
    adapters = {n for n in named if is_adapter(n)}
    assert adapters and {id(named[n]) for n in adapters} == {
        id(p) for p in t.optimizers["generator"].param_groups[0]["params"]
    }
    base = {n: p.detach().clone() for n, p in named.items() if n not in adapters}
    t.micro_loss("generator", 0)[0].backward()
    assert all(named[n].grad is None for n in base)  # no gradient reaches the base, the text encoder included
    assert all(named[n].grad is not None for n in adapters if ".lora_B." in n)
    t.optimizers["generator"].zero_grad(set_to_none=True)
    ema_q = t.ema.model.dit.blocks[0].self_attn.q.base_layer.weight
    assert ema_q is t.model.dit.blocks[0].self_attn.q.base_layer.weight  # the base is stored once
    run = t.train()
    assert all(torch.equal(p, base[n]) for n, p in t.model.named_parameters() if n in base)
    assert any(named[n].abs().sum() > 0 for n in adapters if ".lora_B." in n)  # B starts at 0 and moved
    ckpt = latest_checkpoint(run)
    for network in ("model", "ema"):
        assert set(load_file(ckpt / f"{network}.safetensors")) == {f"{n}" for n in adapters}
    assert len(load_file(ckpt / "critic.safetensors")) > 0  # the critic trains whole


def test_a_lora_run_resumes_exactly_and_loads_for_streaming(teacher, tmp_path):
    a = Trainer(lora_cfg(teacher, tmp_path, "steps=4", "name=a"))
    a.train()
    Trainer(lora_cfg(teacher, tmp_path, "steps=2", "name=b")).train()
    b = Trainer(lora_cfg(teacher, tmp_path, "steps=4", "name=b"))
    b.train()
    for name in ("model", "ema", "critic"):
        sa, sb = a.networks()[name].state_dict(), b.networks()[name].state_dict()
        assert all(torch.equal(v, sb[k]) for k, v in sa.items()), name
    pipe = load_pipeline(b.run_dir)  # the base from init_from, then the EMA adapters
    want = b.ema.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in pipe.model.state_dict().items())
    assert pipe.open_stream(["a small red circle moving right"], seed=0) is not None
    with pytest.raises(ConfigError, match="lora.critic shares the teacher's weights, which FSDP2 cannot shard"):
        lora_cfg(teacher, tmp_path, "distributed=fsdp", "lora.critic=true").validate()


def test_merged_adapters_give_the_same_model():
    torch.manual_seed(0)
    dit = add_adapters(VideoDiT(dit_config("tiny", in_channels=3, out_channels=3, text_dim=32)), rank=4, alpha=8)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)  # trained adapters (B starts at 0)
    plain = VideoDiT(dit_config("tiny", in_channels=3, out_channels=3, text_dim=32))
    plain.load_state_dict(merged_state(dit))  # strict: exactly the plain DiT's names
    x, t, ctx = torch.randn(2, 2, 3, 8, 8), torch.rand(2) * 1000, torch.randn(2, 5, 32)
    torch.testing.assert_close(plain(x, t, ctx), dit(x, t, ctx), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain.blocks[0].self_attn.q.weight, dit.blocks[0].self_attn.q.base_layer.weight)


def test_the_exported_lora_file_loads_in_diffusers_wan_pipeline(tmp_path):
    """original_lora_state as a .safetensors file: diffusers' WanPipeline.load_lora_weights reads it, and its
    transformer then computes what our adapted DiT computes."""
    pytest.importorskip("diffusers")
    from diffusers import WanPipeline
    from safetensors.torch import save_file

    from selfforcing.models.lora import original_lora_state
    from selfforcing.wan.dit_weights import load_dit
    from tests.wan_tiny import diffusers_velocity, dit_inputs, write_diffusers_pipeline

    folder = write_diffusers_pipeline(tmp_path / "pipe")
    torch.manual_seed(0)
    ours = add_adapters(load_dit(folder), rank=4, alpha=8)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    save_file(original_lora_state(ours), tmp_path / "lora.safetensors")
    pipe = WanPipeline.from_pretrained(folder)
    x, t, ctx = dit_inputs(c=16)
    before = diffusers_velocity(pipe.transformer, x, t, ctx)
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    want = diffusers_velocity(pipe.transformer, x, t, ctx)
    with torch.no_grad():
        got = ours(x, t, ctx)
    assert (want - before).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_export_lora_writes_the_adapters_and_the_merged_dit(teacher, tmp_path, capsys):
    from selfforcing.cli import main
    from selfforcing.wan.dit_weights import load_dit

    run = Trainer(lora_cfg(teacher, tmp_path, "steps=2")).train()
    lora, merged_file = tmp_path / "lora.safetensors", tmp_path / "m.safetensors"
    main(["export-lora", str(run), "--out", str(lora), "--merged", str(merged_file)])
    pipe = load_pipeline(run)
    adapters = load_file(lora)
    assert len(adapters) == 3 * sum(".lora_A." in k for k in pipe.model.dit.state_dict())  # A, B, alpha
    merged = load_dit(merged_file)
    x, t, ctx = torch.randn(2, 6, 3, 16, 16), torch.rand(2) * 1000, torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, ctx), pipe.model.dit(x, t, ctx), atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit):
        main(["export-lora", str(teacher), "--out", str(tmp_path / "x.safetensors")])
    assert "is not a LoRA run" in capsys.readouterr().err


def test_lora_under_ddp_equals_one_process_with_accumulation(teacher, tmp_path):
    from tests.test_distributed import _train_worker, like_two_ranks, spawn_ranks

    def cfg(name: str, *extra: str):
        return lora_cfg(teacher, tmp_path, f"name={name}", "steps=2", "num_threads=1", *extra)

    out = str(tmp_path / "ddp_state")
    spawn_ranks(_train_worker, cfg("ddp"), out)
    rank0 = torch.load(f"{out}.0")
    single = like_two_ranks(cfg("single", "grad_accum_steps=2"))
    single.train()
    moved = False
    for name, net in single.networks().items():
        for key, value in net.state_dict().items():
            assert torch.allclose(rank0[name][key], value, atol=1e-6), f"{name}.{key}"
            moved |= is_adapter(key) and ".lora_B." in key and bool(value.abs().sum() > 0)
    assert moved


@pytest.mark.parametrize("loss", ["dmd", "gan"])
def test_adapters_on_the_critic_share_the_teacher_s_weights_and_resume_exactly(teacher, tmp_path, loss):
    """lora.critic: the critic is the teacher's own weights (the same tensors) plus adapters; only the adapters
    (and the GAN's head) train and are checkpointed; a resumed run equals an uninterrupted one."""
    flags = ("lora.critic=true", f"distill.loss={loss}")
    a = Trainer(lora_cfg(teacher, tmp_path, "steps=4", "name=a", *flags))
    critic, q = a.objective.critic.dit, a.objective.teacher.dit.blocks[0].self_attn.q
    assert critic.blocks[0].self_attn.q.base_layer.weight is q.weight  # stored once
    optimized = {id(p) for p in a.optimizers["critic"].param_groups[0]["params"]}
    adapters = {id(p) for n, p in critic.named_parameters() if is_adapter(n)}
    head = {id(p) for p in a.objective.discriminator.head.parameters()} if loss == "gan" else set()
    assert adapters and optimized == adapters | head
    teacher_weights = {k: v.clone() for k, v in a.objective.teacher.state_dict().items()}
    a.train()
    assert all(torch.equal(v, teacher_weights[k]) for k, v in a.objective.teacher.state_dict().items())
    assert not any(p.requires_grad or p.grad is not None for p in a.objective.teacher.parameters())  # stays frozen
    assert all(is_adapter(k) for k in load_file(latest_checkpoint(a.run_dir) / "critic.safetensors"))
    Trainer(lora_cfg(teacher, tmp_path, "steps=2", "name=b", *flags)).train()
    b = Trainer(lora_cfg(teacher, tmp_path, "steps=4", "name=b", *flags))
    b.train()
    for name in a.networks():
        sa, sb = a.networks()[name].state_dict(), b.networks()[name].state_dict()
        assert all(torch.equal(v, sb[k]) for k, v in sa.items()), name
    with pytest.raises(ConfigError, match="lora.critic needs lora.rank"):
        sf_cfg(teacher, tmp_path, "lora.critic=true").validate()


@pytest.mark.parametrize("lora", [False, True])
def test_frozen_weights_in_bf16_train_in_fp32(teacher, tmp_path, lora):
    """frozen_precision=bf16: the teacher (and a LoRA run's bases, the critic's being the teacher's) are stored
    in bf16; everything an optimizer updates stays fp32; the run trains, resumes exactly and streams."""
    flags = ("lora.rank=4", "lora.alpha=8", "lora.critic=true") if lora else ()
    cfg = sf_cfg(teacher, tmp_path, "frozen_precision=bf16", "steps=2", *flags)
    t = Trainer(cfg)
    assert {p.dtype for p in t.objective.teacher.dit.parameters()} == {torch.bfloat16}
    for net in (t.model.dit, t.ema.model.dit, t.objective.critic.dit):
        dtypes = {n: p.dtype for n, p in net.named_parameters()}
        trains = {n for n, p in net.named_parameters() if is_adapter(n)} if lora else set(dtypes)
        assert {dtypes[n] for n in trains} == {torch.float32}, "what trains (and its average) is fp32"
        assert {d for n, d in dtypes.items() if n not in trains} <= {torch.bfloat16}, "the frozen base is bf16"
    for opt in t.optimizers.values():
        assert {p.dtype for g in opt.param_groups for p in g["params"]} == {torch.float32}
    run = t.train()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics) and metrics[0]["generator_grad_norm"] > 0
    Trainer(sf_cfg(teacher, tmp_path, "frozen_precision=bf16", "steps=1", "name=b", *flags)).train()
    b = Trainer(sf_cfg(teacher, tmp_path, "frozen_precision=bf16", "steps=2", "name=b", *flags))
    b.train()
    for name, net in t.networks().items():
        other = b.networks()[name].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in net.state_dict().items()), name
    assert load_pipeline(run).open_stream(["a small red circle moving right"], seed=0) is not None
    with pytest.raises(ConfigError, match="frozen_precision must be fp32 or bf16"):
        sf_cfg(teacher, tmp_path, "frozen_precision=fp16").validate()


def test_a_full_rank_lora_run_sees_the_full_run_s_gradients_through_its_adapters(teacher, tmp_path):
    """A LoRA run and a full run from the same weights (the full DiT = the adapted one merged) compute the same
    Self Forcing + DMD loss on the same draws, and at full rank (r >= every Linear's sides) the adapters'
    gradients are exactly the full run's weight gradient G seen through them: dL/dB = s G A^T and
    dL/dA = s B^T G, s = alpha / r. (The trajectories then differ by the parametrisation, as they must: AdamW
    on (A, B) is not AdamW on W.)"""
    from peft.tuners.lora import LoraLayer

    full = Trainer(sf_cfg(teacher, tmp_path, "name=full"))
    lora = Trainer(sf_cfg(teacher, tmp_path, "name=lora", "lora.rank=64", "lora.alpha=32"))
    layers = {name: m for name, m in lora.model.dit.named_modules() if isinstance(m, LoraLayer)}
    assert all(max(m.in_features, m.out_features) <= 64 for m in layers.values())  # full rank
    torch.manual_seed(0)
    with torch.no_grad():  # a state away from the start: B = 0 would make dL/dA vanish
        for m in layers.values():
            m.lora_B["default"].weight.normal_(std=0.05)
    full.model.dit.load_state_dict(merged_state(lora.model.dit))
    loss_full, _ = full.micro_loss("generator", 0)
    loss_lora, _ = lora.micro_loss("generator", 0)
    torch.testing.assert_close(loss_lora, loss_full, rtol=1e-4, atol=1e-6)
    loss_full.backward()
    loss_lora.backward()
    weights = dict(full.model.dit.named_parameters())
    for name, m in layers.items():
        g = weights[f"{name}.weight"].grad
        a, b, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
        scale = g.abs().max()
        torch.testing.assert_close(b.grad / scale, s * g @ a.T / scale, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(a.grad / scale, s * b.T @ g / scale, rtol=1e-3, atol=1e-4)
    assert any(m.lora_A["default"].weight.grad.abs().sum() > 0 for m in layers.values())


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_lora_under_fsdp_equals_one_process_and_resumes_exactly(teacher, tmp_path, fmt):
    """Adapters under FSDP2 on 2 processes: the same adapters as one process accumulating 2 micro-batches, a
    checkpoint (either format) of the adapters alone, and a run stopped and resumed equal to one that was not."""
    from selfforcing.weights import checkpoint_path, read_checkpoint_weights
    from tests.test_distributed import like_two_ranks, spawn_ranks
    from tests.test_fsdp import _worker, assert_same

    def cfg(name: str, *extra: str):
        return lora_cfg(teacher, tmp_path, f"name={name}", "num_threads=1", "causal.window=4", "ckpt_every=1", *extra)

    fsdp = ("distributed=fsdp", f"checkpoint_format={fmt}")
    runs = [cfg("fsdp", "steps=3", *fsdp), cfg("resumed", "steps=2", *fsdp), cfg("resumed", "steps=3", *fsdp)]
    spawn_ranks(_worker, runs, "sf")
    single = like_two_ranks(cfg("single", "steps=3", "grad_accum_steps=2"))
    single.train()

    def weights(run: str) -> dict:
        return {n: read_checkpoint_weights(checkpoint_path(tmp_path / run, 3), n) for n in ("model", "ema", "critic")}

    sharded, reference = weights("fsdp"), weights("single")
    assert all(is_adapter(k) for n in ("model", "ema") for k in sharded[n]) and len(sharded["critic"]) > 0
    assert_same(sharded, reference)
    assert_same(weights("resumed"), sharded, atol=0)
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in sharded["model"].items())
