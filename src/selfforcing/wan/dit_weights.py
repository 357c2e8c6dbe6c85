"""Loading and writing the Wan2.1 DiT in every layout it ships in.

``VideoDiT``'s parameter names *are* the original Wan2.1 names (``blocks.0.self_attn.q.weight``), so
the original layout loads as it is. Other layouts are renamed by explicit tables:

- ``wan``: a folder with ``config.json`` (``dim``, ``num_heads``, ...) and
  ``diffusion_pytorch_model.safetensors`` (or shards listed in ``diffusion_pytorch_model.safetensors.index.json``);
- ``diffusers``: a ``WanPipeline`` folder (``model_index.json`` + ``transformer/``) or a lone
  ``transformer/`` folder (``config.json`` with ``_class_name: WanTransformer3DModel``), diffusers' names;
- ``training``: a Self Forcing / CausVid ``.pt`` holding ``generator``, ``generator_ema`` and/or
  ``critic`` state dicts, keys ``model.<Wan key>`` with optional FSDP / checkpoint / compile wrapper
  prefixes; read with ``torch.load(weights_only=True)``, so no pickled code runs;
- ``safetensors``: one ``.safetensors`` file of Wan names (what ``export_dit(..., "safetensors")`` writes), or
  of ``model.<Wan key>`` (Krea Realtime 14B's ``krea-realtime-video-14b.safetensors``);
- ``run``: this project's own training run or checkpoint folder (``config.yaml``; the networks as
  safetensors files or a sharded checkpoint), its ``ema`` network unless another is named.

Where there is no ``config.json`` the configuration is inferred from the weight shapes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import config_from_yaml
from ..models.dit import DIT_PRESETS, DiTConfig, VideoDiT
from ..weights import read_checkpoint_weights, resolve_checkpoint, state_mismatches

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
LAYOUTS = ("wan", "diffusers", "training", "safetensors", "run")
TRAINING_WEIGHTS = ("generator_ema", "generator", "critic", "model")  # the networks a training checkpoint holds
DEFAULT_WEIGHTS = ("generator_ema", "generator", "model")  # searched in this order when none is named
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
WAN_HEAD_DIM = 128  # every released Wan2.1 DiT (1536 / 12, 5120 / 40)

# Ours (= original Wan) -> diffusers, by module prefix. Wan's norm2 (the FFN norm) has no weights, so
# only its norm3 (the cross-attention norm, diffusers' norm2) is renamed.
TOP_RENAMES = [
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
]
BLOCK_RENAMES = [
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("norm3", "norm2"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("modulation", "scale_shift_table"),
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, the layout and the fix."""


def _rename(key: str, table: list[tuple[str, str]], reverse: bool) -> str:
    for ours, theirs in table:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if key == src or key.startswith(src + "."):
            return dst + key[len(src) :]
    raise KeyError(key)


def to_diffusers_key(key: str, reverse: bool = False) -> str:
    """``blocks.3.self_attn.o.weight`` -> ``blocks.3.attn1.to_out.0.weight`` (``reverse``: the other way)."""
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        return f"blocks.{index}." + _rename(rest, BLOCK_RENAMES, reverse)
    return _rename(key, TOP_RENAMES, reverse)


