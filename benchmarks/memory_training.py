"""Peak memory per GPU of one Self Forcing + DMD training step of the 1.3B recipes: the reference recipe under
FSDP2 on N GPUs, and the two one-GPU recipes (80 GB: every weight trained; 48 GB: LoRA).

    python benchmarks/memory.py --training           # the five rows (~25 min on 2 cores)
    python benchmarks/memory.py --training --check   # a small DiT: the fake figure against a real step's RSS
    python benchmarks/memory.py --training --device cuda   # on a GPU: the 1-GPU row for real

Each recipe (configs/wan/sf_dmd_1.3b*.yaml) runs as it is (bf16, gradient checkpointing, 21 latent frames of
832x480, one video a micro-batch), with one micro-batch an update: accumulating more adds no memory (the
gradients are there from the first micro-batch's backward on). Its own trainer takes one step (``Trainer.train_step``
at step 0: the generator's rollout with gradient at the exit step, the DMD loss through the teacher
with CFG and the critic, the critic's rollout and flow-matching loss, both backward passes and both
optimizers' first step, which creates their state). It runs as rank 0 of a process group of N ranks
(PyTorch's fake process group: every collective returns at once and moves nothing, so FSDP2 shards,
gathers and reduce-scatters exactly as on N GPUs) under ``FakeTensorMode`` with ``MemTracker``
counting every tensor (memory.py). With one GPU the recipe runs without FSDP, as a plain run does.

What is not real, and why it does not change the figure:
- the weights: a folder of the real sizes (diffusers layout) written with random values;
- the prompts' umT5 embeddings are handed over in memory, as a full text cache hands them over
  (``selfforcing encode-prompts``), so umT5 never loads;
- the values the host reads back from the device (a loss for the log, a gradient norm, the finite
  check) read as 1 / True: fake tensors hold no values. The host's own small tensors (the draws of
  prompts, exit step and noise level from seeded CPU generators) are real, so the step takes the
  branches it takes on a GPU;
- autocast is the CPU's (the fake tensors stand on the CPU): its bf16 op list is close to CUDA's.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "wan"
GIB = 2**30
PROMPTS = ["a red fox runs through snow", "waves break on a rocky shore at dusk", "a city street in the rain"]
# the DiT and video of each size: the recipe's, and a small one this machine trains for real (--check)
SIZES = {
    "1.3b": dict(dit={}, vae={}, frames=81, height=480, width=832),
    "tiny": dict(  # the test suite's size (tests/test_wan_training.py)
        dit=dict(dim=32, ffn_dim=64, num_layers=2, num_heads=2),
        vae=dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
        frames=21,
        height=32,
        width=48,
    ),
    "small": dict(
        dit=dict(dim=768, ffn_dim=2304, num_layers=8, num_heads=6),  # 76M parameters
        vae=dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
        frames=21,
        height=128,
        width=224,
    ),
}
TABLE = [  # (recipe, GPUs)
    ("sf_dmd_1.3b", 1),
    ("sf_dmd_1.3b", 8),
    ("sf_dmd_1.3b", 64),
    ("sf_dmd_1.3b_1gpu_80gb", 1),
    ("sf_dmd_1.3b_1gpu_48gb", 1),
]


def write_folder(size: str, out: Path) -> Path:
    """A Wan folder of ``size`` in diffusers' layout (transformer/, vae/) with random weights."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from selfforcing.models.dit import dit_config
    from selfforcing.wan.dit_weights import diffusers_config

    s = SIZES[size]
    torch.manual_seed(0)
    with torch.device("meta"):  # no initialisation pass over 1.3B weights: filled below, in place
        dit = WanTransformer3DModel(**diffusers_config(dit_config("wan2.1-1.3b", **s["dit"])))
    dit = dit.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    dit.to(torch.bfloat16).save_pretrained(out / "transformer")
    AutoencoderKLWan(**s["vae"]).save_pretrained(out / "vae")
    return out


ATEN = torch.ops.aten
MADE_FROM_VALUES = (ATEN.lift_fresh, ATEN.arange, ATEN.linspace, ATEN.scalar_tensor)  # never garbage


