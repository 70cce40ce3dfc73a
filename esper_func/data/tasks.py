"""Tasks: the data one env step trains and evaluates on, resident on a device.

A `Task` holds its whole training set as tensors on one device and draws each epoch's
batches by index (`sample_batches`): no DataLoader, no worker processes, no host round
trip per batch. Three tasks (see docs/tasks.md):

- `synthetic`: procedurally generated 32x32 RGB images, 10 classes, made from the seed in
  seconds; calibrated so that host capacity matters (a wider host ends clearly ahead;
  `data/synthetic.py`, its calibration in `perf/calibration.py`).
- `cifar10`: the python-format CIFAR-10 batches read from `data_dir` (`data/cifar10.py`).
- `tinystories`: byte-level language modelling (vocab 256) on a local text file, or on a
  small embedded text when `data_dir` is None (`data/text.py`).

One epoch's `Batches` hold `train_iters` training batches drawn uniformly at random, with
replacement (an example can repeat within and across iterations; there is no notion of a
pass over the data), and the task's FIXED validation batches, the same tensors every call,
so that accuracies and counterfactual contributions of successive epochs are comparable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from esper_func.core.config import CNNHostConfig, HostConfig, TransformerHostConfig, require
from esper_func.core.config_json import from_dict
from esper_func.core.step import Batches
from esper_func.data.cifar10 import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_SUBDIR,
    CIFAR10_TEST_FILE,
    CIFAR10_TEST_SIZE,
    CIFAR10_TRAIN_FILES,
    load_cifar10,
)
from esper_func.data.images import NUM_IMAGE_CLASSES, ImageData, channel_stats, normalize, sample_images
from esper_func.data.synthetic import SYNTHETIC_RENDER_SIZE, SYNTHETIC_SIZES, downsample, generate_synthetic
from esper_func.data.text import BYTE_VOCAB, TextData, evenly_spaced_starts, load_text, sample_windows, windows

TaskName = Literal["synthetic", "cifar10", "tinystories"]
TASK_NAMES: tuple[str, ...] = ("synthetic", "cifar10", "tinystories")


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
                f"TaskConfig.image_size={self.image_size} must be one of {list(SYNTHETIC_SIZES)} (32 divided by a "
                "power of 2)",
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

    Strict like `config_json.from_dict`: unknown or mistyped keys are errors that name them.
    """
    name = data.get("name", "synthetic")
    require(name in TASK_PRESETS, f"TaskConfig.name: {name!r} is not one of {list(TASK_NAMES)}")
    return from_dict(TaskConfig, {**TASK_PRESETS[name], **data, "name": name})



# --- The task --------------------------------------------------------------------------------


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


@functools.lru_cache(maxsize=8)
def _rendered_split(n: int, seed: int, stream: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return downsample(*generate_synthetic(n, seed, stream), SYNTHETIC_RENDER_SIZE // image_size)


def synthetic_split(n: int, seed: int, stream: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of the synthetic task (uint8 images, labels), rendered once per process: a
    comparison or evaluation builds the same task for every controller's env, and rendering
    10,000 images takes seconds. Copies, so no caller can change the cached split."""
    images, labels = _rendered_split(n, seed, stream, image_size)
    return images.clone(), labels.clone()


def build_task(config: TaskConfig, device: torch.device | str = "cpu") -> Task:
    """Load or generate the task's data onto `device` and fix its validation batches."""
    device = torch.device(device)
    if config.name == "tinystories":
        return _build_text_task(config, device)
    n_val = config.val_batches * config.batch_size
    if config.name == "synthetic":
        train_images, train_labels = synthetic_split(config.n_train, config.seed, 0, config.image_size)
        val_images, val_labels = synthetic_split(config.n_val, config.seed, 1, config.image_size)
        test_images, test_labels = synthetic_split(config.n_test, config.seed, 2, config.image_size)
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
