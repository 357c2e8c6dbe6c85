"""Wall-clock and peak memory of one training step per paradigm, same batch.

    python benchmarks/training_step.py                     # SF + DMD vs TF vs DF (toy recipes, CPU), batch 8
    python benchmarks/training_step.py --batch 16 --device cuda
    python benchmarks/training_step.py --frames-per-block 1 --recipes sf_dmd_toy.yaml tf_dmd_toy.yaml \
        --out benchmarks/results/training_step_framewise.json   # frame-wise
    python benchmarks/training_step.py --wan 1.3b --device cuda   # Wan recipes at 1.3B: SF + DMD vs TF + DMD
    python benchmarks/training_step.py --wan tiny                 # the same on a tiny Wan folder (CPU check)

``--wan SIZE`` runs configs/wan/sf_dmd_1.3b.yaml and tf_dmd_1.3b.yaml as they are (batch 1 a process,
bf16 on CUDA, gradient checkpointing, 81 frames of 832x480 at 1.3B) on a Wan folder with random weights
that it writes first in diffusers' layout: the real 1.3B DiT (generator, teacher and critic are three
copies), a narrow umT5 of the real width (the embeddings are computed once per prompt, so its depth is
not what a step costs) and a small VAE (a step uses none: prompts for SF, pre-encoded random latents for
TF). Random weights: a network's speed does not depend on its values.

The distillation recipes (DMD, SiD, GAN) alternate generator steps (rollout with gradient + loss, then
a critic or discriminator update) with critic-only steps; their figure per step is the mean over whole
cycles (1 generator + 4 critic steps by default), and both kinds are reported too. Each recipe runs
in its own process so its peak memory is its own. Prints a table and writes
benchmarks/results/training_step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["sf_dmd_toy.yaml", "tf_diffusion_toy.yaml", "df_diffusion_toy.yaml"]
WAN_RECIPES = ["wan/sf_dmd_1.3b.yaml", "wan/tf_dmd_1.3b.yaml"]
WAN_SIZES = {"tiny": dict(frames=21, height=32, width=48), "1.3b": dict(frames=81, height=480, width=832)}
PROMPTS = ["a red circle moving right", "the cat walks on grass", "a small blue triangle", "a dog at night"]


def write_wan_assets(size: str, out: Path) -> Path:
    """A random Wan folder (diffusers layout), a prompt file and random latent shards under ``out``."""
    import json

    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))  # the tiny reference models live with the tests
    from wan_tiny import DIT_KW, diffusers_vae, tiny_tokenizer, tiny_umt5

    from selfforcing.models.dit import DIT_PRESETS
    from selfforcing.wan.dit_weights import diffusers_config

    torch.manual_seed(0)
    if size == "tiny":
        dit = WanTransformer3DModel(**{**DIT_KW, "in_channels": 16, "out_channels": 16})
    else:
        dit = WanTransformer3DModel(**diffusers_config(DIT_PRESETS["wan2.1-1.3b"]))
    torch.nn.init.normal_(dit.proj_out.weight, std=0.02)  # a zero head would make every output zero
    tokenizer = tiny_tokenizer()
    umt5 = tiny_umt5(len(tokenizer), d_model=dit.config.text_dim)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    pipe = WanPipeline(tokenizer, umt5, diffusers_vae(), scheduler, transformer=dit)
    pipe.save_pretrained(out / "wan", safe_serialization=True)
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    v = WAN_SIZES[size]
    f, h, w = (v["frames"] - 1) // 4 + 1, v["height"] // 8, v["width"] // 8
    (out / "latents").mkdir()
    latents = torch.randn(len(PROMPTS), f, 16, h, w)
    save_file({"latents": latents}, out / "latents" / "latents_00000.safetensors", {"prompts": json.dumps(PROMPTS)})
    index = {**v, "latent_shape": list(latents.shape[1:]), "num": len(PROMPTS), "shards": ["latents_00000.safetensors"]}
    (out / "latents" / "index.json").write_text(json.dumps(index))
    return out


def run_one(recipe: str, args: argparse.Namespace) -> dict:
    from selfforcing.config import load_config
    from selfforcing.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"out_dir={tmp}",
            f"device={args.device}",
            f"batch_size={args.batch}",
            f"num_threads={args.threads}",
            f"causal.frames_per_block={args.frames_per_block}",
        ]
        if args.wan:  # the recipe as it is, on the random folder, one process
            a, v = Path(args.assets), WAN_SIZES[args.wan]
            overrides += [f"model.wan={a / 'wan'}", "init_from=''", "model.text_cache=''", "distributed=ddp"]
            overrides.append("grad_accum_steps=1")  # a step is one micro-batch (the 1-GPU recipes accumulate 64)
            overrides += [f"data.prompts={a / 'prompts.txt'}", f"data.latents={a / 'latents'}"]
            overrides += [f"data.{k}={n}" for k, n in v.items()]
            if args.device == "cpu":
                overrides.append("precision=fp32")
        cfg = load_config(ROOT / "configs" / recipe, overrides)
        trainer = Trainer(cfg)
        cycle = cfg.distill.critic_steps_per_generator_step if cfg.distill.loss != "diffusion" else 1
        for _ in range(cycle):  # warm-up: one whole cycle
            trainer.train_step()
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, kinds = [], []
        for _ in range(args.cycles * cycle):
            sync()
            t0 = time.perf_counter()
            stats = trainer.train_step()
            sync()
            times.append(time.perf_counter() - t0)
            kinds.append("generator" if "generator_loss" in stats else "critic")
        peak = (
            torch.cuda.max_memory_allocated() / 2**20
            if trainer.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
    row = {
        "recipe": recipe,
        "paradigm": cfg.distill.paradigm,
        "loss": cfg.distill.loss,
        "batch": args.batch,
        "frames_per_block": args.frames_per_block,
        "sec_per_step": round(sum(times) / len(times), 4),
        "peak_memory_mb": round(peak, 1),
    }
    if cycle > 1:
        gen = [t for t, k in zip(times, kinds, strict=True) if k == "generator"]
        crit = [t for t, k in zip(times, kinds, strict=True) if k == "critic"]
        row["sec_generator_step"] = round(sum(gen) / len(gen), 4)
        row["sec_critic_step"] = round(sum(crit) / len(crit), 4)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=None, help=f"default {RECIPES}, with --wan {WAN_RECIPES}")
    p.add_argument("--wan", choices=sorted(WAN_SIZES), default=None, help="the Wan recipes on a random folder")
    p.add_argument("--assets", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None, help="videos per step (default 8, with --wan 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--frames-per-block", type=int, default=3, help="3 = chunk-wise (the recipes), 1 = frame-wise")
    p.add_argument("--cycles", type=int, default=4, help="timed generator/critic cycles (or steps) per recipe")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training_step.json"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch = args.batch or (1 if args.wan else 8)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    recipes = args.recipes or (WAN_RECIPES if args.wan else RECIPES)
    tmp = tempfile.TemporaryDirectory()
    extra = []
    if args.wan:
        t0 = time.perf_counter()
        extra = ["--assets", str(write_wan_assets(args.wan, Path(tmp.name)))]
        print(f"wrote a random Wan {args.wan} folder in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for recipe in recipes:
        command = [sys.executable, __file__, *sys.argv[1:], *extra, "--one", recipe]
        res = subprocess.run(command, capture_output=True, text=True)
        if res.returncode:
            print(f"{recipe} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["paradigm"] == "teacher_forcing"), None)
    for r in rows:
        r["vs_teacher_forcing"] = round(r["sec_per_step"] / base["sec_per_step"], 2) if base else None
    cols = ["recipe", "batch", "sec_per_step", "sec_generator_step", "sec_critic_step", "peak_memory_mb"]
    cols.append("vs_teacher_forcing")
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    tmp.cleanup()
    meta = {"torch": torch.__version__, "device": args.device, "machine": platform.machine(), "threads": args.threads}
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    meta["wan"] = args.wan
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
