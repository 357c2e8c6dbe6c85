"""The Wan recipe (configs/wan/sf_dmd_1.3b.yaml) end to end at a tiny size: Self Forcing + DMD from a Wan
folder and a prompt file, on one process and on two with FSDP2 (equal, resumed exactly), and the
checkpoint streams with ``selfforcing generate --model``."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from selfforcing.cli import main  # noqa: E402
from selfforcing.config import load_config  # noqa: E402
from selfforcing.data.video_io import read_video  # noqa: E402
from selfforcing.training.trainer import Trainer  # noqa: E402
from selfforcing.wan.dit_weights import load_dit  # noqa: E402
from selfforcing.wan.pipeline import RELEASED_CAUSAL, WAN_NEGATIVE_PROMPT, trained_causal  # noqa: E402
from selfforcing.weights import latest_checkpoint, read_checkpoint_weights  # noqa: E402

from .test_distributed import like_two_ranks, spawn_ranks  # noqa: E402
from .test_fsdp import _weights, _worker, assert_same  # noqa: E402
from .wan_tiny import write_diffusers_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return write_diffusers_pipeline(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny")


RECIPE = "configs/wan/sf_dmd_1.3b.yaml"
ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(folder, tmp_path, name) -> list[str]:
    """The 1.3B recipe shrunk to the tiny Wan folder, a 3-prompt file and 3 steps."""
    (tmp_path / "prompts.txt").write_text("a red circle moving right\nthe cat walks on grass\na small blue triangle\n")
    return [
        f"name={name}",
        f"out_dir={tmp_path}",
        f"model.wan={folder}",
        f"model.text_cache={tmp_path / 'umt5_cache'}",  # not the recipe's runs/umt5_cache: tiny umT5 embeddings
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


def recipe(folder, tmp_path, name, *extra):
    return load_config(RECIPE, [*tiny_overrides(folder, tmp_path, name), *extra])


def test_the_bf16_recipe_trains_its_critic_under_fsdp_with_checkpointing(wan_folder, tmp_path):
    """FSDP2 records which parameters train at a root's first forward. The critic first runs frozen (inside
    the generator's DMD loss), so unless the trainer finishes FSDP's set-up at sharding time, its first
    update hands bf16 gradients to its fp32 shards and the step fails: the recipe's own setting (bf16,
    fsdp). Two ranks of a fake process group in this process (no collective moves data: the values are
    not what is checked; a real two-process bf16 run is the same step). The critic recomputes its blocks
    in backward as the generator does (``gradient_checkpointing``): it trains on whole videos, and without
    it the 1.3B recipe's critic update alone holds ~90 GiB of activations (benchmarks/memory.py --training)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        overrides = ["precision=bf16", "distributed=fsdp", "gradient_checkpointing=true"]
        t = Trainer(recipe(wan_folder, tmp_path, "bf16", *overrides))
        assert t.sharded and t.model.dit.gradient_checkpointing and t.objective.critic.dit.gradient_checkpointing
        stats = t.train_step()  # a generator update, then the critic's
        assert "generator_loss" in stats and "critic_grad_norm" in stats
    finally:
        dist.destroy_process_group()


