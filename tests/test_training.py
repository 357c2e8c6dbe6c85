import json
from pathlib import Path

import pytest
import torch

from selfforcing.config import ConfigError
from selfforcing.inference import generate_videos
from selfforcing.pipeline import load_pipeline
from selfforcing.training.trainer import Trainer
from selfforcing.weights import latest_checkpoint, load_weights, read_checkpoint_weights


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_training_run_lowers_the_loss(tiny_cfg):
    cfg = tiny_cfg("name=fall", "steps=100", "optim.lr=3e-3", "sample_every=1000", "ckpt_every=1000")
    run = Trainer(cfg).train()
    curve = losses(run)
    assert len(curve) == 100
    assert sum(curve[-10:]) / 10 < 0.75 * sum(curve[:10]) / 10


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_resume_replays_the_uninterrupted_loss_curve(tiny_cfg, fmt):
    common = ["steps=8", "sample_every=1000", "ckpt_every=4", "optim.lr=1e-3", f"checkpoint_format={fmt}"]
    straight = Trainer(tiny_cfg("name=straight", *common))
    straight.train()
    # an interrupted run: it crashes during step 7, after the checkpoint at step 4
    crashed = Trainer(tiny_cfg("name=resumed", *common))
    step = crashed.train_step

    def crash_at_step_7():
        if crashed.step == 6:
            raise KeyboardInterrupt
        return step()

    crashed.train_step = crash_at_step_7
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert len(losses(crashed.run_dir)) == 6
    resumed = Trainer(tiny_cfg("name=resumed", *common))
    resumed.train()
    assert resumed.step == 8
    assert losses(straight.run_dir) == losses(resumed.run_dir)  # exact; steps 5-6 re-run, not duplicated
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.model.parameters(), resumed.ema.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_sharded_checkpoint_loads_gathers_and_reports_damage(tiny_cfg, capsys):
    """checkpoint_format=sharded writes no safetensors; load_pipeline assembles the EMA from the shards,
    `gather-checkpoint` writes each network as the file a full checkpoint has, and a damaged one is named."""
    from safetensors.torch import load_file

    from selfforcing.cli import main
    from selfforcing.pipeline import load_pipeline

    t = Trainer(tiny_cfg("name=sharded", "steps=2", "sample_every=1000", "checkpoint_format=sharded"))
    ckpt = latest_checkpoint(t.train())
    assert not list(ckpt.glob("*.safetensors")) and (ckpt / "sharded" / ".metadata").is_file()
    pipe = load_pipeline(ckpt)
    for k, v in t.ema.model.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match=r"holds no network 'critic'; it holds \['ema', 'model'\]"):
        read_checkpoint_weights(ckpt, "critic")
    main(["gather-checkpoint", str(t.run_dir)])
    assert "ema.safetensors" in capsys.readouterr().out
    for name, net in t.networks().items():
        gathered = load_file(ckpt / f"{name}.safetensors")
        assert gathered.keys() == net.state_dict().keys()
        assert all(torch.equal(gathered[k], v) for k, v in net.state_dict().items())
    (ckpt / "sharded" / ".metadata").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the sharded checkpoint"):
        Trainer(tiny_cfg("name=sharded", "steps=3", "sample_every=1000", "checkpoint_format=sharded")).train()
    with pytest.raises(ConfigError, match="checkpoint_format must be full or sharded, got 'dcp'"):
        tiny_cfg("checkpoint_format=dcp")


def damaged(ckpt: Path, name: str, edit) -> Path:
    """A copy of a sharded checkpoint (``name`` beside it) whose index (``sharded/.metadata``) ``edit`` changed."""
    import pickle
    import shutil

    from torch.distributed.checkpoint import FileSystemReader

    copy = ckpt.parent / name
    shutil.copytree(ckpt, copy)
    meta = FileSystemReader(str(copy / "sharded")).read_metadata()
    edit(meta)
    (copy / "sharded" / ".metadata").write_bytes(pickle.dumps(meta))
    return copy


