"""Checkpoints: written atomically, loaded with `weights_only=True`, errors that say what to do.

A checkpoint is a plain dict of tensors, numbers, strings and lists:
`format`, `config` (the TrainingConfig as JSON-able dict) and the trainer's `state_dict()`
(actor, critic, optimizer, normalizers, counters, history, RNG states). Files live in
`RUN_DIR/checkpoints/update_<k>.pt`, and `latest.pt` is the newest (a copy, replaced
atomically), so an interrupted write never leaves a broken `latest.pt`.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS: tuple[str, ...] = ("format", "config", "actor", "critic", "optimizer", "normalizers", "counters", "history", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours; the message names the file."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path:
    return checkpoint_dir(run_dir) / "latest.pt"


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, update: int, config: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
    """Write `update_<k>.pt` and replace `latest.pt`, each via a temp file and a rename."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "config": config, **trainer_state}
    path = directory / f"update_{update:05d}.pt"
    _atomic_save(payload, path)
    tmp = directory / ".latest.pt.tmp"
    shutil.copyfile(path, tmp)
    os.replace(tmp, latest_checkpoint(run_dir))
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and check a checkpoint (weights only: no code runs while loading)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run directory that holds checkpoints/latest.pt or a .pt file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(error).__name__}: {error}); "
            "use an earlier checkpoints/update_*.pt of the same run"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an esper_func checkpoint of format {CHECKPOINT_FORMAT}")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it was not written by this version of esper_func")
    return payload


def resolve_checkpoint(target: Path) -> Path:
    """A run directory means its latest checkpoint; a file is taken as is."""
    return latest_checkpoint(target) if target.is_dir() else target