def test_the_training_memory_benchmark_counts_a_real_step_of_the_recipe(tmp_path):
    """``benchmarks/memory.py --training`` at a tiny size: the recipe's own step runs under fake tensors (in a
    subprocess: it patches the weight reader), and what stays allocated after it is exactly the weights and
    the Adam state (the gradients are freed after each update); two FSDP ranks of a fake process group hold
    about half of each. The 48 GB recipe's LoRA keeps adapters and bf16 bases only."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_training

    folder = memory_training.write_folder("tiny", tmp_path / "wan")
    one, two = (memory_training.run_row("tiny", n, folder, fake=True, device="cpu")["bytes"] for n in (1, 2))
    for row in (one, two):
        assert row["grads"] == 0  # freed by the optimizer steps
        state = row["weights"] + row["optimizer"]
        assert state <= row["between_steps"] <= 1.01 * state, row  # plus at most a few small host tensors
        assert row["peak"] > row["between_steps"]  # the rollouts' activations and caches come and go
    # weights: 4 fp32 DiTs (generator, EMA, teacher, critic) and the VAE; Adam: two moments of 2 DiTs, and a
    # step count per parameter tensor
    vae = one["weights"] - one["optimizer"]
    assert vae > 0 and abs(two["weights"] - two["optimizer"] - vae) < 8192  # the VAE is not sharded, the DiTs are
    assert 0.45 < two["optimizer"] / one["optimizer"] < 0.55
    lora = memory_training.run_row("tiny", 1, folder, fake=True, device="cpu", name="sf_dmd_1.3b_1gpu_48gb")["bytes"]
    assert lora["grads"] == 0 and lora["peak"] > lora["between_steps"]
    state = lora["weights"] + lora["optimizer"]  # a base shared by two networks counted once
    assert state <= lora["between_steps"] <= 1.01 * state, lora


def stream(wan_folder, checkpoint, out):
    """``selfforcing generate --model WAN --checkpoint CHECKPOINT --stream`` at the tiny size."""
    size = ["--frames", "21", "--height", "32", "--width", "48"]
    args = ["--model", str(wan_folder), "--checkpoint", str(checkpoint), "--stream", "--out", str(out)]
    main(["generate", *args, "--prompt", "a red circle moving right", *size])
    return out


def test_the_wan_recipe_trains_and_its_checkpoint_streams(wan_folder, tmp_path):
    t = Trainer(recipe(wan_folder, tmp_path, "single", "distributed=ddp", "causal.window=3"))
    assert t.objective.latent_shape == (6, 16, 4, 6) and t.cfg.causal.frames_per_block == 3
    assert not any(True for _ in t.model.text_encoder.parameters())  # umT5 is shared and frozen
    assert t.objective.teacher.text_encoder is t.model.text_encoder is t.objective.critic.text_encoder
    start = {k: v.clone() for k, v in t.model.dit.state_dict().items()}
    encoded = []
    encode = t.objective.teacher.encode_text
    t.objective.teacher.encode_text = lambda prompts: encoded.extend(prompts) or encode(prompts)
    run = t.train()
    assert t.cfg.distill.negative_prompt == WAN_NEGATIVE_PROMPT in encoded  # CFG's unconditional branch
    weights, ckpt = _weights(run)
    assert set(weights) == {"model", "ema", "critic"} and all(k.startswith("dit.") for k in weights["model"])
    assert any(not torch.equal(start[k.removeprefix("dit.")], v) for k, v in weights["model"].items())
    assert trained_causal(run) == t.cfg.causal != RELEASED_CAUSAL  # a run streams as it was trained (window 3)
    assert trained_causal(ckpt / "ema.safetensors") is None
    out = stream(wan_folder, run, tmp_path / "stream.mp4")
    assert read_video(out).shape == (21, 32, 48, 3)
    dit = load_dit(run, weights="model")
    assert all(torch.equal(dit.state_dict()[k.removeprefix("dit.")], v) for k, v in weights["model"].items())
    from selfforcing.config import ConfigError

    with pytest.raises(ConfigError, match="model.wan takes the DiT's size from .*drop model.num_layers"):
        Trainer(recipe(wan_folder, tmp_path, "bad", "model.num_layers=3"))


def test_the_wan_recipe_on_two_fsdp_processes_equals_one_and_resumes(wan_folder, tmp_path):
    """Full checkpoints (uninterrupted) and sharded ones (resumed at step 2) on 2 ranks; the sharded run
    streams straight from its shards."""
    fsdp = ("distributed=fsdp",)
    sharded = (*fsdp, "checkpoint_format=sharded")
    runs = [recipe(wan_folder, tmp_path, "fsdp", *fsdp), recipe(wan_folder, tmp_path, "resumed", *sharded, "steps=2")]
    runs.append(recipe(wan_folder, tmp_path, "resumed", *sharded))
    spawn_ranks(_worker, runs, "sf")
    single = like_two_ranks(recipe(wan_folder, tmp_path, "single", "distributed=ddp", "grad_accum_steps=2"))
    single.train()
    full = _weights(tmp_path / "fsdp")[0]
    assert_same(full, _weights(tmp_path / "single")[0], atol=1e-5)  # float summation order, through Adam
    resumed = latest_checkpoint(tmp_path / "resumed")
    assert not list(resumed.glob("*.safetensors"))
    assert_same({name: read_checkpoint_weights(resumed, name) for name in full}, full, atol=0)
    assert read_video(stream(wan_folder, tmp_path / "resumed", tmp_path / "v.mp4")).shape == (21, 32, 48, 3)


ENCODE_SIZE = ["--frames", "21", "--height", "32", "--width", "48", "--shard-size", "2", "--device", "cpu"]


def write_video_folder(videos, frames: int = 21):
    """Three random clips of ``frames`` frames of 32x48 with their prompts (prompts.jsonl)."""
    import json

    from selfforcing.data.video_io import write_video

    videos.mkdir()
    g = torch.Generator().manual_seed(0)
    lines = []
    for i, prompt in enumerate(["a red circle moving right", "the cat walks on grass", "a small blue triangle"]):
        clip = (torch.rand(frames, 32, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        write_video(videos / f"clip{i}.gif", clip, fps=8)
        lines.append(json.dumps({"file": f"clip{i}.gif", "prompt": prompt}))
    (videos / "prompts.jsonl").write_text("\n".join(lines))
    return videos


@pytest.mark.parametrize(
    "name",
    [
        "sf_dmd_1.3b_framewise",
        "sf_gan_1.3b",
        "tf_dmd_1.3b",
        "df_dmd_1.3b",
        "sf_dmd_1.3b_1gpu_80gb",
        "sf_dmd_1.3b_1gpu_48gb",
        "sf_dmd_i2v_1.3b",
    ],
)
def test_every_wan_recipe_trains_at_a_tiny_size(wan_folder, tmp_path, name):
    """Each configs/wan recipe as it is, on the tiny Wan folder: two steps, finite losses, and the paradigm,
    loss and chunking its file names. The ones that need real videos read encoded latents."""
    import json

    from selfforcing.training.trainer import Trainer

    extra = ["steps=2"]
    needs_videos = "source: latents" in (ROOT / f"configs/wan/{name}.yaml").read_text()
    if needs_videos:
        videos = write_video_folder(tmp_path / "videos", 25 if "i2v" in name else 21)
        encode = ["encode-videos", "--model", str(wan_folder), "--folder", str(videos), "--out", str(tmp_path / "lat")]
        size = ENCODE_SIZE if "i2v" not in name else ["--frames", "25", *ENCODE_SIZE[2:]]  # 1 + 6 latent frames
        main(encode + size)
        extra.append(f"data.latents={tmp_path / 'lat'}")
        extra += ["data.frames=25"] if "i2v" in name else []
    cfg = load_config(f"configs/wan/{name}.yaml", [*tiny_overrides(wan_folder, tmp_path, name), *extra])
    assert cfg.causal.frames_per_block == (1 if "framewise" in name else 3)
    assert cfg.data.source == ("latents" if needs_videos else "prompts")
    paradigm = {"sf": "self_forcing", "tf": "teacher_forcing", "df": "diffusion_forcing"}[name[:2]]
    assert (cfg.distill.paradigm, cfg.distill.loss) == (paradigm, name.split("_")[1])
    assert cfg.distill.image_to_video == ("i2v" in name)  # from the first latent frame of each real video
    if "1gpu" in name:  # the one-GPU recipes: the reference's batch by accumulation, the teacher in bf16
        assert (cfg.batch_size, cfg.grad_accum_steps, cfg.frozen_precision) == (1, 64, "bf16")
        assert cfg.lora.rank == (256 if "48gb" in name else 0)
        extra = ["grad_accum_steps=2"]  # two micro-batches an update at the tiny size
        cfg = load_config(f"configs/wan/{name}.yaml", [*tiny_overrides(wan_folder, tmp_path, name), "steps=2", *extra])
    run = Trainer(cfg).train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert "generator_loss" in rows[0]


def test_a_video_folder_encoded_once_trains_teacher_forcing(wan_folder, tmp_path, capsys):
    """encode-videos writes the Wan VAE's latents of a video folder into shards (a rerun resumes); a
    Teacher Forcing run reads them as its real videos (data.source=latents), without the VAE."""
    import json

    from selfforcing.data.latent_shards import LatentShards
    from selfforcing.data.video_folder import VideoFolder
    from selfforcing.wan.vae import load_vae

    videos = write_video_folder(tmp_path / "videos")
    args = ["encode-videos", "--model", str(wan_folder), "--folder", str(videos), "--out", str(tmp_path / "lat")]
    main(args + ENCODE_SIZE)
    assert sorted(p.name for p in (tmp_path / "lat").glob("*.safetensors")) == [
        "latents_00000.safetensors",
        "latents_00001.safetensors",
    ]
    shards = LatentShards(tmp_path / "lat", 21, 32, 48)
    folder = VideoFolder(videos, 21, 32, 48)
    latents, prompts = shards.sample(4, 0)
    codec = load_vae(wan_folder)
    for z, p in zip(latents, prompts, strict=True):
        i = shards.prompts.index(p)
        torch.testing.assert_close(z[None], codec.encode(folder[i][0][None]), atol=1e-5, rtol=1e-5)
    stamp = (tmp_path / "lat" / "latents_00000.safetensors").stat().st_mtime_ns
    main(args + ENCODE_SIZE)  # a rerun keeps the shards
    assert (tmp_path / "lat" / "latents_00000.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="latents of 21 frames of 32x48, the run expects 9"):
        LatentShards(tmp_path / "lat", 9, 32, 48)
    cfg = recipe(
        wan_folder,
        tmp_path,
        "tf",
        "distributed=ddp",
        "distill.paradigm=teacher_forcing",
        "distill.loss=diffusion",
        "data.source=latents",
        f"data.latents={tmp_path / 'lat'}",
        "steps=2",
    )
    run = Trainer(cfg).train()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_torchrun_trains_the_wan_recipe_with_fsdp_and_generate_streams_it(wan_folder, tmp_path):
    """The command docs/training_at_scale.md gives, at the tiny size: torchrun, 2 CPU processes, FSDP2 with
    sharded checkpoints; then `generate --model --checkpoint RUN --stream` reads the shards."""
    import os
    import shutil
    import subprocess
    import sys

    from .test_distributed import _free_port

    torchrun = [shutil.which("torchrun") or ""]
    if not torchrun[0]:  # the same launcher, as a module
        torchrun = [sys.executable, "-m", "torch.distributed.run"]
    overrides = [*tiny_overrides(wan_folder, tmp_path, "torchrun"), "distributed=fsdp", "checkpoint_format=sharded"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port())]
    done = subprocess.run(
        [*command, "-m", "selfforcing", "train", RECIPE, *overrides], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: checkpoints" in done.stdout
    ckpt = latest_checkpoint(tmp_path / "torchrun")
    assert ckpt.name == "step_000003" and len(list((ckpt / "sharded").glob("*.distcp"))) == 2
    assert read_video(stream(wan_folder, tmp_path / "torchrun", tmp_path / "v.mp4")).shape == (21, 32, 48, 3)


def test_wan_ode_pairs_initialise_the_student_that_self_forcing_starts_from(wan_folder, tmp_path):
    """`ode-pairs --model WAN` samples the folder's teacher on a prompt file (CFG on Wan's negative prompt);
    the trajectories start at the stored noise and end at the teacher's own Euler sample; the ODE-init
    recipe trains on them, and its run folder is the Self Forcing recipe's init_from."""
    from selfforcing.diffusion.samplers import sample_euler
    from selfforcing.training.ode_pairs import ODEPairs, teacher_segments
    from selfforcing.wan.pipeline import load_wan

    (tmp_path / "prompts.txt").write_text("a red circle moving right\nthe cat walks on grass\n")
    pairs = tmp_path / "pairs"
    args = ["ode-pairs", "--model", str(wan_folder), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(pairs)]
    size = ["--frames", "21", "--height", "32", "--width", "48", "--device", "cpu"]
    main([*args, *size, "--num", "3", "--shard-size", "2", "--batch-size", "2", "--teacher-steps", "6"])
    loaded = ODEPairs(pairs)
    assert loaded.index["settings"]["negative_prompt"] == WAN_NEGATIVE_PROMPT
    assert loaded.index["settings"]["guidance_scale"] == 5.0 and len(loaded) == 3
    assert set(loaded.prompts) <= {"a red circle moving right", "the cat walks on grass"}
    trajectory, prompts = loaded.sample(1, torch.Generator().manual_seed(0))
    assert trajectory.shape == (1, 5, 6, 16, 4, 6)
    # the stored path is the teacher's Euler path: re-run it from the stored noise
    teacher = load_wan(wan_folder, device="cpu").model
    cond, uncond = teacher.encode_text(prompts), teacher.encode_text([WAN_NEGATIVE_PROMPT])

    def velocity(x, sigma):
        return teacher.velocity_with_cfg(x, sigma, cond, uncond, 5.0)

    from selfforcing.training.ode_pairs import ODEPairSettings

    settings = ODEPairSettings(teacher_steps=6, teacher_shift=5.0)
    x = trajectory[:, 0]
    for sigmas in teacher_segments(settings):
        x = sample_euler(velocity, x, sigmas)
    torch.testing.assert_close(x, trajectory[:, -1], atol=1e-4, rtol=1e-4)

    ode = load_config(
        "configs/wan/ode_init_1.3b.yaml",
        [*tiny_overrides(wan_folder, tmp_path, "ode"), f"ode.pairs={pairs}", "steps=2", "optim.ema_start=0"],
    )
    run = Trainer(ode).train()
    ema = read_checkpoint_weights(latest_checkpoint(run), "ema")
    sf = Trainer(recipe(wan_folder, tmp_path, "sf", "distributed=ddp", f"init_from={run}"))
    for k, v in sf.model.dit.state_dict().items():
        assert torch.equal(v, ema[f"dit.{k}"]), k


