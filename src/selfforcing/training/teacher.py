"""Training the bidirectional text-to-video teacher with flow matching, and the loop every stage shares.

Every step is a pure function of (seed, step): the batch, the prompt dropout, the timesteps and the
noise of micro-batch ``k`` are drawn from a generator seeded with (seed, step, k). Resuming from a
checkpoint therefore replays the exact loss curve of an uninterrupted run, and N processes under
``torchrun`` train what one process trains with N times the gradient accumulation (``distributed``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import TrainConfig, config_from_yaml, config_to_yaml
from ..data.latent_shards import LatentShards
from ..data.prompts import PromptFile
from ..data.shapes import ShapesWorld
from ..data.text import prompt_vocabulary
from ..data.video_folder import VideoFolder
from ..data.video_io import video_grid, write_video
from ..device import autocast, cpu_randn_like, resolve_device
from ..diffusion.flow_matching import add_noise, sample_training_sigmas, velocity_target
from ..eval.analyser import analyse_batch
from ..eval.plots import plot_training_curves
from ..inference.generate import generate_videos
from ..inference.pipeline import build_codec, build_model, stream_settings, wan_model
from ..inference.stream import generate_stream
from .checkpoint import (
    SHARDED,
    checkpoint_path,
    latest_checkpoint,
    load_network,
    load_sharded_checkpoint,
    load_weights,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    sharded_keys,
)
from .distributed import barrier, init_distributed, no_sync, wrap_loss
from .ema import EMA
from .fsdp import (
    device_mesh,
    full_state_dict,
    full_tensor,
    load_full_state_dict,
    load_optimizer_state,
    load_sharded_state,
    local,
    optimizer_state,
    reshard,
    set_gradient_sync,
    shard_text_to_video,
    sharded_state,
)


class NonFiniteTraining(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


STREAMS = {"generator": 0, "critic": 1}  # independent random streams of a step's two kinds of update


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to 10 % of the peak at the last step."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    return o.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


class Batches:
    """Training batches as a function of a seed: ``(video [B, F, 3, H, W], prompts)``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.data.source == "shapes":
            self.world = ShapesWorld(cfg.data)
        elif cfg.data.source == "prompts":
            self.prompt_file = PromptFile(cfg.data.prompts)
        elif cfg.data.source == "latents":
            self.shards = LatentShards(cfg.data.latents, cfg.data.frames, cfg.data.height, cfg.data.width)
        else:
            self.folder = VideoFolder(cfg.data.folder, cfg.data.frames, cfg.data.height, cfg.data.width)

    def __call__(self, seed: int, batch_size: int | None = None) -> tuple[torch.Tensor | None, list[str]]:
        """``(video, prompts)``; the video is None for ``source: prompts`` and already latents for
        ``source: latents`` (``TeacherTrainer.latents`` takes either)."""
        n = batch_size or self.cfg.batch_size
        if self.cfg.data.source == "latents":
            return self.shards.sample(n, seed)
        if self.cfg.data.source == "shapes":
            b = self.world.sample(n, seed)
            return b.video, b.prompts
        if self.cfg.data.source == "prompts":
            return None, self.prompt_file.sample(n, seed)
        return self.folder.sample(n, seed)

    def vocabulary(self) -> list[str]:
        """Every word the training prompts can contain."""
        if self.cfg.data.source == "shapes":
            return self.cfg.data.vocabulary()
        if self.cfg.data.source == "prompts":
            return prompt_vocabulary(self.prompt_file.prompts)
        if self.cfg.data.source == "latents":
            return prompt_vocabulary(self.shards.prompts)
        return prompt_vocabulary([p for _, p in self.folder.items])


def velocity_loss(model, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, text) -> torch.Tensor:
    """``mse(v(x_t, sigma), noise - x0)`` for ``x0: [B, F, C, H, W]`` noised to ``sigma: [B]`` (or [B, F])."""
    v = model(add_noise(x0, noise, sigma), sigma, text)
    return F.mse_loss(v.float(), velocity_target(x0, noise).float())