def test_a_sharded_checkpoint_missing_one_tensor_is_refused_with_its_name(tiny_cfg):
    """One tensor (a weight, or one optimizer moment of one weight) gone from the shards, its index entry, or
    its shard file cut short: resuming or reading the network refuses it and names the tensor (a lost
    optimizer moment used to be left at zeros, a lost piece of a weight at the new run's values)."""
    t = Trainer(tiny_cfg("name=sharded", "steps=1", "sample_every=1000", "checkpoint_format=sharded"))
    ckpt = latest_checkpoint(t.train())
    weight = "networks.model.dit.blocks.0.self_attn.q.weight"
    moment = "optimizers.optimizer.state.0.dit.blocks.0.self_attn.q.weight.exp_avg_sq"

    def lose_piece(key):
        def edit(meta):
            meta.state_dict_metadata[key].chunks.pop()  # its only piece: one process wrote it whole

        return edit

    def forget(key):
        return lambda meta: meta.state_dict_metadata.pop(key)

    def unindex(key):
        return lambda meta: meta.storage_data.pop(next(i for i in meta.storage_data if i.fqn == key))

    cases = [
        (lose_piece(weight), f"pieces of {weight} cover 0 of its"),
        (lose_piece(moment), f"pieces of {moment} cover 0 of its"),
        (forget(weight), f"lacks 1 tensors this run holds: {weight}"),
        (forget(moment), f"lacks 1 tensors this run holds: {moment}"),
        (unindex(moment), f"the piece of {moment} at \\(0, 0\\) is in no shard file"),
    ]
    for i, (edit, message) in enumerate(cases):
        bad = damaged(ckpt, f"bad_{i}", edit)
        with pytest.raises(ValueError, match=message):
            Trainer(tiny_cfg("name=sharded", "checkpoint_format=sharded")).load(bad)
    with pytest.raises(ValueError, match=f"pieces of {weight} cover 0"):
        read_checkpoint_weights(damaged(ckpt, "bad_read", lose_piece(weight)), "model")
    cut = damaged(ckpt, "cut", lambda meta: None)
    shard = next((cut / "sharded").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"the shard file {shard.name} holding .* is truncated"):
        Trainer(tiny_cfg("name=sharded", "checkpoint_format=sharded")).load(cut)
    Trainer(tiny_cfg("name=sharded", "checkpoint_format=sharded")).load(ckpt)  # the intact one loads


