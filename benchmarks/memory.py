"""Peak GPU memory of streaming Wan2.1 at 832x480, read before you buy a GPU.

The real code runs, not a formula: the DiT, the decoder and umT5 are built at their real sizes under
PyTorch's ``FakeTensorMode`` (tensors with shapes and dtypes but no storage, so nothing is allocated
and no GPU is needed), a stream is opened and a few chunks are generated and decoded, and PyTorch's
``MemTracker`` (``torch.distributed._tools.mem_tracker``) counts every tensor alive at every op. Its
peak is what ``torch.cuda.max_memory_allocated`` reports on a GPU.

    python benchmarks/memory.py                 # the table: 1.3B and 14B, every option (~10 min on 2 cores)
    python benchmarks/memory.py --check         # the same code at a small size, fake vs a real allocation
    python benchmarks/memory.py --device cuda   # on a GPU: each row for real, beside the stored fake figure
    python benchmarks/memory.py --training      # one SF + DMD training step per GPU: 1, 8, 64 GPUs; one-GPU recipes

``--training`` (benchmarks/memory_training.py) runs each 1.3B recipe's own trainer for one step as rank 0
of a fake process group, with ``--check`` and ``--device cuda`` as for the streaming rows.

Rows: the Wan VAE or the TAEW2.1 preview decoder; umT5 resident on the GPU or offloaded (on the CPU,
its blocks visiting the GPU one at a time to encode a prompt); the KV cache in bf16 or fp8; 1 or 2
streams. Every row is bf16, window 21 latent frames (the release's), chunks of 3 latent frames.
An offloaded umT5 is built outside the tracker (its weights sit in CPU memory); the one block that
visits the GPU while a prompt is encoded is added to the peak at stream open (its bytes, read off the
module). Writes benchmarks/results/memory.json (or --out) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import memory_training
import torch
from report import print_table, save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny tokenizer lives with the tests
GIB = 2**30
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


@dataclass(frozen=True)
class Row:
    model: str = "1.3b"  # "1.3b", "14b" or "small" (the --check size)
    decoder: str = "vae"  # "vae" or "tae"
    text: str = "offloaded"  # "resident" or "offloaded"
    kv: str = "auto"  # "auto" (bf16) or "fp8"
    streams: int = 1
    height: int = 480
    width: int = 832

    @property
    def name(self) -> str:
        return f"{self.model} {self.decoder} umT5 {self.text} kv {self.kv} x{self.streams}"


TABLE = [
    Row("1.3b", "vae", "resident"),
    Row("1.3b", "vae", "offloaded"),
    Row("1.3b", "vae", "offloaded", streams=2),
    Row("1.3b", "vae", "offloaded", "compact"),
    Row("1.3b", "vae", "offloaded", "fp8"),  # --low-memory
    Row("1.3b", "tae", "offloaded"),
    Row("1.3b", "tae", "offloaded", "fp8"),  # --low-memory --preview-decoder
    Row("1.3b", "tae", "offloaded", "fp8", streams=2),
    Row("14b", "vae", "offloaded"),
    Row("14b", "vae", "offloaded", "fp8"),
    Row("14b", "tae", "offloaded", "fp8"),
]
SMALL = dict(height=128, width=224)  # the --check size: a small DiT, the real VAE, a small umT5


def dit_config(model: str):
    from selfforcing.models.dit import DIT_PRESETS, dit_config

    if model == "small":
        return dit_config("wan2.1-1.3b", dim=512, ffn_dim=1536, num_layers=6, num_heads=4, text_dim=512)
    return DIT_PRESETS[{"1.3b": "wan2.1-1.3b", "14b": "wan2.1-14b"}[model]]


def build(row: Row, dtype: torch.dtype):
    """(DiT, decoder codec, umT5 text encoder) of the row's sizes, in ``dtype``, on the current device."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel
    from wan_tiny import tiny_tokenizer

    from selfforcing.models.dit import VideoDiT
    from selfforcing.wan.tae import TAEW21, TAEDecoder
    from selfforcing.wan.text_encoder import UMT5TextEncoder
    from selfforcing.wan.vae import WanVAE

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: no fp32 copy first (and .to() cannot swap fakes)
    try:
        torch.manual_seed(0)
        dit = VideoDiT(dit_config(row.model)).eval()
        codec = TAEW21(TAEDecoder().eval()) if row.decoder == "tae" else WanVAE(AutoencoderKLWan().eval())
        t5_cfg = UMT5_XXL if row.model != "small" else dict(UMT5_XXL, d_model=512, d_ff=1024, num_layers=4, num_heads=8)
        t5 = UMT5EncoderModel(UMT5Config(**t5_cfg, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    finally:
        torch.set_default_dtype(default)
    device = next(dit.parameters()).device
    text = UMT5TextEncoder(t5, tiny_tokenizer(), offload=row.text == "offloaded", device=device)
    return dit, codec, text


def networks(codec) -> list[torch.nn.Module]:
    return [codec.vae] if hasattr(codec, "vae") else [codec.decoder]


def stream_chunks(dit, codec, text, row: Row, chunks: int, on_chunk=None) -> None:
    """Open ``row.streams`` streams of one prompt each and generate ``chunks`` chunks of each, in turn."""
    from selfforcing.inference.video_stream import VideoStream
    from selfforcing.models.t2v import TextToVideo
    from selfforcing.wan.pipeline import RELEASED_CAUSAL

    settings = RELEASED_CAUSAL.__class__(**{**asdict(RELEASED_CAUSAL), "kv_cache": row.kv})
    model = TextToVideo(text, dit)
    streams = [
        VideoStream(model, codec, [f"prompt {i}"], row.height, row.width, settings, seed=i) for i in range(row.streams)
    ]
    for n in range(chunks):
        for i, stream in enumerate(streams):
            next(stream)
            if on_chunk:
                on_chunk(n, i)


def peak_tracker():
    """PyTorch's MemTracker, counting the tensors of every op (its peak is what we read), without its
    per-module snapshots: those deep-copy a snapshot at every module call (thousands a chunk; forward and
    backward) and make a row take many minutes. The weights are registered with ``track_external``."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs) -> None:
            pass

        def _post_fw_hook(self, module, inputs, outputs) -> None:
            pass

        def _pre_bw_hook(self, module, grad_outputs) -> None:
            pass

        def _post_bw_hook(self, module, grad_inputs) -> None:
            pass

    return PeakTracker()


def fake_peak(row: Row, chunks: int = 3, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The row's peak memory (GiB) under FakeTensorMode + MemTracker, and its parts.

    Two measured phases. Encoding the prompts (at stream open): umT5's activations (the tracker counts
    the weights of every module that runs; they are taken off and added back as the row says: all of
    umT5 resident, or one block visiting). Streaming: the DiT and decoder weights, the KV caches, every
    chunk's denoising, commit and decoding."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        dit, codec, text = build(row, dtype)
    text.offload = False  # fake modules cannot move (.to() swaps tensors): placement is accounted below

    def nbytes(module: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    def total(tracker: MemTracker, kind: str) -> int:
        return sum(s["Total"] for s in tracker.get_tracker_snapshot(kind).values())

    umt5, block = nbytes(text.encoder), max(nbytes(b) for b in text.encoder.encoder.block)
    encoding = peak_tracker()
    encoding.track_external(text.encoder)  # registered, or views of them (a Linear's weight.t()) would count
    with encoding:  # outside the fake mode: the tokenizer's ids are real (and tiny); the activations are fake
        text([f"prompt {i}" for i in range(row.streams)])
    encode_activations = total(encoding, "peak") - umt5

    weights = nbytes(dit) + sum(nbytes(n) for n in networks(codec))
    tracker, per_chunk = peak_tracker(), []
    tracker.track_external(dit, *networks(codec))

    def on_chunk(n: int, i: int) -> None:
        now, peak = total(tracker, "current") / GIB, total(tracker, "peak") / GIB
        per_chunk.append({"chunk": n, "stream": i, "now_gib": now, "peak_gib": peak})

    # every tensor fake (the mode first: the tracker counts the ops of the mode it saw on entry); the prompts
    # are encoded already: the streams read their embeddings
    with mode, tracker:
        stream_chunks(dit, codec, text, row, chunks, on_chunk)
    streaming = total(tracker, "peak")
    between = per_chunk[-1]["now_gib"] * GIB  # weights, caches, decoder state: what stays between chunks
    visiting = umt5 if row.text == "resident" else block
    opening = between + encode_activations + visiting  # a prompt encoded with the streams open (a switch)
    peak = max(streaming + (umt5 if row.text == "resident" else 0), opening)
    return {
        "peak_gib": round(peak / GIB, 2),
        "streaming_gib": round((streaming + (umt5 if row.text == "resident" else 0)) / GIB, 2),
        "encoding_gib": round(opening / GIB, 2),
        "weights_gib": round((weights + (umt5 if row.text == "resident" else 0)) / GIB, 2),
        "between_chunks_gib": round(between / GIB, 2),
        "per_chunk": [{k: round(v, 3) if isinstance(v, float) else v for k, v in c.items()} for c in per_chunk],
    }


def real_peak_cpu(row: Row, chunks: int) -> dict:
    """The same run with real tensors on the CPU, in a fresh process (``--real-cpu``): peak RSS over the
    baseline after imports, with glibc told to hand every freed block of 64 KiB or more back at once, so
    that RSS follows the live tensors."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--real-cpu", json.dumps(asdict(row)), "--chunks", str(chunks)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _real_cpu(row: Row, chunks: int) -> None:
    import diffusers  # noqa: F401  (imports are not what is measured)
    import transformers  # noqa: F401
    from wan_tiny import tiny_tokenizer

    tiny_tokenizer()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dit, codec, text = build(row, torch.bfloat16)
    stream_chunks(dit, codec, text, row, chunks)
    print(json.dumps({"rss_gib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20, 3)}))


def cuda_peak(row: Row, chunks: int) -> dict:
    """The row measured on a GPU: ``torch.cuda.max_memory_allocated`` over the whole run (umT5 offloaded:
    built on the CPU, its blocks visit the GPU)."""
    cuda = torch.device("cuda")
    with torch.device("meta"):  # no initialisation (the values do not change the memory): then placed
        dit, codec, text = build(row, torch.bfloat16)
    for module in [dit, *networks(codec)]:
        module.to_empty(device=cuda)
    text.encoder.to_empty(device=cuda if row.text == "resident" else "cpu")
    text.device = cuda
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # from the weights on
    stream_chunks(dit, codec, text, row, chunks)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB
    del dit, codec, text
    return {"cuda_peak_gib": round(peak, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="small size: the fake figure against a real allocation")
    p.add_argument("--device", default="fake", choices=["fake", "cuda"], help="cuda: also measure each row for real")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="indices into the table (default: all)")
    p.add_argument(
        "--chunks",
        type=int,
        default=None,
        help="chunks per stream (default: 7 with the preview decoder, whose peak comes when the cache is full; 3 "
        "with the VAE, whose decoding peaks from the second chunk on, above any DiT step)",
    )
    p.add_argument("--training", action="store_true", help="one SF + DMD training step of each 1.3B recipe")
    p.add_argument("--gpus", type=int, nargs="+", default=None, help="with --training: GPU counts (1 8 64)")
    p.add_argument("--recipes", nargs="+", default=None, help="with --training: recipe names (configs/wan/NAME.yaml)")
    p.add_argument("--out", default=None)
    p.add_argument("--real-cpu", default=None, help=argparse.SUPPRESS)  # --check's measuring subprocess
    p.add_argument("--training-step", default=None, help=argparse.SUPPRESS)  # --training's subprocess
    args = p.parse_args(argv)
    if args.real_cpu:
        return _real_cpu(Row(**json.loads(args.real_cpu)), args.chunks)
    if args.training_step:
        return memory_training.one_step(args.training_step)
    if args.training:
        results, cols = memory_training.table(args.check, args.device, args.recipes, args.gpus)
        print_table(results, cols)
        meta = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
        meta["settings"] = "each recipe as it is (bf16, gradient checkpointing), one video a micro-batch and an update"
        name = f"memory_training{'_check' if args.check else ''}{'_cuda' if args.device == 'cuda' else ''}.json"
        path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
        return save(path, "memory.py", argv, meta, results)
    if args.check:
        rows = [Row("small", d, "resident", kv, 1, **SMALL) for d in ("vae", "tae") for kv in ("auto", "fp8")]
    else:
        rows = [TABLE[i] for i in args.rows] if args.rows else TABLE
    results = []
    stored = ROOT / "benchmarks" / "results" / "memory.json"  # the fake table, not recomputed on a GPU
    fake_rows = {r["row"]: r for r in json.loads(stored.read_text())["rows"]} if stored.is_file() else {}
    for row in rows:
        t0 = time.perf_counter()
        chunks = args.chunks or (7 if row.decoder == "tae" else 3)
        r = {"row": row.name, **asdict(row), "chunks": chunks}
        if args.device == "cuda" and row.name in fake_rows:
            r.update({k: fake_rows[row.name][k] for k in ("peak_gib", "weights_gib", "between_chunks_gib")})
            r.update({k: fake_rows[row.name].get(k) for k in ("streaming_gib", "encoding_gib")})
        else:
            r.update(fake_peak(row, chunks))
        if args.check:
            r.update(real_peak_cpu(row, chunks))
            r["fake_vs_real"] = round(r["peak_gib"] / r["rss_gib"] - 1, 3)
        if args.device == "cuda":
            r.update(cuda_peak(row, chunks))
            r["fake_vs_cuda"] = round(r["peak_gib"] / r["cuda_peak_gib"] - 1, 3)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "per_chunk"}), flush=True)
    cols = ["row", "peak_gib", "streaming_gib", "encoding_gib", "weights_gib", "between_chunks_gib"]
    cols += [c for c in ("rss_gib", "fake_vs_real", "cuda_peak_gib", "fake_vs_cuda") if c in results[0]]
    print_table(results, cols)
    meta = {
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "settings": "bf16, window 21 latent frames, chunks of 3, 832x480 (81-frame training length)",
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    name = "memory_check.json" if args.check else f"memory{'_cuda' if args.device == 'cuda' else ''}.json"
    return save(
        Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name, "memory.py", argv, meta, results
    )


if __name__ == "__main__":
    main()
