"""The ``selfforcing`` command line. Every command is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .training.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    run_dir = Trainer(cfg).train()
    print(f"done: checkpoints, samples and metrics.jsonl are in {run_dir}")


def cmd_generate(args: argparse.Namespace) -> None:
    from .families import family

    if args.model:
        return _generate_wan(args)
    if not args.checkpoint:
        raise ValueError("pass --checkpoint (a run or checkpoint folder) or --model (a Wan2.1 folder)")
    from .data.video_io import video_grid, write_video
    from .device import resolve_device
    from .inference.generate import generate_videos
    from .pipeline import load_pipeline

    pipe = load_pipeline(args.checkpoint, weights=args.weights or "ema", device=resolve_device(args.device))
    if args.lora:
        from .wan.lora_weights import load_lora

        pipe.model.dit = load_lora(pipe.model.dit, args.lora, args.lora_alpha, args.merge_lora)
    if args.compile:
        pipe.model.dit.compile_blocks()
    prompts = args.prompt * args.num
    scale, fps = args.scale or 4, args.fps or 8.0
    data = pipe.cfg.data
    frames, height, width = args.frames or data.frames, args.height or data.height, args.width or data.width
    if args.video:
        fpb = pipe.cfg.causal.frames_per_block if pipe.cfg.causal else 1
        input_video, frames = read_input_video(args, height, width, pipe.codec, fpb)
    video = (pipe.model, pipe.codec, prompts, frames, height, width)  # what to generate, either way
    if args.stream or pipe.cfg.causal is not None:
        from .inference.stream import stream_video
        from .pipeline import stream_guidance, stream_settings

        settings, fam = stream_settings(pipe.cfg, window=args.window), None
        if args.family:  # its inference rules on this model (families.Family.rules_for)
            fam = family(args.family)
            settings = fam.rules_for(settings)
            print(f"{fam.title}'s rules: {fam.differs}")
        settings = _causal_overrides(settings, args)
        guidance = stream_guidance(pipe.cfg) if args.guidance is None else args.guidance
        interaction = _interaction(args, fam.switch if fam else "recache")
        if args.video:
            interaction |= dict(video=input_video, strength=args.strength)
        chunks = stream_video(*video, settings, args.seed, guidance_scale=guidance, **interaction)
        videos, _ = _write_stream(chunks, args.out, fps, lambda v: video_grid(v, prompts, scale=scale), settings)
    else:
        _no_interaction(args, "a bidirectional model samples the whole video at once")
        if args.family or args.video:
            raise ValueError(f"--family and --video stream a causal model; {args.checkpoint} is bidirectional")
        d = pipe.cfg.diffusion
        videos = generate_videos(
            *video,
            seed=args.seed,
            steps=args.steps or d.sample_steps,
            shift=args.shift or d.sample_shift,
            guidance_scale=d.guidance_scale if args.guidance is None else args.guidance,
            progress=True,
        ).cpu()
        out = write_video(args.out, video_grid(videos, prompts, scale=scale), fps=fps)
        print(f"wrote {out}")
    if args.analyse:
        from .eval.analyser import analyse_batch

        summary, _ = analyse_batch(videos, prompts)
        print(json.dumps({k: round(v, 4) for k, v in summary.items()}, indent=1))


def parse_switch(text: str) -> tuple[int, str]:
    """``--switch FRAME:PROMPT`` -> (frame, prompt)."""
    frame, sep, prompt = text.partition(":")
    if not sep or not frame.strip().isdigit() or not prompt.strip():
        raise ValueError(f"--switch takes FRAME:PROMPT, e.g. --switch '24:a blue square moving left', got {text!r}")
    return int(frame), prompt.strip()


def _interaction(args: argparse.Namespace, switch_mode: str = "recache") -> dict:
    """``stream_video``'s image / switches / switch_mode from --image, --switch and --switch-mode (default
    ``switch_mode``: the model's family's rule)."""
    from .data.video_io import read_image

    switches = dict(parse_switch(s) for s in args.switch or [])
    return {
        "image": read_image(args.image) if args.image else None,
        "switches": switches,
        "switch_mode": args.switch_mode or switch_mode,
    }


def read_input_video(args: argparse.Namespace, height: int, width: int, codec, frames_per_block: int):
    """``--video``: the file's frames ``[1, F, 3, height, width]`` in [-1, 1] (resized when the file is another
    size) and the frame count to generate: ``--frames``, else the most whole chunks the file holds."""
    import torch.nn.functional as F

    from .data.video_io import from_uint8, read_video

    video = from_uint8(read_video(args.video))
    if video.shape[-2:] != (height, width):
        print(f"--video: resizing {video.shape[-1]}x{video.shape[-2]} to {width}x{height}")
        video = F.interpolate(video, size=(height, width), mode="bilinear", antialias=True).clamp(-1, 1)
    if args.frames:
        frames = args.frames
    else:  # the longest prefix that is a whole number of chunks
        c, first = codec.temporal_compression, 1 if codec.keeps_first_frame else 0
        latents = (video.shape[0] - first) // c + first
        latents -= latents % frames_per_block
        frames = codec.pixel_frames(latents) if latents else 0
    if not 0 < frames <= video.shape[0]:
        raise ValueError(
            f"{args.video} has {video.shape[0]} frames: too few for {frames or 'one chunk of'} frames (--frames)"
        )
    return video[None], frames


def _no_interaction(args: argparse.Namespace, why: str) -> None:
    if args.image or args.switch:
        raise ValueError(f"--image and --switch need a causal student that streams: {why}")


def _causal_overrides(settings, args: argparse.Namespace):
    """The causal settings with the command line's --frames-per-block, --denoising-steps, ... applied."""
    from dataclasses import replace

    flags = {
        "frames_per_block": args.frames_per_block,
        "denoising_steps": args.denoising_steps,
        "shift": args.step_shift,
        "context_timestep": args.context_timestep,
        "window": args.window,
        "sink": args.sink,
        "kv_cache": kv_cache_kind(args),
    }
    settings = replace(settings, **{k: v for k, v in flags.items() if v is not None})
    settings.validate()
    return settings


