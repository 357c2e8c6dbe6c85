"""The field's causal models as presets (families.py): official settings, detection from the official file
names and layouts, their rules on the shapes-world model, LongLive's LoRA, and clear refusals."""

from dataclasses import replace

import peft
import pytest
import torch

pytest.importorskip("diffusers")

from selfforcing.cli import main  # noqa: E402
from selfforcing.config import CausalConfig  # noqa: E402
from selfforcing.families import FAMILIES, detect_family, family  # noqa: E402
from selfforcing.models.dit import DIT_PRESETS  # noqa: E402
from selfforcing.wan.dit_weights import CheckpointError  # noqa: E402
from selfforcing.wan.pipeline import family_of, load_wan  # noqa: E402

from .test_lora import longlive_lora  # noqa: E402
from .wan_tiny import diffusers_dit, wan_state_dict, write_diffusers_pipeline  # noqa: E402

SIZE = dict(height=32, width=48)


def test_every_family_s_official_settings():
    runnable = [f for f in FAMILIES.values() if not f.missing]
    assert {f.name for f in runnable} >= {"causvid", "causal-forcing", "longlive", "reward-forcing", "rolling-forcing"}
    for f in runnable:
        f.causal_config()  # validates
    assert family("causvid").causal_config().sigmas().tolist() == pytest.approx([1.0, 0.757, 0.522])
    cf = family("causal-forcing++1").causal_config()
    assert len(cf.sigmas(0)) == 4 and len(cf.sigmas()) == 1  # the first frame takes 4 steps, then 1
    rf = family("reward-forcing").causal_config()
    assert (rf.window, rf.sink, rf.rope, rf.sink_ema) == (6, 3, "slot", 0.999)  # local_attn_size 9, sink 3
    ll = family("longlive").causal_config(kv_cache="fp8")  # each setting still overridable
    assert (ll.window + ll.sink, ll.sink, ll.kv_cache) == (12, 3, "fp8")
    krea = family("krea").causal_config()
    assert (krea.scheme, krea.window, len(krea.sigmas()), krea.sigmas()[-1].item()) == ("rebuild", 6, 5, 0.0)
    with pytest.raises(NotImplementedError, match="does not run yet"):  # a family listed before its pieces exist
        replace(family("krea"), missing="a scheme of its own").causal_config()
    with pytest.raises(ValueError, match="unknown family 'wan'"):
        family("wan")


@pytest.mark.parametrize(
    "path,name",
    [
        ("ckpts/longlive_base.pt", "longlive"),
        ("rewardforcing.pt", "reward-forcing"),
        ("CausVid/autoregressive_checkpoint/model.pt", "causvid"),
        ("Causal-Forcing/framewise/causal_forcing.pt", "causal-forcing-frame"),
        ("Causal-Forcing/causal-forcing++/framewise-2step.pt", "causal-forcing++2"),
        ("checkpoints/self_forcing_dmd.pt", "self-forcing"),
        ("my_run/model.pt", None),  # too common a name to tell
    ],
)
def test_a_checkpoint_is_recognised_by_its_official_file_name(path, name):
    found = detect_family(path)
    assert (found.name if found else None) == name


def test_rules_on_the_shapes_world_model_count_in_chunks():
    toy = CausalConfig(3, window=12)  # the chunk-wise toy: 12 latent frames of training
    ll = family("longlive").rules_for(toy)
    assert (ll.sink, ll.window, ll.rope, ll.denoising_steps) == (3, 9, "absolute", toy.denoising_steps)
    frame = family("reward-forcing").rules_for(CausalConfig(1, window=12))
    assert (frame.sink, frame.window, frame.rope, frame.sink_ema) == (1, 2, "slot", 0.999)
    assert family("self-forcing").rules_for(toy) == toy  # the reference changes nothing
    assert family("causvid").rules_for(toy).window == 12  # the model's own steps and window


