"""Training signals: the reference SignalTracker as pure per-env state.

The tracker's Python object (one per env, mutated every epoch) becomes a TensorDict `[N]`
that `update_signals` maps to a new one from the epoch's metrics. Everything is a tensor
expression (no host sync), so it runs inside the compiled end-of-epoch step.

| key | shape | dtype | meaning |
|---|---|---|---|
| `epochs_seen` | `[N]` | int64 | epochs recorded so far |
| `has_prev` | `[N]` | bool | an epoch before the latest exists (`epochs_seen >= 2`); replaces the reference's `prev = +inf` |
| `val_loss` | `[N]` | float32 | latest validation loss (0 before the first epoch) |
| `val_accuracy` | `[N]` | float32 | latest validation accuracy, percent (0 before the first epoch) |
| `prev_val_loss` | `[N]` | float32 | validation loss of the epoch before the latest (0 while `has_prev` is False) |
| `prev_val_accuracy` | `[N]` | float32 | likewise for the accuracy |
| `loss_delta` | `[N]` | float32 | `prev_val_loss - val_loss`: positive = better; 0 at the first epoch |
| `acc_delta` | `[N]` | float32 | `val_accuracy - prev_val_accuracy` (pp); 0 at the first epoch |
| `plateau_epochs` | `[N]` | int64 | consecutive epochs with `acc_delta < plateau_threshold` (the first epoch has nothing to compare with and counts as no plateau) |
| `stable_epochs` | `[N]` | int64 | consecutive stable epochs: `loss_delta / prev_val_loss < stabilization_threshold` and `val_loss < 1.5 * prev_val_loss`; only counted (or reset) when the previous loss is finite and > 1e-8, otherwise left as is |
| `stabilized` | `[N]` | bool | latch: `stable_epochs` reached `stabilization_epochs` once; never un-latches |
| `best_val_accuracy` | `[N]` | float32 | all-time maximum validation accuracy (NaN epochs ignored; 0 before the first epoch) |
| `best_val_loss` | `[N]` | float32 | minimum validation loss over `val_loss_history`'s recorded entries (NaN ignored, +inf if all recorded are NaN; 0 before the first epoch) |
| `val_loss_history` | `[N, H]` | float32 | last H validation losses, oldest first; left-padded with 0 while `epochs_seen < H` (the last `min(epochs_seen, H)` entries are real) |
| `val_acc_history` | `[N, H]` | float32 | likewise for accuracies (percent) |

H = `SignalConfig.history`. Differences from esper-lite's signal tracker: one window H for
both the histories and `best_val_loss` (the reference keeps 10 and exposes 5); no `+inf`
previous loss (the `has_prev` flag instead), so the first epoch's deltas are 0 rather than
`+inf` and `val_acc` (its previous accuracy started at 0).
"""  # noqa: E501 (the table keeps one row per line)

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict

from esper_func.core.config import ConfigError

MIN_PREV_LOSS = 1e-8
"""Below this previous loss the relative loss change is not computed (reference value)."""

LOSS_BLOWUP_FACTOR = 1.5
"""An epoch whose loss exceeds this multiple of the previous one is never stable."""


