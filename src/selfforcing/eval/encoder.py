"""A small video encoder for the shapes world, trained to read its prompts, and the Frechet distance on it.

The encoder plays the role I3D plays for FVD: its features (the layer before the attribute heads) are
what the Frechet distance between generated and real videos is computed on. It is a 3D CNN with one
attention-pooling query per palette colour, trained on real shapes-world videos to predict, for every
palette colour, whether an object of that colour is present and, if so, its shape, size and
direction. So its features see what the world is about: which objects, how they look, how they move.

    x: [B, F, 3, H, W] in [-1, 1]  ->  features: [B, feature_dim]   (any F >= 1: pooled over time)

Train it with ``selfforcing train-encoder``; the package ships one for the toy world in
``assets/video_encoder_toy``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data.shapes import COLOURS, DIRECTIONS, SHAPES, SIZES, ShapesWorld, ShapesWorldConfig
from ..weights import load_weights

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_CONFIG = "encoder.json"
TOY_ENCODER = Path(__file__).resolve().parents[1] / "assets" / "video_encoder_toy"
# attribute heads per palette colour: present (1 logit), shape, size, direction
HEAD_SIZES = (1, len(SHAPES), len(SIZES), len(DIRECTIONS))


@dataclass
class EncoderConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    feature_dim: int = 32  # small, so that a few hundred videos estimate the feature covariance


class VideoEncoder(nn.Module):
    """3D CNN -> one attention-pooled vector per palette colour (a learned query each, so the pooled
    vector describes that colour's object) -> ``features`` -> per-colour attribute logits."""

    def __init__(self, cfg: EncoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or EncoderConfig()
        layers, c_in = [], 3
        for i, c in enumerate(cfg.channels):  # each stage halves H and W after the first
            stride = (1, 1, 1) if i == 0 else (1, 2, 2)
            layers += [nn.Conv3d(c_in, c, 3, stride=stride, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.backbone = nn.Sequential(*layers)
        k = len(COLOURS)
        self.queries = nn.Parameter(torch.randn(k, c_in) * c_in**-0.5)
        self.key, self.value = nn.Linear(c_in, c_in), nn.Linear(c_in, c_in)
        self.project = nn.Linear(k * c_in, cfg.feature_dim)
        self.heads = nn.Linear(cfg.feature_dim, k * sum(HEAD_SIZES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, F, 3, H, W]`` -> ``[B, feature_dim]``."""
        if x.dim() != 5 or x.shape[2] != 3:
            raise ValueError(f"expected videos [B, F, 3, H, W], got {tuple(x.shape)}")
        h = self.backbone(rearrange(x.float(), "b f c h w -> b c f h w"))
        h = rearrange(h, "b c f h w -> b (f h w) c")
        attention = torch.einsum("kc,bnc->bkn", self.queries, self.key(h)).softmax(-1)  # over positions
        pooled = torch.einsum("bkn,bnc->bkc", attention, self.value(h))  # [B, colours, C]
        return self.project(pooled.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attribute logits ``[B, num_colours, sum(HEAD_SIZES)]``."""
        return rearrange(self.heads(F.silu(self.features(x))), "b (k a) -> b k a", k=len(COLOURS))


def attribute_targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per video and palette colour: ``present [B, K]`` (0/1) and ``labels [B, K, 3]`` (shape, size,
    direction indices; -100 where the colour is absent, ignored by cross-entropy)."""
    names = list(COLOURS)
    present = torch.zeros(len(batch.objects), len(names))
    labels = torch.full((len(batch.objects), len(names), 3), -100, dtype=torch.long)
    for i, scene in enumerate(batch.objects):
        for o in scene:
            k = names.index(o.colour)
            present[i, k] = 1
            labels[i, k] = torch.tensor(
                [SHAPES.index(o.shape), list(SIZES).index(o.size), list(DIRECTIONS).index(o.direction)]
            )
    return present, labels


def attribute_loss(logits: torch.Tensor, present: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE on presence + cross-entropy on shape, size and direction of the colours present."""
    loss = F.binary_cross_entropy_with_logits(logits[..., 0], present)
    start = 1
    for j, n in enumerate(HEAD_SIZES[1:]):
        part = logits[..., start : start + n]
        loss = loss + F.cross_entropy(part.reshape(-1, n), labels[..., j].reshape(-1), ignore_index=-100)
        start += n
    return loss


def train_encoder(
    world: ShapesWorldConfig,
    out: str | Path,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    cfg: EncoderConfig | None = None,
    progress: bool = True,
) -> tuple[VideoEncoder, list[float]]:
    """Train the encoder on fresh real videos of ``world`` (a new batch every step; cosine learning rate)
    and save it to ``out``. Returns the encoder and its loss per step."""
    torch.manual_seed(seed)
    encoder = VideoEncoder(cfg)
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    source, losses = ShapesWorld(world), []
    for step in tqdm(range(steps), desc="video encoder", disable=not progress, dynamic_ncols=True):
        batch = source.sample(batch_size, seed=seed * 1_000_003 + step)
        loss = attribute_loss(encoder(batch.video), *attribute_targets(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    save_encoder(encoder, world, out, {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed})
    return encoder, losses


def save_encoder(encoder: VideoEncoder, world: ShapesWorldConfig, out: str | Path, training: dict) -> Path:
    """Write ``out/encoder.safetensors`` and ``out/encoder.json`` (encoder and world settings), atomically."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, tmp / ENCODER_WEIGHTS)
    world_fields = {f.name: getattr(world, f.name) for f in fields(ShapesWorldConfig)}  # not data.source etc.
    meta = {"encoder": asdict(encoder.cfg), "world": world_fields, "training": training}
    (tmp / ENCODER_CONFIG).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_encoder(path: str | Path = TOY_ENCODER) -> tuple[VideoEncoder, ShapesWorldConfig]:
    """The encoder saved in ``path`` (eval mode, frozen) and the world it was trained on."""
    path = Path(path)
    if not (path / ENCODER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{path} has no {ENCODER_CONFIG}: train one with `selfforcing train-encoder --out {path}`"
        )
    meta = json.loads((path / ENCODER_CONFIG).read_text())
    encoder = VideoEncoder(EncoderConfig(**meta["encoder"]))
    load_weights(encoder, path / ENCODER_WEIGHTS)
    return encoder.eval().requires_grad_(False), ShapesWorldConfig(**meta["world"])


@torch.no_grad()
def encode_videos(encoder: VideoEncoder, videos: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Features ``[N, D]`` of ``videos: [N, F, 3, H, W]`` in [-1, 1]."""
    return torch.cat([encoder.features(videos[i : i + batch_size]) for i in range(0, len(videos), batch_size)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to features ``a: [N, D]`` and ``b: [M, D]``:

    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need features [N>=2, D] and [M>=2, D] of the same D, got {tuple(a.shape)}, {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)
