"""Streaming a causal student: KV cache vs recomputing the context, for growing video lengths.

    python benchmarks/streaming.py                      # toy preset on the CPU, 1x 2x 4x 8x the training length
    python benchmarks/streaming.py --preset wan2.1-1.3b --device cuda --dtype bf16
        # Wan2.1-1.3B DiT with random weights at the reference latent size (3 frames of 16x60x104 per
        # chunk, 21-frame training length, 4 steps + commit). DiT only: no VAE decoding, no text encoder.

Modes (they produce the same video; tests/test_causal.py proves it):
  cache            the KV cache, rolling (window = the training length) beyond it
  recompute_chunk  no persistent cache: at every chunk the whole context is re-run once to rebuild it
  recompute_step   no cache at all: every denoising step re-runs the whole context with the chunk
Each (mode, length) runs in a fresh process, so peak memory is its own. Prints a table and writes JSON
(benchmarks/results/streaming_<preset>_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

PRESET_DEFAULTS = {  # latent size, training length (latent frames), text tokens, video frames per latent frame
    "toy": dict(channels=3, height=24, width=24, train_frames=12, text_len=16, temporal_compression=1),
    "wan2.1-1.3b": dict(
        channels=16, height=60, width=104, train_frames=21, text_len=512, temporal_compression=4
    ),  # 832x480 pixels, 81 frames
}


def build(args: argparse.Namespace):
    """A random-weight causal text-to-video model and a pass-through codec for the latent size."""
    from selfforcing.models.codec import Codec
    from selfforcing.models.dit import VideoDiT, dit_config
    from selfforcing.models.t2v import TextToVideo
    from selfforcing.models.text_encoder import TextEncoder

    class Latents(Codec):  # DiT only: chunks are handed over as latents
        latent_channels = args.channels
        spatial_compression = temporal_compression = 1
        keeps_first_frame = False

        def decode(self, latents: torch.Tensor) -> torch.Tensor:
            return latents

    class RandomText(TextEncoder):  # a fixed random embedding stands in for the text encoder
        def __init__(self, dim: int, length: int):
            super().__init__()
            self.register_buffer("emb", torch.randn(1, length, dim))

        def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            e = self.emb.expand(len(prompts), -1, -1)
            return e, torch.ones(e.shape[:2], dtype=torch.bool, device=e.device)

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = dit_config(args.preset, in_channels=args.channels, out_channels=args.channels)
    with device:
        dit = VideoDiT(cfg)
        torch.nn.init.normal_(dit.head.head.weight, std=0.02)
        model = TextToVideo(RandomText(cfg.text_dim, args.text_len), dit)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = model.to(dtype).eval().requires_grad_(False)
    if args.compile:  # fuses the norms, RoPE and modulation around the matmuls; shapes vary as the cache fills
        model.dit.compile_blocks()
    return model, Latents()


def run_one(args: argparse.Namespace) -> dict:
    """One (mode, length) measurement in this process."""
    from selfforcing.config import CausalConfig
    from selfforcing.inference.stream import stream_video

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, codec = build(args)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    settings = CausalConfig(frames_per_block=args.fpb, window=args.train_frames)
    frames = args.train_frames * args.length
    prompts = ["benchmark"] * args.batch

    def stream(num_frames: int):
        return stream_video(model, codec, prompts, num_frames, args.height, args.width, settings, 0, args.mode)

    for _ in stream(2 * args.fpb):  # warm-up: kernels, allocator
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if args.profile:  # where the time of one whole stream goes, by kernel
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in stream(frames):
                pass
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25), file=sys.stderr)
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        runs.append([time.perf_counter() - t0 for _ in stream(frames)])  # wall-clock at each chunk's arrival
    times = min(runs, key=lambda r: r[-1])  # the fastest repeat
    total = times[-1]
    steady = (frames - args.fpb) / (total - times[0]) if len(times) > 1 else float("nan")
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "mode": args.mode,
        "length": f"{args.length}x",
        "latent_frames": frames,
        "first_chunk_s": round(times[0], 4),
        "steady_fps": round(steady * args.batch, 2),
        "video_fps": round(steady * args.batch * args.temporal_compression, 2),
        "overall_fps": round(frames * args.batch / total, 2),
        "total_s": round(total, 3),
        "peak_memory_mb": round(peak, 1),
        "memory_above_model_mb": round(peak - rss_model, 1) if device.type == "cpu" else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="toy", choices=sorted(PRESET_DEFAULTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 4, 8], help="multiples of the training length")
    p.add_argument("--modes", nargs="+", default=["cache", "recompute_chunk", "recompute_step"])
    p.add_argument("--fpb", type=int, default=3, help="latent frames per chunk")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement; the fastest is kept")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT (warm-up covers compilation)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one stream (stderr)")
    for k in ("channels", "height", "width", "train_frames", "text_len", "temporal_compression"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help="default: the preset's")
    p.add_argument("--out", default=None)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: a single measurement
    p.add_argument("--mode", default="cache", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    for k, v in PRESET_DEFAULTS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.one:
        print(json.dumps(run_one(args)))
        return

    rows = []
    for length in args.lengths:
        for mode in args.modes:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", "--mode", mode, "--length", str(length)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{mode} {length}x failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                rows.append({"mode": mode, "length": f"{length}x", "error": res.stderr.strip().splitlines()[-1]})
                continue
            if args.profile:
                print(res.stderr, file=sys.stderr)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:  # speed-up of the cache over each recompute mode at the same length
        cached = next(
            (c for c in rows if c["length"] == r["length"] and c["mode"] == "cache" and "error" not in c), None
        )
        if cached and "error" not in r:
            r["cache_speedup"] = round(r["total_s"] / cached["total_s"], 2)

    cols = [
        "mode",
        "length",
        "latent_frames",
        "first_chunk_s",
        "steady_fps",
        "video_fps",
        "overall_fps",
        "peak_memory_mb",
        "cache_speedup",
    ]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    out = Path(
        args.out or ROOT / "benchmarks" / "results" / f"streaming_{args.preset}_{args.device.split(':')[0]}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "cpu_threads": args.threads or torch.get_num_threads(),
        "preset": args.preset,
        "dtype": args.dtype,
        "latent": [args.channels, args.height, args.width],
        "train_frames": args.train_frames,
        "frames_per_block": args.fpb,
        "steps": 4,
        "temporal_compression": args.temporal_compression,
        "compile": args.compile,
        "batch": args.batch,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