def _generate_wan(args: argparse.Namespace) -> None:
    """``generate --model WAN_FOLDER [--checkpoint self_forcing_dmd.pt]``: stream the causal student, or
    sample the folder's bidirectional model (the teacher)."""
    import torch
    from safetensors.torch import save_file

    from .data.video_io import to_uint8, video_grid, write_video
    from .wan.pipeline import TEACHER_GUIDANCE, TEACHER_SHIFT, TEACHER_STEPS, load_wan

    if args.analyse:
        raise ValueError("--analyse scores shapes-world videos; it does not apply to a Wan model")
    pipe = load_wan(args.model, args.checkpoint, weights=args.weights, **wan_options(args))
    if args.compile:
        pipe.model.dit.compile_blocks()
    prompts = args.prompt * args.num
    frames, height, width = args.frames or 81, args.height or 480, args.width or 832
    if args.video:
        if pipe.causal is None:
            raise ValueError("--video streams a causal student: pass --checkpoint")
        input_video, frames = read_input_video(args, height, width, pipe.codec, pipe.causal.frames_per_block)
    fps, scale = args.fps or 16.0, args.scale or 1

    def render(video: torch.Tensor):  # [B, F, 3, H, W] -> [F, H', W', 3] uint8
        if len(prompts) == 1 and scale == 1:
            return to_uint8(video[0])
        return video_grid(video, None, scale=scale)

    if pipe.causal is not None:
        settings = _causal_overrides(pipe.causal, args)
        if pipe.family:
            print(f"{pipe.family.title}: {pipe.family.differs}")
        interaction = _interaction(args, pipe.switch_mode)
        if args.video:
            interaction |= dict(video=input_video, strength=args.strength)
        stream = pipe.stream(prompts, frames, height, width, args.seed, settings, **interaction)
        _, latents = _write_stream(stream, args.out, fps, render, settings)
    else:
        if args.stream:
            raise ValueError("--stream needs a causal student: pass --checkpoint (e.g. self_forcing_dmd.pt)")
        _no_interaction(args, "Wan's bidirectional model samples the whole video at once")
        video, latents = pipe.generate(
            prompts,
            frames,
            height,
            width,
            args.seed,
            steps=args.steps or TEACHER_STEPS,
            shift=args.shift or TEACHER_SHIFT,
            guidance_scale=TEACHER_GUIDANCE if args.guidance is None else args.guidance,
            return_latents=True,
        )
        print(f"wrote {write_video(args.out, render(video.float().cpu()), fps=fps)}")
    if args.save_latents:
        path = Path(args.out).with_suffix(".latents.safetensors")
        save_file({"latents": latents.float().contiguous()}, path, metadata={"prompts": json.dumps(prompts)})
        print(f"wrote {path} (latents [B, F, C, h, w], normalised)")


