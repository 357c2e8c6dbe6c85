"""Training a causal student on a video-level loss: Self Forcing, and TF/DF + DMD (METHOD.md 1, 2, 4).

Three networks: the generator (the causal student, from ``init_from``, usually the ODE-initialised
one), the frozen teacher (real score, with CFG) and the critic (fake score, a trainable copy of the
teacher; with ``loss: gan`` its backbone plus a head is the discriminator). The generator's
training-time videos depend on ``distill.paradigm``: its own KV-cached rollout with gradient at the
exit step (self_forcing), or one pass over real videos with clean (teacher_forcing) or noised
(diffusion_forcing) context. Every step trains the critic on fresh videos made without gradient
(flow matching, or the discriminator loss); every ``critic_steps_per_generator_step``-th step also
trains the generator on DMD, SiD or GAN. Everything random comes from (seed, step, micro-batch), so a
resumed run replays the uninterrupted one exactly.
"""

from __future__ import annotations

import copy

import torch

from ..config import ConfigError
from ..device import cpu_randn_like
from ..diffusion.flow_matching import add_noise, x0_from_velocity
from ..models.lora import add_adapters
from ..pipeline import frozen_dtype, load_pipeline, wan_model
from .causal_diffusion import forced_velocity
from .dmd import Scores, dmd_generator_loss, dmd_sigma, guidance_per_video
from .fsdp import reshard, shard_module
from .gan import Discriminator, finite_difference_penalty, gan_discriminator_loss, gan_generator_loss, noised
from .objective import STREAMS, Objective, Setup, lr_at, step_seed
from .ode_init import load_student_pairs, ode_regression_loss
from .rollout import draw_exit_step, self_forcing_rollout
from .sid import sid_generator_loss
from .teacher import velocity_loss


