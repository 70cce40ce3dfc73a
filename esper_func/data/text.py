"""Byte-level text (TinyStories, or a small embedded text): loading and splitting the
files, and windows of `context + 1` bytes drawn at random starts (training) or evenly
spaced (validation)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from esper_func.data.errors import TaskDataError
from esper_func.data.images import draws_on

TINYSTORIES_TRAIN_FILE = "TinyStories-train.txt"
TINYSTORIES_VALID_FILE = "TinyStories-valid.txt"
EMBEDDED_TEXT = "data/tiny_stories.txt"
TEXT_VAL_FRACTION = 0.1
BYTE_VOCAB = 256


@dataclass(frozen=True, eq=False)
class TextData:
    """The training split as uint8 bytes `[L]`; windows of `context + 1` bytes are drawn from it."""

    tokens: torch.Tensor
    context: int


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
    starts = draws_on(torch.randint(0, n_starts, shape, generator=generator, device=generator.device), device)
    return windows(data.tokens, starts, data.context)


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