def _write_stream(chunks, out: str, fps: float, render, settings):
    """Append each streamed chunk to the video file as it arrives, printing its latency; returns the
    frames ``[B, F, 3, H, W]`` and the latents ``[B, f, C, h, w]`` (on the CPU)."""
    import time

    import torch

    from .data.video_io import VideoWriter

    done, n, t0, prompts = [], 0, time.perf_counter(), None
    with VideoWriter(out, fps=fps) as writer:
        for chunk in chunks:
            elapsed = time.perf_counter() - t0
            frames = chunk.frames.float().cpu()
            if chunk.prompts is not None and chunk.prompts != prompts:
                print(f"from frame {n}: {' | '.join(dict.fromkeys(chunk.prompts))}")
                prompts = chunk.prompts
            ms, last = chunk.seconds * 1000, n + frames.shape[1] - 1
            print(f"chunk {chunk.index:3d}  frames {n:4d}-{last:<4d} {ms:8.1f} ms  (t = {elapsed:.2f} s)")
            writer.append(render(frames))
            done.append((chunk.seconds, frames, chunk.latents.cpu()))
            n += frames.shape[1]
    total = time.perf_counter() - t0
    b = done[0][1].shape[0]
    print(
        f"wrote {writer.path}: {n} frames x {b} videos in {total:.2f} s = {n / total:.1f} frames/s; "
        f"first chunk after {done[0][0] * 1000:.1f} ms (window {settings.window}, sink {settings.sink})"
    )
    return torch.cat([f for _, f, _ in done], dim=1), torch.cat([z for _, _, z in done], dim=1)