def from_diffusers(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``WanTransformer3DModel`` state dict to Wan names; unknown keys are an error."""
    out, unknown = {}, []
    for k, v in state.items():
        try:
            out[to_diffusers_key(k, reverse=True)] = v
        except KeyError:
            unknown.append(k)
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} keys are not part of a text-to-video WanTransformer3DModel: "
            f"{', '.join(sorted(unknown)[:6])}{' ...' if len(unknown) > 6 else ''} "
            "(image-to-video and VACE variants are not supported)"
        )
    return out


def strip_training_prefixes(key: str) -> str:
    """``model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.ffn.0.weight`` -> ``blocks.0.ffn.0.weight``."""
    for prefix in WRAPPER_PREFIXES:
        key = key.replace(prefix, "")
    return key.removeprefix("model.")


# ---------------------------------------------------------------------------------------------------- layouts


def detect_layout(path: Path) -> str:
    """Which of ``LAYOUTS`` ``path`` is; raises with the layouts it could have been."""
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".bin"):
            return "training"
        if path.suffix == ".safetensors":
            return "safetensors"
    elif path.is_dir():
        if (path / "config.yaml").is_file() or (path / "checkpoints" / "latest").is_file():
            return "run"
        if (path / "model_index.json").is_file() or (path / "transformer" / "config.json").is_file():
            return "diffusers"
        config = path / "config.json"
        if config.is_file():
            return "diffusers" if _read_json(config).get("_class_name") == "WanTransformer3DModel" else "wan"
    elif not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise CheckpointError(
        f"{path} is not a Wan DiT checkpoint. Expected one of: a Wan2.1 folder (config.json + {WEIGHTS_NAME}), "
        "a diffusers WanPipeline folder (model_index.json + transformer/) or transformer/ folder, "
        "a Self Forcing / CausVid .pt training checkpoint, a .safetensors file of Wan weights, or a selfforcing "
        "run or checkpoint folder (config.yaml)"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the file is corrupt or truncated") from e


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing (the checkpoint folder is incomplete)")
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {f}: {e} (the file is corrupt or truncated)") from e
    return state


def read_weight_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/diffusion_pytorch_model.safetensors`` or of the shards its index lists."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return read_safetensors([single])
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map: the index file is damaged")
        state = {}
        for name in sorted(set(weight_map.values())):
            shard = read_safetensors([folder / name])
            listed = {k for k, v in weight_map.items() if v == name}
            if listed - set(shard):
                lost = sorted(listed - set(shard))
                raise CheckpointError(
                    f"{folder / name} holds {len(shard)} tensors but {index.name} lists {len(listed)} in it: "
                    f"{len(lost)} missing ({', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}). The shard is "
                    "damaged or from another download: fetch it again"
                )
            state.update(shard)
        return state
    raise FileNotFoundError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def load_torch_file(path: Path, expected: str):
    """``torch.load`` with ``weights_only=True`` (no pickled code runs), memory-mapped when the file is in
    the zip format; a damaged file is a CheckpointError naming ``expected`` (what the file should be)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected {expected})")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors alike for a damaged file
        raise CheckpointError(
            f"cannot read {path} as a weights-only torch checkpoint ({expected}): {e}. (A corrupt file, or one "
            "holding pickled code, which is never run here.)"
        ) from e


