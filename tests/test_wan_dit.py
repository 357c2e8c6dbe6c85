"""The Wan DiT loads from every real layout and computes what diffusers' WanTransformer3DModel computes."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import WanTransformer3DModel  # noqa: E402

from selfforcing.models import DIT_PRESETS, VideoDiT  # noqa: E402
from selfforcing.wan.dit_weights import (  # noqa: E402
    CheckpointError,
    diffusers_config,
    export_dit,
    load_dit,
    read_dit,
    to_diffusers_key,
)

from .wan_tiny import diffusers_dit, diffusers_velocity, dit_inputs, wan_state_dict, write_wan_dit  # noqa: E402


@pytest.mark.parametrize("preset", ["wan2.1-1.3b", "wan2.1-14b"])
def test_key_map_is_a_bijection_onto_the_real_diffusers_model(preset):
    """Every parameter of the real-size model has exactly one diffusers name, of the same shape."""
    cfg = DIT_PRESETS[preset]
    with torch.device("meta"):
        ours = VideoDiT(cfg).state_dict()
        theirs = WanTransformer3DModel(**diffusers_config(cfg)).state_dict()
    mapped = {to_diffusers_key(k): v.shape for k, v in ours.items()}
    assert mapped == {k: v.shape for k, v in theirs.items()}
    assert {to_diffusers_key(k, reverse=True) for k in theirs} == set(ours)


def test_diffusers_transformer_folder_matches_diffusers_forward(tmp_path):
    """512-token zero-padded text attended without a mask (as Wan does) and per-frame timesteps."""
    ref = diffusers_dit()
    ref.save_pretrained(tmp_path / "transformer")
    ours = load_dit(tmp_path / "transformer")
    x, t, ctx = dit_inputs()
    want = diffusers_velocity(ref, x, t, ctx)
    got = ours(x, t, ctx)
    assert want.abs().max() > 1  # not a trivially small output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # masking the padding (the shapes world's text handling) would be a different model
    mask = ctx.abs().sum(-1) > 0
    assert (ours(x, t, ctx, mask) - want).abs().max() > 1e-2


@pytest.mark.parametrize("shards", [1, 3])
def test_every_layout_loads_the_same_weights(tmp_path, shards):
    ref = diffusers_dit(seed=1)
    ref.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="30KB" if shards > 1 else "10GB")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    if shards > 1:
        assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    write_wan_dit(ref, tmp_path / "wan", shards=shards)
    sd = wan_state_dict(ref)
    wrapped = {
        f"model._fsdp_wrapped_module.{k}".replace("ffn.", "_checkpoint_wrapped_module.ffn."): v for k, v in sd.items()
    }
    torch.save(
        {"generator": {f"model.{k}": v * 0 for k, v in sd.items()}, "generator_ema": wrapped}, tmp_path / "sf.pt"
    )
    torch.save({"generator": {f"model._orig_mod.{k}": v for k, v in sd.items()}}, tmp_path / "causvid.pt")
    x, t, ctx = dit_inputs(seed=2)
    want = diffusers_velocity(ref, x, t, ctx)
    for path in ["pipe", "pipe/transformer", "wan", "sf.pt", "causvid.pt"]:
        model = load_dit(tmp_path / path, num_heads=2 if path.endswith(".pt") else None)  # heads: in no shape
        torch.testing.assert_close(model(x, t, ctx), want, atol=1e-4, rtol=1e-4, msg=path)
    assert read_dit(tmp_path / "sf.pt", num_heads=2).weights == "generator_ema"  # EMA preferred
    assert read_dit(tmp_path / "sf.pt", weights="generator", num_heads=2).state["head.head.weight"].abs().max() == 0


def test_convert_round_trips_bit_identically(tmp_path):
    ref = diffusers_dit(seed=3)
    ref.save_pretrained(tmp_path / "src")
    ckpt = read_dit(tmp_path / "src")
    export_dit(ckpt, "diffusers", tmp_path / "diffusers")
    back = WanTransformer3DModel.from_pretrained(tmp_path / "diffusers")  # diffusers' own loader reads it
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    for to, out in [("diffusers", "diffusers"), ("wan", "wan"), ("safetensors", "dit.safetensors")]:
        export_dit(ckpt, to, tmp_path / out)
        again = read_dit(tmp_path / out)
        assert again.config == ckpt.config, to
        assert again.state.keys() == ckpt.state.keys()
        assert all(torch.equal(again.state[k], v) for k, v in ckpt.state.items()), to


def test_config_is_inferred_from_shapes_and_checked_against_a_preset(tmp_path):
    ref = diffusers_dit()
    torch.save({"generator": {f"model.{k}": v for k, v in wan_state_dict(ref).items()}}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="pass num_heads"):  # dim 32: no preset, not a multiple of 128
        read_dit(tmp_path / "g.pt")
    cfg = read_dit(tmp_path / "g.pt", num_heads=2).config
    assert (cfg.dim, cfg.num_layers, cfg.ffn_dim, cfg.text_dim, cfg.in_channels) == (32, 2, 48, 24, 4)
    with pytest.raises(CheckpointError, match=r"not a wan2.1-1.3b model \(dim: checkpoint 32 vs wan2.1-1.3b 1536"):
        load_dit(tmp_path / "g.pt", preset="wan2.1-1.3b", num_heads=2)


def test_bad_checkpoints_get_clear_errors(tmp_path):
    ref = diffusers_dit()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a Wan DiT checkpoint. Expected one of"):
        read_dit(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_dit(tmp_path / "nope")
    write_wan_dit(ref, tmp_path / "wan")
    (tmp_path / "wan" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has neither diffusion_pytorch_model.safetensors"):
        read_dit(tmp_path / "wan")
    (tmp_path / "wan" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_dit(tmp_path / "wan")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="weights-only torch checkpoint"):
        read_dit(tmp_path / "bad.pt")
    torch.save({"optimizer": {"x": torch.zeros(1)}, "step": torch.tensor(3)}, tmp_path / "opt.pt")
    torch.save({"critic": wan_state_dict(ref)}, tmp_path / "critic_only.pt")
    with pytest.raises(CheckpointError, match=r"pass weights= one of \['critic'\]"):  # never the critic by default
        read_dit(tmp_path / "critic_only.pt", num_heads=2)
    assert read_dit(tmp_path / "critic_only.pt", weights="critic", num_heads=2).weights == "critic"
    with pytest.raises(CheckpointError, match="no generator_ema or generator or model state dict"):
        read_dit(tmp_path / "opt.pt")
    # a config that disagrees with the weights: every mis-shaped key is listed with the layout
    write_wan_dit(diffusers_dit(), tmp_path / "wan2")
    cfg = json.loads((tmp_path / "wan2" / "config.json").read_text())
    (tmp_path / "wan2" / "config.json").write_text(json.dumps({**cfg, "ffn_dim": 64, "num_layers": 3}))
    with pytest.raises(
        CheckpointError, match=r"wan layout\) does not match(.|\n)*missing \(\d+\): blocks.2(.|\n)*shape mismatch"
    ):
        load_dit(tmp_path / "wan2")
    sd = ref.state_dict()
    sd["blocks.0.attn2.add_k_proj.weight"] = torch.zeros(2, 2)
    (tmp_path / "i2v").mkdir()
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "i2v" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "i2v" / "config.json").write_text(
        json.dumps({"_class_name": "WanTransformer3DModel", **dict(ref.config)})
    )
    with pytest.raises(CheckpointError, match="not part of a text-to-video WanTransformer3DModel"):
        read_dit(tmp_path / "i2v")


def test_convert_command(tmp_path, capsys):
    from selfforcing.cli import main

    ref = diffusers_dit(seed=4)
    torch.save({"generator_ema": {f"model.{k}": v for k, v in wan_state_dict(ref).items()}}, tmp_path / "sf.pt")
    main(["convert", str(tmp_path / "sf.pt"), "--to", "diffusers", str(tmp_path / "tr"), "--num-heads", "2"])
    assert "(generator_ema), training layout" in capsys.readouterr().out
    back = WanTransformer3DModel.from_pretrained(tmp_path / "tr")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())
    main(["convert", str(tmp_path / "tr"), "--to", "wan", str(tmp_path / "wan")])
    assert json.loads((tmp_path / "wan" / "config.json").read_text())["num_heads"] == 2
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "tr"), "--to", "onnx", str(tmp_path / "x")])


def test_a_sharded_diffusers_dit_with_a_shard_missing_or_short_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = diffusers_dit()
    folder = tmp_path / "pipe" / "transformer"
    ref.save_pretrained(folder, max_shard_size="30KB")  # diffusers' own shards + index
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    read_dit(tmp_path / "pipe", num_heads=2)  # intact: loads
    tensors = load_file(shards[1])
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, shards[1])
    with pytest.raises(CheckpointError, match=f"{shards[1].name} holds {len(tensors) - 1} tensors but .* lists "):
        read_dit(tmp_path / "pipe", num_heads=2)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=f"{shards[1].name} is missing"):
        read_dit(tmp_path / "pipe", num_heads=2)