def test_a_family_of_another_size_is_refused():
    c = DIT_PRESETS["wan2.1-1.3b"]
    big = replace(family("longlive"), size="wan2.1-14b")
    with pytest.raises(CheckpointError, match="is a wan2.1-14b model"):
        family_of(big, None, c, "Wan2.1-T2V-1.3B")
    with pytest.raises(CheckpointError, match="Krea Realtime 14B is a wan2.1-14b model"):
        family_of(None, "krea-realtime-video-14b.safetensors", c, "Wan2.1-T2V-1.3B")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_diffusers_pipeline(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny-Diffusers")


@pytest.fixture(scope="module")
def weights():
    return wan_state_dict(diffusers_dit(seed=5, in_channels=16, out_channels=16))


def test_longlive_loads_with_its_lora_and_streams_with_its_rules(folder, weights, tmp_path):
    """LongLive's release: ``longlive_base.pt`` ({generator, ...}) and ``lora.pt`` ({generator_lora, ...}),
    recognised by name; its settings, its LoRA run unmerged, and a switch re-caches in one pass."""
    base = tmp_path / "longlive_base.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in weights.items()}, "critic": {}}, base)
    with pytest.raises(ValueError, match="runs with its LoRA"):
        load_wan(folder, base)
    plain = load_wan(folder, base, lora="none")
    lora = tmp_path / "lora.pt"
    longlive_lora(plain.model.dit, lora, rank=4, alpha=4.0)
    pipe = load_wan(folder, base, lora=lora)
    assert pipe.family.name == "longlive" and pipe.switch_mode == "one-pass"
    assert (pipe.causal.window, pipe.causal.sink) == (9, 3)
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in pipe.model.dit.modules())
    prompt = ["a red circle moving right"]
    chunks = list(pipe.stream(prompt, frames=45, switches={25: "a blue square"}, **SIZE))
    assert chunks[-1].prompts == ["a blue square"]
    base_chunks = list(plain.stream(prompt, frames=45, switches={25: "a blue square"}, **SIZE))
    assert not torch.allclose(chunks[0].latents, base_chunks[0].latents, atol=1e-4)  # the LoRA matters


def test_reward_forcing_s_flat_state_dict_loads_and_streams_by_slot(folder, weights, tmp_path):
    ckpt = tmp_path / "rewardforcing.pt"
    torch.save({f"model.{k}": v for k, v in weights.items()}, ckpt)  # a flat generator state dict
    pipe = load_wan(folder, ckpt)
    assert pipe.family.name == "reward-forcing" and pipe.causal.rope == "slot" and pipe.causal.sink_ema == 0.999
    stream = pipe.open_stream(["a red circle"], **SIZE)
    for _ in range(5):  # 15 latent frames: past the 9 it attends to, so the sink has blended
        next(stream)
    assert stream.cache.policy.sink_ema == 0.999 and stream.cache.num_frames == 6


def test_generate_with_a_family_on_the_shapes_world_model(tmp_path, capsys):
    out = tmp_path / "rf.gif"
    main(
        ["generate", "--checkpoint", "sf_dmd_chunk_toy", "--family", "reward-forcing", "--prompt", "a red circle"]
        + ["--frames", "24", "--out", str(out), "--switch", "12:a blue square"]
    )
    text = capsys.readouterr().out
    assert out.is_file() and "Reward Forcing's rules" in text and "window 6, sink 3" in text
    main(
        ["generate", "--checkpoint", "sf_dmd_frame_toy", "--family", "krea", "--prompt", "a red circle"]
        + ["--frames", "12", "--out", str(tmp_path / "krea.gif"), "--switch", "6:a blue square"]
    )
    text = capsys.readouterr().out
    assert "Krea Realtime 14B's rules" in text and "window 2, sink 0" in text  # 1 context frame + the chunk


def test_rolling_forcing_s_checkpoint_streams_its_window(folder, weights, tmp_path):
    ckpt = tmp_path / "rolling_forcing_dmd.pt"
    torch.save({"generator_ema": {f"model._fsdp_wrapped_module.{k}": v for k, v in weights.items()}}, ckpt)
    pipe = load_wan(folder, ckpt)
    assert pipe.family.name == "rolling-forcing" and pipe.causal.scheme == "rolling" and len(pipe.causal.sigmas()) == 5
    chunks = list(pipe.stream(["a red circle"], frames=33, **SIZE))  # 9 latent frames: the window drains
    assert [c.latents.shape[1] for c in chunks] == [3, 3, 3]
    toy = family("rolling-forcing").rules_for(CausalConfig(3, window=12))
    assert (toy.scheme, toy.rope, toy.sink, toy.window) == ("rolling", "slot", 0, 12)


def test_krea_s_safetensors_stream_by_rebuilding_from_a_reencoded_frame(folder, weights, tmp_path):
    """``krea-realtime-video-14b.safetensors`` holds ``model.<Wan key>``; from the third chunk on, the context's
    first frame is the VAE's encode of the last pixel frame of latent p - 3 (pixel frame 4 (p - 3))."""
    from safetensors.torch import save_file

    ckpt = tmp_path / "krea-realtime-video-14b.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in weights.items()}, ckpt)
    pipe = load_wan(folder, ckpt)
    assert pipe.family.name == "krea" and pipe.switch_mode == "blend" and pipe.causal.scheme == "rebuild"
    encoded, encode = [], pipe.codec.encode
    pipe.codec.encode = lambda video: encoded.append(video) or encode(video)
    chunks = list(pipe.stream(["a red circle"], frames=33, switches={13: "a blue square"}, **SIZE))
    video = torch.cat([c.frames for c in chunks], dim=1)
    assert len(encoded) == 1 and torch.allclose(encoded[0][:, 0], video[:, 12].clamp(-1, 1))
    assert chunks[-1].prompts == ["a blue square"]