def flow_matching_loss(
    model, x0: torch.Tensor, prompts: list[str], cfg: TrainConfig, g: torch.Generator
) -> torch.Tensor:
    """MSE between the predicted and the true velocity at a random noise level per video."""
    d = cfg.diffusion
    b = x0.shape[0]
    drop = torch.rand(b, generator=g) < d.prompt_dropout
    prompts = ["" if dropped else p for p, dropped in zip(prompts, drop.tolist(), strict=True)]
    sigma = sample_training_sigmas(b, g, d.timestep_distribution, d.train_shift, d.logit_mean, d.logit_std)
    noise = cpu_randn_like(x0, g)
    return velocity_loss(model, x0, noise, sigma.to(x0.device), model.encode_text(prompts))


class TeacherTrainer:
    """``TeacherTrainer(cfg).train()`` trains, samples, checkpoints and resumes."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        self.rank, self.world_size, self.device = init_distributed(resolve_device(cfg.device))
        self.is_main = self.rank == 0  # rank 0 alone writes checkpoints, metrics and samples
        self.run_dir = cfg.run_dir
        self.batches = Batches(cfg)
        init = resolve_checkpoint(cfg.init_from) if cfg.init_from and not cfg.model.wan else None
        if init is not None:  # the vocabulary comes with the weights
            cfg.text.vocab = cfg.text.vocab or config_from_yaml((init / "config.yaml").read_text()).text.vocab
        cfg.text.vocab = cfg.text.vocab or self.batches.vocabulary()  # stored with every checkpoint
        self.codec = build_codec(cfg)
        torch.manual_seed(cfg.seed)  # weight initialisation
        if cfg.model.wan:  # a Wan DiT in any layout (a Self Forcing / ODE-init .pt, ...), else the folder's own
            weights = cfg.init_from or cfg.model.wan
            self.model = wan_model(cfg, weights, cfg.init_lora, cfg.init_lora_alpha).to(self.device)
            self.model.dit.requires_grad_(True)
            # umT5 is shared and frozen; in bf16, loaded only for prompts missing from model.text_cache, and on
            # CUDA kept on the CPU between them (inference.pipeline.LazyUMT5). The VAE runs on this device.
            self.model.text_encoder.shared.place(self.device)
            self.codec.vae.to(self.device)
        else:
            self.model = build_model(cfg).to(self.device)
        if init is not None:
            load_network(self.model, init, "ema")
        self.model.dit.gradient_checkpointing = cfg.gradient_checkpointing
        self.ema = EMA(self.model, cfg.optim.ema_decay, cfg.optim.ema_start)
        self.sharded = cfg.distributed == "fsdp" and self.world_size > 1
        self.mesh = device_mesh(self.world_size, self.device) if self.sharded else None
        if self.sharded:  # before the optimizer, which then holds this process's shards
            self.shard(self.model)
            self.shard(self.ema.model)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self.skipped_updates = 0  # updates skipped for a non-finite loss or gradient (optimizer_step)
        self.nonfinite_in_a_row = 0
        self._loss_modules: dict[str, torch.nn.Module] = {}
        self.sample_prompts = self.batches(10_000 + cfg.seed, cfg.num_samples)[1]  # fixed prompts for samples

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2: shard a text-to-video model over every process (training/fsdp.py)."""
        return shard_text_to_video(model, self.mesh, self.cfg.precision)

    # -- state ---------------------------------------------------------------------------------
    def networks(self) -> dict[str, torch.nn.Module]:
        """Every network a checkpoint holds, by file name (subclasses add theirs)."""
        return {"model": self.model, "ema": self.ema.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"optimizer": self.optimizer}

    def optimizer_modules(self, name: str) -> list[torch.nn.Module]:
        """The networks whose parameters optimizer ``name`` updates."""
        return self.trainable("generator" if name == "optimizer" else "critic")

    def finite(self, module: torch.nn.Module) -> bool:
        """Whether every weight is finite (on every process: under FSDP each checks its shards)."""
        return self.all_ranks(all(bool(local(p).isfinite().all()) for p in reshard(module).parameters()))

    def all_ranks(self, flag: bool) -> bool:
        """True when ``flag`` holds on every process (so all of them take the same branch)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor(float(flag), device=self.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t)

    def save(self) -> Path | None:
        """Rank 0 writes the checkpoint (atomically); the other ranks wait for it (under FSDP every rank
        first joins in gathering the full weights and optimizer state). Weights that are not all finite
        are never written: the last good checkpoint stays ``latest`` (returns None)."""
        bad = [name for name, net in self.networks().items() if not self.finite(net)]
        if bad:
            print(f"step {self.step}: {', '.join(bad)} hold non-finite weights; no checkpoint written")
            return None
        state = {"step": self.step, "scaler": self.scaler.state_dict()}
        state["nonfinite"] = {"skipped_updates": self.skipped_updates, "in_a_row": self.nonfinite_in_a_row}
        config_yaml, keep = config_to_yaml(self.cfg), self.cfg.keep_checkpoints
        if self.cfg.checkpoint_format == "sharded":  # every process writes its own shards, nothing is gathered
            tensors = sharded_state(self.networks(), self.optimizer_owners())
            return save_sharded_checkpoint(self.run_dir, self.step, tensors, state, config_yaml, keep, self.is_main)
        if self.sharded:
            weights = {name: full_state_dict(net) for name, net in self.networks().items()}
            for name, (modules, opt) in self.optimizer_owners().items():
                state[name] = optimizer_state(modules, opt)
        else:
            weights = {name: net.state_dict() for name, net in self.networks().items()}
            state.update({name: opt.state_dict() for name, opt in self.optimizers().items()})
        path = checkpoint_path(self.run_dir, self.step)
        if self.is_main:
            path = save_checkpoint(self.run_dir, self.step, weights, state, config_yaml, keep)
        barrier()
        return path

    def optimizer_owners(self) -> dict[str, tuple[list[torch.nn.Module], torch.optim.Optimizer]]:
        """Each optimizer by name, with the networks whose parameters it updates."""
        return {name: (self.optimizer_modules(name), opt) for name, opt in self.optimizers().items()}

    def load(self, ckpt: Path) -> None:
        """Resume from ``ckpt`` in either format, whatever the number of processes that wrote it."""
        state = torch.load(ckpt / "training_state.pt", map_location=self.device, weights_only=True)
        if (ckpt / SHARDED).is_dir():
            # optimizer state for exactly the parameters that have it in the checkpoint: none before an
            # optimizer's first step, none for one that never had a gradient (the GAN critic's output head)
            tensors = sharded_state(self.networks(), self.optimizer_owners(), saved=sharded_keys(ckpt))
            load_sharded_checkpoint(ckpt, tensors)  # strict: a tensor the checkpoint lacks is an error
            load_sharded_state(self.networks(), self.optimizer_owners(), tensors)
        elif self.sharded:  # every rank reads the full files and keeps its shards
            for name, module in self.networks().items():
                load_full_state_dict(module, read_weights(module, ckpt / f"{name}.safetensors"))
            for name, (modules, opt) in self.optimizer_owners().items():
                load_optimizer_state(modules, opt, state[name])
        else:
            for name, module in self.networks().items():
                load_weights(module, ckpt / f"{name}.safetensors")
            for name, opt in self.optimizers().items():
                opt.load_state_dict(state[name])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        counts = state.get("nonfinite", {})  # absent in checkpoints from before the guard
        self.skipped_updates, self.nonfinite_in_a_row = counts.get("skipped_updates", 0), counts.get("in_a_row", 0)

    def _truncate_metrics(self) -> None:
        """Drop metric lines past the resumed step (written after the last checkpoint of a crashed run)."""
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in lines))

    # -- training ------------------------------------------------------------------------------
    def latents(self, video: torch.Tensor) -> torch.Tensor:
        """A batch of real videos as the DiT's latents: encoded by the codec, or as they are for
        ``data.source: latents`` (encoded once, ahead of training)."""
        video = video.to(self.device)
        return video if self.cfg.data.source == "latents" else self.codec.encode(video)

    def loss(self, g: torch.Generator) -> torch.Tensor:
        """One micro-batch's training loss; every random draw comes from ``g``."""
        video, prompts = self.batches(int(torch.randint(2**62, (1,), generator=g)))
        x0 = self.latents(video)
        return flow_matching_loss(self.model, x0, prompts, self.cfg, g)

    def micro_generator(self, kind: str, k: int) -> torch.Generator:
        """The random source of this rank's micro-batch ``k`` of this step's ``generator``/``critic`` update:
        global micro-batch ``rank * grad_accum_steps + k``."""
        i = self.rank * self.cfg.grad_accum_steps + k
        return torch.Generator().manual_seed(
            step_seed(self.cfg.seed * 1_000_003 + STREAMS[kind] * 1_000 + i, self.step)
        )

    def generator_micro_loss(self, k: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(self.micro_generator("generator", k)), {}

    def trainable(self, kind: str) -> list[torch.nn.Module]:
        """The networks an update of ``kind`` trains (subclasses add the critic)."""
        return [self.model]

    def loss_module(self, kind: str) -> torch.nn.Module:
        """``kind``'s micro-batch loss as a module, DDP-wrapped under torchrun (built on first use)."""
        if kind not in self._loss_modules:
            fn = getattr(self, f"{kind}_micro_loss")
            ddp_world = 1 if self.sharded else self.world_size  # FSDP reduces the gradients itself
            self._loss_modules[kind] = wrap_loss(fn, self.trainable(kind), ddp_world)
        return self._loss_modules[kind]

    def accumulate(self, kind: str, optimizer: torch.optim.Optimizer) -> tuple[float, dict[str, float]]:
        """Gradients of the mean loss over ``grad_accum_steps`` micro-batches (each ``batch_size`` videos),
        averaged over the processes by DDP at the last one."""
        n = self.cfg.grad_accum_steps
        module = self.loss_module(kind)
        optimizer.zero_grad(set_to_none=True)
        total, stats = 0.0, {}
        for k in range(n):
            if self.sharded:  # reduce-scatter the gradients at the last micro-batch only
                set_gradient_sync(self.trainable(kind), k == n - 1)
            with no_sync(module, sync=k == n - 1):
                with autocast(self.device, self.cfg.precision):
                    loss, stats = module(k)
                self.scaler.scale(loss / n).backward()
            total += float(loss.detach()) / n
        return total, stats

    def optimizer_step(self, optimizer: torch.optim.Optimizer, loss: float = 0.0) -> float:
        """Unscale, clip the optimizer's parameters to ``optim.grad_clip``, step; returns the gradient norm
        before clipping. An update whose ``loss`` or gradient is not finite is skipped and counted
        (``skipped_updates``); ``max_nonfinite_steps`` of them in a row halt the run."""
        self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)))
        if self.all_ranks(math.isfinite(norm) and math.isfinite(loss)):  # a rank's own loss may be the bad one
            self.scaler.step(optimizer)
            self.scaler.update()
            self.nonfinite_in_a_row = 0
            return norm
        optimizer.zero_grad(set_to_none=True)  # the weights and the optimizer state stay as they were
        self.scaler.update()
        self.skipped_updates += 1
        self.nonfinite_in_a_row += 1
        name = next(k for k, v in self.optimizers().items() if v is optimizer)
        print(f"step {self.step}: non-finite {name} update (loss {loss}, gradient norm {norm}) skipped")
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise NonFiniteTraining(
                f"{self.nonfinite_in_a_row} updates in a row had a non-finite loss or gradient (last at step "
                f"{self.step}, {name}): the run is halted. Lower optim.lr or raise optim.grad_clip, check the "
                f"data, or resume from the last good checkpoint ({self.run_dir / 'checkpoints'}; non-finite "
                "weights are never saved). max_nonfinite_steps sets how many bad updates in a row are tolerated."
            )
        return norm

    def train_step(self) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        self.model.train()
        loss, stats = self.accumulate("generator", self.optimizer)
        grad_norm = self.optimizer_step(self.optimizer, loss)
        self.step += 1
        self.ema.update(self.model, self.step)
        stats["skipped_updates"] = self.skipped_updates
        return {"loss": loss, **stats, "grad_norm": grad_norm, "lr": lr_at(self.step - 1, self.cfg)}

    def generate_samples(self) -> torch.Tensor:
        """The fixed prompts sampled by the EMA weights: ``[B, F, 3, H, W]``.

        A bidirectional teacher uses many Euler steps with CFG; a causal student streams its few steps
        with the KV cache.
        """
        c, d = self.cfg, self.cfg.diffusion
        if c.causal is not None:
            settings = stream_settings(c)
            shape = (c.data.frames, c.data.height, c.data.width)
            return generate_stream(self.ema.model, self.codec, self.sample_prompts, *shape, settings, seed=c.seed)
        return generate_videos(
            self.ema.model,
            self.codec,
            self.sample_prompts,
            c.data.frames,
            c.data.height,
            c.data.width,
            seed=c.seed,
            steps=d.sample_steps,
            shift=d.sample_shift,
            guidance_scale=d.guidance_scale,
        )

    @torch.no_grad()
    def sample(self, tag: str) -> dict[str, float]:
        """Sample the fixed prompts, write a captioned grid, score it with the analyser."""
        videos = self.generate_samples().cpu()
        if not self.is_main:
            return {}
        write_video(self.run_dir / "samples" / f"{tag}.gif", video_grid(videos, self.sample_prompts))
        if self.cfg.data.source != "shapes":
            return {}
        summary, _ = analyse_batch(videos, self.sample_prompts)
        return {f"sample/{k}": v for k, v in summary.items()}

    def train(self) -> Path:
        cfg, main = self.cfg, self.is_main
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(self.run_dir) if cfg.resume else None
        barrier()  # every rank has seen the same checkpoints before rank 0 writes anything
        if ckpt is not None:
            self.load(ckpt)
            if main:
                self._truncate_metrics()
                print(f"resumed from {ckpt} at step {self.step}")
        elif main and (self.run_dir / "metrics.jsonl").exists():
            (self.run_dir / "metrics.jsonl").unlink()
        if main:
            (self.run_dir / "config.yaml").write_text(config_to_yaml(cfg))
            n_params = sum(p.numel() for p in self.model.dit.parameters())
            where = f"{self.world_size} processes" if self.world_size > 1 else str(self.device)
            print(f"training {cfg.name}: DiT {n_params / 1e6:.2f}M parameters on {where}, run folder {self.run_dir}")
        with (
            open(self.run_dir / "metrics.jsonl", "a") if main else contextlib.nullcontext() as log,
            tqdm(total=cfg.steps, initial=self.step, desc=cfg.name, dynamic_ncols=True, disable=not main) as bar,
        ):
            t0 = time.perf_counter()
            while self.step < cfg.steps:
                stats = self.train_step()
                stats["sec_per_step"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                sample_now = self.step % cfg.sample_every == 0 or self.step == cfg.steps
                if sample_now and (main or self.sharded):  # sharded weights: every rank joins the sampling
                    stats.update(self.sample(f"step_{self.step:06d}"))
                if main:
                    log.write(json.dumps({"step": self.step, **stats}) + "\n")
                    if self.step % cfg.log_every == 0:
                        log.flush()
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    if main:
                        log.flush()
                    self.save()  # rank 0 writes, the others wait
                    if main:
                        plot_training_curves(self.run_dir / "metrics.jsonl", self.run_dir / "training_curves.png")
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
        return self.run_dir
