"""The shapes world: a procedural, seeded, infinite dataset of short videos with prompts.

Each video holds one to three objects (circle, square, triangle) of distinct palette colours, moving
at constant velocity and bouncing off the walls, on a plain background. Rendering is vectorised over
batch, objects, frames and pixels. Everything is a pure function of the seed.

Larger objects are drawn behind smaller ones, so a small object is never hidden.
Geometry: an object of radius r fills the box [cx - r, cx + r] x [cy - r, cy + r]: a circle of
radius r, a square of half-side r, an upward triangle with base 2r and height 2r. Positions are in
pixel units, pixel (i, j) has its centre at (j + 0.5, i + 0.5); y grows downwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..models.tokens import tokenize

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 90, 245),
    "yellow": (240, 220, 40),
    "magenta": (220, 60, 220),
    "cyan": (40, 220, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.13, "large": 0.2}  # radius as a fraction of min(height, width)
DIRECTIONS: dict[str, tuple[float, float]] = {
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "up-left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "down-right": (math.sqrt(0.5), math.sqrt(0.5)),
    "down-left": (-math.sqrt(0.5), math.sqrt(0.5)),
}
BACKGROUND: tuple[int, int, int] = (16, 16, 24)


@dataclass
class ShapesWorldConfig:
    height: int = 32
    width: int = 32
    frames: int = 12
    min_objects: int = 1
    max_objects: int = 3
    colours: list[str] = field(default_factory=lambda: list(COLOURS))
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    sizes: list[str] = field(default_factory=lambda: list(SIZES))
    directions: list[str] = field(default_factory=lambda: list(DIRECTIONS))
    speed_min: float = 0.75  # pixels per frame
    speed_max: float = 1.5

    def validate(self) -> None:
        for name, chosen, known in [
            ("colours", self.colours, COLOURS),
            ("shapes", self.shapes, SHAPES),
            ("sizes", self.sizes, SIZES),
            ("directions", self.directions, DIRECTIONS),
        ]:
            bad = [c for c in chosen if c not in known]
            if bad or not chosen:
                raise ValueError(f"data.{name}: unknown or empty {bad or chosen}; choose from {list(known)}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_objects > len(self.colours):
            raise ValueError(
                f"max_objects={self.max_objects} exceeds the {len(self.colours)} colours available: objects "
                "in one video have distinct colours"
            )
        if self.frames < 1 or self.height < 8 or self.width < 8:
            raise ValueError(f"need frames >= 1 and height, width >= 8, got {self.frames}x{self.height}x{self.width}")
        if not 0 <= self.speed_min <= self.speed_max:
            raise ValueError(f"need 0 <= speed_min <= speed_max, got {self.speed_min}, {self.speed_max}")

    def vocabulary(self) -> list[str]:
        """Every word a prompt of this world can contain."""
        return ["a", "and", "moving", *COLOURS, *SHAPES, *SIZES, *DIRECTIONS]


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str
    direction: str

    def describe(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} moving {self.direction}"


def describe(objects: list[ShapeObject]) -> str:
    """The prompt of a scene: 'a large red circle moving right and a small blue square moving up'."""
    return " and ".join(o.describe() for o in objects)


def parse_prompt(prompt: str) -> list[ShapeObject]:
    """Inverse of ``describe``: the objects a shapes-world prompt asks for (the analyser's ground truth)."""
    words = tokenize(prompt)
    objects, i = [], 0
    while i < len(words):
        if words[i] == "and":
            i += 1
            continue
        chunk = words[i : i + 6]
        if len(chunk) < 6 or chunk[0] != "a" or chunk[4] != "moving":
            raise ValueError(
                f"not a shapes-world prompt near {' '.join(chunk)!r}: expected 'a SIZE COLOUR SHAPE moving DIRECTION'"
            )
        _, size, colour, shape, _, direction = chunk
        for value, known in [(size, SIZES), (colour, COLOURS), (shape, SHAPES), (direction, DIRECTIONS)]:
            if value not in known:
                raise ValueError(f"unknown word {value!r} in prompt {prompt!r}; expected one of {list(known)}")
        objects.append(ShapeObject(colour, shape, size, direction))
        i += 6
    if not objects:
        raise ValueError(f"prompt {prompt!r} describes no object")
    return objects


@dataclass
class ShapesBatch:
    video: torch.Tensor  # [B, F, 3, H, W] in [-1, 1]
    prompts: list[str]
    objects: list[list[ShapeObject]]
    centres: torch.Tensor  # [B, K, F, 2] (x, y) in pixels; K = max objects, unused slots are NaN
    radii: torch.Tensor  # [B, K] in pixels, 0 for unused slots
    visible: torch.Tensor  # [B, F, H, W] index of the visible object, -1 for background


def nominal_area(shape: str, radius: float) -> float:
    """Area in pixels of a shape inscribed in a 2r x 2r box."""
    return {"circle": math.pi, "square": 4.0, "triangle": 2.0}[shape] * radius**2


def nominal_visible_fraction(batch: ShapesBatch, i: int) -> torch.Tensor:
    """``[F, K]``: the visible pixels of each object of video ``i`` over its nominal (unoccluded) pixels."""
    objects = batch.objects[i]
    counts = torch.stack([(batch.visible[i] == j).sum((1, 2)).float() for j in range(len(objects))], 1)
    areas = torch.tensor([nominal_area(o.shape, float(batch.radii[i, j])) for j, o in enumerate(objects)])
    return counts / areas


def colour_tensor(name: str) -> torch.Tensor:
    """A palette colour in [-1, 1], shape [3]."""
    return torch.tensor(COLOURS[name], dtype=torch.float32) / 127.5 - 1


def fold_into(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Reflect free motion p back into [lo, hi]: the trajectory of a ball bouncing between two walls."""
    span = (hi - lo).clamp_min(1e-6)
    u = torch.remainder(p - lo, 2 * span)
    return lo + torch.where(u <= span, u, 2 * span - u)


def shape_masks(shape_ids: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pixel masks ``[B, K, F, H, W]`` for shape ids [B, K], centres [B, K, F, 2], radii [B, K]."""
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    dx = xs.view(1, 1, 1, 1, w) - centres[..., 0, None, None]
    dy = ys.view(1, 1, 1, h, 1) - centres[..., 1, None, None]
    r = radii[:, :, None, None, None]
    circle = dx**2 + dy**2 <= r**2
    square = (dx.abs() <= r) & (dy.abs() <= r)
    triangle = (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2)
    sid = shape_ids[:, :, None, None, None]
    return torch.where(sid == 0, circle, torch.where(sid == 1, square, triangle)) & (r > 0)


class ShapesWorld:
    """``world.sample(batch_size, seed)`` -> ``ShapesBatch``. Deterministic for a seed."""

    def __init__(self, cfg: ShapesWorldConfig | None = None):
        self.cfg = cfg or ShapesWorldConfig()
        self.cfg.validate()

    def sample_objects(self, batch_size: int, g: torch.Generator) -> list[list[ShapeObject]]:
        c = self.cfg
        scenes = []
        for _ in range(batch_size):
            k = int(torch.randint(c.min_objects, c.max_objects + 1, (1,), generator=g))
            colours = [c.colours[i] for i in torch.randperm(len(c.colours), generator=g)[:k]]
            pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
            scenes.append([ShapeObject(col, pick(c.shapes), pick(c.sizes), pick(c.directions)) for col in colours])
        return scenes

    def render(self, objects: list[list[ShapeObject]], g: torch.Generator, frames: int | None = None) -> ShapesBatch:
        """Draw start positions and speeds for the given scenes and render them."""
        c = self.cfg
        nf = frames or c.frames
        b, k = len(objects), max(len(s) for s in objects)
        shape_ids = torch.zeros(b, k, dtype=torch.long)
        radii = torch.zeros(b, k)
        direction = torch.zeros(b, k, 2)
        colours = torch.zeros(b, k, 3)
        for i, scene in enumerate(objects):
            for j, o in enumerate(scene):
                shape_ids[i, j] = SHAPES.index(o.shape)
                radii[i, j] = SIZES[o.size] * min(c.height, c.width)
                direction[i, j] = torch.tensor(DIRECTIONS[o.direction])
                colours[i, j] = colour_tensor(o.colour)
        speed = c.speed_min + (c.speed_max - c.speed_min) * torch.rand(b, k, 1, generator=g)
        size = torch.tensor([c.width, c.height], dtype=torch.float32)
        lo, hi = radii[..., None], size - radii[..., None]  # [B, K, 2]
        start = lo + (hi - lo) * torch.rand(b, k, 2, generator=g)
        t = torch.arange(nf, dtype=torch.float32).view(1, 1, nf, 1)
        centres = fold_into(
            start[:, :, None] + speed[:, :, None] * direction[:, :, None] * t, lo[:, :, None], hi[:, :, None]
        )

        masks = shape_masks(shape_ids, centres, radii, c.height, c.width)  # [B, K, F, H, W]
        visible = torch.full((b, nf, c.height, c.width), -1, dtype=torch.long)
        video = (
            (torch.tensor(BACKGROUND, dtype=torch.float32) / 127.5 - 1)
            .view(1, 1, 3, 1, 1)
            .repeat(b, nf, 1, c.height, c.width)
        )
        draw_order = torch.argsort(-radii, dim=1, stable=True)  # large objects behind small ones
        rows = torch.arange(b)
        for layer in range(k):
            j = draw_order[:, layer]  # [B] the object drawn at this depth in each video
            m = masks[rows, j]  # [B, F, H, W]
            visible = torch.where(m, j.view(b, 1, 1, 1), visible)
            video = torch.where(m[:, :, None], colours[rows, j].view(b, 1, 3, 1, 1), video)
        centres = torch.where(radii[:, :, None, None] > 0, centres, float("nan"))
        return ShapesBatch(video, [describe(s) for s in objects], objects, centres, radii, visible)

    def sample(self, batch_size: int, seed: int, frames: int | None = None) -> ShapesBatch:
        """A batch of ``batch_size`` fresh videos; ``frames`` overrides the configured length."""
        g = torch.Generator().manual_seed(seed)
        return self.render(self.sample_objects(batch_size, g), g, frames)

    def sample_for_prompts(self, prompts: list[str], seed: int, frames: int | None = None) -> ShapesBatch:
        """Real videos that match given prompts (start positions and speeds drawn from the seed)."""
        g = torch.Generator().manual_seed(seed)
        return self.render([parse_prompt(p) for p in prompts], g, frames)
