"""The training loop every method shares: ``Trainer(cfg).train()``.

The Trainer knows no method. It builds the generator, hands it to the run's objective (``objective_for``:
flow matching, ODE regression, Teacher/Diffusion Forcing, or Self Forcing with DMD, SiD or GAN) and
runs the objective's updates: micro-batches with gradient accumulation, processes (DDP or FSDP2 under
``torchrun``), mixed precision, the non-finite guard, the EMA, samples, and atomic checkpoints that
resume exactly.

Every step is a pure function of (seed, step): micro-batch ``k`` of an update draws everything from a
generator seeded with (seed, step, update kind, global micro-batch), so resuming replays the exact loss
curve of an uninterrupted run, and N processes train what one process trains with N times the gradient
accumulation (``distributed.py``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..config import TrainConfig, config_from_yaml, config_to_yaml
from ..device import autocast, resolve_device
from ..eval.plots import plot_training_curves
from ..models.t2v import TextToVideo
from ..pipeline import build_codec, initial_model, saved_keys
from ..weights import (
    SHARDED,
    check_subset,
    checkpoint_path,
    latest_checkpoint,
    load_subset,
    load_weights,
    read_safetensors_file,
    read_weights,
    resolve_checkpoint,
    sharded_keys,
)
from .batches import Batches
from .checkpoint import load_sharded_checkpoint, save_checkpoint, save_sharded_checkpoint
from .distributed import (
    RankFailure,
    barrier,
    collective_failed,
    init_distributed,
    no_sync,
    report_failure,
    silent_ranks,
    wrap_loss,
)
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
from .objective import STREAMS, Objective, Setup, step_seed
from .samples import sample_images, sample_videos, write_samples

OPTIMIZER_NAMES = {"generator": "optimizer", "critic": "critic_optimizer"}  # their names in a checkpoint


class NonFiniteTraining(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


def objective_for(cfg: TrainConfig) -> type[Objective]:
    """The objective of a run config: by ``stage`` (and ``distill.loss`` for causal students)."""
    from .causal_diffusion import CausalDiffusion
    from .ode_init import ODERegression
    from .self_forcing import SelfForcing
    from .teacher import FlowMatching

    if cfg.stage == "causal":
        return CausalDiffusion if cfg.distill.loss == "diffusion" else SelfForcing
    return {"teacher": FlowMatching, "ode_init": ODERegression}[cfg.stage]


def build_generator(cfg: TrainConfig, batches: Batches, device: torch.device) -> TextToVideo:
    """The network the run trains (``pipeline.initial_model``), after filling in ``cfg.text.vocab`` (stored with
    every checkpoint): ``init_from``'s, else every word of the training prompts."""
    init = resolve_checkpoint(cfg.init_from) if cfg.init_from and not cfg.model.wan else None
    if init is not None:  # the vocabulary comes with the weights
        cfg.text.vocab = cfg.text.vocab or config_from_yaml((init / "config.yaml").read_text()).text.vocab
    cfg.text.vocab = cfg.text.vocab or batches.vocabulary()
    model = initial_model(cfg, device)
    model.dit.gradient_checkpointing = cfg.gradient_checkpointing
    return model


