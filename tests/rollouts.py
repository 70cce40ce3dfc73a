"""Helpers shared by the tests of collection on worker processes (multiprocess, distributed)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import replace
from pathlib import Path

import torch
from tensordict import TensorDictBase

from esper_func.core.stages import ACTION_HEADS
from esper_func.rl.run_config import TrainingConfig
from esper_func.rl.run_sections import TelemetryConfig
from esper_func.rl.trainer import PPOTrainer

QUIET = TelemetryConfig(level="off", logger="none", plots=False, progress_bar=False)
LOG_PROB_KEYS = [("action", f"{head}_log_prob") for head in ACTION_HEADS]
BATCH_KEYS = [
    "observation",
    "action_noise",
    ("next", "reward"),
    ("next", "observation"),
    *(("action", head) for head in ACTION_HEADS),
    *LOG_PROB_KEYS,
    *(
        ("next", "metrics", name)
        for name in ("val_accuracy", "val_loss", "train_loss", "seed_params", "action_executed")
    ),
]
"""What a batch must repeat: the envs' draws and the policy's samples exactly, its log-probs to 1e-6
(which read the synced weights and normalizer statistics), the hosts' training."""


def tiny(**fields: object) -> TrainingConfig:
    """The tiny preset, quiet, no comparison and no checkpoints; `fields` replace the run's."""
    base = TrainingConfig.preset("tiny")
    return replace(base, **{"telemetry": QUIET, "compare_episodes": 0, "checkpoint_every": 0, **fields})


def recorded_batches(trainer: PPOTrainer) -> list[TensorDictBase]:
    """Train, keeping a copy of every batch the update received."""
    batches: list[TensorDictBase] = []
    update = trainer.update

    def recording_update(batch: TensorDictBase) -> dict[str, object]:
        batches.append(batch.clone())
        return update(batch)

    trainer.update = recording_update  # type: ignore[method-assign]
    trainer.train()
    return batches


def assert_same_batches(mine: TensorDictBase, theirs: TensorDictBase) -> None:
    assert mine.shape == theirs.shape
    for key in BATCH_KEYS:
        # A log-prob is the policy's GEMM over however many envs a process holds; on some
        # CPUs (seen without AVX-512) a row's result moves by an ulp with the batch's size.
        tolerance = 1e-6 if key in LOG_PROB_KEYS else 0.0
        torch.testing.assert_close(
            theirs[key], mine[key], rtol=tolerance, atol=tolerance, msg=lambda text, key=key: f"{key}: {text}"
        )


def wait_for_first_update(trainer: subprocess.Popen[str], run_dir: Path) -> None:
    """Until the run's first checkpoint exists (the workers are then mid-run)."""
    deadline = time.monotonic() + 90
    while not (run_dir / "checkpoints" / "update_00001.pt").exists():
        assert time.monotonic() < deadline and trainer.poll() is None, "the first update never finished"
        time.sleep(0.2)
