"""The project's streaming against the official Self Forcing inference code: same weights, same noise.

    git clone https://github.com/guandeh17/Self-Forcing ../Self-Forcing && pip install easydict
    python benchmarks/official_speed.py --official ../Self-Forcing            # CPU: a narrow 30-layer DiT
    python benchmarks/official_speed.py --official ../Self-Forcing --size 1.3b --device cuda --dtype bf16

Both sides generate the same video of 21 latent frames (7 chunks of 3) with the released settings: 4 steps
[1000, 750, 500, 250] warped onto the shift-5 schedule, then each chunk committed to the KV cache at t = 0.
One random DiT in Wan's own layout is loaded into the official ``CausalWanModel`` and into this project's
``VideoDiT``; both read the same prompt embedding and the same noise (the official pipeline's initial
noise and its re-noising draws are the project's, in the order it draws them). The official side is its
``CausalInferencePipeline.inference``, as its inference.py calls it, with the text encoder and the VAE
replaced by pass-throughs, so that only the DiT loop is compared (its packages are imported without their
``__init__``, which imports every model and pipeline and needs torchvision). Without flash-attn (the CPU) its
attention falls back to PyTorch's SDPA; that fallback casts to bf16, so it is given the dtype it is called
with instead (what flash-attn computes on a GPU in bf16). Its import-time CUDA device lookups are pointed
at device 0 so that it imports on the CPU.

Reported: seconds for the whole video (best of ``--repeats``), aten ops per chunk (every op is a kernel
launch or more on a GPU: a count without timing noise), DiT passes, and the largest difference between
the two videos' latents. Where the project does less: the last chunk is not committed (nothing follows
it), and fewer ops a pass. Writes benchmarks/results/official_speed_<size>_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from report import print_table, save

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # DiT width/depth (always Wan2.1-1.3B's 30 layers of 128-wide heads) and latent frame size
    "tiny": dict(dim=256, ffn_dim=512, num_heads=2, height=8, width=8),  # a quick run of the script
    "small": dict(dim=512, ffn_dim=1536, num_heads=4, height=16, width=16),  # 128x128 pixels
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, height=60, width=104),  # 832x480 pixels
}
FRAMES, FPB, TEXT_LEN = 21, 3, 512
VIDEO_FRAMES = (FRAMES - 1) * 4 + 1  # 81: the VAE decodes the first latent frame to one frame, the others to 4


def wan_kwargs(size: str) -> dict:
    s = SIZES[size]
    return dict(
        model_type="t2v", patch_size=(1, 2, 2), text_len=TEXT_LEN, in_dim=16, dim=s["dim"], ffn_dim=s["ffn_dim"],
        freq_dim=256, text_dim=4096, out_dim=16, num_heads=s["num_heads"], num_layers=30, eps=1e-6,
    )  # fmt: skip


def import_official(path: Path):
    """The official modules, importable on a machine without CUDA."""
    import types

    sys.path.insert(0, str(path))
    for package in ("wan", "pipeline"):  # their __init__ imports every model and pipeline (torchvision, ...)
        module = types.ModuleType(package)
        module.__path__ = [str(path / package)]
        sys.modules[package] = module
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: 0  # read at import for default devices, never used here
    import wan.modules.causal_model as causal_model
    import wan.modules.model as wan_model
    from pipeline.causal_inference import CausalInferencePipeline
    from utils.scheduler import FlowMatchScheduler
    from utils.wan_wrapper import WanDiffusionWrapper

    def attention(q, k, v, **_):  # [B, L, heads, d], no mask: flash-attn's semantics, in the caller's dtype
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous()

    for module in (causal_model, wan_model):
        module.attention = module.flash_attention = attention
    return SimpleNamespace(
        CausalWanModel=causal_model.CausalWanModel,
        Pipeline=CausalInferencePipeline,
        Scheduler=FlowMatchScheduler,
        Wrapper=WanDiffusionWrapper,
    )


class Embedding(torch.nn.Module):
    """A text encoder that hands back one fixed prompt embedding (official: ``{"prompt_embeds": ...}``)."""

    def __init__(self, emb: torch.Tensor, official: bool):
        super().__init__()
        self.emb, self.official = emb, official

    def forward(self, prompts=None, text_prompts=None):  # the official one is called with text_prompts=
        prompts = prompts if prompts is not None else text_prompts
        e = self.emb.expand(len(prompts), -1, -1)
        return {"prompt_embeds": e} if self.official else (e, None)


def official_pipeline(off, state: dict, size: str, emb: torch.Tensor, device, dtype):
    model = off.CausalWanModel(**wan_kwargs(size))
    model.load_state_dict(state)
    model = model.to(device, dtype).eval().requires_grad_(False)
    wrapper = off.Wrapper.__new__(off.Wrapper)  # its __init__ reads wan_models/ from disk: set up by hand
    torch.nn.Module.__init__(wrapper)
    wrapper.model, wrapper.uniform_timestep, wrapper.seq_len = model, False, 32760
    wrapper.scheduler = off.Scheduler(shift=5.0, sigma_min=0.0, extra_one_step=True)
    wrapper.scheduler.set_timesteps(1000, training=True)
    wrapper.post_init()
    args = SimpleNamespace(
        denoising_step_list=[1000, 750, 500, 250], warp_denoising_step=True, num_frame_per_block=FPB,
        independent_first_frame=False, context_noise=0,
    )  # fmt: skip
    vae = SimpleNamespace(decode_to_pixel=lambda latents, use_cache=False: latents)
    pipe = off.Pipeline(args, device, generator=wrapper, text_encoder=Embedding(emb, True), vae=vae)
    s, n, d = SIZES[size], model.num_heads, model.dim // model.num_heads
    pipe.num_transformer_blocks, pipe.frame_seq_length = 30, s["height"] * s["width"] // 4
    tokens = FRAMES * pipe.frame_seq_length  # its cache holds the video (32760 tokens at 832x480)

    def caches(batch: int) -> None:  # its _initialize_* hard-code 1.3B's 12 heads and 832x480
        z = dict(device=device, dtype=dtype)
        pipe.kv_cache1 = [
            {"k": torch.zeros(batch, tokens, n, d, **z), "v": torch.zeros(batch, tokens, n, d, **z)} for _ in range(30)
        ]
        pipe.crossattn_cache = [
            {"k": torch.zeros(batch, TEXT_LEN, n, d, **z), "v": torch.zeros(batch, TEXT_LEN, n, d, **z)}
            for _ in range(30)
        ]  # inference() resets the indices and flags of caches it finds

    caches(1)
    return pipe


def ours(state_file: Path, size: str, emb: torch.Tensor, device, dtype):
    from selfforcing.models.t2v import TextToVideo
    from selfforcing.wan.dit_weights import load_dit

    dit = load_dit(state_file, num_heads=SIZES[size]["num_heads"], dtype=dtype, device=device)
    return TextToVideo(Embedding(emb, False), dit).eval()


def draws(seed: int, shape: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The project's noise, in its order: per chunk the chunk's noise, then one draw per re-noising."""
    g = torch.Generator().manual_seed(seed)
    chunk = (shape[0], FPB, *shape[2:])
    noise, renoise = [], []
    for _ in range(FRAMES // FPB):
        noise.append(torch.randn(chunk, generator=g))
        renoise += [torch.randn(chunk, generator=g) for _ in range(3)]
    return torch.cat(noise, dim=1), renoise


class CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def run_official(pipe, noise: torch.Tensor, renoise: list[torch.Tensor]) -> torch.Tensor:
    queue = list(renoise)
    randn_like = torch.randn_like
    torch.randn_like = lambda x, **kw: queue.pop(0).to(x.device, x.dtype).reshape(x.shape)  # its re-noising
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every timestep
            _, latents = pipe.inference(noise, ["a prompt"], return_latents=True)
    finally:
        torch.randn_like = randn_like
    return latents


def run_ours(model, size: str, device, dtype) -> torch.Tensor:
    from selfforcing.inference.video_stream import VideoStream
    from selfforcing.models.codec import Codec
    from selfforcing.wan.pipeline import RELEASED_CAUSAL

    class Latents(Codec):
        latent_channels, spatial_compression, temporal_compression, keeps_first_frame = 16, 1, 1, False

        def decode(self, latents):
            return latents

    s = SIZES[size]
    stream = VideoStream(model, Latents(), ["a prompt"], s["height"], s["width"], RELEASED_CAUSAL, seed=0)
    return torch.cat([next(stream).latents for _ in range(FRAMES // FPB)], dim=1)


def timed(fn, device, repeats: int) -> tuple[float, torch.Tensor]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="a checkout of github.com/guandeh17/Self-Forcing")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    off = import_official(Path(args.official).resolve())
    torch.manual_seed(0)
    reference = off.CausalWanModel(**wan_kwargs(args.size))
    with torch.no_grad():
        for p_ in reference.parameters():  # Wan's init leaves the head at zero: every output would be zero
            p_.normal_(0, 0.02) if p_.dim() > 1 else None
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    s = SIZES[args.size]
    emb = torch.randn(1, TEXT_LEN, 4096).to(device, dtype)
    noise, renoise = draws(0, (1, FRAMES, 16, s["height"], s["width"]))
    pipe = official_pipeline(off, state, args.size, emb, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:  # Wan's own key names, read by the project's loader
        save_file(state, Path(tmp) / "dit.safetensors")
        model = ours(Path(tmp) / "dit.safetensors", args.size, emb, device, dtype)
    del reference, state
    rows = []
    with torch.no_grad():
        for name, fn, passes in [
            ("official CausalInferencePipeline", lambda: run_official(pipe, noise.to(device, dtype), renoise), 35),
            ("selfforcing VideoStream", lambda: run_ours(model, args.size, device, dtype), 34),
        ]:
            fn()  # warm-up
            seconds, latents = timed(fn, device, args.repeats)
            with CountOps() as count:
                fn()
            rows.append(
                {
                    "code": name,
                    "seconds": round(seconds, 3),
                    "frames_per_s": round(VIDEO_FRAMES / seconds, 2),
                    "dit_passes": passes,
                    "aten_ops_per_chunk": count.n // (FRAMES // FPB),
                    "latents": latents.float().cpu(),
                }
            )
            print({k: v for k, v in rows[-1].items() if k != "latents"}, flush=True)
    a, b = rows[0].pop("latents"), rows[1].pop("latents")
    diff = float((a - b).abs().max())
    for r in rows:
        r["speedup"] = round(rows[0]["seconds"] / r["seconds"], 3)
        r["max_latent_diff"] = diff
    print_table(rows, ["code", "seconds", "frames_per_s", "dit_passes", "aten_ops_per_chunk", "speedup"])
    print(f"largest latent difference between the two videos: {diff:.2e}")
    meta = {"size": args.size, "device": args.device, "dtype": args.dtype, "frames": FRAMES}
    meta["latent_size"] = f"{s['height']}x{s['width']}"
    meta["gpu"] = torch.cuda.get_device_name() if device.type == "cuda" else None
    name = f"official_speed_{args.size}_{args.device}.json"
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    return save(path, "official_speed.py", argv, meta, rows)


if __name__ == "__main__":
    main()
