"""The shapes-world analyser: finds the prompted objects in frames by colour and scores each frame.

Every pixel is assigned to the nearest of {background, palette colours} when it lies within ``tol``
(Euclidean distance in RGB scaled to [0, 1]); otherwise it is "unassigned" (noise, blur, wrong hue).
For each object the prompt asks for, the pixels of its colour form its mask. Per frame:

- ``found``: fraction of expected objects whose mask covers at least ``min_area`` of the nominal area.
- ``coherence``: over found objects, the share of the mask in its largest 4-connected piece (1 = one
  solid object, lower = fragments). Size, shape and centroid are measured on that largest piece.
- ``colour_fidelity``: over the found objects' pixels, 1 - distance-to-exact-colour / tol (1 = exact).
- ``size_ratio``: the mask's bounding-box side over the nominal 2r (1 = right size), over found objects
  that touch no other expected object (a touching one may be partly hidden).
- ``shape_correct``: over the same isolated objects, the fraction whose shape is the prompted one; the
  shape is the template (circle, square, triangle drawn in the mask's bounding box) of highest IoU.
- ``extra_objects``: palette colours the prompt does not mention, covering at least ``min_area`` of a
  small object's area.
- ``background_clean``: fraction of pixels outside the expected objects that are background.
- ``centroid``: [K, 2] (x, y) centre of each expected object's mask in pixels (NaN if not found).
- ``frame_ok``: every object found, no extra object, background_clean >= 0.95.

Real shapes-world videos score 1 everywhere except ``found`` where an object is hidden behind another
of the same size (rare: larger objects are drawn behind smaller ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.shapes import BACKGROUND, COLOURS, SHAPES, SIZES, ShapeObject, nominal_area, parse_prompt

PALETTE_NAMES = ["background", *COLOURS]
PALETTE = torch.tensor([BACKGROUND, *COLOURS.values()], dtype=torch.float32) / 255.0  # [P, 3]


def largest_component(masks: torch.Tensor) -> torch.Tensor:
    """The largest 4-connected component of each mask in ``masks: [N, H, W]`` (bool), by label propagation."""
    n, h, w = masks.shape
    big = h * w + 1
    labels = torch.where(masks, torch.arange(1, h * w + 1, device=masks.device).view(1, h, w), 0).float()
    while True:
        padded = F.pad(labels, (1, 1, 1, 1))
        neighbours = torch.stack(
            [labels, padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]]
        )
        new = torch.where(masks, neighbours.amax(0), 0)
        if torch.equal(new, labels):
            break
        labels = new
    counts = torch.zeros(n, big, device=masks.device)
    counts.scatter_add_(1, labels.long().flatten(1), masks.flatten(1).float())
    counts[:, 0] = 0
    return labels == counts.argmax(1).view(n, 1, 1).float()


def classify_shape(mask: torch.Tensor) -> str:
    """The shape whose template, stretched over the bounding box of ``mask: [H, W]``, overlaps it best (IoU).

    In box coordinates u, v in [-1, 1] (v downwards): circle u^2 + v^2 <= 1, square everything,
    triangle |u| <= (v + 1) / 2.
    """
    rows, cols = torch.nonzero(mask, as_tuple=True)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].cpu()
    bh, bw = box.shape
    v = ((torch.arange(bh) + 0.5) / bh * 2 - 1)[:, None]
    u = ((torch.arange(bw) + 0.5) / bw * 2 - 1)[None, :]
    templates = {
        "circle": u**2 + v**2 <= 1,
        "square": torch.ones(bh, bw, dtype=torch.bool),
        "triangle": u.abs() <= (v + 1) / 2,
    }
    iou = {k: float((t & box).sum() / (t | box).sum()) for k, t in templates.items()}
    return max(iou, key=iou.get)


@dataclass
class FrameScores:
    """Per-frame figures for one video, each ``[F]`` (``centroid``: [F, K, 2])."""

    found: torch.Tensor
    colour_fidelity: torch.Tensor
    coherence: torch.Tensor
    size_ratio: torch.Tensor
    shape_correct: torch.Tensor
    extra_objects: torch.Tensor
    background_clean: torch.Tensor
    frame_ok: torch.Tensor
    centroid: torch.Tensor

    def summary(self) -> dict[str, float]:
        """Means over frames (NaN entries, e.g. shape of an occluded object, are skipped)."""
        out = {}
        for name in [
            "found",
            "colour_fidelity",
            "coherence",
            "size_ratio",
            "shape_correct",
            "extra_objects",
            "background_clean",
            "frame_ok",
        ]:
            v = getattr(self, name).float()
            ok = ~torch.isnan(v)
            out[name] = float(v[ok].mean()) if ok.any() else float("nan")
        return out


def assign_pixels(frames: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """frames [F, 3, H, W] in [-1, 1] -> palette index [F, H, W] (-1 = unassigned) and distance [F, H, W]."""
    rgb = (frames.float().clamp(-1, 1) + 1) / 2
    f, _, h, w = rgb.shape
    pixels = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    dist = torch.cdist(pixels, PALETTE.to(rgb.device), compute_mode="donot_use_mm_for_euclid_dist")  # [FHW, P]
    d, idx = dist.min(dim=1)
    d, idx = d.view(f, h, w), idx.view(f, h, w)
    return torch.where(d < tol, idx, -1), d


def analyse_video(
    frames: torch.Tensor,
    objects: list[ShapeObject] | str,
    tol: float = 0.25,
    min_area: float = 0.25,
) -> FrameScores:
    """Score one video ``frames: [F, 3, H, W]`` in [-1, 1] against the objects its prompt asks for."""
    if isinstance(objects, str):
        objects = parse_prompt(objects)
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames [F, 3, H, W], got {tuple(frames.shape)}")
    nf, _, h, w = frames.shape
    label, dist = assign_pixels(frames, tol)
    ys = torch.arange(h, dtype=torch.float32, device=frames.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=frames.device) + 0.5
    small_area = min(nominal_area(s, SIZES[z] * min(h, w)) for s in SHAPES for z in SIZES)

    k = len(objects)
    found = torch.zeros(nf, k, dtype=torch.bool)
    fidelity = torch.full((nf, k), float("nan"))
    coherence = torch.full((nf, k), float("nan"))
    size_ratio = torch.full((nf, k), float("nan"))
    shape_ok = torch.full((nf, k), float("nan"))
    centroid = torch.full((nf, k, 2), float("nan"))
    masks = torch.stack([label == PALETTE_NAMES.index(o.colour) for o in objects], 1)  # [F, K, H, W]
    expected_mask = masks.any(1)
    near = F.max_pool2d(masks.float(), 3, stride=1, padding=1) > 0  # masks grown by one pixel
    for j, o in enumerate(objects):
        r = SIZES[o.size] * min(h, w)
        m = masks[:, j]
        others = expected_mask & ~m
        touching = (near[:, j] & others).any((1, 2)).cpu()
        area = m.sum((1, 2)).float()
        found[:, j] = (area >= min_area * nominal_area(o.shape, r)).cpu()
        main = largest_component(m)  # [F, H, W]
        for f in torch.nonzero(found[:, j]).flatten().tolist():
            fidelity[f, j] = float((1 - dist[f][m[f]] / tol).mean())
            coherence[f, j] = float(main[f].sum() / area[f])
            rows, cols = torch.nonzero(main[f], as_tuple=True)
            centroid[f, j, 0], centroid[f, j, 1] = float(xs[cols].mean()), float(ys[rows].mean())
            if touching[f]:
                continue
            bh = float(rows.max() - rows.min() + 1)
            bw = float(cols.max() - cols.min() + 1)
            size_ratio[f, j] = max(bh, bw) / (2 * r)
            shape_ok[f, j] = float(classify_shape(main[f]) == o.shape)

    expected_colours = {PALETTE_NAMES.index(o.colour) for o in objects}
    extra = torch.zeros(nf)
    for p in range(1, len(PALETTE_NAMES)):
        if p not in expected_colours:
            extra += ((label == p).sum((1, 2)).float() >= min_area * small_area).cpu().float()
    outside = ~expected_mask
    clean = ((label == 0) & outside).sum((1, 2)).float() / outside.sum((1, 2)).clamp_min(1).float()
    clean = clean.cpu()
    found_frac = found.float().mean(1)
    return FrameScores(
        found=found_frac,
        colour_fidelity=fidelity.nanmean(1),
        coherence=coherence.nanmean(1),
        size_ratio=size_ratio.nanmean(1),
        shape_correct=shape_ok.nanmean(1),
        extra_objects=extra,
        background_clean=clean,
        frame_ok=((found_frac == 1) & (extra == 0) & (clean >= 0.95)).float(),
        centroid=centroid,
    )


def analyse_batch(videos: torch.Tensor, prompts: list[str], **kw) -> tuple[dict[str, float], list[FrameScores]]:
    """Score videos ``[B, F, 3, H, W]``; returns the mean of the per-video summaries and the per-video scores."""
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    scores = [analyse_video(v, p, **kw) for v, p in zip(videos, prompts, strict=True)]
    summaries = [s.summary() for s in scores]
    mean = {}
    for key in summaries[0]:
        vals = torch.tensor([s[key] for s in summaries])
        ok = ~torch.isnan(vals)
        mean[key] = float(vals[ok].mean()) if ok.any() else float("nan")
    return mean, scores
