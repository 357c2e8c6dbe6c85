"""The whole Wan streaming pipeline: umT5 once, then per chunk the DiT (4 steps + commit) and the VAE's
streaming decode, at 832x480, chunk-wise and frame-wise, at 1x and 4x the training length.

    python benchmarks/wan_streaming.py                                  # tiny random models on the CPU
    python benchmarks/wan_streaming.py --size 1.3b --device cuda --dtype bf16 --compile
        # Wan2.1-1.3B DiT, the Wan2.1 VAE and umT5-XXL, random weights, 81 frames of 832x480 a window
    ... --streams 2   # two streams generated in turn, as a server's two workers share the GPU

Random weights: the speed of a network does not depend on its values (the DiT's head is drawn
non-zero so the latents are not trivially zero). benchmarks/streaming.py measures the DiT alone
(cache vs recompute); this script measures what a viewer waits for: first-chunk latency with the
VAE included, steady video frames/s, peak memory, and the split of each chunk's time between the DiT
and the decoder. Prints a table and writes JSON
(benchmarks/results/wan_streaming_<size>_<decoder>_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny reference models live with the tests

SIZES = {  # DiT preset or tiny, VAE base width, umT5 size, video size
    "tiny": dict(height=32, width=48, train_frames=21),
    "1.3b": dict(height=480, width=832, train_frames=81),
}
PAPER = [  # published figures for context: (system, GPU, video frames/s, first-chunk latency s)
    ("Self Forcing (paper, chunk-wise)", "H100", 17.0, 0.69),
    ("LongLive", "H100", 20.7, None),
    ("MotionStream", "H100", 29.0, 0.4),
]


def build(size: str, device: torch.device, dtype: torch.dtype, decoder: str = "vae"):
    """(TextToVideo with umT5, a codec) with random weights of the real sizes, or tiny ones; the codec is
    the Wan VAE or (``decoder="tae"``) the TAEW2.1 preview decoder, which has one size."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel
    from wan_tiny import DIT_KW, VAE_KW, tiny_tokenizer, tiny_umt5

    from selfforcing.models.dit import DIT_PRESETS, VideoDiT
    from selfforcing.models.t2v import TextToVideo
    from selfforcing.wan.dit_weights import config_from_diffusers_json
    from selfforcing.wan.tae import TAEW21, TAEDecoder
    from selfforcing.wan.text_encoder import UMT5TextEncoder
    from selfforcing.wan.vae import WanVAE

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()  # tokenizing is not what is timed; the real vocabulary size is
    with device:
        if size == "tiny":
            dit = VideoDiT(config_from_diffusers_json({**DIT_KW, "in_channels": 16, "out_channels": 16}, "tiny"))
            t5 = tiny_umt5(len(tokenizer))
        else:  # umT5-XXL: 24 layers, d_model 4096, 64 heads, gated GELU
            dit = VideoDiT(DIT_PRESETS["wan2.1-1.3b"])
            t5_cfg = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
            t5 = UMT5EncoderModel(UMT5Config(**t5_cfg, feed_forward_proj="gated-gelu", dropout_rate=0.0))
        torch.nn.init.normal_(dit.head.head.weight, std=0.02)
        # TAEW2.1 has one size; the VAE is the tiny test one or Wan2.1's (only the one measured is built)
        net = TAEDecoder() if decoder == "tae" else AutoencoderKLWan(**(VAE_KW if size == "tiny" else {}))
    dit = dit.to(dtype).eval().requires_grad_(False)
    t5 = t5.to(device, dtype).eval().requires_grad_(False)
    text = UMT5TextEncoder(t5, tokenizer, device=device)
    net = net.to(device, dtype).eval().requires_grad_(False)
    return TextToVideo(text, dit), TAEW21(net) if decoder == "tae" else WanVAE(net)


class TimedCodec:
    """The VAE with its streaming decoder timed (synchronised on CUDA) so each chunk's time splits
    into DiT and decode."""

    def __init__(self, codec, device: torch.device):
        self.codec, self.device, self.decode_s = codec, device, []

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def stream_decoder(self):
        decoder = self.codec.stream_decoder()

        def decode(latents):
            self._sync()
            t0 = time.perf_counter()
            out = decoder(latents)
            self._sync()
            self.decode_s.append(time.perf_counter() - t0)
            return out

        return decode


