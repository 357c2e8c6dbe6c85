"""How well the shipped video encoder reads the shapes world, and how its Frechet distance (FD) separates
real videos from corrupted ones. Prints two tables, writes JSON.

    python benchmarks/encoder_check.py --num 256 --out benchmarks/results/encoder_check.json

FDs are measured as ``selfforcing eval`` measures models: against real videos of the same prompts
(another draw of positions and speeds), so the real-vs-real row is the floor at this sample size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from selfforcing.data.shapes import ShapesWorld
from selfforcing.eval.encoder import HEAD_SIZES, attribute_targets, encode_videos, frechet_distance, load_encoder

ROOT = Path(__file__).resolve().parents[1]
BG = torch.tensor([16, 16, 24], dtype=torch.float32).view(3, 1, 1) / 127.5 - 1


def corruptions(video: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    objects = (video - BG).abs().sum(-3, keepdim=True) > 1e-3
    vanished = video.clone()
    vanished[:, video.shape[1] // 2 :] = BG
    jitter = torch.randint(-1, 2, (len(video), video.shape[1], 2), generator=g).tolist()
    return {
        "real (another draw)": video,
        "noise (std 0.3)": (video + 0.3 * torch.randn(video.shape, generator=g)).clamp(-1, 1),
        "colours rotated RGB->BRG": torch.where(objects, video.roll(1, dims=-3), video),
        "colours 10% more saturated": torch.where(objects, (video * 1.1).clamp(-1, 1), video),
        "blur 3x3": torch.nn.functional.avg_pool3d(video.transpose(1, 2), (1, 3, 3), 1, (0, 1, 1)).transpose(1, 2),
        "frozen (first frame)": video[:, :1].expand_as(video).clone(),
        "time reversed": video.flip(1),
        "objects vanish halfway": vanished,
        "jitter +-1 px": torch.stack(
            [
                torch.stack([f.roll(tuple(s), (1, 2)) for f, s in zip(v, sv, strict=True)])
                for v, sv in zip(video, jitter, strict=True)
            ]
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default=None)
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "encoder_check.json"))
    args = p.parse_args()
    encoder, world = load_encoder(args.encoder) if args.encoder else load_encoder()
    shapes = ShapesWorld(world)

    held_out = shapes.sample(args.num, seed=999_999)
    with torch.no_grad():
        logits = encoder(held_out.video)
    present, labels = attribute_targets(held_out)
    accuracy = {"present": float(((logits[..., 0] > 0).float() == present).float().mean())}
    start = 1
    for j, (name, n) in enumerate(zip(["shape", "size", "direction"], HEAD_SIZES[1:], strict=True)):
        pred, want = logits[..., start : start + n].argmax(-1), labels[..., j]
        accuracy[name] = float((pred == want)[want >= 0].float().mean())
        start += n
    print("| attribute | held-out accuracy |\n| --- | --- |")
    for k, v in accuracy.items():
        print(f"| {k} | {v:.3f} |")

    prompts = shapes.sample(args.num, seed=1).prompts
    reference = encode_videos(encoder, shapes.sample_for_prompts(prompts, seed=10).video)
    real = shapes.sample_for_prompts(prompts, seed=11).video
    fd = {name: frechet_distance(reference, encode_videos(encoder, v)) for name, v in corruptions(real).items()}
    fd["real, other prompts"] = frechet_distance(
        reference, encode_videos(encoder, shapes.sample(args.num, seed=5).video)
    )
    print(f"\n| videos ({args.num}) | FD to real videos of the same prompts |\n| --- | --- |")
    for k, v in fd.items():
        print(f"| {k} | {v:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"num": args.num, "accuracy": accuracy, "fd": fd}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
