"""LoRA on the DiT through peft (models/lora.py), from a file in LongLive's layout written here by peft's own
``get_peft_model_state_dict``: unmerged and merged both equal W + (alpha / r) B A, written out in the test."""

import copy

import peft
import pytest
import torch

from selfforcing.cli import main
from selfforcing.models import VideoDiT, dit_config
from selfforcing.models.lora import LoRAError, apply_lora
from selfforcing.wan.dit_weights import load_dit
from selfforcing.wan.lora_weights import load_lora, read_lora

from .test_causal import inputs, random_model

BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k")
BLOCK_LINEARS += ("cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def longlive_lora(dit: VideoDiT, path, rank: int = 4, alpha: float = 8.0) -> dict:
    """A random LoRA on every Linear of every block, saved as LongLive's ``lora.pt`` (its trainer's keys)."""
    targets = [f"blocks.{i}.{n}" for i in range(len(dit.blocks)) for n in BLOCK_LINEARS]
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(dit), config)
    state = peft.get_peft_model_state_dict(model)
    torch.save({"generator_lora": state, "critic_lora": {}, "step": 100}, path)
    return state


def merged_by_hand(dit: VideoDiT, state: dict, alpha: float) -> VideoDiT:
    """The definition: every adapted W becomes W + (alpha / r) B A."""
    out = copy.deepcopy(dit)
    linears = dict(out.named_modules())
    for key, a in state.items():
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = state[key.replace("lora_A", "lora_B")]
            linears[name].weight.data += alpha / a.shape[0] * b @ a
    return out


@pytest.fixture
def dit_and_lora(tmp_path):
    dit = random_model()
    state = longlive_lora(dit, tmp_path / "lora.pt")
    return dit, state, tmp_path / "lora.pt"


@pytest.mark.parametrize("merge", [False, True])
def test_lora_equals_its_definition_unmerged_and_merged(dit_and_lora, merge):
    dit, state, path = dit_and_lora
    x, t, ctx = inputs(3)
    expected = merged_by_hand(dit, state, 8.0)(x, t, ctx)
    base = dit(x, t, ctx)
    adapted = load_lora(copy.deepcopy(dit), path, alpha=8.0, merge=merge)
    got = adapted(x, t, ctx)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapters matter
    lora_layers = [m for m in adapted.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert (len(lora_layers) == 0) == merge  # merged: plain Linears again
    assert not any(p.requires_grad for p in adapted.parameters())


def test_alpha_defaults_to_the_rank(dit_and_lora):
    dit, state, path = dit_and_lora
    x, t, ctx = inputs(3)
    assert torch.allclose(
        load_lora(copy.deepcopy(dit), path)(x, t, ctx), merged_by_hand(dit, state, 4.0)(x, t, ctx), atol=1e-5
    )


def test_a_lora_that_does_not_fit_is_refused(dit_and_lora, tmp_path):
    dit, state, path = dit_and_lora
    other = VideoDiT(dit_config("tiny", dim=64, num_heads=4))
    with pytest.raises(LoRAError, match="another model size"):
        load_lora(other, path)
    with pytest.raises(LoRAError, match="is not a LoRA weight of a Linear"):
        apply_lora(
            copy.deepcopy(dit), {**state, "base_model.model.blocks.7.self_attn.q.lora_A.weight": torch.zeros(4, 32)}
        )
    half = {k: v for k, v in state.items() if "blocks.0.ffn.0.lora_B" not in k}
    with pytest.raises(LoRAError, match="not its pair"):
        apply_lora(copy.deepcopy(dit), half)
    torch.save({"step": 3}, tmp_path / "empty.pt")
    with pytest.raises(LoRAError, match="is not a LoRA state dict"):
        read_lora(tmp_path / "empty.pt")


def test_convert_merges_a_lora_into_the_exported_weights(dit_and_lora, tmp_path):
    """``selfforcing convert base.pt out.safetensors --to safetensors --lora lora.pt``: LongLive's base with its
    LoRA merged, loadable as any DiT."""
    dit, state, path = dit_and_lora
    torch.save({"generator": {f"model.{k}": v for k, v in dit.state_dict().items()}}, tmp_path / "base.pt")
    out = tmp_path / "merged.safetensors"
    main(
        [
            "convert",
            str(tmp_path / "base.pt"),
            str(out),
            "--to",
            "safetensors",
            "--lora",
            str(path),
            "--lora-alpha",
            "8",
        ]
    )
    x, t, ctx = inputs(3)
    merged = load_dit(out, num_heads=dit.cfg.num_heads)
    assert torch.allclose(merged(x, t, ctx), merged_by_hand(dit, state, 8.0)(x, t, ctx), atol=1e-5)
