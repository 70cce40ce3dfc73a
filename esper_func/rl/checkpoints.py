"""Checkpoints: written atomically, verified on load, errors that say what to do.

A checkpoint's payload is a plain dict of tensors, numbers, strings and lists: `config`
(the TrainingConfig as JSON-able dict) and the trainer's `state_dict()` (actor, critic,
optimizer, normalizers, counters, history, RNG states). The file holds `{"format": 3,
"sha256": hex, "payload": uint8 tensor}`, the payload serialized by `torch.save`, so a
file changed after it was written (a flipped byte loads silently otherwise) is refused.
Loading uses `weights_only=True`: no code runs. Files live in
`RUN_DIR/checkpoints/update_<k>.pt`; `latest.pt` is the newest. Each is written to a temp
file, flushed to disk, then renamed, so an interrupted write never leaves a broken file.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = 3
REQUIRED_KEYS: tuple[str, ...] = ("config", "actor", "critic", "optimizer", "normalizers", "counters", "history", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours; the message names the file."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path:
    return checkpoint_dir(run_dir) / "latest.pt"


def _atomic_write(data: bytes, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def _torch_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def save_checkpoint(run_dir: Path, update: int, config: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
    """Write `update_<k>.pt` and replace `latest.pt`, each via a temp file and a rename."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    payload = _torch_bytes({"config": config, **trainer_state})
    data = _torch_bytes(
        {
            "format": CHECKPOINT_FORMAT,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
        }
    )
    path = directory / f"update_{update:05d}.pt"
    _atomic_write(data, path)
    _atomic_write(data, latest_checkpoint(run_dir))
    return path


_UNREADABLE = (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint, verify its digest and contents (no code runs while loading)."""
    earlier = "use an earlier checkpoints/update_*.pt of the same run"
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a run directory that holds checkpoints/latest.pt or a .pt file"
        )
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated, corrupt or unreadable ({type(error).__name__}: {error}); {earlier}"
        ) from error
    if not isinstance(outer, dict) or not {"format", "sha256", "payload"} <= set(outer):
        raise CheckpointError(f"checkpoint {path} is not an esper_func checkpoint (format {CHECKPOINT_FORMAT})")
    if outer["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {outer['format']}, this esper_func reads format {CHECKPOINT_FORMAT}; "
            "resume it with the esper_func version that wrote it"
        )
    payload = outer["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != outer["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} was modified after it was written (its SHA-256 digest does not match); {earlier}"
        )
    try:
        checkpoint = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except _UNREADABLE as error:
        raise CheckpointError(
            f"checkpoint {path} holds an unreadable payload ({type(error).__name__}: {error}); {earlier}"
        ) from error
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it was not written by this version of esper_func")
    return checkpoint


def resolve_checkpoint(target: Path) -> Path:
    """A run directory means its latest checkpoint; a file is taken as is."""
    return latest_checkpoint(target) if target.is_dir() else target