def read_training_checkpoint(path: Path, weights: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """One network's state dict from a Self Forcing / CausVid ``.pt``, in Wan names, and which one it was.

    ``weights``: ``generator_ema``, ``generator``, ``critic`` or ``model``; default: the first of
    ``generator_ema``, ``generator``, ``model`` present (never the critic). A ``.pt`` that is itself a
    plain state dict loads too (``weights`` must be None).
    """
    ckpt = load_torch_file(path, "a Self Forcing / CausVid training checkpoint")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a dict of state dicts")
    nets = [k for k in TRAINING_WEIGHTS if isinstance(ckpt.get(k), dict)]
    if weights is None and not nets and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, which = ckpt, "state_dict"
    else:
        which = weights or next((k for k in DEFAULT_WEIGHTS if k in nets), None)
        if which not in nets:
            raise CheckpointError(
                f"{path} has no {which or ' or '.join(DEFAULT_WEIGHTS)} state dict; its top-level keys are "
                f"{sorted(ckpt)[:10]}: pass weights= one of {nets or TRAINING_WEIGHTS}"
            )
        state = ckpt[which]
    return {strip_training_prefixes(k): v for k, v in state.items()}, which


# ---------------------------------------------------------------------------------------------------- configs


def config_from_wan_json(cfg: dict, source: Path) -> DiTConfig:
    """Wan2.1's ``config.json`` (``dim``, ``in_dim``, ``num_heads``, ...) -> DiTConfig."""
    if cfg.get("model_type", "t2v") != "t2v":
        raise CheckpointError(f"{source}: model_type {cfg['model_type']!r}; only text-to-video (t2v) is supported")
    try:
        return DiTConfig(
            in_channels=cfg["in_dim"],
            out_channels=cfg["out_dim"],
            dim=cfg["dim"],
            ffn_dim=cfg["ffn_dim"],
            num_layers=cfg["num_layers"],
            num_heads=cfg["num_heads"],
            text_dim=cfg.get("text_dim", 4096),
            freq_dim=cfg["freq_dim"],
            patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
            qk_norm=cfg.get("qk_norm", True),
            cross_attn_norm=cfg.get("cross_attn_norm", True),
            eps=cfg.get("eps", 1e-6),
        )
    except KeyError as e:
        raise CheckpointError(f"{source} lacks the Wan config key {e}") from e


def config_from_diffusers_json(cfg: dict, source: Path) -> DiTConfig:
    """diffusers' ``WanTransformer3DModel`` ``config.json`` -> DiTConfig."""
    if cfg.get("image_dim") or cfg.get("added_kv_proj_dim"):
        raise CheckpointError(
            f"{source} is an image-to-video Wan model (image_dim set): only text-to-video is supported"
        )
    if cfg.get("qk_norm", "rms_norm_across_heads") not in ("rms_norm_across_heads", None):
        raise CheckpointError(f"{source}: qk_norm {cfg['qk_norm']!r} is not supported (rms_norm_across_heads is)")
    try:
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        return DiTConfig(
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            dim=heads * head_dim,
            ffn_dim=cfg["ffn_dim"],
            num_layers=cfg["num_layers"],
            num_heads=heads,
            text_dim=cfg["text_dim"],
            freq_dim=cfg["freq_dim"],
            patch_size=tuple(cfg["patch_size"]),
            qk_norm=cfg.get("qk_norm") is not None,
            cross_attn_norm=cfg.get("cross_attn_norm", True),
            eps=cfg.get("eps", 1e-6),
        )
    except KeyError as e:
        raise CheckpointError(f"{source} lacks the diffusers config key {e}") from e


def infer_config(state: dict[str, torch.Tensor], source: str, num_heads: int | None = None) -> DiTConfig:
    """The DiTConfig that Wan-named weights imply. The head count is not in any shape: it comes from
    ``num_heads``, else a preset of the same size, else Wan's head width of 128."""
    try:
        patch = state["patch_embedding.weight"]  # [dim, in, pf, ph, pw]
        dim, in_channels = patch.shape[:2]
        patch_size = tuple(patch.shape[2:])
        num_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        cfg = DiTConfig(
            in_channels=in_channels,
            out_channels=state["head.head.weight"].shape[0] // (patch_size[0] * patch_size[1] * patch_size[2]),
            dim=dim,
            ffn_dim=state["blocks.0.ffn.0.weight"].shape[0],
            num_layers=num_layers,
            text_dim=state["text_embedding.0.weight"].shape[1],
            freq_dim=state["time_embedding.0.weight"].shape[1],
            patch_size=patch_size,
            qk_norm="blocks.0.self_attn.norm_q.weight" in state,
            cross_attn_norm="blocks.0.norm3.weight" in state,
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot infer the model size, weight {e} is missing (not a Wan DiT?)") from e
    if num_heads is None:
        same = [p for p in DIT_PRESETS.values() if (p.dim, p.num_layers, p.ffn_dim) == (dim, num_layers, cfg.ffn_dim)]
        num_heads = same[0].num_heads if same else dim // WAN_HEAD_DIM if dim % WAN_HEAD_DIM == 0 else None
    if not num_heads:
        raise CheckpointError(f"{source}: dim {dim} matches no preset: pass num_heads= (the head count is in no shape)")
    return replace(cfg, num_heads=num_heads)


def check_preset(cfg: DiTConfig, preset: str, source: str) -> None:
    """Raise if ``cfg`` is not the size of ``preset`` (channels and text width may differ from a preset)."""
    if preset not in DIT_PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
    want = DIT_PRESETS[preset]
    size = ("dim", "ffn_dim", "num_layers", "num_heads")
    diff = [
        f"{k}: checkpoint {getattr(cfg, k)} vs {preset} {getattr(want, k)}"
        for k in size
        if getattr(cfg, k) != getattr(want, k)
    ]
    if diff:
        raise CheckpointError(f"{source} is not a {preset} model ({'; '.join(diff)}): drop the preset or pick another")


# ---------------------------------------------------------------------------------------------------- loading


@dataclass
class DiTCheckpoint:
    """Wan-named weights and the config that goes with them, read from any layout."""

    state: dict[str, torch.Tensor]
    config: DiTConfig
    layout: str
    source: Path
    weights: str = ""  # for a training checkpoint: which network (generator_ema, generator, critic)


def folder_config(path: str | Path) -> DiTConfig:
    """The DiT config of a Wan or diffusers folder, read from its config.json alone (no weights)."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == "wan":
        return config_from_wan_json(_read_json(path / "config.json"), path / "config.json")
    if layout == "diffusers":
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        return config_from_diffusers_json(_read_json(folder / "config.json"), folder / "config.json")
    raise CheckpointError(f"{path} is a {layout} file, not a model folder with a config.json")


def read_dit(path: str | Path, weights: str | None = None, num_heads: int | None = None) -> DiTCheckpoint:
    """Read the DiT weights and config from any of ``LAYOUTS`` (see the module docstring)."""
    path = Path(path)
    layout = detect_layout(path)
    which = ""
    if weights is not None and layout not in ("training", "run"):
        raise CheckpointError(
            f"weights={weights!r} applies to a training checkpoint (.pt or a run), {path} is a {layout} layout"
        )
    if layout == "run":
        ckpt, which = resolve_checkpoint(path), weights or "ema"
        state = read_checkpoint_weights(ckpt, which)
        if not all(k.startswith("dit.") for k in state):
            raise CheckpointError(
                f"{ckpt} ({which}) holds a whole toy text-to-video model, not a Wan DiT trained from model.wan: "
                "load it with load_pipeline / `generate --checkpoint` without --model"
            )
        state = {k.removeprefix("dit."): v for k, v in state.items()}
        wan = config_from_yaml((ckpt / "config.yaml").read_text()).model.wan
        if num_heads is None and wan and Path(wan).is_dir():  # the head count is in no shape; the run's folder has it
            num_heads = folder_config(wan).num_heads
        cfg = infer_config(state, str(ckpt), num_heads)
    elif layout == "training":
        state, which = read_training_checkpoint(path, weights)
        cfg = infer_config(state, str(path), num_heads)
    elif layout == "safetensors":
        state = read_safetensors([path])
        if state and all(k.startswith("dit.") for k in state):  # a training run's model/ema.safetensors
            state = {k.removeprefix("dit."): v for k, v in state.items()}
        elif state and all(k.startswith("model.") for k in state):  # Krea Realtime's release (a wrapper's keys)
            state = {strip_training_prefixes(k): v for k, v in state.items()}
        with safe_open(path, "pt") as f:
            meta = (f.metadata() or {}).get("selfforcing_dit_config")
        cfg = DiTConfig(**{**json.loads(meta), "patch_size": tuple(json.loads(meta)["patch_size"])}) if meta else None
        cfg = cfg or infer_config(state, str(path), num_heads)
    elif layout == "wan":
        cfg = config_from_wan_json(_read_json(path / "config.json"), path / "config.json")
        state = read_weight_folder(path)
    else:  # diffusers: a pipeline folder or its transformer/
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json (a diffusers transformer/ folder has one)")
        cfg = config_from_diffusers_json(_read_json(folder / "config.json"), folder / "config.json")
        state = from_diffusers(read_weight_folder(folder), str(folder))
    return DiTCheckpoint(state, cfg, layout, path, which)


def check_state(model: VideoDiT, state: dict[str, torch.Tensor], layout: str, source: Path) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped key."""
    problems = state_mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError(
            "\n".join([f"{source} ({layout} layout) does not match a Wan DiT of {model.cfg}:", *problems])
        )


def check_same_size(cfg: DiTConfig, folder_cfg: DiTConfig, source: str | Path, folder: str | Path) -> None:
    """Raise unless a checkpoint's DiT is the size of the Wan folder's (eps is not in the weights)."""
    if replace(cfg, eps=folder_cfg.eps) != folder_cfg:
        raise CheckpointError(
            f"{source} is a DiT of {cfg}, but {folder} holds {folder_cfg}: use the checkpoint with the Wan "
            "folder it was trained from (e.g. Wan2.1-T2V-1.3B for the released Self Forcing checkpoints)"
        )


def load_dit(
    path: str | Path,
    weights: str | None = None,
    preset: str | None = None,
    num_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> VideoDiT:
    """A ``VideoDiT`` with the weights of ``path`` (any layout), in eval mode, without gradients.

    ``weights``: which network of a training checkpoint (default ``generator_ema``, else ``generator``);
    ``preset``: assert the checkpoint has that size. The model is built on the meta device and takes
    the checkpoint's tensors, so a 14B model is not allocated twice.
    """
    ckpt = read_dit(path, weights, num_heads)
    if preset is not None:
        check_preset(ckpt.config, preset, str(path))
    return build_dit(ckpt, dtype, device)


def build_dit(ckpt: DiTCheckpoint, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> VideoDiT:
    """A ``VideoDiT`` holding ``ckpt``'s weights (built on the meta device, so nothing is allocated twice)."""
    with torch.device("meta"):
        model = VideoDiT(ckpt.config)
    check_state(model, ckpt.state, ckpt.layout, ckpt.source)
    state = {k: v.to(device=device, dtype=dtype) for k, v in ckpt.state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- export


def diffusers_config(cfg: DiTConfig) -> dict:
    """The ``WanTransformer3DModel`` constructor arguments of ``cfg``."""
    return dict(
        patch_size=list(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads" if cfg.qk_norm else None,
        eps=cfg.eps,
    )


def wan_config(cfg: DiTConfig) -> dict:
    """Wan2.1's ``config.json`` for ``cfg``."""
    return dict(
        _class_name="WanModel",
        model_type="t2v",
        patch_size=list(cfg.patch_size),
        text_len=512,
        in_dim=cfg.in_channels,
        dim=cfg.dim,
        ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim,
        out_dim=cfg.out_channels,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        qk_norm=cfg.qk_norm,
        cross_attn_norm=cfg.cross_attn_norm,
        eps=cfg.eps,
    )


def export_dit(ckpt: DiTCheckpoint, to: str, out: str | Path) -> Path:
    """Write Wan-named weights as ``to`` = ``diffusers`` (a transformer/ folder diffusers' own
    ``from_pretrained`` reads), ``wan`` (the original folder) or ``safetensors`` (one file). Returns the path."""
    out = Path(out)
    tensors = {k: v.detach().contiguous().cpu() for k, v in ckpt.state.items()}
    if to == "safetensors":
        out.parent.mkdir(parents=True, exist_ok=True)
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(ckpt.config).items()}
        save_file(tensors, out, metadata={"format": "pt", "selfforcing_dit_config": json.dumps(cfg)})
        return out
    if to not in ("diffusers", "wan"):
        raise ValueError(f"export format must be diffusers, wan or safetensors, got {to!r}")
    out.mkdir(parents=True, exist_ok=True)
    if to == "wan":
        (out / "config.json").write_text(json.dumps(wan_config(ckpt.config), indent=2))
        save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
        return out
    from diffusers import WanTransformer3DModel  # the [wan] extra

    with torch.device("meta"):
        model = WanTransformer3DModel(**diffusers_config(ckpt.config))
    model.load_state_dict({to_diffusers_key(k): v for k, v in tensors.items()}, strict=True, assign=True)
    model.save_pretrained(out, safe_serialization=True)
    return out