def measure(model, codec, args, fpb: int, length: int, device: torch.device) -> dict:
    from selfforcing.config import CausalConfig
    from selfforcing.inference.video_stream import VideoStream

    f_lat = codec.latent_shape(args.train_frames, args.height, args.width)[0]
    settings = CausalConfig(frames_per_block=fpb, window=f_lat)
    frames = codec.pixel_frames(f_lat * length)
    # decode timing synchronises around the decoder, which would undo an overlapped decode: not measured then
    timed = codec if args.overlap_decode else TimedCodec(codec, device)

    def stream(num_frames: int):
        """``args.streams`` streams (one prompt each, their own caches) generated in turn, chunk by chunk, as
        a server's workers would share the GPU: arrival times and frames of every chunk, in order."""
        timed.decode_s = []
        t0, arrivals, pixel = time.perf_counter(), [], []
        latent = codec.latent_shape(num_frames, args.height, args.width)[0]
        size, lap = (args.height, args.width), args.overlap_decode
        streams = [
            VideoStream(model, timed, [f"benchmark {i}"], *size, settings, i, overlap_decode=lap)
            for i in range(args.streams)
        ]
        waiting = []  # chunks handed over whose frames were not waited for yet (an overlapped decode)

        def arrive(chunk) -> None:
            chunk.uint8_frames()  # the frames on the host, as a server's encoder thread takes them
            arrivals.append(time.perf_counter() - t0)
            pixel.append(chunk.frames.shape[1])

        while streams[0].latent_frames < latent:
            for s in streams:
                chunk = next(s)  # overlapped: queued beside the previous chunk's decode, which is awaited now
                for c in waiting:
                    arrive(c)
                waiting = [chunk] if lap else []
                if not lap:
                    arrive(chunk)
        for c in waiting:
            arrive(c)
        return arrivals, pixel, list(timed.decode_s)

    stream(codec.pixel_frames(2 * fpb))  # warm-up: kernels, allocator, compilation
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    runs = [stream(frames) for _ in range(args.repeats)]
    arrivals, pixel, decode_s = min(runs, key=lambda r: r[0][-1])
    total = arrivals[-1]
    steady = sum(pixel[1:]) / (total - arrivals[0]) if len(arrivals) > 1 else float("nan")
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "streams": args.streams,
        "granularity": "chunk" if fpb == 3 else "frame" if fpb == 1 else f"{fpb} frames",
        "length": f"{length}x",
        "video_frames": frames,
        "first_chunk_s": round(arrivals[0], 4),
        "steady_video_fps": round(steady, 2),
        "overall_video_fps": round(sum(pixel) / total, 2),  # every stream's frames
        "overlap_decode": args.overlap_decode,
        "decode_share": round(sum(decode_s) / total, 3) if decode_s else None,
        "decode_ms_per_frame": round(1000 * sum(decode_s) / sum(pixel), 2) if decode_s else None,
        "peak_memory_gb": round(peak, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--fpb", type=int, nargs="+", default=[3, 1], help="latent frames a chunk: 3 chunk-, 1 frame-wise")
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 4], help="multiples of the training length")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row; the fastest is kept")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT's blocks (warm-up covers it)")
    p.add_argument("--streams", type=int, default=1, help="streams generated in turn (frames/s: all of them)")
    p.add_argument("--decoder", default="vae", choices=["vae", "tae"], help="the Wan VAE or the TAEW2.1 preview")
    p.add_argument(
        "--overlap-decode", action="store_true", help="on CUDA: decode on a stream of its own beside the next chunk"
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--train-frames", type=int, default=None, help="video frames of the training window")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for k, v in SIZES[args.size].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, codec = build(args.size, device, dtype, args.decoder)
    if args.compile:
        model.dit.compile_blocks()

    t0 = time.perf_counter()
    model.encode_text(["a corgi surfing a wave at sunset, cinematic"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    text_s = time.perf_counter() - t0

    rows = []
    for fpb in args.fpb:
        for length in args.lengths:
            rows.append(measure(model, codec, args, fpb, length, device))
            print(json.dumps(rows[-1]), flush=True)
    cols = list(rows[0])
    print(f"\ntext encoding (once per prompt): {text_s:.3f} s")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    result = {
        "meta": {
            "command": "python benchmarks/wan_streaming.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "size": args.size,
            "dtype": args.dtype,
            "video": [args.train_frames, args.height, args.width],
            "compile": args.compile,
            "decoder": args.decoder,
            "text_encoding_s": round(text_s, 4),
            "published": PAPER,
        },
        "rows": rows,
    }
    name = f"wan_streaming_{args.size}_{args.decoder}_{device.type}.json"
    out = Path(args.out or ROOT / "benchmarks" / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