def test_checkpoint_roundtrip_gives_the_same_videos(tiny_cfg):
    trainer = Trainer(tiny_cfg("name=rt", "steps=3", "sample_every=1000", "ckpt_every=3"))
    run = trainer.train()
    pipe = load_pipeline(run)  # the run folder resolves to its latest checkpoint
    assert pipe.checkpoint.name == "step_000003"
    prompts = ["a small red circle moving left"]
    kw = dict(frames=4, height=16, width=16, seed=3, steps=2)
    a = generate_videos(trainer.ema.model.eval(), trainer.codec, prompts, **kw)
    b = generate_videos(pipe.model, pipe.codec, prompts, **kw)
    assert torch.equal(a, b)
    assert (run / "samples" / "step_000003.gif").is_file()
    assert (run / "checkpoints" / "step_000003" / "training_state.pt").is_file()
    assert (run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_old_checkpoints_are_pruned_and_no_temporary_folder_is_left(tiny_cfg):
    run = Trainer(tiny_cfg("name=prune", "steps=6", "sample_every=1000", "ckpt_every=2", "keep_checkpoints=2")).train()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_000004", "step_000006"]


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(tiny_cfg):
    run = Trainer(tiny_cfg("name=bad", "steps=2", "sample_every=1000", "ckpt_every=2")).train()
    ckpt = run / "checkpoints" / "step_000002"
    other = Trainer(tiny_cfg("name=other", "model.num_layers=3")).model
    with pytest.raises(ValueError, match=r"does not match the model(.|\n)*unexpected|missing"):
        load_weights(other, ckpt / "model.safetensors")
    wide = Trainer(tiny_cfg("name=wide", "model.ffn_dim=48")).model
    with pytest.raises(ValueError, match="shape mismatch"):
        load_weights(wide, ckpt / "model.safetensors")
    data = (ckpt / "ema.safetensors").read_bytes()
    (ckpt / "ema.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_pipeline(ckpt)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        load_pipeline(run / "samples")


def test_bf16_autocast_trains_and_fp16_needs_cuda(tiny_cfg):
    cfg = tiny_cfg("name=bf16", "steps=3", "precision=bf16", "sample_every=100", "ckpt_every=100")
    run = Trainer(cfg).train()
    assert all(torch.isfinite(torch.tensor(losses(run))))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="fp16 needs a CUDA device"):
            Trainer(tiny_cfg("name=fp16", "steps=1", "precision=fp16")).train()


def test_training_on_a_video_folder(tiny_cfg, tmp_path):
    """The user's own clips: the vocabulary comes from their prompts and is stored with the checkpoint."""
    from selfforcing.data import ShapesWorld, ShapesWorldConfig
    from selfforcing.data.video_io import to_uint8, write_video

    folder = tmp_path / "clips"
    b = ShapesWorld(ShapesWorldConfig(height=16, width=16, frames=6)).sample(3, seed=0)
    lines = []
    for i in range(3):
        write_video(folder / f"c{i}.mp4", to_uint8(b.video[i]))
        lines.append(json.dumps({"file": f"c{i}.mp4", "prompt": f"clip number {i}, a sunny day"}))
    (folder / "prompts.jsonl").write_text("\n".join(lines))
    cfg = tiny_cfg(
        "name=folder", "steps=2", "ckpt_every=2", "sample_every=2", "data.source=folder", f"data.folder={folder}"
    )
    run = Trainer(cfg).train()
    pipe = load_pipeline(run)
    assert set(pipe.cfg.text.vocab) == {"clip", "number", "0", "1", "2", "a", "sunny", "day"}
    assert (run / "samples" / "step_000002.gif").is_file()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pipe.model.encode_text(["a rainy day"])


def test_a_non_finite_update_is_skipped_counted_and_never_saved(tiny_cfg):
    """A NaN loss leaves the weights and optimizer as they were, the run goes on, and a run whose updates
    keep failing halts with the fix; non-finite weights are never checkpointed."""
    import math

    from selfforcing.training.trainer import NonFiniteTraining, Trainer

    t = Trainer(tiny_cfg("steps=4", "ckpt_every=1", "max_nonfinite_steps=2"))
    loss = t.objective.loss
    poisoned = {1}  # steps whose loss is NaN

    def poisoned_loss(*args):
        value, stats = loss(*args)
        return value * (math.nan if t.step in poisoned else 1.0), stats

    t.objective.loss = poisoned_loss
    t.train_step()
    before = [p.detach().clone() for p in t.model.parameters()]
    moments = [s["exp_avg"].clone() for s in t.optimizers["generator"].state.values()]
    stats = t.train_step()
    assert stats["skipped_updates"] == 1 and math.isnan(stats["grad_norm"])
    assert all(torch.equal(a, p) for a, p in zip(before, t.model.parameters(), strict=True))
    assert all(
        torch.equal(a, s["exp_avg"]) for a, s in zip(moments, t.optimizers["generator"].state.values(), strict=True)
    )
    stats = t.train_step()  # a good step resets the count in a row
    assert stats["skipped_updates"] == 1 and t.nonfinite_in_a_row == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, t.model.parameters(), strict=True))
    poisoned.update({3, 4})
    t.train_step()
    with pytest.raises(NonFiniteTraining, match="2 updates in a row had a non-finite loss"):
        t.train_step()
    # weights that went non-finite are not written: the last good checkpoint stays latest
    good = t.save()
    with torch.no_grad():
        next(t.model.parameters()).fill_(math.nan)
    assert t.save() is None
    from selfforcing.weights import latest_checkpoint

    assert latest_checkpoint(t.run_dir) == good