def read_training_state(file: Path, device: torch.device) -> dict:
    """A checkpoint's step, optimizer and scaler state; a damaged file is an error naming it."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: the checkpoint {file.parent} is incomplete")
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors alike for a damaged file
        raise ValueError(
            f"cannot read {file} ({type(e).__name__}: {e}): the checkpoint is damaged. Point "
            f"{file.parent.parent / 'latest'} at an earlier step_* folder, or remove {file.parent}"
        ) from e


class Trainer:
    """``Trainer(cfg).train()`` trains ``cfg``'s objective, samples, checkpoints and resumes."""

    def __init__(self, cfg: TrainConfig, objective: type[Objective] | None = None):
        cfg.validate()
        self.cfg = cfg
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        self.rank, self.world_size, self.device = init_distributed(resolve_device(cfg.device), cfg.collective_timeout_s)
        self.is_main = self.rank == 0  # rank 0 alone writes checkpoints, metrics and samples
        self.run_dir = cfg.run_dir
        self.batches = Batches(cfg)
        self.codec = build_codec(cfg)
        self.model = build_generator(cfg, self.batches, self.device)
        if cfg.model.wan:
            self.codec.vae.to(self.device)
        self.sharded = cfg.distributed == "fsdp" and self.world_size > 1
        # a LoRA run's average shares the frozen base; under FSDP each network holds its own shards of it
        share = cfg.lora.rank > 0 and not self.sharded
        self.ema = EMA(self.model, cfg.optim.ema_decay, cfg.optim.ema_start, share_frozen=share)
        self.mesh = device_mesh(self.world_size, self.device) if self.sharded else None
        if self.sharded:  # before the optimizers, which then hold this process's shards
            shard_text_to_video(self.model, self.mesh, cfg.precision)
            shard_text_to_video(self.ema.model, self.mesh, cfg.precision)
        setup = Setup(cfg, self.model, self.codec, self.batches, self.device, self.mesh)
        self.objective = (objective or objective_for(cfg))(setup)
        o = cfg.optim
        self.optimizers = {
            kind: torch.optim.AdamW(
                self.trained_parameters(kind),
                lr=self.objective.learning_rate(kind, 0),
                betas=tuple(o.betas),
                weight_decay=o.weight_decay,
            )
            for kind in self.objective.kinds
        }
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self.skipped_updates = 0  # updates skipped for a non-finite loss or gradient (optimizer_step)
        self.nonfinite_in_a_row = 0
        self._loss_modules: dict[str, torch.nn.Module] = {}
        real, self.sample_prompts = self.batches(10_000 + cfg.seed, cfg.num_samples)  # fixed prompts for samples
        self.sample_images = sample_images(cfg, self.codec, real, self.device)  # an image-to-video run's first frames

    def trained_parameters(self, kind: str) -> list[torch.nn.Parameter]:
        """What the optimizer of ``kind`` updates: its networks' parameters (with ``lora.rank``, the adapters)."""
        params = [p for module in self.objective.trainable(kind) for p in module.parameters()]
        return [p for p in params if p.requires_grad] if self.cfg.lora.rank else params

    # -- state ---------------------------------------------------------------------------------
    def state_to_save(self, net: torch.nn.Module, state: dict | None = None) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of ``net`` (of ``state``, default its state dict): all of it, or in a LoRA
        run its adapters only."""
        state = net.state_dict() if state is None else state
        keys = saved_keys(self.cfg, net)
        return state if keys is None else {k: state[k] for k in keys}

    def checkpoint_keys(self) -> dict[str, list[str] | None]:
        """Per network, the keys a checkpoint holds (``pipeline.saved_keys``: a LoRA run's adapters), None for all."""
        return {name: saved_keys(self.cfg, net) for name, net in self.networks().items()}

    def networks(self) -> dict[str, torch.nn.Module]:
        """Every network a checkpoint holds, by file name."""
        return {"model": self.model, "ema": self.ema.model, **self.objective.networks()}

    def optimizer_owners(self) -> dict[str, tuple[list[torch.nn.Module], torch.optim.Optimizer]]:
        """Each optimizer by its checkpoint name, with the networks whose parameters it updates."""
        return {OPTIMIZER_NAMES[k]: (self.objective.trainable(k), opt) for k, opt in self.optimizers.items()}

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
            tensors = sharded_state(self.networks(), self.optimizer_owners(), keys=self.checkpoint_keys())
            return save_sharded_checkpoint(self.run_dir, self.step, tensors, state, config_yaml, keep, self.is_main)
        if self.sharded:
            weights = {name: full_state_dict(net) for name, net in self.networks().items()}  # rank 0 holds them
            if self.is_main:
                weights = {name: self.state_to_save(net, weights[name]) for name, net in self.networks().items()}
            for name, (modules, opt) in self.optimizer_owners().items():
                state[name] = optimizer_state(modules, opt)
        else:
            weights = {name: self.state_to_save(net) for name, net in self.networks().items()}
            state.update({name: opt.state_dict() for name, (_, opt) in self.optimizer_owners().items()})
        path = checkpoint_path(self.run_dir, self.step)
        if self.is_main:
            path = save_checkpoint(self.run_dir, self.step, weights, state, config_yaml, keep)
        barrier()
        return path

    def load(self, ckpt: Path) -> None:
        """Resume from ``ckpt`` in either format, whatever the number of processes that wrote it."""
        state = read_training_state(ckpt / "training_state.pt", self.device)
        if (ckpt / SHARDED).is_dir():
            # optimizer state for exactly the parameters that have it in the checkpoint: none before an
            # optimizer's first step, none for one that never had a gradient (the GAN critic's output head)
            keys = self.checkpoint_keys()
            tensors = sharded_state(self.networks(), self.optimizer_owners(), saved=sharded_keys(ckpt), keys=keys)
            load_sharded_checkpoint(ckpt, tensors)  # strict: a tensor the checkpoint lacks is an error
            load_sharded_state(self.networks(), self.optimizer_owners(), tensors, keys)
        elif self.sharded:  # every rank reads the full files and keeps its shards
            for name, module in self.networks().items():
                file, keys = ckpt / f"{name}.safetensors", saved_keys(self.cfg, module)
                if keys is None:
                    load_full_state_dict(module, read_weights(module, file))
                else:  # a LoRA run's adapters
                    tensors = read_safetensors_file(file)
                    check_subset(module, tensors, keys, file)
                    load_full_state_dict(module, tensors, strict=False)
            for name, (modules, opt) in self.optimizer_owners().items():
                load_optimizer_state(modules, opt, state[name])
        else:
            for name, module in self.networks().items():
                keys = saved_keys(self.cfg, module)
                if keys is None:
                    load_weights(module, ckpt / f"{name}.safetensors")
                else:  # a LoRA run's adapters
                    file = ckpt / f"{name}.safetensors"
                    load_subset(module, read_safetensors_file(file), keys, file)
            for name, (_, opt) in self.optimizer_owners().items():
                opt.load_state_dict(state[name])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        counts = state.get("nonfinite", {})  # absent in checkpoints from before the guard
        self.skipped_updates, self.nonfinite_in_a_row = counts.get("skipped_updates", 0), counts.get("in_a_row", 0)

    def _truncate_metrics(self) -> None:
        """Drop metric lines past the resumed step (written after the last checkpoint of a crashed run), and
        the half-written line a killed run may leave at the end."""
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            lines = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        lines.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by the crash
            path.write_text("".join(ln + "\n" for ln in lines))

    # -- one step ------------------------------------------------------------------------------
    def micro_generator(self, kind: str, k: int) -> torch.Generator:
        """The random source of this rank's micro-batch ``k`` of this step's ``generator``/``critic`` update:
        global micro-batch ``rank * grad_accum_steps + k``."""
        i = self.rank * self.cfg.grad_accum_steps + k
        return torch.Generator().manual_seed(
            step_seed(self.cfg.seed * 1_000_003 + STREAMS[kind] * 1_000 + i, self.step)
        )

    def micro_loss(self, kind: str, k: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective's loss of this rank's micro-batch ``k`` of this step's ``kind`` update."""
        return self.objective.loss(kind, k, self.step, self.micro_generator(kind, k))

    def loss_module(self, kind: str) -> torch.nn.Module:
        """``kind``'s micro-batch loss as a module, DDP-wrapped under torchrun (built on first use)."""
        if kind not in self._loss_modules:
            ddp_world = 1 if self.sharded else self.world_size  # FSDP reduces the gradients itself
            loss = functools.partial(self.micro_loss, kind)
            self._loss_modules[kind] = wrap_loss(loss, self.objective.trainable(kind), ddp_world)
        return self._loss_modules[kind]

    def accumulate(self, kind: str) -> tuple[float, dict[str, float]]:
        """Gradients of the mean loss over ``grad_accum_steps`` micro-batches (each ``batch_size`` videos),
        averaged over the processes by DDP at the last one."""
        n = self.cfg.grad_accum_steps
        module = self.loss_module(kind)
        self.optimizers[kind].zero_grad(set_to_none=True)
        total, stats = 0.0, {}
        for k in range(n):
            if self.sharded:  # reduce-scatter the gradients at the last micro-batch only
                set_gradient_sync(self.objective.trainable(kind), k == n - 1)
            with no_sync(module, sync=k == n - 1):
                with autocast(self.device, self.cfg.precision):
                    loss, stats = module(k)
                self.scaler.scale(loss / n).backward()
            total += float(loss.detach()) / n
        return total, stats

    def optimizer_step(self, kind: str, loss: float = 0.0) -> float:
        """Unscale, clip the optimizer's parameters to ``optim.grad_clip``, step; returns the gradient norm
        before clipping. An update whose ``loss`` or gradient is not finite is skipped and counted
        (``skipped_updates``); ``max_nonfinite_steps`` of them in a row halt the run."""
        optimizer = self.optimizers[kind]
        self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)))
        if self.all_ranks(math.isfinite(norm) and math.isfinite(loss)):  # a rank's own loss may be the bad one
            self.scaler.step(optimizer)
            self.scaler.update()
            optimizer.zero_grad(set_to_none=True)  # freed now: the next update's backward has their memory
            self.nonfinite_in_a_row = 0
            return norm
        optimizer.zero_grad(set_to_none=True)  # the weights and the optimizer state stay as they were
        self.scaler.update()
        self.skipped_updates += 1
        self.nonfinite_in_a_row += 1
        name = OPTIMIZER_NAMES[kind]
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
        """The objective's updates of this step. Logged: each update's loss and gradient norm (``loss``,
        ``grad_norm`` for a one-kind objective; ``<kind>_loss``, ``<kind>_grad_norm`` else, and ``loss`` the
        last update's), the objective's own stats, the generator's learning rate, the skipped updates."""
        for kind, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = self.objective.learning_rate(kind, self.step)
        self.model.train()
        stats: dict[str, float] = {}
        kinds = self.objective.updates(self.step)
        for kind in kinds:
            loss, extra = self.accumulate(kind)
            prefix = "" if len(self.objective.kinds) == 1 else f"{kind}_"
            stats[f"{prefix}loss"] = stats["loss"] = loss
            stats[f"{prefix}grad_norm"] = self.optimizer_step(kind, loss)
            stats.update(extra)
        if "generator" in kinds:
            self.ema.update(self.model, self.objective.generator_updates(self.step))
        stats["skipped_updates"] = self.skipped_updates
        stats["lr"] = self.optimizers["generator"].param_groups[0]["lr"]
        self.step += 1
        return stats

    @torch.no_grad()
    def sample(self, tag: str) -> dict[str, float]:
        """Sample the fixed prompts with the EMA weights, write a captioned grid, score it with the analyser."""
        videos = sample_videos(self.cfg, self.ema.model, self.codec, self.sample_prompts, self.sample_images).cpu()
        if not self.is_main:
            return {}
        return write_samples(self.cfg, videos, self.sample_prompts, self.run_dir / "samples" / f"{tag}.gif")

    @contextlib.contextmanager
    def peers_watched(self):
        """Under torchrun: when a collective fails because another process is gone or silent, stop within a
        bounded time (``collective_timeout_s``, then a short roll call) with an error naming it; when this
        process fails on its own, leave its error for the others to report."""
        try:
            yield
        except Exception as e:
            if self.world_size == 1:
                raise
            if not collective_failed(e):
                report_failure(self.rank, e)
                raise
            tag = f"selfforcing/rollcall/{self.cfg.name}/{self.step}"
            silent = silent_ranks(tag, self.rank, self.world_size, min(5.0, self.cfg.collective_timeout_s))
            if not silent:
                raise
            names = "; ".join(f"rank {r}: {why}" for r, why in silent.items())
            raise RankFailure(
                f"rank {self.rank} stops at step {self.step}: another process of the run stopped ({names}). Fix "
                f"its cause and start the run again: it resumes from {self.run_dir / 'checkpoints'}"
            ) from e

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
                with self.peers_watched():
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
