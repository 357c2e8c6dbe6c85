"""What an fp8 KV cache (``causal.kv_cache: fp8``) costs: the same streams, from the same noise, with the
cache in the compute dtype (``auto``), without its in-place slots (``compact``, which must be exact) and
in fp8 (e4m3, one scale per frame and head).

    python benchmarks/kv_fp8.py                                     # the shipped shapes-world student, CPU
    python benchmarks/kv_fp8.py --checkpoint sf_dmd_frame_toy --length 4

Per kind: the latents' relative error against ``auto`` (L2), the decoded frames' PSNR against ``auto``
(frames in [-1, 1], peak-to-peak 2), and the shapes-world analyser's frame ok. Writes
benchmarks/results/kv_fp8_<checkpoint>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from report import print_table, save

ROOT = Path(__file__).resolve().parents[1]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR (dB) of frames in [-1, 1] (peak-to-peak 2); None for identical frames."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return None if mse == 0 else round(10 * torch.log10(torch.tensor(4.0 / mse)).item(), 2)


def main(argv: list[str] | None = None) -> dict:
    from selfforcing.eval.analyser import analyse_batch
    from selfforcing.eval.score import held_out_prompts
    from selfforcing.inference.stream import stream_video
    from selfforcing.pipeline import load_pipeline, stream_guidance, stream_settings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="sf_dmd_chunk_toy")
    p.add_argument("--num", type=int, default=64, help="held-out prompts")
    p.add_argument("--length", type=int, default=4, help="multiple of the training length (the cache rolls)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    pipe = load_pipeline(args.checkpoint)
    cfg = pipe.cfg
    prompts = held_out_prompts(cfg, args.num, args.seed)
    frames = cfg.data.frames * args.length
    results, videos, latents = [], {}, {}
    for kind in ("auto", "compact", "fp8"):
        settings = replace(stream_settings(cfg), kv_cache=kind)
        t0 = time.perf_counter()
        chunks = list(
            stream_video(
                pipe.model,
                pipe.codec,
                prompts,
                frames,
                cfg.data.height,
                cfg.data.width,
                settings,
                args.seed,
                guidance_scale=stream_guidance(cfg),
            )
        )
        seconds = time.perf_counter() - t0
        videos[kind] = torch.cat([c.frames for c in chunks], 1).float().clamp(-1, 1)
        latents[kind] = torch.cat([c.latents for c in chunks], 1).float()
        summary, _ = analyse_batch(videos[kind], prompts)
        err = ((latents[kind] - latents["auto"]).norm() / latents["auto"].norm()).item()
        results.append(
            {
                "kv_cache": kind,
                "latent_rel_error": round(err, 5),
                "psnr_db_vs_auto": psnr(videos[kind], videos["auto"]),
                "frame_ok": round(summary["frame_ok"], 4),
                "seconds": round(seconds, 1),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    print_table(results, list(results[0]))
    meta = {"checkpoint": args.checkpoint, "prompts": args.num, "video_frames": frames}
    meta["window"] = stream_settings(cfg).window
    name = f"kv_fp8_{Path(args.checkpoint).name}.json"
    return save(
        Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name, "kv_fp8.py", argv, meta, results
    )


if __name__ == "__main__":
    main()
