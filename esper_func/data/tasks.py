"""Tasks: the data one env step trains and evaluates on, resident on a device.

A `Task` holds its whole training set as tensors on one device and draws each epoch's
batches by index (`sample_batches`): no DataLoader, no worker processes, no host round
trip per batch. Three tasks (see docs/tasks.md):

- `synthetic`: procedurally generated 32x32 RGB images, 10 classes, made from the seed in
  seconds; calibrated so that host capacity matters (a wider host ends clearly ahead).
- `cifar10`: the python-format CIFAR-10 batches read from `data_dir`.
- `tinystories`: byte-level language modelling (vocab 256) on a local text file, or on a
  small embedded text when `data_dir` is None.

One epoch's `Batches` hold `train_iters` training batches drawn uniformly at random, with
replacement (an example can repeat within and across iterations; there is no notion of a
pass over the data), and the task's FIXED validation batches, the same tensors every call,
so that accuracies and counterfactual contributions of successive epochs are comparable.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch

from esper_func.core.config import CNNHostConfig, CoreConfig, HostConfig, TransformerHostConfig, from_dict, require
from esper_func.core.host_evaluation import evaluate
from esper_func.core.model import build_model
from esper_func.core.state import init_state
from esper_func.core.step import Batches, StepFunctions
from esper_func.core.host_training import train_epoch

TaskName = Literal["synthetic", "cifar10", "tinystories"]
TASK_NAMES: tuple[str, ...] = ("synthetic", "cifar10", "tinystories")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_SUBDIR = "cifar-10-batches-py"
CIFAR10_TEST_SIZE = 10_000
CROP_PADDING = 4

TINYSTORIES_TRAIN_FILE = "TinyStories-train.txt"
TINYSTORIES_VALID_FILE = "TinyStories-valid.txt"
EMBEDDED_TEXT = "data/tiny_stories.txt"
TEXT_VAL_FRACTION = 0.1
BYTE_VOCAB = 256


class TaskDataError(ValueError):
    """A data file exists but is not what the task expects; the message names the path and the format."""


# --- Configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskConfig:
    """Which data the hosts train on, and how much of it one env step uses.

    The field defaults are the `synthetic` preset; `TaskConfig.preset(name, **overrides)`
    (or `load_task_config`) starts from the named task's defaults instead.
    """

    name: TaskName = "synthetic"
    data_dir: str | None = None
    """cifar10: folder with data_batch_1..5 and test_batch (or its parent holding
    cifar-10-batches-py); required. tinystories: a .txt file, or a folder with
    TinyStories-train.txt and TinyStories-valid.txt; None uses the embedded text.
    synthetic: must be None."""
    batch_size: int = 64
    """Examples per training iteration (and per validation batch), shared by all envs."""
    train_iters: int = 64
    """Training iterations per epoch (= per env step)."""
    val_batches: int = 32
    """Fixed validation batches evaluated after every epoch."""
    seed: int = 0
    """Seeds data generation (synthetic) and nothing else: batch sampling follows the
    generator given to `sample_batches`."""
    augment: bool = False
    """cifar10 only: random crop (pad 4) and horizontal flip of the training batches."""
    n_train: int = 10_000
    """synthetic only: training images generated."""
    n_val: int = 2048
    """synthetic only: validation images generated (>= val_batches * batch_size)."""
    n_test: int = 4096
    """synthetic only: held-out test images (a third stream), never seen by training or by
    the gates; what the growth benchmark's final accuracies are measured on."""
    image_size: int = 16
    """synthetic only: image side in pixels. Images are rendered at 32x32 and area-averaged
    down by 32 // image_size (anti-aliased, so fine patterns blur rather than alias)."""
    context: int = 256
    """tinystories only: window length in bytes (the host's context); windows hold context + 1 bytes."""

    def __post_init__(self) -> None:
        require(
            self.name in TASK_NAMES, f"TaskConfig.name must be one of {list(TASK_NAMES)}, got {self.name!r}"
        )
        for field_name in ("batch_size", "train_iters", "val_batches", "context"):
            value = getattr(self, field_name)
            require(value >= 1, f"TaskConfig.{field_name} must be >= 1, got {value}")
        require(self.seed >= 0, f"TaskConfig.seed must be >= 0, got {self.seed}")
        val_examples = self.val_batches * self.batch_size
        if self.name == "synthetic":
            require(
                self.data_dir is None,
                f"TaskConfig.data_dir={self.data_dir!r} is not used by the synthetic task (it is generated "
                "from the seed); set data_dir to null, or pick name 'cifar10' or 'tinystories'",
            )
            require(self.n_train >= 1, f"TaskConfig.n_train must be >= 1, got {self.n_train}")
            require(self.n_test >= 1, f"TaskConfig.n_test must be >= 1, got {self.n_test}")
            require(
                self.image_size in SYNTHETIC_SIZES,
                f"TaskConfig.image_size={self.image_size} must be one of {list(SYNTHETIC_SIZES)} (32 divided by a power of 2)",
            )
            require(
                self.n_val >= val_examples,
                f"TaskConfig.n_val={self.n_val} is smaller than val_batches * batch_size = {val_examples}; "
                f"set n_val >= {val_examples} or use fewer/smaller validation batches",
            )
        if self.name == "cifar10":
            require(
                self.data_dir is not None,
                "TaskConfig.data_dir is required for cifar10: set it to the folder holding "
                f"{', '.join(CIFAR10_TRAIN_FILES)} and {CIFAR10_TEST_FILE} (or to its parent containing "
                f"{CIFAR10_SUBDIR}/)",
            )
            require(
                val_examples <= CIFAR10_TEST_SIZE,
                f"TaskConfig.val_batches * batch_size = {val_examples} exceeds the {CIFAR10_TEST_SIZE} "
                "CIFAR-10 test images; use fewer/smaller validation batches",
            )
        require(
            not self.augment or self.name == "cifar10",
            f"TaskConfig.augment applies to cifar10 only; set augment to false for {self.name!r}",
        )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TaskConfig:
        """The named task's defaults, with `overrides` (e.g. `data_dir`) applied."""
        require(name in TASK_PRESETS, f"unknown task preset {name!r}; choose one of {sorted(TASK_PRESETS)}")
        return cls(**{"name": name, **TASK_PRESETS[name], **overrides})


