"""LoRA adapters on the DiT, through ``peft``: apply a PEFT state dict, run it unmerged or merge it (the
files: ``wan.lora_weights``).

Each adapted Linear computes ``W x + b + (alpha / r) * B (A x)``, with ``A: [r, in]`` and ``B: [out, r]``;
merging folds ``(alpha / r) * B A`` into ``W``. The state dict is PEFT's own (``get_peft_model_state_dict``:
``base_model.model.blocks.0.self_attn.q.lora_A.weight``), as LongLive ships it in ``models/lora.pt``
under ``generator_lora`` (rank 256 on every Linear of every block, alpha 256), or a plain one. PEFT does
not store alpha: it comes from the caller (LongLive's preset), else alpha = r.
"""

from __future__ import annotations

import torch
from torch import nn

from .dit import VideoDiT

PREFIX = "base_model.model."
SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class LoRAError(ValueError):
    """A LoRA that does not fit the model: the message names the file, the key and the sizes."""


def lora_targets(dit: VideoDiT, state: dict[str, torch.Tensor], source: str = "the LoRA") -> tuple[list[str], int]:
    """The DiT Linear names ``state`` adapts, and its rank; a ``LoRAError`` names any key that is not an adapter
    of this DiT's Linears, or whose shape does not fit (a LoRA for another model size)."""
    linears = {name: m for name, m in dit.named_modules() if isinstance(m, nn.Linear)}
    targets: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        module = name.removesuffix(suffix) if suffix else None
        if module not in linears:
            raise LoRAError(
                f"{source}: {key!r} is not a LoRA weight of a Linear of this DiT "
                f"(e.g. {PREFIX}blocks.0.self_attn.q.lora_A.weight)"
            )
        targets.setdefault(module, {})[suffix] = value
    ranks = set()
    for module, pair in targets.items():
        if len(pair) != 2:
            raise LoRAError(
                f"{source}: {module} has {next(iter(pair)).strip('.')} but not its pair (lora_A and lora_B)"
            )
        a, b, linear = pair[".lora_A.weight"], pair[".lora_B.weight"], linears[module]
        if (
            a.dim() != 2
            or b.dim() != 2
            or a.shape[1] != linear.in_features
            or b.shape[0] != linear.out_features
            or a.shape[0] != b.shape[1]
        ):
            raise LoRAError(
                f"{source}: {module} is {linear.in_features} -> {linear.out_features} in this DiT, the LoRA has A "
                f"{list(a.shape)} and B {list(b.shape)}: a LoRA for another model size (LongLive's is for Wan2.1-1.3B)"
            )
        ranks.add(a.shape[0])
    if len(ranks) > 1:
        raise LoRAError(f"{source}: adapters of several ranks {sorted(ranks)}; one rank per file is supported")
    if not targets:
        raise LoRAError(f"{source} holds no adapters")
    return sorted(targets), ranks.pop()


def apply_lora(
    dit: VideoDiT,
    state: dict[str, torch.Tensor],
    alpha: float | None = None,
    merge: bool = False,
    source: str = "the LoRA",
) -> VideoDiT:
    """``dit`` with the adapters of ``state``: run unmerged (peft's LoRA layers in place of the adapted Linears,
    in the DiT's dtype), or merged into the weights (``merge``: plain Linears again). ``alpha``: default the rank."""
    import peft

    targets, rank = lora_targets(dit, state, source)
    p = next(dit.parameters())
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0, target_modules=targets)
    model = peft.get_peft_model(dit, config)
    result = peft.set_peft_model_state_dict(model, {PREFIX + k.removeprefix(PREFIX): v for k, v in state.items()})
    assert not result.unexpected_keys, result.unexpected_keys  # lora_targets checked every key
    model.to(p.device, p.dtype)
    dit = model.merge_and_unload() if merge else model.base_model.model
    return dit.eval().requires_grad_(False)


def block_linears(dit: VideoDiT) -> list[str]:
    """Every Linear of the DiT's blocks (attention, cross-attention, FFN): LongLive's LoRA targets."""
    return [name for name, m in dit.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")]


def add_adapters(
    dit: VideoDiT,
    rank: int,
    alpha: float | None = None,
    targets: list[str] | None = None,
    base_dtype: torch.dtype | None = None,
) -> VideoDiT:
    """Fresh trainable adapters on ``targets`` (default ``block_linears``), in place: A random, B zero, so the
    adapted DiT starts equal to the base. Everything but the adapters is frozen; ``base_dtype`` (e.g. bf16)
    stores the frozen base in that dtype. The adapters are fp32 whatever the base's. Returns ``dit``."""
    import peft
    from peft.tuners.lora import LoraLayer

    if base_dtype is not None:
        dit.to(base_dtype)
    names = targets or block_linears(dit)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0, target_modules=names)
    peft.inject_adapter_in_model(config, dit)
    for module in dit.modules():
        if isinstance(module, LoraLayer):  # peft makes them in the base's dtype: the optimizer's need fp32
            module.lora_A.to(torch.float32)
            module.lora_B.to(torch.float32)
    for name, p in dit.named_parameters():
        p.requires_grad_(is_adapter(name))
    return dit


def is_adapter(name: str) -> bool:
    """Whether a parameter name (of a DiT with ``add_adapters``) is an adapter's."""
    return ".lora_A." in name or ".lora_B." in name


def merged_state(dit: VideoDiT) -> dict[str, torch.Tensor]:
    """The adapted DiT's weights with every adapter folded in (``W + (alpha / r) B A``), under the plain
    DiT's names (``blocks.0.self_attn.q.weight``): a state dict any loader of the project's layouts reads."""
    from peft.tuners.lora import LoraLayer

    merged = {}
    for name, module in dit.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            merged[f"{name}.weight"] = (base.weight + module.get_delta_weight("default")).detach().clone()
            if base.bias is not None:
                merged[f"{name}.bias"] = base.bias.detach().clone()
    for key, value in dit.state_dict().items():
        if ".base_layer." not in key and not is_adapter(key):
            merged[key] = value.detach().clone()
    return merged


def original_lora_state(dit: VideoDiT) -> dict[str, torch.Tensor]:
    """The adapters in the original Wan LoRA layout (``diffusion_model.blocks.0.self_attn.q.lora_A.weight``,
    ``...lora_B.weight`` and the scale as ``...alpha``), which diffusers' ``WanPipeline.load_lora_weights``
    reads (and converts to its own names)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in dit.named_modules():
        if isinstance(module, LoraLayer):
            key = f"diffusion_model.{name}"
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            out[f"{key}.lora_A.weight"] = a.detach().contiguous().clone()
            out[f"{key}.lora_B.weight"] = b.detach().contiguous().clone()
            out[f"{key}.alpha"] = torch.tensor(float(module.scaling["default"] * a.shape[0]))
    if not out:
        raise LoRAError("this DiT has no adapters to export (train with lora.rank > 0)")
    return out