def test_a_text_cache_of_every_prompt_spares_loading_umt5(wan_folder, tmp_path, monkeypatch):
    """Training reads umT5's embeddings from model.text_cache and never loads umT5 (~23 GB in fp32, on every
    GPU) when the cache holds every prompt of the run; a prompt it lacks loads umT5 once, in bf16 (Wan's own
    dtype), kept on the CPU between new prompts on CUDA, and the embeddings are the same either way."""
    import selfforcing.wan.text_encoder as wan_text
    from selfforcing.pipeline import LazyUMT5, wan_text_encoder

    load = wan_text.load_text_encoder
    cache = tmp_path / "umt5"
    prompts = ["a red circle moving right", "the cat walks on grass", "a small blue triangle"]  # the run's
    reference = load(wan_folder, dtype=torch.bfloat16, cache_dir=cache)
    expected = reference([*prompts, WAN_NEGATIVE_PROMPT])[0]  # what `selfforcing encode-prompts` writes

    def refuse(*args, **kw):
        raise AssertionError("umT5 was loaded")

    monkeypatch.setattr(wan_text, "load_text_encoder", refuse)
    wan_text_encoder.cache_clear()
    t = Trainer(recipe(wan_folder, tmp_path, "cached", "distributed=ddp", "steps=1", f"model.text_cache={cache}"))
    t.train()
    umt5 = t.model.text_encoder.shared
    assert isinstance(umt5, LazyUMT5) and not umt5.loaded
    assert torch.equal(t.model.encode_text([*prompts, WAN_NEGATIVE_PROMPT])[0], expected)

    loads = []
    monkeypatch.setattr(wan_text, "load_text_encoder", lambda *a, **kw: loads.append((a, kw)) or load(*a, **kw))
    new = ["a green square", "two dogs on a beach"]
    uncached = load(wan_folder, dtype=torch.bfloat16)  # runs umT5 on every prompt
    assert torch.equal(umt5([new[0], prompts[0]])[0], uncached([new[0], prompts[0]])[0])
    assert torch.equal(umt5(new)[0], uncached(new)[0])
    assert umt5.loaded and len(loads) == 1 and loads[0][0][1] == torch.bfloat16  # once, in bf16
    lazy = LazyUMT5(wan_folder, t.model.dit.cfg.text_dim, cache)
    lazy.place(torch.device("cuda"))  # never run on CUDA here: the load's placement is what is checked
    monkeypatch.setattr(wan_text, "load_text_encoder", lambda *a, **kw: loads.append((a, kw)) or refuse())
    with pytest.raises(AssertionError, match="umT5 was loaded"):
        lazy(["a purple star"])
    folder, dtype, device, offload = loads[1][0]
    assert (dtype, device, offload) == (torch.bfloat16, torch.device("cuda"), True)  # on the CPU between prompts
    wan_text_encoder.cache_clear()