@dataclass(frozen=True)
class SignalConfig:
    """Plateau and stabilization detection (reference defaults; accuracies in percent)."""

    plateau_threshold: float = 0.5
    """An epoch whose accuracy gain (pp) is below this extends the plateau."""
    history: int = 5
    """Epochs kept in the loss/accuracy histories and the `best_val_loss` window."""
    stabilization_threshold: float = 0.03
    """An epoch is stable when the relative loss improvement is below this."""
    stabilization_epochs: int = 3
    """Consecutive stable epochs that latch `stabilized`."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.plateau_threshold) and self.plateau_threshold >= 0):
            raise ConfigError(
                f"SignalConfig.plateau_threshold must be finite and >= 0 (pp), got {self.plateau_threshold}"
            )
        if self.history < 1:
            raise ConfigError(f"SignalConfig.history must be >= 1 epoch, got {self.history}")
        if not (math.isfinite(self.stabilization_threshold) and self.stabilization_threshold > 0):
            raise ConfigError(
                f"SignalConfig.stabilization_threshold must be finite and > 0 (a relative loss change), "
                f"got {self.stabilization_threshold}"
            )
        if self.stabilization_epochs < 1:
            raise ConfigError(f"SignalConfig.stabilization_epochs must be >= 1, got {self.stabilization_epochs}")


def init_signals(config: SignalConfig, n_envs: int, device: torch.device | str) -> TensorDict:
    """Signals of `n_envs` environments that have seen no epoch yet."""
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    device = torch.device(device)

    def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(n_envs, *shape, dtype=dtype, device=device)

    return TensorDict(
        {
            "epochs_seen": zeros(dtype=torch.int64),
            "has_prev": zeros(dtype=torch.bool),
            "val_loss": zeros(),
            "val_accuracy": zeros(),
            "prev_val_loss": zeros(),
            "prev_val_accuracy": zeros(),
            "loss_delta": zeros(),
            "acc_delta": zeros(),
            "plateau_epochs": zeros(dtype=torch.int64),
            "stable_epochs": zeros(dtype=torch.int64),
            "stabilized": zeros(dtype=torch.bool),
            "best_val_accuracy": zeros(),
            "best_val_loss": zeros(),
            "val_loss_history": zeros(config.history),
            "val_acc_history": zeros(config.history),
        },
        batch_size=[n_envs],
        device=device,
    )


def _append(history: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Drop the oldest entry, append `value` as the newest."""
    return torch.cat((history[:, 1:], value.unsqueeze(-1)), dim=-1)


def update_signals(config: SignalConfig, signals: TensorDict, metrics: TensorDict) -> TensorDict:
    """Record one epoch: `metrics` `[N]` needs `val_loss` and `val_accuracy` (percent).

    Returns new signals; `signals` and `metrics` are not modified.
    """
    dtype = signals["val_loss"].dtype
    loss = metrics["val_loss"].to(dtype)
    acc = metrics["val_accuracy"].to(dtype)
    seen = signals["epochs_seen"]
    first = seen == 0
    last_loss, last_acc = signals["val_loss"], signals["val_accuracy"]
    zero = torch.zeros_like(loss)

    loss_delta = torch.where(first, zero, last_loss - loss)
    acc_delta = torch.where(first, zero, acc - last_acc)
    plateau = torch.where(
        first, 0, torch.where(acc_delta < config.plateau_threshold, signals["plateau_epochs"] + 1, 0)
    )

    comparable = ~first & torch.isfinite(last_loss) & (last_loss > MIN_PREV_LOSS)
    relative = loss_delta / torch.where(comparable, last_loss, torch.ones_like(last_loss))
    stable = (relative < config.stabilization_threshold) & (loss < LOSS_BLOWUP_FACTOR * last_loss)
    stable_epochs = torch.where(
        comparable, torch.where(stable, signals["stable_epochs"] + 1, 0), signals["stable_epochs"]
    )
    stabilized = signals["stabilized"] | (stable_epochs >= config.stabilization_epochs)

    loss_history = _append(signals["val_loss_history"], loss)
    acc_history = _append(signals["val_acc_history"], acc)
    window = loss_history.shape[-1]
    recorded = torch.arange(window, device=loss.device) >= (window - (seen + 1).clamp(max=window)).unsqueeze(-1)
    best_loss = torch.where(recorded & ~loss_history.isnan(), loss_history, math.inf).amin(dim=-1)

    return TensorDict(
        {
            "epochs_seen": seen + 1,
            "has_prev": ~first,
            "val_loss": loss,
            "val_accuracy": acc,
            "prev_val_loss": torch.where(first, zero, last_loss),
            "prev_val_accuracy": torch.where(first, zero, last_acc),
            "loss_delta": loss_delta,
            "acc_delta": acc_delta,
            "plateau_epochs": plateau,
            "stable_epochs": stable_epochs,
            "stabilized": stabilized,
            "best_val_accuracy": torch.fmax(signals["best_val_accuracy"], acc),
            "best_val_loss": best_loss,
            "val_loss_history": loss_history,
            "val_acc_history": acc_history,
        },
        batch_size=signals.batch_size,
        device=signals.device,
    )