class SelfForcing(Objective):
    """``stage: causal`` with ``distill.loss: dmd | sid | gan``: a generator update every
    ``critic_steps_per_generator_step``-th step (after ``critic_warmup_steps``), a critic update every step."""

    kinds = ("generator", "critic")

    def __init__(self, setup: Setup):
        super().__init__(setup)
        cfg, d = self.cfg, self.cfg.distill
        self.teacher = self.load_teacher().eval().requires_grad_(False)
        if cfg.lora.critic:  # adapters on the critic, whose base is the teacher's own weights (stored once)
            self.teacher.dit.to(frozen_dtype(cfg))
            self.critic = copy.deepcopy(self.teacher, {id(p): p for p in self.teacher.parameters()}).train()
            add_adapters(self.critic.dit, cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.targets) or None)
        else:  # a trainable fp32 copy, then the teacher in its frozen dtype
            self.critic = copy.deepcopy(self.teacher).train()
            self.critic.dit.requires_grad_(True)  # the critic's text encoder stays the teacher's, frozen
            self.teacher.dit.to(frozen_dtype(cfg))
        for score in (self.teacher, self.critic):  # the critic trains on whole videos: recompute its blocks too
            score.dit.gradient_checkpointing = cfg.gradient_checkpointing
        self.discriminator = None
        if d.loss == "gan":  # the critic's backbone + a small head
            n = self.critic.dit.cfg.num_layers
            taps = tuple(d.gan_taps) or tuple(sorted({n // 3, 2 * n // 3, n - 1}))
            self.discriminator = Discriminator(self.critic, taps).to(self.device)
        if self.mesh is not None:  # FSDP2: the frozen teacher, the critic and the head are sharded like the generator
            self.shard(self.teacher)
            self.shard(self.critic)
            if self.discriminator is not None:
                shard_module(self.discriminator.head, self.mesh)
        # what the critic's optimizer updates (with lora.critic its adapters: its base is the frozen teacher's)
        self.critic_params = [p for module in self.trainable("critic") for p in module.parameters() if p.requires_grad]
        f, c, h, w = self.codec.latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width)
        self.latent_shape = (f, c, h, w)
        self.given = 1 if d.image_to_video else 0  # latent frames given, not generated: the first
        if self.given and self.codec.temporal_compression != 1 and not self.codec.keeps_first_frame:
            name = type(self.codec).__name__
            raise ConfigError(f"distill.image_to_video needs a codec that encodes a frame alone; {name} does not")
        if self.given and (f - 1) % cfg.causal.frames_per_block:
            fpb = cfg.causal.frames_per_block
            raise ConfigError(
                f"distill.image_to_video: data.frames={cfg.data.frames} is {f} latent frames, the given first one and "
                f"{f - 1} to generate, which is not a whole number of chunks of {fpb}: use data.frames="
                f"{self.codec.pixel_frames(1 + -(-(f - 1) // fpb) * fpb)}"
            )
        self.rollout_frames, self.score_frames = self.rollout_window(f - self.given)
        self.pairs = None
        if d.regression_weight > 0:
            self.pairs, self.levels = load_student_pairs(cfg, self.codec)

    def load_teacher(self):
        """The frozen real score: ``distill.teacher`` (a run folder), or with ``model.wan`` the folder's own
        bidirectional DiT (or a DiT in any layout given as ``distill.teacher``) with the shared umT5."""
        d = self.cfg.distill
        if self.cfg.model.wan:
            return wan_model(self.cfg, d.teacher or self.cfg.model.wan).to(self.device)
        teacher = load_pipeline(d.teacher, device=self.device)
        if teacher.cfg.causal is not None:
            raise ValueError(f"distill.teacher {d.teacher} is a causal student; give the bidirectional teacher")
        return teacher.model

    # -- what the Trainer asks -------------------------------------------------------------------
    def updates(self, step: int) -> tuple[str, ...]:
        d = self.cfg.distill
        since = step - d.critic_warmup_steps  # the critic first fits the student alone
        generator_step = since >= 0 and since % d.critic_steps_per_generator_step == 0
        return ("generator", "critic") if generator_step else ("critic",)

    def generator_updates(self, step: int) -> int:
        d = self.cfg.distill
        return (step - d.critic_warmup_steps) // d.critic_steps_per_generator_step + 1

    def learning_rate(self, kind: str, step: int) -> float:
        return self.cfg.distill.critic_lr if kind == "critic" else lr_at(step, self.cfg)

    def trainable(self, kind: str) -> list[torch.nn.Module]:
        if kind == "generator":
            return [self.model]
        return [self.critic.dit] + ([self.discriminator.head] if self.discriminator is not None else [])

    def networks(self) -> dict[str, torch.nn.Module]:
        nets = {"critic": self.critic}
        if self.discriminator is not None:
            nets["discriminator_head"] = self.discriminator.head
        return nets

    def loss(self, kind: str, k: int, step: int, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator's: the video-level loss of its rollout with gradient (plus the optional regression
        anchor). The critic's: fitting fresh rollouts made without gradient."""
        if kind == "generator":
            video, prompts, real = self.videos(g, grad=True, kind=kind, k=k, step=step)
            loss, stats = self.generator_loss(self.scored(video), prompts, g, real)
            if self.pairs is not None:  # the regression anchor
                trajectory, pair_prompts = self.pairs.sample(self.cfg.batch_size, g)
                trajectory = trajectory.to(self.device)
                regression = ode_regression_loss(self.model, trajectory, self.levels, pair_prompts, self.cfg, g)
                loss = loss + self.cfg.distill.regression_weight * regression
                stats["regression"] = float(regression.detach())
            return loss, stats
        video, prompts, real = self.videos(g, grad=False, kind=kind, k=k, step=step)
        video = self.scored(video.detach())
        if self.discriminator is not None:
            return self.gan_critic_loss(video, real, prompts, g)
        return self.critic_loss(video, prompts, g), {}

    # -- the generator's videos ------------------------------------------------------------------
    def videos(
        self, g: torch.Generator, grad: bool, kind: str, k: int, step: int
    ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Micro-batch ``k``'s generated videos (with gradient for the generator update, without for the
        critic's), their prompts, and the real videos of the same prompts (used by TF/DF to make the
        outputs, and by the GAN as the real side). Self Forcing: the generator's own rollout."""
        real, prompts = self.batch(g)
        if self.cfg.distill.paradigm == "self_forcing":
            first = self.latents(real[:, :1]) if self.given else None  # image-to-video: the real first frame
            end = self.rollout_end(kind, k, step)
            video = self.rollout(prompts, g, grad, self.exit_step(kind, k, step), end, first)
            return video, prompts, real
        return self.forced_output(real, prompts, g, grad), prompts, real

    def rollout(
        self,
        prompts: list[str],
        g: torch.Generator,
        grad: bool,
        exit_step: int | None = None,
        frames: int = 0,
        first: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The generator's video for ``prompts`` ([B, F, C, H, W], F = ``frames`` or ``rollout_frames``),
        chunk by chunk against its own KV cache as at inference, with gradient at the exit step only; the
        exit step is drawn from ``g`` if not given. ``first`` (image-to-video): the given first latent frame
        ``[B, 1, C, H, W]``, committed clean before them and returned in front of them."""
        c = self.cfg
        if exit_step is None:
            exit_step = draw_exit_step(len(c.causal.denoising_steps), g)
        with torch.set_grad_enabled(grad):
            text_kv = self.model.dit.text_kv(*self.model.encode_text(prompts))
            _, ch, h, w = self.latent_shape
            return self_forcing_rollout(
                self.model,
                text_kv,
                (len(prompts), frames or self.rollout_frames, ch, h, w),
                c.causal,
                exit_step,
                g,
                grad_frames=self.score_frames,  # no loss reaches the chunks before the scored window
                grad=grad,
                first=first,
            )

    def exit_step(self, kind: str, k: int, step: int) -> int:
        """The exit step s* of micro-batch ``k`` of ``step``'s ``generator``/``critic`` update: one draw per
        rollout, a function of (seed, step, kind, k). Successive micro-batches of a step differ; the k-th
        rollout of every rank shares its s*, so the ranks run the same number of generator passes (FSDP
        gathers weights for each pass in lockstep; the reference shares s* across ranks too)."""
        return draw_exit_step(len(self.cfg.causal.denoising_steps), self.rollout_draw(10_000, kind, k, step))

    def rollout_end(self, kind: str, k: int, step: int) -> int:
        """Latent frames that micro-batch ``k`` of ``step``'s ``generator``/``critic`` update rolls out:
        ``rollout_frames``, or with ``score_window=random`` a chunk boundary drawn uniformly from those
        at or past ``score_frames``. A function of (seed, step, kind, k), shared by the ranks like s*."""
        if self.cfg.distill.score_window == "last":
            return self.rollout_frames
        fpb = self.cfg.causal.frames_per_block
        ends = range(-(-self.score_frames // fpb) * fpb, self.rollout_frames + 1, fpb)
        return ends[int(torch.randint(len(ends), (1,), generator=self.rollout_draw(20_000, kind, k, step)))]

    def rollout_draw(self, stream: int, kind: str, k: int, step: int) -> torch.Generator:
        """A generator for one per-rollout draw (``stream`` names which), seeded by (seed, step, kind, k)
        alone, so every rank draws the same value."""
        seed = self.cfg.seed * 1_000_003 + stream + STREAMS[kind] * 1_000 + k
        return torch.Generator().manual_seed(step_seed(seed, step))

    def rollout_window(self, data_frames: int) -> tuple[int, int]:
        """(latent frames rolled out, latent frames scored at the end of the rollout), checked."""
        d, fpb = self.cfg.distill, self.cfg.causal.frames_per_block
        rollout = d.rollout_frames or data_frames
        score = d.score_frames or rollout
        if d.rollout_frames and d.paradigm != "self_forcing":
            raise ConfigError(f"distill.rollout_frames is for self_forcing; {d.paradigm} trains on the data's length")
        if rollout % fpb:
            raise ConfigError(f"distill.rollout_frames={rollout} is not a whole number of chunks of {fpb} frames")
        if not 0 < score <= rollout:
            raise ConfigError(f"distill.score_frames={score} must be in 1..{rollout} (the rollout's latent frames)")
        if d.score_window not in ("last", "random"):
            raise ConfigError(f"distill.score_window={d.score_window!r}: use 'last' or 'random'")
        if d.score_window == "random" and score > rollout - fpb:
            raise ConfigError(
                f"distill.score_window=random needs a rollout longer than the scored window: rollout_frames="
                f"{rollout} is not at least a chunk ({fpb} frames) past score_frames={score}"
            )
        if d.loss == "gan" and score > data_frames:
            raise ConfigError(
                f"distill.score_frames={score} is longer than the real videos ({data_frames} latent frames) the GAN "
                "compares with: score at most data.frames"
            )
        return rollout, score

    def scored(self, video: torch.Tensor) -> torch.Tensor:
        """The part of a video ``[B, F, ...]`` the losses see: its last ``score_frames`` frames (image-to-video:
        with the given first frame in front of them, the whole video)."""
        return video[:, -(self.score_frames + self.given) :]

    def forced_output(self, video: torch.Tensor, prompts: list[str], g: torch.Generator, grad: bool) -> torch.Tensor:
        """Teacher/Diffusion Forcing + DMD (CausVid): the generator's x0 for real videos noised to a random
        few-step level per chunk, in one pass with clean (TF) or noisy (DF) real context."""
        c = self.cfg.causal
        x0 = self.latents(video)
        b, f = x0.shape[:2]
        sigmas = c.sigmas().to(x0.device)
        pick = torch.randint(len(sigmas), (b, f // c.frames_per_block), generator=g).to(x0.device)
        sigma = sigmas[pick.repeat_interleave(c.frames_per_block, dim=1)]
        x_t = add_noise(x0, cpu_randn_like(x0, g), sigma)
        with torch.set_grad_enabled(grad):
            v = forced_velocity(self.model, x0, x_t, sigma, self.model.encode_text(prompts), self.cfg, g)
            return x0_from_velocity(x_t, v, sigma)

    # -- the video-level loss --------------------------------------------------------------------
    def generator_loss(self, video: torch.Tensor, prompts: list[str], g: torch.Generator, real=None):
        """DMD, SiD or GAN on the generated ``video`` ``[B, F, C, H, W]``."""
        d = self.cfg.distill
        cond = self.teacher.encode_text(prompts)
        uncond = self.teacher.encode_text([d.negative_prompt] * len(prompts))
        # SiD/GAN backpropagate through the critic's input, not into it. Under FSDP a unit's gathered
        # parameters copy requires_grad from its sharded ones when gathered: so the flag is set on the
        # sharded parameters (resharded first), and restored on them (the optimizer's) before backward.
        for module in self.trainable("critic"):
            reshard(module).requires_grad_(False)
        try:
            if d.loss == "gan":
                return self.gan_generator_loss(video, real, prompts, g)
            sigma = self.loss_sigma(video.shape[0], g)
            noise = cpu_randn_like(video, g)
            guidance = guidance_per_video(sigma, d.guidance_scale, d.guidance_min_sigma, d.guidance_max_sigma)
            scores = Scores(self.teacher, self.critic, cond, uncond, guidance, d.guidance_rescale)
            if d.loss == "sid":
                return sid_generator_loss(video, sigma, noise, scores, alpha=d.sid_alpha)
            return dmd_generator_loss(video, sigma, noise, scores)
        finally:
            for p in self.critic_params:
                p.requires_grad_(True)

    def loss_sigma(self, batch: int, g: torch.Generator) -> torch.Tensor:
        """One noise level per video for the DMD/SiD/GAN scores and the critic: shifted, clamped."""
        d = self.cfg.distill
        return dmd_sigma(batch, g, d.timestep_shift, d.min_t, d.max_t).to(self.device)

    def _disc(self, x: torch.Tensor, sigma: torch.Tensor, text, g: torch.Generator) -> torch.Tensor:
        return self.discriminator(noised(x, sigma, g), sigma, text)

    def gan_generator_loss(self, fake, real, prompts, g):
        d = self.cfg.distill
        sigma = self.loss_sigma(fake.shape[0], g)
        text = self.critic.encode_text(prompts)
        d_fake = self._disc(fake, sigma, text, g)
        d_real = None
        if d.gan_relativistic:
            d_real = self._disc(self.scored(self.latents(real)), sigma, text, g)
        return gan_generator_loss(d_fake, d_real), {"gan/generator_d_fake": float(d_fake.detach().mean())}

    # -- the critic ------------------------------------------------------------------------------
    def critic_loss(self, video: torch.Tensor, prompts: list[str], g: torch.Generator) -> torch.Tensor:
        """Flow matching of the critic on the generator's (detached) videos, at DMD's noise levels."""
        sigma = self.loss_sigma(video.shape[0], g)
        noise = cpu_randn_like(video, g)
        return velocity_loss(self.critic, video, noise, sigma, self.critic.encode_text(prompts))

    def gan_critic_loss(self, fake, real, prompts, g):
        """Discriminator loss on real vs generated videos (same noise level), plus R1 (real) and R2 (fake)."""
        d = self.cfg.distill
        sigma = self.loss_sigma(fake.shape[0], g)
        text = self.critic.encode_text(prompts)
        x_real = noised(self.scored(self.latents(real)), sigma, g)
        x_fake = noised(fake, sigma, g)

        def disc(x: torch.Tensor) -> torch.Tensor:
            return self.discriminator(x, sigma, text)

        d_real, d_fake = disc(x_real), disc(x_fake)
        loss = gan_discriminator_loss(d_real, d_fake, d.gan_relativistic)
        penalty = finite_difference_penalty(disc, x_real, d_real, g) + finite_difference_penalty(
            disc, x_fake, d_fake, g
        )
        stats = {"gan/d_real": float(d_real.detach().mean()), "gan/d_fake": float(d_fake.detach().mean())}
        return loss + d.gan_penalty_weight * penalty, stats
