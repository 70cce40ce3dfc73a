"""The synthetic task's images: shapes, patterns and colours rendered procedurally from a
seed (in seconds, no files), calibrated so that host capacity matters (docs/tasks.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from esper_func.data.images import NUM_IMAGE_CLASSES

SYNTHETIC_RENDER_SIZE = 32
SYNTHETIC_SIZES: tuple[int, ...] = (32, 16, 8)


def downsample(images: torch.Tensor, labels: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images `[n, C, H, W]` area-averaged by `factor` (1: unchanged), labels passed through."""
    if factor == 1:
        return images, labels
    pooled = torch.nn.functional.avg_pool2d(images.to(torch.float32), factor)
    return pooled.round().to(torch.uint8), labels


SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross", "diamond")
PATTERNS: tuple[str, ...] = ("solid", "horizontal stripes", "vertical stripes", "diagonal stripes", "checker", "dots")
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (0.95, 0.90, 0.15),
    "magenta": (0.90, 0.20, 0.90),
    "cyan": (0.15, 0.90, 0.90),
}


@dataclass(frozen=True)
class SyntheticSpec:
    """Design constants of the synthetic task, calibrated on the default budget (docs/tasks.md).

    Each class is a set of `variants` prototypes, each a (shape, fill pattern, colour)
    triple; no attribute alone names a class, so a host must detect conjunctions, and more
    prototypes need more detectors (width). Everything else varies as nuisance.
    """

    image_size: int = 32
    variants: int = 4
    """Prototypes per class (10 x variants distinct triples out of 6 x 6 x 6)."""
    radius: tuple[float, float] = (5.0, 9.0)
    """Object radius range, pixels."""
    period: tuple[float, float] = (3.5, 6.0)
    """Fill pattern period range, pixels (phase is uniform)."""
    colour_jitter: float = 0.12
    """Uniform per-channel offset of the object colour."""
    background: tuple[float, float] = (0.25, 0.60)
    """Background base colour range per channel; a random linear ramp of up to +-0.15 is added."""
    noise: float = 0.08
    """Std of Gaussian pixel noise."""
    table_seed: int = 1234
    """Draws the class -> prototype table, the same for every task seed."""


SYNTHETIC_SPEC = SyntheticSpec()


def prototype_table(spec: SyntheticSpec = SYNTHETIC_SPEC) -> torch.Tensor:
    """`[10, variants, 3]` int64 (shape, pattern, colour) indices.

    Within a class the prototypes differ in every attribute (no single shape, pattern or
    colour names a class), and no triple belongs to two classes. Drawn class by class from
    `table_seed`; a class whose draw reuses another class's triple is drawn again.
    """
    sizes = (len(SHAPES), len(PATTERNS), len(PALETTE))
    if not 1 <= spec.variants <= min(sizes):
        raise ValueError(f"SyntheticSpec.variants must be in 1..{min(sizes)}, got {spec.variants}")
    generator = torch.Generator().manual_seed(spec.table_seed)
    taken: set[tuple[int, ...]] = set()
    classes = []
    while len(classes) < NUM_IMAGE_CLASSES:
        draw = torch.stack([torch.randperm(k, generator=generator)[: spec.variants] for k in sizes], -1)
        triples = {tuple(t) for t in draw.tolist()}
        if not triples & taken:
            taken |= triples
            classes.append(draw)
    return torch.stack(classes)


def _shape_mask(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-mask of each image's shape; `u`, `v` are pixel offsets from the centre in radii."""
    r = torch.hypot(u, v)
    au, av = u.abs(), v.abs()
    masks = (
        r <= 1.0,  # disc
        torch.maximum(au, av) <= 0.8,  # square
        (v <= 0.75) & (2 * au <= v + 1.0),  # triangle, apex up
        (r <= 1.0) & (r >= 0.55),  # ring
        ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0)),  # cross
        au + av <= 1.0,  # diamond
    )
    return torch.stack(masks).gather(0, shape.expand_as(u).unsqueeze(0)).squeeze(0)


def _pattern_mask(
    pattern: torch.Tensor, x: torch.Tensor, y: torch.Tensor, period: torch.Tensor, phase: torch.Tensor
) -> torch.Tensor:
    """Bright (True) or dark pixels of each image's fill pattern."""
    w = 2 * math.pi / period
    sx, sy = torch.sin(w * x + phase), torch.sin(w * y + phase)
    masks = (
        torch.ones_like(sx, dtype=torch.bool),  # solid
        sy > 0,  # horizontal stripes
        sx > 0,  # vertical stripes
        torch.sin(w * (x + y) / math.sqrt(2) + phase) > 0,  # diagonal stripes
        (sx > 0) ^ (sy > 0),  # checker
        sx * sy > 0.35,  # dots
    )
    return torch.stack(masks).gather(0, pattern.expand_as(sx).unsqueeze(0)).squeeze(0)


def generate_synthetic(
    n: int, seed: int, stream: int = 0, spec: SyntheticSpec = SYNTHETIC_SPEC
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images uint8 `[n, 3, S, S]` and labels int64 `[n]`, a pure function of (seed, stream).

    Generated on the CPU with its own generator, so the data is the same on every device;
    `stream` separates the training (0) and validation (1) sets.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + stream)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    labels = torch.randint(0, NUM_IMAGE_CLASSES, (n,), generator=generator)
    variant = torch.randint(0, spec.variants, (n,), generator=generator)
    shape, pattern, colour = prototype_table(spec)[labels, variant].unbind(-1)
    radius = uniform(*spec.radius, n)
    size = float(spec.image_size)
    cx = radius + (size - 2 * radius) * torch.rand(n, generator=generator)
    cy = radius + (size - 2 * radius) * torch.rand(n, generator=generator)
    period = uniform(*spec.period, n)
    phase = uniform(0.0, 2 * math.pi, n)
    rgb = torch.tensor(list(PALETTE.values()))[colour] + uniform(-spec.colour_jitter, spec.colour_jitter, n, 3)
    base = uniform(*spec.background, n, 3)
    ramp_angle = uniform(0.0, 2 * math.pi, n)
    ramp_gain = uniform(-0.15, 0.15, n, 3)
    noise = spec.noise * torch.randn((n, 3, spec.image_size, spec.image_size), generator=generator)

    coords = torch.arange(spec.image_size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # [S, S] pixel centres

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, 1, 1)

    inside = _shape_mask(
        per_image(shape), (x - per_image(cx)) / per_image(radius), (y - per_image(cy)) / per_image(radius)
    )
    bright = _pattern_mask(per_image(pattern), x, y, per_image(period), per_image(phase))
    centred = (x - size / 2) / (size / 2), (y - size / 2) / (size / 2)
    ramp = torch.cos(ramp_angle).view(-1, 1, 1) * centred[0] + torch.sin(ramp_angle).view(-1, 1, 1) * centred[1]
    background = base.view(n, 3, 1, 1) + ramp_gain.view(n, 3, 1, 1) * ramp.unsqueeze(1)
    foreground = rgb.view(n, 3, 1, 1) * torch.where(bright, 1.0, 0.3).unsqueeze(1)
    image = torch.where(inside.unsqueeze(1), foreground, background) + noise
    return image.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8), labels