def test_video_to_video_through_the_wan_vae(folder, weights, tmp_path):
    """The input is encoded chunk by chunk by the VAE's streaming encoder (1 + 4 (f - 1) frames, then 4 f):
    at strength 1 the stream is text-to-video's; below, its first chunk follows the input."""
    ckpt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in weights.items()}}, ckpt)
    pipe = load_wan(folder, ckpt)
    video = torch.rand(1, 21, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompt = ["a red circle"]
    plain = torch.cat([c.latents for c in pipe.stream(prompt, 21, **SIZE)], 1)
    full = torch.cat([c.latents for c in pipe.stream(prompt, 21, video=video, strength=1.0, **SIZE)], 1)
    torch.testing.assert_close(full, plain)
    low = torch.cat([c.latents for c in pipe.stream(prompt, 21, video=video, strength=0.2, **SIZE)], 1)
    target = pipe.codec.encode(video)
    assert (low - target).abs().mean() < (plain - target).abs().mean()


def test_training_starts_from_longlive_with_its_lora_merged(folder, weights, tmp_path):
    """``init_from=longlive_base.pt init_lora=lora.pt``: the trainer's DiT is LongLive's network ("generator",
    as its inference script reads) with the LoRA merged; a LoRA without a Wan model is refused."""
    from selfforcing.config import ConfigError, load_config
    from selfforcing.pipeline import wan_model
    from selfforcing.wan.dit_weights import load_dit
    from selfforcing.wan.lora_weights import load_lora

    base = tmp_path / "longlive_base.pt"
    other = {k: v + 1 for k, v in weights.items()}  # generator_ema differs: the family's network must be read
    torch.save({"generator": {f"model.{k}": v for k, v in weights.items()}, "generator_ema": other}, base)
    plain = load_dit(base, weights="generator", num_heads=2)
    lora = tmp_path / "lora.pt"
    longlive_lora(plain, lora, rank=4, alpha=4.0)
    cfg = load_config("configs/wan/sf_dmd_1.3b.yaml", [f"model.wan={folder}", f"init_from={base}", f"init_lora={lora}"])
    model = wan_model(cfg, cfg.init_from, cfg.init_lora)
    expected = load_lora(plain, lora, 256.0, merge=True)  # LongLive's alpha (256) over rank 4
    for k, v in expected.state_dict().items():
        assert torch.equal(model.dit.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="init_lora merges a LoRA into a Wan DiT"):
        load_config("configs/sf_dmd_toy.yaml", [f"init_lora={lora}"])


@pytest.mark.parametrize(
    "name,network,decoy,prefix",
    [  # the file, the entry its inference script reads (None: a flat state dict), another entry, key prefix
        ("checkpoints/self_forcing_dmd.pt", "generator_ema", "generator", "model."),
        ("CausVid/autoregressive_checkpoint/model.pt", "generator", "generator_ema", "model."),
        ("framewise/causal_forcing.pt", "generator_ema", "generator", "model."),
        ("rewardforcing.pt", None, None, "model."),
        ("rolling_forcing_dmd.pt", "generator_ema", "generator", "model._fsdp_wrapped_module."),
        ("krea-realtime-video-14b.safetensors", None, None, "model."),
    ],
)
def test_training_starts_from_every_released_causal_checkpoint(folder, weights, tmp_path, name, network, decoy, prefix):
    """``init_from`` a released causal model's file: the run's first model holds the network its own inference
    script reads (``initial_model``, what the Trainer builds), not the file's other networks."""
    from safetensors.torch import save_file

    from selfforcing.config import load_config
    from selfforcing.pipeline import initial_model

    state = {f"{prefix}{k}": v.contiguous() for k, v in weights.items()}
    data = state if network is None else {network: state, decoy: {k: v + 1 for k, v in state.items()}}
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(data, path) if path.suffix == ".safetensors" else torch.save(data, path)
    cfg = load_config("configs/wan/sf_dmd_1.3b.yaml", [f"model.wan={folder}", f"init_from={path}"])
    dit = initial_model(cfg).dit.state_dict()
    assert all(torch.equal(dit[k], v) for k, v in weights.items())