def cmd_convert(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .wan.dit_weights import build_dit, export_dit, read_dit

    ckpt = read_dit(args.src, weights=args.weights, num_heads=args.num_heads)
    if args.lora:  # merged into the weights: W + (alpha / r) B A
        from .wan.lora_weights import load_lora

        merged = load_lora(build_dit(ckpt), args.lora, args.lora_alpha, merge=True)
        ckpt = replace(ckpt, state=merged.state_dict())
        print(f"merged {args.lora} (alpha {args.lora_alpha or 'the rank'})")
    out = export_dit(ckpt, args.to, args.out)
    which = f" ({ckpt.weights})" if ckpt.weights else ""
    c = ckpt.config
    print(
        f"read {ckpt.source}{which}, {ckpt.layout} layout: {len(ckpt.state)} tensors, dim {c.dim}, "
        f"{c.num_layers} layers, {c.num_heads} heads; wrote {out} ({args.to} layout)"
    )


def cmd_export_lora(args: argparse.Namespace) -> None:
    """A LoRA run's adapters as a file diffusers' WanPipeline.load_lora_weights reads, and optionally merged."""
    from safetensors.torch import save_file

    from .models.lora import merged_state, original_lora_state
    from .pipeline import load_pipeline

    pipe = load_pipeline(args.checkpoint, weights=args.weights)
    if not pipe.cfg.lora.rank:
        raise ValueError(f"{pipe.checkpoint} is not a LoRA run (lora.rank: 0): its weights are whole, use convert")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(original_lora_state(pipe.model.dit), args.out)
    print(f"wrote the {args.weights} adapters of {pipe.checkpoint} to {args.out} (original Wan LoRA layout)")
    if args.merged:
        from .wan.dit_weights import DiTCheckpoint, export_dit

        dit = DiTCheckpoint(merged_state(pipe.model.dit), pipe.model.dit.cfg, "lora run", pipe.checkpoint)
        print(f"wrote {export_dit(dit, args.to, args.merged)}: the adapters merged ({args.to} layout)")


def cmd_gather_checkpoint(args: argparse.Namespace) -> None:
    """A sharded checkpoint's networks, each assembled on this process and written as ``<name>.safetensors``."""
    from .training.checkpoint import gather_checkpoint

    for file in gather_checkpoint(args.checkpoint):
        print(f"wrote {file} ({file.stat().st_size / 2**20:.1f} MiB)")


WAN_NEGATIVE_PROMPT_FLAG = "wan"  # encode-prompts' default: Wan's own negative prompt


def cmd_encode_prompts(args: argparse.Namespace) -> None:
    """umT5 embeddings of a prompt file into a cache folder, once (a rerun skips what is there)."""
    from tqdm.auto import tqdm

    from .data.prompts import PromptFile
    from .device import resolve_device
    from .wan.pipeline import WAN_NEGATIVE_PROMPT, default_dtype
    from .wan.text_encoder import clean_prompt, load_text_encoder

    if args.negative_prompt == WAN_NEGATIVE_PROMPT_FLAG:
        args.negative_prompt = WAN_NEGATIVE_PROMPT
    elif args.negative_prompt == "none":
        args.negative_prompt = None
    device = resolve_device(args.device)
    dtype = default_dtype(device)
    encoder = load_text_encoder(args.model, dtype=dtype, device=device, cache_dir=args.out)
    negative = [] if args.negative_prompt is None else [args.negative_prompt]  # the recipes' CFG prompt too
    prompts = list(dict.fromkeys(clean_prompt(p) for p in [*PromptFile(args.prompts).prompts, *negative]))
    todo = [p for p in prompts if not encoder.cache_file(p).is_file()]
    for i in tqdm(range(0, len(todo), args.batch_size), desc="umT5", unit="batch"):
        encoder.embed_new(todo[i : i + args.batch_size])
        encoder.cache.clear()  # on disk now
    print(f"{len(prompts)} prompts, {len(todo)} encoded now, {len(prompts) - len(todo)} already in {args.out}")


def cmd_encode_videos(args: argparse.Namespace) -> None:
    """A video folder encoded once by the Wan VAE into latent shards (data.source=latents)."""
    from .data.latent_shards import encode_video_folder
    from .data.video_folder import VideoFolder
    from .device import resolve_device
    from .wan.pipeline import default_dtype
    from .wan.vae import load_vae

    device = resolve_device(args.device)
    codec = load_vae(args.model, dtype=default_dtype(device), device=device)
    folder = VideoFolder(args.folder, args.frames, args.height, args.width)
    out = encode_video_folder(codec, folder, args.out, args.shard_size)
    print(f"{len(folder)} videos encoded into {out} (data.source=latents data.latents={out})")


def cmd_ode_pairs(args: argparse.Namespace) -> None:
    from .device import resolve_device
    from .training.ode_pairs import ODEPairSettings, generate_ode_pairs, generate_wan_ode_pairs

    if bool(args.teacher) == bool(args.model):
        raise ValueError("pass --teacher CHECKPOINT (a teacher of this project) or --model WAN_FOLDER, not both")
    if args.model:  # Wan2.1's own sampling unless told otherwise: 50 steps, shift 5, CFG 5 on its negative prompt
        from .wan.pipeline import TEACHER_GUIDANCE, TEACHER_SHIFT, TEACHER_STEPS, WAN_NEGATIVE_PROMPT

        missing = [f"--{k}" for k in ("prompts", "frames", "height", "width") if getattr(args, k) is None]
        if missing:
            raise ValueError(f"--model needs {' '.join(missing)} (a prompt file and the video size to sample)")
        defaults = (TEACHER_STEPS, TEACHER_SHIFT, TEACHER_GUIDANCE, WAN_NEGATIVE_PROMPT)
    else:
        defaults = (48, 3.0, 3.0, "")
    given = (args.teacher_steps, args.teacher_shift, args.guidance, args.negative_prompt)
    steps, shift, guidance, negative = (d if v is None else v for v, d in zip(given, defaults, strict=True))
    settings = ODEPairSettings(
        num_samples=args.num,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        teacher_steps=steps,
        teacher_shift=shift,
        guidance_scale=guidance,
        student_steps=tuple(args.student_steps),
        student_shift=args.student_shift,
        seed=args.seed,
        negative_prompt=negative,
    )
    device = resolve_device(args.device)
    if args.model:
        size = (args.frames, args.height, args.width)
        out = generate_wan_ode_pairs(args.model, args.prompts, *size, args.out, settings, device=device)
    else:
        out = generate_ode_pairs(args.teacher, args.out, settings, device=device)
    print(f"ODE pairs are in {out}")


def cmd_recipe(args: argparse.Namespace) -> None:
    from .config import ConfigError
    from .recipe import STAGES, run_recipe

    overrides: dict[str, list[str]] = {}
    for item in args.set:
        stage, sep, kv = item.partition(":")
        if not sep or stage not in STAGES or "=" not in kv:
            raise ConfigError(f"--set {item!r}: write STAGE:key=value with STAGE one of {STAGES}")
        overrides.setdefault(stage, []).append(kv)
    run_recipe(args.out, args.loss, args.teacher, overrides, args.device, init=args.init)


def cmd_world(args: argparse.Namespace) -> None:
    from .data.shapes import ShapesWorld, ShapesWorldConfig
    from .data.video_io import video_grid, write_video

    cfg = ShapesWorldConfig(height=args.size, width=args.size, frames=args.frames, max_objects=args.max_objects)
    batch = ShapesWorld(cfg).sample(args.num, seed=args.seed)
    out = write_video(args.out, video_grid(batch.video, batch.prompts, scale=args.scale), fps=args.fps)
    print(f"wrote {out}")


def cmd_analyse(args: argparse.Namespace) -> None:
    from .data.video_io import from_uint8, read_video
    from .eval.analyser import analyse_video

    scores = analyse_video(from_uint8(read_video(args.video)), args.prompt)
    print(json.dumps({k: round(v, 4) for k, v in scores.summary().items()}, indent=1))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps)


