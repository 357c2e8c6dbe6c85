"""Tiny random Wan-family models written in the real checkpoint layouts, for the Wan tests.

Every writer uses the reference library's own ``save_pretrained`` (diffusers, transformers) or the
original key names, so the loaders are tested on exactly what the released files hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from selfforcing.wan.dit_weights import WEIGHTS_NAME, to_diffusers_key, wan_config

DIT_KW = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
)


def randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn from N(0, std^2) (norm gains and biases too): no zero-initialised shortcuts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def diffusers_dit(seed: int = 0, **kw):
    from diffusers import WanTransformer3DModel

    return randomize(WanTransformer3DModel(**{**DIT_KW, **kw}), seed=seed)


def wan_state_dict(model) -> dict[str, torch.Tensor]:
    """A diffusers transformer's weights under the original Wan2.1 names."""
    return {to_diffusers_key(k, reverse=True): v.clone() for k, v in model.state_dict().items()}


def write_wan_dit(model, folder: Path, shards: int = 1) -> Path:
    """The original Wan2.1 DiT layout: config.json + diffusion_pytorch_model.safetensors (or shards + index)."""
    from safetensors.torch import save_file

    from selfforcing.wan.dit_weights import config_from_diffusers_json

    folder.mkdir(parents=True, exist_ok=True)
    cfg = config_from_diffusers_json(dict(model.config), folder)
    (folder / "config.json").write_text(json.dumps(wan_config(cfg)))
    state = wan_state_dict(model)
    if shards == 1:
        save_file(state, folder / WEIGHTS_NAME)
        return folder
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / (WEIGHTS_NAME + ".index.json")).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def dit_inputs(b: int = 2, f: int = 3, h: int = 4, w: int = 6, c: int = 4, text_dim: int = 24, seed: int = 0):
    """x [B, F, C, H, W], per-frame t [B, F], and Wan-style text: real tokens then zeros to 512."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, c, h, w, generator=g)
    t = torch.rand(b, f, generator=g) * 1000
    ctx = torch.zeros(b, 512, text_dim)
    for i in range(b):
        n = 5 + 4 * i
        ctx[i, :n] = torch.randn(n, text_dim, generator=g)
    return x, t, ctx


def diffusers_velocity(model, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """diffusers' forward in our layout: x [B, F, C, H, W], per-frame t [B, F] given per token."""
    p = model.config.patch_size
    tokens = (x.shape[3] // p[1]) * (x.shape[4] // p[2])
    with torch.no_grad():
        out = model(x.permute(0, 2, 1, 3, 4), t.repeat_interleave(tokens, dim=1), ctx, return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)


VAE_KW = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


def diffusers_vae(seed: int = 0, **kw):
    from diffusers import AutoencoderKLWan

    return randomize(AutoencoderKLWan(**{**VAE_KW, **kw}), std=0.1, seed=seed)


def original_vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKLWan's weights under the original ``WanVAE_`` names (the reverse renaming,
    written independently of the loader's: quant_conv -> conv1, up_blocks.s.resnets.p -> upsamples.N, ...)."""
    import re

    nrb = vae.config.num_res_blocks
    residual = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}
    residual["conv_shortcut"] = "shortcut"

    def block(tail: str) -> str:
        name, _, rest = tail.partition(".")
        return f"{residual[name]}.{rest}" if name in residual else tail  # resample.* / time_conv.* keep names

    out = {}
    for key, v in vae.state_dict().items():
        k = re.sub(r"^quant_conv\.", "conv1.", key)
        k = re.sub(r"^post_quant_conv\.", "conv2.", k)
        k = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", k)
        k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", k)
        k = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", k)
        k = re.sub(r"mid_block\.attentions\.0\.", "middle.1.", k)
        if m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)$", k):
            k = f"{m[1]}.middle.{2 * int(m[2])}.{block(m[3])}"
        if m := re.match(r"^encoder\.down_blocks\.(\d+)\.(.+)$", k):
            k = f"encoder.downsamples.{m[1]}.{block(m[2])}"
        if m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k):
            k = f"decoder.upsamples.{int(m[1]) * (nrb + 2) + int(m[2])}.{block(m[3])}"
        if m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", k):
            k = f"decoder.upsamples.{int(m[1]) * (nrb + 2) + nrb + 1}.{m[2]}"
        out[k] = v.clone()
    return out


WORDS = [
    "a",
    "large",
    "red",
    "circle",
    "moving",
    "right",
    "small",
    "blue",
    "triangle",
    "up",
    "the",
    "cat",
    "walks",
    "on",
    "grass",
    "at",
    "night",
]


def tiny_tokenizer():
    """A umT5-style tokenizer (Unigram, metaspace, ``</s>`` appended) built offline with ``tokenizers``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,.'"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    cls = getattr(transformers, "T5TokenizerFast", None) or transformers.T5Tokenizer
    return cls(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def tiny_umt5(vocab_size: int, d_model: int = 24, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=12,
        d_ff=40,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    return randomize(UMT5EncoderModel(cfg), std=0.3, seed=seed)


def write_diffusers_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny text-to-video Wan pipeline saved by diffusers' own ``WanPipeline.save_pretrained``:
    model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    tokenizer = tiny_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_umt5(len(tokenizer), seed=seed),
        transformer=diffusers_dit(seed=seed, in_channels=16, out_channels=16),
        vae=diffusers_vae(seed=seed),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )
    pipe.save_pretrained(folder)
    return folder


def original_t5_state_dict(encoder) -> dict[str, torch.Tensor]:
    """A UMT5EncoderModel's weights under Wan's own T5 names (wan/modules/t5.py), the reverse renaming."""
    import re

    block = {
        "layer.0.layer_norm": "norm1",
        "layer.0.SelfAttention.q": "attn.q",
        "layer.0.SelfAttention.k": "attn.k",
        "layer.0.SelfAttention.v": "attn.v",
        "layer.0.SelfAttention.o": "attn.o",
        "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
        "layer.1.layer_norm": "norm2",
        "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
        "layer.1.DenseReluDense.wi_1": "ffn.fc1",
        "layer.1.DenseReluDense.wo": "ffn.fc2",
    }
    out = {}
    for k, v in encoder.state_dict().items():
        if k == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        if k == "shared.weight":
            out["token_embedding.weight"] = v.clone()
        elif k == "encoder.final_layer_norm.weight":
            out["norm.weight"] = v.clone()
        else:
            m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)\.weight", k)
            out[f"blocks.{m[1]}.{block[m[2]]}.weight"] = v.clone()
    return out


def write_original_wan_folder(diffusers_folder: Path, folder: Path) -> Path:
    """The original Wan2.1-T2V layout holding the same weights as a diffusers pipeline folder:
    config.json + diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth
    and the tokenizer in google/umt5-xxl/."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    write_wan_dit(WanTransformer3DModel.from_pretrained(diffusers_folder / "transformer"), folder)
    vae = AutoencoderKLWan.from_pretrained(diffusers_folder / "vae")
    torch.save(original_vae_state_dict(vae), folder / "Wan2.1_VAE.pth")
    t5 = UMT5EncoderModel.from_pretrained(diffusers_folder / "text_encoder")
    torch.save(original_t5_state_dict(t5), folder / "models_t5_umt5-xxl-enc-bf16.pth")  # fp32 here; bf16 released
    AutoTokenizer.from_pretrained(diffusers_folder / "tokenizer").save_pretrained(folder / "google" / "umt5-xxl")
    return folder
