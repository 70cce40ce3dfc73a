"""Images resident on a device: normalization, augmentation (crop and flip as one gather)
and batch sampling by index, for the synthetic and CIFAR-10 tasks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CROP_PADDING = 4
NUM_IMAGE_CLASSES = 10


@dataclass(frozen=True, eq=False)
class ImageData:
    """Training images as uint8 `[n, C, H, W]` and int64 labels `[n]`, plus their normalization."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    """`[C, 1, 1]` float32, in [0, 1] pixel units."""
    std: torch.Tensor
    augment: bool


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 `[n, C, H, W]` images, in [0, 1] pixel units."""
    pixels = images.to(torch.float64).div(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return pixels.mean(1).to(torch.float32), pixels.std(1).to(torch.float32)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) images `[..., C, H, W]` -> float32 `(x/255 - mean) / std`."""
    pixels = images.to(torch.float32).div(255.0) if images.dtype == torch.uint8 else images
    return (pixels - mean) / std


def draws_on(draws: torch.Tensor, device: torch.device) -> torch.Tensor:
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
    offsets = draws_on(
        torch.randint(0, 2 * padding + 1, (m, 2), generator=generator, device=draw_device), images.device
    )
    flips = draws_on(torch.randint(0, 2, (m,), generator=generator, device=draw_device), images.device).bool()
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
    index = draws_on(torch.randint(0, n, shape, generator=generator, device=generator.device), device).flatten()
    images = data.images[index]
    if data.augment:
        images = crop_and_flip(images, generator)
    x = normalize(images, data.mean, data.std)
    return x.view(*shape, *x.shape[1:]), data.labels[index].view(shape)