class HostRealFakeMode(FakeTensorMode):
    """``FakeTensorMode`` in which the host's own small tensors stay real (see the module docstring).

    Host tensors: seeded random draws (an op given a ``generator``), tensors made from Python data or
    ranges (a device mesh's ranks), and what ops on host tensors alone make. They run for real when
    small, so the step's draws (prompts, exit step, noise level) and the branches they take are those of
    a real run. Everything else is fake, including every weight and buffer; a scalar read from a fake
    tensor gives 1 (True for a bool)."""

    SMALL = 1 << 16  # elements

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.host = WeakIdKeyDictionary()  # the real host tensors this mode made

    def dispatch(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        drawn = kwargs.get("generator") is not None or func.overloadpacket in MADE_FROM_VALUES
        on_host = not any(isinstance(t, FakeTensor) for t in tensors) and (
            drawn or (tensors and all(t in self.host for t in tensors))
        )
        if not on_host:
            if func is ATEN._local_scalar_dense.default:
                dtype = args[0].dtype
                return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
            return super().dispatch(func, types, args, kwargs)
        try:  # the fake run gives the output sizes
            out = super().dispatch(func, types, args, kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            out = None  # a value read from a host tensor
        if out is not None and any(o.numel() > self.SMALL for o in tree_leaves(out) if isinstance(o, torch.Tensor)):
            return out  # a large draw (the rollout's noise) is device memory: fake
        with unset_fake_temporarily():
            out = func(*args, **kwargs)
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self.host[o] = True
        return out


def read_weights_outside() -> None:
    """Weights files are read as real tensors (a file cannot be read into a fake tensor); the trainer's
    ``.to(dtype)`` of each makes it fake at once."""
    import selfforcing.wan.dit_weights as dit_weights

    load_file = dit_weights.load_file

    def read(*args, **kwargs):
        with unset_fake_temporarily():
            return load_file(*args, **kwargs)

    dit_weights.load_file = read


def stay_put() -> None:
    """``module.to(device)`` of a module already there returns it, and ``module.to(dtype)`` of fake parameters
    casts each in place (``param.data``, as ``Module.to`` does for real ones). (``Module.to`` would swap every fake
    parameter, which fake parameters loaded from a file refuse: their converter still refers to them.)"""
    to = torch.nn.Module.to

    def to_unless_there(module, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*module.parameters(), *module.buffers()]
        if device is None or all(t.device == device for t in tensors):
            if dtype is None:
                return module
            if any(isinstance(t, FakeTensor) for t in tensors):
                for t in tensors:
                    if t.is_floating_point() and t.dtype != dtype:
                        t.data = t.data.to(dtype)
                return module
        return to(module, *args, **kwargs)

    torch.nn.Module.to = to_unless_there


def recipe(name: str, size: str, folder: Path, out: Path, device: str):
    from selfforcing.config import load_config

    s = SIZES[size]
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    overrides = [
        f"out_dir={out}",
        f"model.wan={folder}",
        "model.text_cache=''",
        "init_from=''",  # the folder's DiT starts the student (the recipe's ODE checkpoint is the same size)
        f"data.prompts={out / 'prompts.txt'}",
        f"data.frames={s['frames']}",
        f"data.height={s['height']}",
        f"data.width={s['width']}",
        f"device={device}",
        "grad_accum_steps=1",
    ]
    return load_config(RECIPES / f"{name}.yaml", overrides)


def hand_over_embeddings(cfg) -> None:
    """The prompts' (and the negative prompt's) umT5 embeddings, in the shared text encoder's memory."""
    from selfforcing.pipeline import wan_text_encoder
    from selfforcing.wan.text_encoder import clean_prompt

    lazy = wan_text_encoder(cfg.model.wan, cfg.model.text_cache).shared
    g = torch.Generator().manual_seed(0)
    for p in [*PROMPTS, cfg.distill.negative_prompt]:
        lazy.encoder.cache[clean_prompt(p)] = torch.randn(64, lazy.dim, generator=g)


def step(size: str, world: int, folder: Path, fake: bool, device: str = "cpu", name: str = "sf_dmd_1.3b") -> dict:
    """One training step of the recipe ``name`` as rank 0 of ``world``: its peak memory (GiB) and parts."""
    import torch.distributed as dist
    from memory import peak_tracker

    from selfforcing.pipeline import wan_vae
    from selfforcing.training.fsdp import local
    from selfforcing.training.trainer import Trainer

    if world > 1:
        from torch.distributed._tools import fake_collectives  # noqa: F401  (collectives on fake tensors)
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    out = Path(tempfile.mkdtemp(dir=folder.parent))  # removed with the folder
    cfg = recipe(name, size, folder, out, device)
    hand_over_embeddings(cfg)
    if not fake:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(cfg)
        trainer.train_step()
        if device == "cuda":
            return {"cuda_peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)}
        return {"rss_gib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20, 3)}
    wan_vae(cfg.model.wan)  # real: the VAE loads through diffusers (no fake tensors); a SF step never runs it
    read_weights_outside()
    stay_put()
    mode = HostRealFakeMode()
    with mode:
        trainer = Trainer(cfg)
    tracker = peak_tracker()
    networks = [
        *trainer.networks().values(),
        trainer.objective.teacher,
        trainer.codec.vae,
    ]  # the teacher is not checkpointed
    tracker.track_external(*networks, *trainer.optimizers.values())
    with mode, tracker:
        stats = trainer.train_step()
    assert "generator_loss" in stats, "step 0 updates the generator and the critic"

    def local_bytes(tensors) -> int:  # this rank's part of each (a DTensor's local shard)
        return sum(local(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def total(kind: str) -> int:
        return sum(s["Total"] for s in tracker.get_tracker_snapshot(kind).values())

    params = list({id(p): p for n in networks for p in n.parameters()}.values())  # a LoRA run shares its bases
    states = [v for o in trainer.optimizers.values() for s in o.state.values() for v in s.values()]
    parts = {
        "peak": total("peak"),
        "weights": local_bytes(params),
        "optimizer": local_bytes(states),
        "grads": local_bytes(p.grad for p in params),
        "between_steps": total("current"),
    }
    return {f"{k}_gib": round(v / GIB, 2) for k, v in parts.items() if k != "grads"} | {"bytes": parts}


def run_row(size: str, world: int, folder: Path, fake: bool, device: str, name: str = "sf_dmd_1.3b") -> dict:
    """``step`` in a fresh process (its own process group, caches and peak), with glibc told to give freed
    blocks back at once so that RSS follows the live tensors."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    spec = json.dumps(dict(size=size, world=world, folder=str(folder), fake=fake, device=device, name=name))
    cmd = [sys.executable, str(Path(__file__).with_name("memory.py")), "--training-step", spec]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{name} at size {size} on {world} GPUs failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def one_step(spec: str) -> None:
    """The subprocess of ``run_row``: prints the row as the last line."""
    s = json.loads(spec)
    import diffusers  # noqa: F401  (imports are not what --check measures)

    print(json.dumps(step(s["size"], s["world"], Path(s["folder"]), s["fake"], s["device"], s["name"])))


def table(
    check: bool, device: str, recipes: list[str] | None, worlds: list[int] | None
) -> tuple[list[dict], list[str]]:
    """The rows of ``TABLE`` whose recipe is in ``recipes`` and GPU count in ``worlds`` (default: every row; with
    --check or on a GPU, the one-GPU rows)."""
    size = "small" if check else "1.3b"
    rows = [
        (name, world)
        for name, world in TABLE
        if (recipes is None or name in recipes)
        and (world in worlds if worlds else world == 1 or not (check or device == "cuda"))
    ]
    if not rows:
        raise SystemExit(f"no row of the table is {recipes} on {worlds} GPUs: the rows are {TABLE}")
    results = []
    table_file = ROOT / "benchmarks" / "results" / "memory_training.json"
    stored = {r["row"]: r for r in json.loads(table_file.read_text())["rows"]} if table_file.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = write_folder(size, Path(tmp) / "wan")
        print(f"wrote a random {size} Wan folder in {time.perf_counter() - t0:.0f} s", flush=True)
        for name, world in rows:
            t0 = time.perf_counter()
            s = SIZES[size]
            r = {"row": f"{name.replace('1.3b', size)}, {world} GPU{'s' if world > 1 else ''}", "gpus": world}
            r |= {"recipe": f"configs/wan/{name}.yaml", "video": f"{s['frames']}x{s['height']}x{s['width']}"}
            if device == "cuda" and r["row"] in stored:  # the fake figure is not recomputed on the GPU machine
                r.update(
                    {k: stored[r["row"]][k] for k in ("peak_gib", "weights_gib", "optimizer_gib", "between_steps_gib")}
                )
            else:
                r.update(run_row(size, world, folder, fake=True, device="cpu", name=name))
            if check:
                r.update(run_row(size, world, folder, fake=False, device="cpu", name=name))
                r["fake_vs_real"] = round(r["peak_gib"] / r["rss_gib"] - 1, 3)
            if device == "cuda":
                r.update(run_row(size, world, folder, fake=False, device="cuda", name=name))
                r["fake_vs_cuda"] = round(r["peak_gib"] / r["cuda_peak_gib"] - 1, 3)
            r["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(r)
            print(json.dumps(r), flush=True)
    cols = ["row", "peak_gib", "weights_gib", "optimizer_gib", "between_steps_gib"]
    cols += [c for c in ("rss_gib", "fake_vs_real", "cuda_peak_gib", "fake_vs_cuda") if c in results[0]]
    return results, cols
