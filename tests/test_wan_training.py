"""The Wan recipe (configs/wan/sf_dmd_1.3b.yaml) end to end at a tiny size: Self Forcing + DMD from a Wan
folder and a prompt file, on one process and on two with FSDP2 (equal, resumed exactly), and the
checkpoint streams with ``selfforcing generate --model``."""

import pytest
import torch

pytest.importorskip("diffusers")

from selfforcing.cli import main  # noqa: E402
from selfforcing.config import load_config  # noqa: E402
from selfforcing.data.video_io import read_video  # noqa: E402
from selfforcing.training.self_forcing import SelfForcingTrainer  # noqa: E402

from .test_distributed import spawn_ranks  # noqa: E402
from .test_fsdp import _weights, _worker, assert_same  # noqa: E402
from .wan_tiny import write_diffusers_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return write_diffusers_pipeline(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny")


def recipe(folder, tmp_path, name, *extra):
    (tmp_path / "prompts.txt").write_text("a red circle moving right\nthe cat walks on grass\na small blue triangle\n")
    tiny = [
        f"name={name}",
        f"out_dir={tmp_path}",
        f"model.wan={folder}",
        "init_from=''",  # the folder's own DiT starts the causal student
        f"data.prompts={tmp_path / 'prompts.txt'}",
        "data.frames=21",  # 6 latent frames: two chunks of 3
        "data.height=32",
        "data.width=48",
        "precision=fp32",
        "device=cpu",
        "num_threads=1",
        "gradient_checkpointing=false",
        "steps=3",
        "ckpt_every=1",
        "sample_every=1000",
        "num_samples=1",
        "optim.ema_start=0",
        "optim.lr=1e-3",
        "distill.critic_lr=1e-3",
        "distill.critic_steps_per_generator_step=2",
    ]
    return load_config("configs/wan/sf_dmd_1.3b.yaml", [*tiny, *extra])


def test_the_wan_recipe_trains_and_its_checkpoint_streams(wan_folder, tmp_path):
    t = SelfForcingTrainer(recipe(wan_folder, tmp_path, "single", "distributed=ddp"))
    assert t.latent_shape == (6, 16, 4, 6) and t.cfg.causal.frames_per_block == 3
    assert not any(True for _ in t.model.text_encoder.parameters())  # umT5 is shared and frozen
    assert t.teacher.text_encoder is t.model.text_encoder is t.critic.text_encoder
    start = {k: v.clone() for k, v in t.model.dit.state_dict().items()}
    run = t.train()
    weights, ckpt = _weights(run)
    assert set(weights) == {"model", "ema", "critic"} and all(k.startswith("dit.") for k in weights["model"])
    assert any(not torch.equal(start[k.removeprefix("dit.")], v) for k, v in weights["model"].items())
    out = tmp_path / "stream.mp4"
    main(
        ["generate", "--model", str(wan_folder), "--checkpoint", str(ckpt / "ema.safetensors"), "--stream"]
        + [
            "--prompt",
            "a red circle moving right",
            "--frames",
            "21",
            "--height",
            "32",
            "--width",
            "48",
            "--out",
            str(out),
        ]
    )
    assert read_video(out).shape == (21, 32, 48, 3)
    from selfforcing.config import ConfigError

    with pytest.raises(ConfigError, match="model.wan takes the DiT's size from .*drop model.num_layers"):
        SelfForcingTrainer(recipe(wan_folder, tmp_path, "bad", "model.num_layers=3"))


def test_the_wan_recipe_on_two_fsdp_processes_equals_one_and_resumes(wan_folder, tmp_path):
    fsdp = ("distributed=fsdp",)
    runs = [recipe(wan_folder, tmp_path, "fsdp", *fsdp), recipe(wan_folder, tmp_path, "resumed", *fsdp, "steps=2")]
    runs.append(recipe(wan_folder, tmp_path, "resumed", *fsdp))
    spawn_ranks(_worker, runs, "sf", fresh=(tmp_path / "fsdp", tmp_path / "resumed"))
    single = SelfForcingTrainer(recipe(wan_folder, tmp_path, "single", "distributed=ddp", "grad_accum_steps=2"))
    draw = single.exit_step  # the two ranks' first rollouts share s*: so do the single process's two
    single.exit_step = lambda kind, i: draw(kind, i % 1)
    single.train()
    sharded = _weights(tmp_path / "fsdp")[0]
    assert_same(sharded, _weights(tmp_path / "single")[0], atol=1e-5)  # float summation order, through Adam
    assert_same(_weights(tmp_path / "resumed")[0], sharded, atol=0)
