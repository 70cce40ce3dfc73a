"""The training loop's own hooks: checkpointing, logging and early stopping.

Each is a callable on `TrainerState`, registered at a hook point of `PPOTrainer`
(`after_batch` unless said otherwise); user hooks use the same mechanism.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from esper_func.core.config_json import to_dict
from esper_func.rl.checkpoints import save_checkpoint
from esper_func.rl.telemetry import JsonlWriter
from esper_func.rl.trainer import TrainerState, scalar_metrics


class CheckpointHook:
    """Save every `every` updates and at the last one (`every=0`: only at the last).

    Register the instance at `after_batch` and its `final` at `end_of_run`, which makes
    sure the state a run ends in (a stopped or interrupted run included) is on disk.
    """

    def __init__(self, trainer_state_dict: Callable[[], dict[str, Any]], every: int) -> None:
        self.trainer_state_dict = trainer_state_dict
        self.every = every
        self.saved_update = -1

    def __call__(self, state: TrainerState) -> None:
        last = state.update >= state.config.episodes or state.stop
        if last or (self.every > 0 and state.update % self.every == 0):
            self.save(state)

    def final(self, state: TrainerState) -> None:
        if self.saved_update != state.update:
            self.save(state)

    def save(self, state: TrainerState) -> None:
        state.checkpoint_path = save_checkpoint(
            state.run_dir, state.update, to_dict(state.config), self.trainer_state_dict()
        )
        self.saved_update = state.update


class UpdateLogHook:
    """One `updates.jsonl` record per update, and every scalar to the TorchRL logger."""

    def __init__(self, path: Path) -> None:
        self.writer = JsonlWriter(path)

    def __call__(self, state: TrainerState) -> None:
        if state.telemetry_level == "off":
            return
        record = {
            "update": state.update,
            "frames": state.frames,
            "wall_time": state.wall_time,
            "telemetry_level": state.telemetry_level,
            "rollout": state.rollout,
            "losses": state.losses,
        }
        self.writer.write(record)
        if state.logger is not None:
            for name, value in scalar_metrics(state).items():
                state.logger.log_scalar(name, value, step=state.update)

    def close(self, state: TrainerState) -> None:
        self.writer.close()


class EarlyStopping:
    """Stop when the rollout return has not improved by `min_delta` for `patience` updates."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = float("-inf")
        self.since_best = 0

    def __call__(self, state: TrainerState) -> None:
        value = state.rollout["return"]
        if value > self.best + self.min_delta:
            self.best = value
            self.since_best = 0
            return
        self.since_best += 1
        if self.since_best >= self.patience:
            state.stop = True