def cmd_train_encoder(args: argparse.Namespace) -> None:
    from .config import load_config
    from .eval.encoder import train_encoder

    data = load_config(args.config, []).data
    if data.source != "shapes":
        raise ValueError(f"{args.config} reads videos from a folder; the encoder learns the shapes world's prompts")
    _, losses = train_encoder(data, args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    print(f"wrote {args.out} (attribute loss {sum(losses[:50]) / 50:.3f} -> {sum(losses[-50:]) / 50:.3f})")


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ValueError("selfforcing serve needs aiohttp: pip install 'selfforcing[serve]'") from None
    from .device import resolve_device
    from .serve.server import serve, toy_source, wan_source

    if args.model:
        if not args.checkpoint:
            raise ValueError("--model serves a causal student: pass --checkpoint (e.g. self_forcing_dmd.pt)")
        size = (args.height or 480, args.width or 832)
        run = {"compile": args.compile, "kv_cache": kv_cache_kind(args)}
        source = wan_source(args.model, args.checkpoint, *size, **run, **wan_options(args))
    else:
        if args.offload_text or args.preview_decoder:
            raise ValueError("--offload-text and --preview-decoder apply to a Wan model (--model)")
        device = str(resolve_device(args.device))
        if args.lora:
            raise ValueError("--lora applies to a Wan model (--model) in serve")
        checkpoint = args.checkpoint or "sf_dmd_chunk_toy"
        source = toy_source(checkpoint, device, args.compile, kv_cache_kind(args), args.family)
    max_streams = args.max_streams or (1 if args.model else 2)
    serve(source, args.host, args.port, max_streams=max_streams, max_frames=args.max_frames)


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval.evaluate import EvalSettings, evaluate, markdown_table, write_report

    settings = EvalSettings(
        args.lengths, args.num, args.seeds, samples=args.samples, sink=args.sink, families=args.families or []
    )
    if args.encoder:
        settings.encoder = args.encoder
    summary = write_report(evaluate(args.checkpoint, settings, args.out), args.out)
    print(markdown_table(summary))
    print(f"wrote {args.out}/results.json, results.md, drift_*.png and samples/")


def cmd_experiment(args: argparse.Namespace) -> None:
    from .experiment import TEACHER, ExperimentSettings, run_experiment, stage_configs, stage_names

    given = {
        "ode_steps": args.ode_steps,
        "updates": args.updates,
        "methods": args.methods,
        "granularities": args.granularities,
        "num_pairs": args.num_pairs,
        "eval_num": args.eval_num,
        "eval_seeds": args.eval_seeds,
    }
    settings = ExperimentSettings(**{k: v for k, v in given.items() if v is not None}, overrides=args.set)
    if args.list:
        settings.validate()
        configs = stage_configs(Path(args.out), settings, Path(args.teacher or TEACHER))
        for name in stage_names(configs, settings):
            print(f"{name}: {configs[name].steps} steps from {configs[name].init_from}" if name in configs else name)
        return
    done = run_experiment(args.out, settings, args.teacher or TEACHER, only=args.only, device=args.device)
    print("[experiment] done: " + ", ".join(done))


def build_parser() -> argparse.ArgumentParser:
    from .inference.recache import SWITCH_MODES

    p = argparse.ArgumentParser(prog="selfforcing", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML recipe")
    t.add_argument("config", help="a recipe in configs/, e.g. configs/teacher_toy.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 optim.lr=1e-3")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate videos from prompts: a trained checkpoint or a Wan2.1 folder")
    g.add_argument(
        "--checkpoint", default=None, help="a run/checkpoint folder; with --model, a causal .pt (Self Forcing)"
    )
    g.add_argument("--model", default=None, help="a Wan2.1-T2V folder (diffusers or original layout): VAE, umT5, DiT")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    g.add_argument("--out", default="video.mp4", help="output .mp4 or .gif (a grid when several)")
    g.add_argument("--num", type=int, default=1, help="videos per prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None, help="Euler steps (default: the recipe's; Wan: 50)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (Wan teacher: 5)")
    g.add_argument("--shift", type=float, default=None, help="timestep shift of the sampling schedule (Wan: 5)")
    g.add_argument("--frames", type=int, default=None, help="frames (default: the training length; Wan: 81)")
    g.add_argument("--height", type=int, default=None, help="default: the training size; Wan: 480")
    g.add_argument("--width", type=int, default=None, help="default: the training size; Wan: 832")
    g.add_argument(
        "--weights", default=None, help="ema|model (run folders, default ema); generator_ema|generator|critic (.pt)"
    )
    g.add_argument("--device", default="auto")
    g.add_argument("--scale", type=int, default=None, help="upscaling of each tile in the output (default 4; Wan 1)")
    g.add_argument("--fps", type=float, default=None, help="default 8; Wan 16")
    g.add_argument("--analyse", action="store_true", help="print the shapes-world analyser's scores")
    g.add_argument(
        "--stream", action="store_true", help="causal student: write chunk by chunk, print latency and frames/s"
    )
    g.add_argument(
        "--window", type=int, default=None, help="KV-cache window in latent frames (default: training length; Wan 21)"
    )
    g.add_argument("--sink", type=int, default=None, help="latent frames kept from the start when the cache rolls")
    g.add_argument("--frames-per-block", type=int, default=None, help="latent frames per streamed chunk (Wan: 3)")
    g.add_argument("--denoising-steps", type=float, nargs="+", default=None, help="few-step list (1000 750 500 250)")
    g.add_argument("--step-shift", type=float, default=None, help="warp of the few-step list (5)")
    g.add_argument("--context-timestep", type=float, default=None, help="t of the cache-commit pass (0: clean)")
    g.add_argument(
        "--switch",
        action="append",
        default=None,
        metavar="FRAME:PROMPT",
        help="causal student: switch to PROMPT from the first chunk at or after FRAME (repeat for several)",
    )
    g.add_argument(
        "--switch-mode",
        default=None,
        choices=list(SWITCH_MODES),
        help="recache: recompute the held frames under the new prompt, causally; one-pass: LongLive's re-cache; "
        "keep: the old cache; reset: a cut (inference/recache.py). Default: the family's rule, else recache",
    )
    g.add_argument("--image", default=None, help="causal student: the first frame (an image file of the video's size)")
    g.add_argument(
        "--video", default=None, help="video-to-video: an input video (mp4, gif), encoded chunk by chunk (any family)"
    )
    g.add_argument(
        "--strength", type=float, default=0.7, help="with --video: how far from the input (1: from pure noise)"
    )
    g.add_argument("--save-latents", action="store_true", help="Wan: also write OUT.latents.safetensors")
    add_model_flags(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="write a Wan DiT checkpoint (any layout) as diffusers, wan or safetensors")
    c.add_argument("src", help="a Wan folder, diffusers folder, Self Forcing / CausVid .pt or .safetensors file")
    c.add_argument("--to", required=True, choices=["diffusers", "wan", "safetensors"], help="the layout to write")
    c.add_argument("out", help="output folder (diffusers, wan) or .safetensors file")
    c.add_argument("--weights", default=None, help="network of a .pt: generator_ema (default), generator, critic")
    c.add_argument("--num-heads", type=int, default=None, help="heads, when no config.json says (default: dim/128)")
    c.add_argument("--lora", default=None, help="a PEFT LoRA state dict to merge first (LongLive's models/lora.pt)")
    c.add_argument("--lora-alpha", type=float, default=None, help="its alpha (PEFT files omit it; default the rank)")
    c.set_defaults(func=cmd_convert)

    el = sub.add_parser("export-lora", help="a LoRA run's adapters as a file diffusers loads, or merged")
    el.add_argument("checkpoint", help="a run or checkpoint folder trained with lora.rank > 0")
    el.add_argument("--out", required=True, help="the adapters, e.g. lora.safetensors (WanPipeline.load_lora_weights)")
    el.add_argument("--weights", default="ema", choices=["ema", "model"])
    el.add_argument("--merged", default=None, help="also write the DiT with the adapters merged here")
    el.add_argument("--to", default="safetensors", choices=["safetensors", "wan", "diffusers"], help="its layout")
    el.set_defaults(func=cmd_export_lora)

    gc = sub.add_parser("gather-checkpoint", help="write a sharded checkpoint's networks as one safetensors each")
    gc.add_argument("checkpoint", help="a sharded checkpoint folder, or a run folder (its latest checkpoint)")
    gc.set_defaults(func=cmd_gather_checkpoint)

    ep = sub.add_parser("encode-prompts", help="cache umT5 embeddings of a prompt file (for model.text_cache)")
    ep.add_argument("--model", required=True, help="a Wan2.1 folder (its umT5 and tokenizer)")
    ep.add_argument("--prompts", required=True, help="a text file, one prompt a line")
    ep.add_argument("--out", required=True, help="the cache folder (one .safetensors per prompt; reruns resume)")
    ep.add_argument("--batch-size", type=int, default=16)
    ep.add_argument("--device", default="auto")
    ep.add_argument(
        "--negative-prompt",
        default=WAN_NEGATIVE_PROMPT_FLAG,
        help="also cache this prompt (default: Wan's negative prompt, the Wan recipes' distill.negative_prompt, so "
        "training never loads umT5 for it; 'none': skip)",
    )
    ep.set_defaults(func=cmd_encode_prompts)

    ev = sub.add_parser("encode-videos", help="encode a video folder once with the Wan VAE (data.source=latents)")
    ev.add_argument("--model", required=True, help="a Wan2.1 folder (its VAE)")
    ev.add_argument("--folder", required=True, help="a video folder with prompts.jsonl (see README)")
    ev.add_argument("--out", required=True, help="the latent shards' folder (a rerun resumes)")
    ev.add_argument("--frames", type=int, default=81)
    ev.add_argument("--height", type=int, default=480)
    ev.add_argument("--width", type=int, default=832)
    ev.add_argument("--shard-size", type=int, default=64, help="videos per shard file")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_encode_videos)

    r = sub.add_parser(
        "recipe", help="the whole recipe: teacher -> ODE pairs -> ODE init -> Self Forcing (skips finished stages)"
    )
    r.add_argument("--out", default="runs/recipe", help="folder of the stages' run folders (a rerun resumes)")
    r.add_argument("--loss", default="dmd", choices=["dmd", "sid", "gan"], help="the Self Forcing loss")
    r.add_argument("--teacher", default=None, help="use this trained teacher instead of training one")
    r.add_argument(
        "--init", default=None, help="start Self Forcing from this causal student (skips the ODE pairs and ODE init)"
    )
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE:KEY=VALUE",
        help="override a stage's setting, e.g. teacher:steps=2000 pairs:num_samples=256 self_forcing:batch_size=4",
    )
    r.add_argument("--device", default="auto")
    r.set_defaults(func=cmd_recipe)

    x = sub.add_parser(
        "experiment", help="the ablation: every paradigm x loss, chunk- and frame-wise, then eval (resumable)"
    )
    x.add_argument("--out", default="runs/experiment", help="folder of the stages' run folders (a rerun resumes)")
    x.add_argument("--only", nargs="+", default=None, help="run only these stages (see --list)")
    x.add_argument("--list", action="store_true", help="print the stages and their budgets, run nothing")
    x.add_argument("--teacher", default=None, help="bidirectional teacher (default: the shipped toy teacher)")
    x.add_argument("--methods", nargs="+", default=None, help="subset of tf_diffusion df_diffusion tf_dmd ...")
    x.add_argument("--granularities", nargs="+", default=None, help="chunk and/or frame")
    x.add_argument("--ode-steps", type=int, default=None, help="ODE-init updates of each few-step student (2000)")
    x.add_argument("--updates", type=int, default=None, help="generator updates after the ODE init (200)")
    x.add_argument("--num-pairs", type=int, default=None, help="teacher trajectories for ODE init (1280)")
    x.add_argument("--eval-num", type=int, default=None, help="held-out prompts per evaluation seed (128)")
    x.add_argument("--eval-seeds", type=int, nargs="+", default=None, help="evaluation seeds (0 1 2)")
    x.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every training stage")
    x.add_argument("--device", default="auto")
    x.set_defaults(func=cmd_experiment)

    o = sub.add_parser("ode-pairs", help="sample the teacher and store its trajectories at the student's levels")
    o.add_argument("--teacher", default=None, help="teacher checkpoint or run folder (of this project)")
    o.add_argument("--model", default=None, help="or a Wan2.1 folder: its bidirectional model is the teacher")
    o.add_argument("--prompts", default=None, help="with --model: a prompt file, one a line")
    o.add_argument("--frames", type=int, default=None, help="with --model: video frames (e.g. 81)")
    o.add_argument("--height", type=int, default=None, help="with --model: e.g. 480")
    o.add_argument("--width", type=int, default=None, help="with --model: e.g. 832")
    o.add_argument("--out", required=True, help="folder for index.json + shards (a rerun resumes)")
    o.add_argument("--num", type=int, default=1024, help="number of videos")
    o.add_argument("--shard-size", type=int, default=128)
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--teacher-steps", type=int, default=None, help="teacher Euler steps (48; Wan 50)")
    o.add_argument("--teacher-shift", type=float, default=None, help="shift of its Euler schedule (3; Wan 5)")
    o.add_argument("--guidance", type=float, default=None, help="teacher classifier-free guidance (3; Wan 5)")
    o.add_argument("--negative-prompt", default=None, help="CFG's unconditional prompt ('' ; Wan: its own)")
    o.add_argument("--student-steps", type=float, nargs="+", default=[1000, 750, 500, 250])
    o.add_argument("--student-shift", type=float, default=5.0, help="warp of the student's step list")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto")
    o.set_defaults(func=cmd_ode_pairs)

    w = sub.add_parser("world", help="write example videos of the built-in shapes world")
    w.add_argument("--out", default="shapes_world.gif")
    w.add_argument("--num", type=int, default=8)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--size", type=int, default=32)
    w.add_argument("--frames", type=int, default=12)
    w.add_argument("--max-objects", type=int, default=3)
    w.add_argument("--scale", type=int, default=4)
    w.add_argument("--fps", type=float, default=8.0)
    w.set_defaults(func=cmd_world)

    a = sub.add_parser("analyse", help="score a shapes-world video file against its prompt")
    a.add_argument("video")
    a.add_argument("--prompt", required=True)
    a.set_defaults(func=cmd_analyse)

    sv = sub.add_parser("serve", help="a local web page that streams a causal student live (prompt switches too)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=7860)
    sv.add_argument("--checkpoint", default=None, help="a causal student (default: the shipped sf_dmd_chunk_toy)")
    sv.add_argument("--model", default=None, help="a Wan2.1 folder (with --checkpoint, its Self Forcing student)")
    sv.add_argument("--height", type=int, default=None, help="Wan: 480")
    sv.add_argument("--width", type=int, default=None, help="Wan: 832")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--max-streams", type=int, default=None, help="concurrent streams (default 2; Wan 1); more: busy")
    add_model_flags(sv)
    sv.add_argument("--max-frames", type=int, default=0, help="end a stream after this many frames (0: never)")
    sv.set_defaults(func=cmd_serve)

    v = sub.add_parser("eval", help="drift, motion, prompt adherence and FD of checkpoints at 1x/2x/4x length")
    v.add_argument("--checkpoint", action="append", required=True, help="checkpoint or run folder (repeatable)")
    v.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 4], help="multiples of the training length")
    v.add_argument("--num", type=int, default=256, help="held-out prompts (the FD needs a few hundred)")
    v.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="generation seeds (mean and spread)")
    v.add_argument("--encoder", default=None, help="video encoder folder for the FD (default: the shipped toy one)")
    v.add_argument("--samples", type=int, default=8, help="videos per model and length in the sample gifs")
    v.add_argument("--sink", type=int, default=None, help="stream every causal model with this many sink frames")
    v.add_argument(
        "--families",
        nargs="+",
        default=None,
        help="stream every causal model by each of these released models' rules (a row model@family each)",
    )
    v.add_argument("--out", default="runs/eval", help="folder for results.json/.md, drift_*.png, samples/")
    v.set_defaults(func=cmd_eval)

    e = sub.add_parser(
        "train-encoder", help="train the small video encoder behind the Frechet distance on a recipe's shapes world"
    )
    e.add_argument("--config", default="configs/teacher_toy.yaml", help="a recipe whose data: section is the world")
    e.add_argument("--out", default="runs/video_encoder", help="folder for encoder.safetensors + encoder.json")
    e.add_argument("--steps", type=int, default=4000)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_train_encoder)

    d = sub.add_parser("demo", help="the built-in pipeline end to end on the shapes world (~10 min on 2 cores)")
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo recipe's)")
    d.set_defaults(func=cmd_demo)
    return p


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """How a model is loaded and run: the flags ``generate`` and ``serve`` share."""
    from .families import FAMILIES

    p.add_argument(
        "--family",
        default=None,
        choices=list(FAMILIES),
        help="a released causal model's inference settings and rules (docs/models.md); Wan: default from the "
        "checkpoint's file name; a shapes-world model takes its rules (cache, window and sink in chunks, switch)",
    )
    p.add_argument("--lora", default=None, help="a PEFT LoRA on the DiT (LongLive: models/lora.pt; 'none': without)")
    p.add_argument("--lora-alpha", type=float, default=None, help="the LoRA's alpha (default: the family's, or r)")
    p.add_argument("--merge-lora", action="store_true", help="merge the LoRA into the weights (default: unmerged)")
    p.add_argument("--offload-text", action="store_true", help="Wan: keep umT5 on the CPU between prompts")
    p.add_argument("--preview-decoder", default=None, help="Wan: decode with TAEW2.1 (taew2_1.pth), not the VAE")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the DiT's blocks (faster on GPUs after ~1 min warm-up)"
    )
    p.add_argument(
        "--kv-cache",
        default=None,
        choices=["auto", "compact", "fp8"],
        help="KV cache storage: auto (in place, fastest), compact (no slots for the chunk), fp8 (half of compact)",
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="the least GPU memory: umT5 offloaded block by block, an fp8 KV cache (docs/streaming.md, memory)",
    )


def wan_options(args: argparse.Namespace) -> dict:
    """``load_wan``'s keyword arguments from the shared model flags."""
    offload = args.offload_text or args.low_memory
    return {
        "device": args.device,
        "offload_text_encoder": offload,
        "preview_decoder": args.preview_decoder,
        "family": args.family,
        "lora": args.lora,
        "lora_alpha": args.lora_alpha,
        "merge_lora": args.merge_lora,
    }


def kv_cache_kind(args: argparse.Namespace) -> str | None:
    """``causal.kv_cache`` from --kv-cache, or fp8 under --low-memory (None: the model's own setting)."""
    return args.kv_cache or ("fp8" if args.low_memory else None)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .training.checkpoint import CheckpointWriteError
    from .training.distributed import RankFailure
    from .training.trainer import NonFiniteTraining

    clear = (ConfigError, FileNotFoundError, ValueError, NotImplementedError, NonFiniteTraining, RankFailure)
    try:
        args.func(args)
    except (*clear, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