TASK_PRESETS: dict[str, dict[str, Any]] = {
    # CPU-friendly: 25 epochs of the cifar host at N=4 take about a minute (docs/tasks.md).
    "synthetic": {},
    # The reference's PPO setting: 24 x 512 = 12,288 samples per env step, 2,048 validation images.
    "cifar10": {"batch_size": 512, "train_iters": 24, "val_batches": 4, "augment": True},
    # Reference batch 32 and block 256 (bytes here, GPT-2 tokens there).
    "tinystories": {"batch_size": 32, "train_iters": 32, "val_batches": 4, "context": 256},
}


def load_task_config(data: dict[str, Any]) -> TaskConfig:
    """A TaskConfig from a plain dict, missing keys filled from the preset of `data["name"]`.

    Strict like `config.from_dict`: unknown or mistyped keys are errors that name them.
    """
    name = data.get("name", "synthetic")
    require(name in TASK_PRESETS, f"TaskConfig.name: {name!r} is not one of {list(TASK_NAMES)}")
    return from_dict(TaskConfig, {**TASK_PRESETS[name], **data, "name": name})



# --- The task --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageData:
    """Training images as uint8 `[n, C, H, W]` and int64 labels `[n]`, plus their normalization."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    """`[C, 1, 1]` float32, in [0, 1] pixel units."""
    std: torch.Tensor
    augment: bool


@dataclass(frozen=True, eq=False)
class TextData:
    """The training split as uint8 bytes `[L]`; windows of `context + 1` bytes are drawn from it."""

    tokens: torch.Tensor
    context: int


@dataclass(frozen=True, eq=False)
class Task:
    """A task's data on `device`, its default host, and its fixed validation batches."""

    config: TaskConfig
    device: torch.device
    host_config: HostConfig
    num_classes: int
    """Classes (images) or vocabulary size (text): the width of the host's output."""
    data: ImageData | TextData
    val_x: torch.Tensor
    """`[V, B, ...]` validation inputs, built once: the same tensor every epoch."""
    val_y: torch.Tensor
    test_x: torch.Tensor
    """`[T, B, ...]` held-out test inputs (T may be 0): never used by training or by any
    gate; for final accuracies that no decision was tuned on."""
    test_y: torch.Tensor

    def sample_batches(self, generator: torch.Generator) -> Batches:
        """One epoch: `train_iters` batches drawn uniformly with replacement, and the fixed validation batches.

        All randomness (indices, crops, flips) comes from `generator`, in a fixed order, so
        a generator in the same state gives identical batches. A generator on the task's
        device avoids moving the drawn indices.
        """
        shape = (self.config.train_iters, self.config.batch_size)
        if isinstance(self.data, ImageData):
            train_x, train_y = sample_images(self.data, shape, generator, self.device)
        else:
            train_x, train_y = sample_windows(self.data, shape, generator, self.device)
        return Batches(train_x=train_x, train_y=train_y, val_x=self.val_x, val_y=self.val_y)


