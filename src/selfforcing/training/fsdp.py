"""Fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``): ``distributed: fsdp``.

Every network of a text-to-video model is sharded across the processes, one unit per DiT block, one for
the rest of the DiT and one for the text encoder: each process holds 1/N of the weights, gradients and
optimizer state, and gathers a unit's weights only while it runs. Gradients are reduce-scattered (and
averaged) in backward, so N processes with ``grad_accum_steps = a`` still train exactly what one process
trains with ``grad_accum_steps = N * a`` (tests/test_fsdp.py). With ``precision: bf16`` the units
compute in bf16 while the sharded master weights, gradient reductions and optimizer stay fp32.

Methods called outside ``forward`` (``VideoDiT.text_kv``, ``DiTBlock.text_kv``: the text keys/values,
computed once per prompt) are registered with FSDP, so they gather their unit's weights too.

Checkpoints (``checkpoint_format``): ``full`` gathers each network's whole state dict, and rank 0 writes
the same files a single-process run writes (``model.safetensors`` ...: one file per network, loadable
without FSDP), with the optimizer state gathered keyed by parameter name; resuming scatters them back.
``sharded`` has every process write only its shards (``sharded_state``, torch.distributed.checkpoint),
so no process ever holds a whole network or optimizer: the format for models that do not fit one host.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def device_mesh(world_size: int, device: torch.device) -> DeviceMesh:
    """All processes in one dimension: every network is sharded over all of them."""
    return init_device_mesh(device.type, (world_size,))


def shard_text_to_video(model: nn.Module, mesh: DeviceMesh, precision: str) -> nn.Module:
    """Shard a ``TextToVideo`` in place (blocks, DiT, text encoder) over ``mesh``; returns it."""
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for block in model.dit.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
        register_fsdp_forward_method(block, "text_kv")
    fully_shard(model.dit, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model.dit, "text_kv")
    model.dit.compute_dtype = compute  # a KV cache stores keys/values in it, not in the fp32 master dtype
    initialise(model.dit)
    if any(True for _ in model.text_encoder.parameters()):
        fully_shard(model.text_encoder, mesh=mesh, mp_policy=policy)
    return model


def initialise(root: nn.Module) -> None:
    """Finish FSDP2's set-up of a root unit now, with ``requires_grad`` as it stands. FSDP does it at the
    root's first forward, and records then which parameters train and so the dtypes their gradients are
    reduced in. The critic first runs frozen (inside the generator's loss), so it would record none and
    its later updates would hand bf16 gradients to fp32 shards (the step fails under bf16)."""
    fully_shard.state(root)._lazy_init()  # what the root's first forward calls


def shard_module(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard a small module as one unit (e.g. the GAN's discriminator head)."""
    fully_shard(module, mesh=mesh)
    initialise(module)
    return module


def fsdp_roots(modules: list[nn.Module]) -> list[FSDPModule]:
    """The outermost FSDP units inside ``modules`` (setting gradient sync on them covers the rest)."""
    roots = []
    for module in modules:
        stack = [module]
        while stack:
            m = stack.pop()
            if isinstance(m, FSDPModule):
                roots.append(m)
            else:
                stack.extend(m.children())
    return roots


def set_gradient_sync(modules: list[nn.Module], sync: bool) -> None:
    """Reduce-scatter gradients in this backward (``sync``) or keep accumulating them unreduced."""
    for root in fsdp_roots(modules):
        root.set_requires_gradient_sync(sync)


def reshard(module: nn.Module) -> nn.Module:
    """Put every FSDP unit of ``module`` back in its sharded state. A root unit stays gathered after a
    forward without a backward (e.g. a rollout for the critic, or sampling), so its ``parameters()`` are
    the full tensors until this is called."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return module


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state dict on the CPU (a collective: every process calls it)."""
    return get_model_state_dict(module, options=FULL)


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Scatter a whole state dict into a sharded module (every process passes the same one); not ``strict``:
    a checked subset of it (a LoRA run's adapters), the rest staying as it is."""
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def optimizer_state(modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name (a collective). Changes nothing (``_optimizer_state``)."""
    return _optimizer_state(modules, optimizer, FULL)


def _optimizer_state(
    modules: list[nn.Module], optimizer: torch.optim.Optimizer, options: StateDictOptions | None = None
) -> dict:
    """``get_optimizer_state_dict``, without its side effect: it gives an optimizer that has not stepped yet
    state by a step at lr 0, which for Adam counts (``step`` 1, so the first real update would be
    bias-corrected as the second, ~1.4x too large). Such an optimizer is left without state, as it was, and
    its state dict holds none, so saving never changes the training (resuming restores no state either)."""
    fresh = not optimizer.state
    osd = get_optimizer_state_dict(nn.ModuleList(modules), optimizer, options=options)
    if fresh:
        optimizer.state.clear()
        osd = {**osd, "state": {}}
    return osd


def sharded_state(
    networks: dict[str, nn.Module],
    optimizers: dict[str, tuple[list[nn.Module], torch.optim.Optimizer]],
    saved: set[str] | None = None,
    keys: dict[str, list[str] | None] | None = None,
) -> dict:
    """``{"networks": {name: state dict}, "optimizers": {name: state dict}}`` as this process holds them
    (DTensor shards under FSDP, whole tensors otherwise; optimizer state keyed by parameter name), for
    torch.distributed.checkpoint. To save (``saved`` None) nothing is changed: an optimizer that has not
    stepped yet has no state. To load, ``saved`` holds the checkpoint's keys (``checkpoint.sharded_keys``):
    every optimizer is given state (zeros) for the checkpoint to fill, for exactly the parameters the
    checkpoint holds state of (``load_sharded_state`` then drops the rest). ``keys``: per network, the keys its
    checkpoint holds (a LoRA run's adapters), or None for all."""
    state = {
        "networks": {name: _subset(get_model_state_dict(net), (keys or {}).get(name)) for name, net in networks.items()}
    }
    state["optimizers"] = {}
    for name, (modules, opt) in optimizers.items():
        if saved is None:
            state["optimizers"][name] = _optimizer_state(modules, opt)
            continue
        osd = get_optimizer_state_dict(nn.ModuleList(modules), opt)  # state zeros if it had none
        prefix = f"optimizers.{name}.state."
        held = {k.removeprefix(prefix).rsplit(".", 1)[0] for k in saved if k.startswith(prefix)}  # param names
        state["optimizers"][name] = {**osd, "state": {p: s for p, s in osd["state"].items() if p in held}}
    return state


def _subset(state: dict, keys: list[str] | None) -> dict:
    return state if keys is None else {k: state[k] for k in keys}


def drop_unsaved_state(modules: list[nn.Module], optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Forget the optimizer state of every parameter not in ``saved`` (a state dict's ``"state"``, keyed by
    parameter name): one that had not stepped when the checkpoint was written has none now either."""
    for name, param in nn.ModuleList(modules).named_parameters():
        if name not in saved:
            optimizer.state.pop(param, None)


def load_sharded_state(
    networks: dict[str, nn.Module],
    optimizers: dict[str, tuple[list[nn.Module], torch.optim.Optimizer]],
    state: dict,
    keys: dict[str, list[str] | None] | None = None,
) -> None:
    """Put ``sharded_state``'s output (filled from a checkpoint) back into the networks and optimizers (with
    ``keys``, the subset each network's checkpoint holds)."""
    for name, net in networks.items():
        strict = (keys or {}).get(name) is None
        set_model_state_dict(net, state["networks"][name], options=StateDictOptions(strict=strict))
    for name, (modules, opt) in optimizers.items():
        osd = state["optimizers"][name]
        set_optimizer_state_dict(nn.ModuleList(modules), opt, osd, options=StateDictOptions(strict=False))
        drop_unsaved_state(modules, opt, osd["state"])


def load_optimizer_state(modules: list[nn.Module], optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Scatter ``optimizer_state``'s output back. Not strict: a parameter that never had a gradient (the
    critic's output head under the GAN loss), or any before the optimizer's first step, has no state, in
    the checkpoint as in the optimizer."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(nn.ModuleList(modules), optimizer, state, options=options)
    drop_unsaved_state(modules, optimizer, state["state"])