def build_task(config: TaskConfig, device: torch.device | str = "cpu") -> Task:
    """Load or generate the task's data onto `device` and fix its validation batches."""
    device = torch.device(device)
    if config.name == "tinystories":
        return _build_text_task(config, device)
    n_val = config.val_batches * config.batch_size
    if config.name == "synthetic":
        factor = SYNTHETIC_RENDER_SIZE // config.image_size
        train_images, train_labels = downsample(*generate_synthetic(config.n_train, config.seed), factor)
        val_images, val_labels = downsample(*generate_synthetic(config.n_val, config.seed, stream=1), factor)
        test_images, test_labels = downsample(*generate_synthetic(config.n_test, config.seed, stream=2), factor)
        mean, std = channel_stats(train_images)
        augment = False
        host = CNNHostConfig.preset("synthetic")
        host = replace(host, image_size=config.image_size)
    else:
        assert config.data_dir is not None  # validated by TaskConfig
        train_images, train_labels, val_images, val_labels = load_cifar10(config.data_dir)
        # The test images past the validation ones are held out from every decision.
        test_images, test_labels = val_images[n_val:], val_labels[n_val:]
        mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
        augment = config.augment
        host = CNNHostConfig.preset("cifar")
    data = ImageData(
        images=train_images.to(device),
        labels=train_labels.to(device),
        mean=mean.to(device, torch.float32).view(-1, 1, 1),
        std=std.to(device, torch.float32).view(-1, 1, 1),
        augment=augment,
    )
    val_x = normalize(val_images[:n_val].to(device), data.mean, data.std)
    val_shape = (config.val_batches, config.batch_size)
    n_test = test_labels.numel() // config.batch_size * config.batch_size
    test_x = normalize(test_images[:n_test].to(device), data.mean, data.std)
    test_shape = (n_test // config.batch_size, config.batch_size)
    return Task(
        config=config,
        device=device,
        host_config=host,
        num_classes=NUM_IMAGE_CLASSES,
        data=data,
        val_x=val_x.view(*val_shape, *val_x.shape[1:]),
        val_y=val_labels[:n_val].to(device).view(val_shape),
        test_x=test_x.view(*test_shape, *test_x.shape[1:]),
        test_y=test_labels[:n_test].to(device).view(test_shape),
    )


def _build_text_task(config: TaskConfig, device: torch.device) -> Task:
    train, val = load_text(config.data_dir, config.context)
    val_starts = evenly_spaced_starts(val.numel(), config.context, config.val_batches * config.batch_size)
    val_x, val_y = windows(val.to(device), val_starts.to(device), config.context)
    val_shape = (config.val_batches, config.batch_size, config.context)
    host = replace(TransformerHostConfig.preset("tinystories"), vocab_size=BYTE_VOCAB, context=config.context)
    return Task(
        config=config,
        device=device,
        host_config=host,
        num_classes=BYTE_VOCAB,
        data=TextData(tokens=train.to(device), context=config.context),
        val_x=val_x.view(val_shape),
        val_y=val_y.view(val_shape),
        test_x=val_x.view(val_shape)[:0],
        test_y=val_y.view(val_shape)[:0],
    )


# --- Images: normalization, augmentation, sampling ------------------------------------------


NUM_IMAGE_CLASSES = 10


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 `[n, C, H, W]` images, in [0, 1] pixel units."""
    pixels = images.to(torch.float64).div(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return pixels.mean(1).to(torch.float32), pixels.std(1).to(torch.float32)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) images `[..., C, H, W]` -> float32 `(x/255 - mean) / std`."""
    pixels = images.to(torch.float32).div(255.0) if images.dtype == torch.uint8 else images
    return (pixels - mean) / std


def _to(draws: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Random draws moved to the data's device only when the generator lives elsewhere."""
    return draws if draws.device == device else draws.to(device)


def crop_and_flip(
    images: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING
) -> torch.Tensor:
    """Random crop (zero padding `padding`) and horizontal flip of every image `[M, C, H, W]` at once.

    Same as torchvision's RandomCrop(H, padding) + RandomHorizontalFlip on raw pixels, as
    one gather: the flip is folded into the column indices. Offsets are drawn first, then flips.
    """
    m, _, height, width = images.shape
    draw_device = generator.device
    offsets = _to(torch.randint(0, 2 * padding + 1, (m, 2), generator=generator, device=draw_device), images.device)
    flips = _to(torch.randint(0, 2, (m,), generator=generator, device=draw_device), images.device).bool()
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, :1] + torch.arange(height, device=images.device)
    across = torch.arange(width, device=images.device)
    cols = offsets[:, 1:] + torch.where(flips.unsqueeze(1), width - 1 - across, across)
    picked = padded[torch.arange(m, device=images.device).view(m, 1, 1), :, rows.unsqueeze(2), cols.unsqueeze(1)]
    return picked.permute(0, 3, 1, 2)  # advanced indices first: [M, H, W, C] -> [M, C, H, W]


def sample_images(
    data: ImageData, shape: tuple[int, int], generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`shape = (I, B)` images drawn with replacement: float32 `[I, B, C, H, W]`, int64 labels `[I, B]`."""
    n = data.labels.numel()
    index = _to(torch.randint(0, n, shape, generator=generator, device=generator.device), device).flatten()
    images = data.images[index]
    if data.augment:
        images = crop_and_flip(images, generator)
    x = normalize(images, data.mean, data.std)
    return x.view(*shape, *x.shape[1:]), data.labels[index].view(shape)


# --- Text: windows ---------------------------------------------------------------------------


def windows(tokens: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of `context + 1` tokens at `starts [...]`: x = window[:-1], y = window[1:], int64 `[..., context]`."""
    window = tokens[starts.unsqueeze(-1) + torch.arange(context + 1, device=tokens.device)].to(torch.int64)
    return window[..., :-1].contiguous(), window[..., 1:].contiguous()


def evenly_spaced_starts(length: int, context: int, count: int) -> torch.Tensor:
    """`count` window starts spread evenly over a split of `length` tokens (fixed, seed-free)."""
    last = length - (context + 1)
    return torch.linspace(0, last, count, dtype=torch.float64).round().to(torch.int64)


def sample_windows(
    data: TextData, shape: tuple[int, int], generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`shape = (I, B)` windows at uniform random starts: int64 x, y `[I, B, context]`."""
    n_starts = data.tokens.numel() - data.context
    starts = _to(torch.randint(0, n_starts, shape, generator=generator, device=generator.device), device)
    return windows(data.tokens, starts, data.context)


# --- Synthetic images -----------------------------------------------------------------------


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


def _pattern_mask(pattern: torch.Tensor, x: torch.Tensor, y: torch.Tensor, period: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
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


# --- Loading files ---------------------------------------------------------------------------


def cifar10_folder(data_dir: str | Path) -> Path:
    """The folder holding the CIFAR-10 batches: `data_dir` itself or `data_dir/cifar-10-batches-py`."""
    root = Path(data_dir)
    expected = (
        f"expected the python-format CIFAR-10 batches {', '.join(CIFAR10_TRAIN_FILES)}, {CIFAR10_TEST_FILE} "
        f"in that folder or in its subfolder {CIFAR10_SUBDIR}/"
    )
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 data_dir {str(root)!r} is not a directory; {expected}")
    nested = root / CIFAR10_SUBDIR
    folder = nested if nested.is_dir() else root
    missing = [name for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {str(folder)!r} lacks {missing}; {expected}")
    return folder


def load_cifar10(data_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test images uint8 `[n, 3, 32, 32]` and labels int64 `[n]` from the python-format batches."""
    folder = cifar10_folder(data_dir)
    train = [read_cifar10_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    test_images, test_labels = read_cifar10_batch(folder / CIFAR10_TEST_FILE)
    train_images = torch.cat([images for images, _ in train])
    train_labels = torch.cat([labels for _, labels in train])
    return train_images, train_labels, test_images, test_labels


CIFAR10_FORMAT = (
    "a pickled dict with b'data' (numpy uint8 array [n, 3072], each row 1024 red, 1024 green, "
    "1024 blue values of a 32x32 image) and b'labels' (n integers in 0..9)"
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch needs nothing else,
    and refusing other globals keeps a hostile file from running code."""

    ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core."):  # numpy 1.x names (the real files); numpy 2 moved them
            module = "numpy._core." + module.removeprefix("numpy.core.")
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _unpickle(handle: BinaryIO) -> Any:
    return _NumpyOnlyUnpickler(handle, encoding="bytes").load()


def read_cifar10_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One python-format batch file -> uint8 images `[n, 3, 32, 32]`, int64 labels `[n]`."""
    with open(path, "rb") as handle:
        try:
            batch = _unpickle(handle)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise TaskDataError(f"{str(path)!r} is not a readable pickle ({error}); expected {CIFAR10_FORMAT}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise TaskDataError(f"{str(path)!r} holds {keys}; expected {CIFAR10_FORMAT}")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise TaskDataError(f"{str(path)!r}: b'data' is a {found}; expected {CIFAR10_FORMAT}")
    label_array = np.asarray(labels)
    if label_array.shape != (data.shape[0],) or not np.issubdtype(label_array.dtype, np.integer):
        raise TaskDataError(
            f"{str(path)!r}: b'labels' has shape {label_array.shape} and dtype {label_array.dtype} for "
            f"{data.shape[0]} images; expected {CIFAR10_FORMAT}"
        )
    if label_array.size and (label_array.min() < 0 or label_array.max() >= NUM_IMAGE_CLASSES):
        raise TaskDataError(
            f"{str(path)!r}: labels span {label_array.min()}..{label_array.max()}; expected {CIFAR10_FORMAT}"
        )
    images = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)
    return images, torch.from_numpy(label_array.astype(np.int64))


def load_text(data_dir: str | None, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation bytes (uint8 `[L]`) for the byte-level text task.

    None -> the embedded text; a file -> its last max(context + 1, 10 %) bytes validate, the
    rest trains; a folder -> TinyStories-train.txt and TinyStories-valid.txt. Every split
    must hold at least one window (`context + 1` bytes).
    """
    window = context + 1
    if data_dir is None:
        source = resources.files("esper_func").joinpath(EMBEDDED_TEXT)
        return split_text(np.frombuffer(source.read_bytes(), dtype=np.uint8), f"embedded {EMBEDDED_TEXT}", window)
    path = Path(data_dir)
    if path.is_file():
        return split_text(_read_bytes(path, 2 * window), str(path), window)
    if path.is_dir():
        return (
            torch.from_numpy(_read_bytes(path / TINYSTORIES_TRAIN_FILE, window)),
            torch.from_numpy(_read_bytes(path / TINYSTORIES_VALID_FILE, window)),
        )
    raise FileNotFoundError(
        f"tinystories data_dir {str(path)!r} does not exist; expected a .txt file, or a folder holding "
        f"{TINYSTORIES_TRAIN_FILE} and {TINYSTORIES_VALID_FILE}"
    )


def _read_bytes(path: Path, minimum: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"text file {str(path)!r} not found; a tinystories folder must hold {TINYSTORIES_TRAIN_FILE} "
            f"and {TINYSTORIES_VALID_FILE}"
        )
    tokens = np.fromfile(path, dtype=np.uint8)
    if tokens.size < minimum:
        state = "is empty" if tokens.size == 0 else f"has {tokens.size} bytes"
        raise TaskDataError(
            f"text file {str(path)!r} {state}; it needs at least {minimum} bytes "
            "(one window of context + 1 bytes per split)"
        )
    return tokens


def split_text(tokens: np.ndarray, where: str, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split one text into train (head) and validation (tail, max(window, 10 %) bytes)."""
    if tokens.size < 2 * window:
        raise TaskDataError(
            f"text {where!r} has {tokens.size} bytes; it needs at least {2 * window} (one window of "
            f"context + 1 = {window} bytes for each of train and validation)"
        )
    n_val = max(window, math.ceil(tokens.size * TEXT_VAL_FRACTION))
    split = tokens.size - n_val
    return torch.from_numpy(tokens[:split].copy()), torch.from_numpy(tokens[split:].copy())


# --- Calibration: static hosts on a task, through the core ------------------------------------


@dataclass(frozen=True)
class StaticRun:
    """Validation accuracy (percent) of static hosts (every slot DORMANT) after each epoch."""

    host: CNNHostConfig | TransformerHostConfig
    seed: int
    accuracy: torch.Tensor
    """`[epochs, N]`: one column per env (independent initializations, shared batches)."""
    seconds: float
    """Wall time of training and evaluation (task building excluded)."""


def train_static_host(task: Task, host: HostConfig, epochs: int, n_envs: int, seed: int) -> StaticRun:
    """Train `n_envs` fresh hosts on `task` for `epochs` env steps with the core, no seeds.

    Uses `training.train_epoch` and `evaluation.evaluate` (eager; `OptimConfig` defaults,
    the learning-rate schedule spanning `epochs`), so the figures are what the core gives.
    Initialization draws from `seed`, batch sampling from `seed + 1`: two hosts run with
    the same seed see the same batches.
    """
    start = time.perf_counter()
    core = CoreConfig(host=host, compile=False)
    core = replace(core, lifecycle=replace(core.lifecycle, max_epochs=epochs))
    steps = StepFunctions(build_model(core, task.device))
    state = init_state(steps.model, n_envs, torch.Generator(task.device).manual_seed(seed))
    sampler = torch.Generator(task.device).manual_seed(seed + 1)
    accuracy = []
    for _ in range(epochs):
        batches = task.sample_batches(sampler)
        state, _ = train_epoch(steps.model, state, batches.train_x, batches.train_y, steps.train)
        metrics = evaluate(steps.model, state, batches.val_x, batches.val_y, steps.eval)
        accuracy.append(metrics["val_accuracy"])
    return StaticRun(host=host, seed=seed, accuracy=torch.stack(accuracy).cpu(), seconds=time.perf_counter() - start)


def calibrate(
    config: TaskConfig, widths: tuple[int, ...], epochs: int, n_envs: int, seeds: tuple[int, ...], device: torch.device
) -> list[dict[str, Any]]:
    """Final validation accuracy of static CNN hosts of each base width, per task seed.

    For every seed the task is generated from that seed and every width (the task's own
    host with `base_channels` set) trains on the same batches (a paired comparison); the
    figure is the mean over the `n_envs` envs.
    """
    rows = []
    for seed in seeds:
        task = build_task(replace(config, seed=seed), device)
        for width in widths:
            assert isinstance(task.host_config, CNNHostConfig)
            host = replace(task.host_config, base_channels=width)
            run = train_static_host(task, host, epochs, n_envs, seed)
            rows.append(
                {
                    "seed": seed,
                    "base_channels": width,
                    "final_accuracy": run.accuracy[-1].mean().item(),
                    "final_accuracy_per_env": run.accuracy[-1].tolist(),
                    "curve": run.accuracy.mean(1).tolist(),
                    "seconds": run.seconds,
                }
            )
            print(
                f"seed {seed} base_channels {width:3d}: final val accuracy {rows[-1]['final_accuracy']:5.1f} % "
                f"(envs {[round(a, 1) for a in rows[-1]['final_accuracy_per_env']]}), {run.seconds:.0f} s",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m esper_func.tasks`: measure the synthetic task's calibration (docs/tasks.md)."""
    parser = argparse.ArgumentParser(prog="python -m esper_func.tasks", description=main.__doc__)
    parser.add_argument("--task", default="synthetic", choices=["synthetic", "cifar10"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--envs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32], help="CNN base_channels to compare")
    parser.add_argument("--train-iters", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 on a busy 2-core CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {"data_dir": args.data_dir} if args.data_dir else {}
    if args.train_iters is not None:
        overrides["train_iters"] = args.train_iters
    config = TaskConfig.preset(args.task, **overrides)
    rows = calibrate(config, tuple(args.widths), args.epochs, args.envs, tuple(args.seeds), torch.device(args.device))
    for width in args.widths:
        finals = [row["final_accuracy"] for row in rows if row["base_channels"] == width]
        mean = sum(finals) / len(finals)
        print(f"base_channels {width:3d}: mean final val accuracy {mean:5.1f} % over seeds {args.seeds}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
