"""The governor: per-env health checks, snapshots and rollbacks, vectorized and sync-free.

Every env step ends with a health check of the epoch's losses (`check`). An env panics on
a non-finite loss; on a validation-loss spike (over a rolling window of `window` healthy
losses, at least `min_samples` of them: loss > mean + `spike_sigma`·σ, > `spike_mean_factor`
· mean and > `spike_min_loss_factor` · random-guess loss) `consecutive_spikes` times in a
row; or on a collapse to the random-guess loss ln(classes) (within `collapse_tolerance` of
it: the signature of a net that outputs a uniform guess) after its window mean had been
below `collapse_history_fraction` of it. A panicking env is rolled back (`rollback`):
its host, BatchNorm statistics, the seeds that were FOSSILIZED at the snapshot and the
optimizer (momentum) state are restored from its snapshot, every other seed is culled
(live ones, and any fossilized since the snapshot, which trained against a host that no
longer exists), and its metrics become the snapshot's. Snapshots are taken every
`snapshot_every` epochs, only after the epoch's check passed with no spike pending, so a
snapshot never holds weights that were not checked (esper-lite took it before the
check). Everything is `torch.where` over envs: no host reads, other envs untouched.

State keys under `"governor"` (batch `[N]`):

| key | shape | meaning |
|---|---|---|
| `loss_history` | `[N, window]` float32 | healthy validation losses, newest last |
| `history_len` | `[N]` int64 | valid entries at the end of `loss_history` |
| `spike_streak` | `[N]` int64 | consecutive anomalous losses |
| `rollbacks` | `[N]` int64 | rollbacks this episode |
| `snapshot_epoch` | `[N]` int64 | epoch of the snapshot |
| `("snapshot", "params" / "buffers" / "momentum")` | as in the state | the env at the snapshot |
| `("snapshot", "metrics")` | `[N]` each | val_accuracy, val_loss, train_loss at the snapshot |
| `("snapshot", "fossilized")` | `[N, S]` bool | slots FOSSILIZED at the snapshot |
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
from tensordict import TensorDict

from esper_func.core.config import CNNHostConfig, GovernorConfig, HostConfig
from esper_func.core.model import Model
from esper_func.core.stages import LIVE, Stage, stage_lookup


class Panic(IntEnum):
    """Why the governor rolled an env back (0: it did not)."""

    NONE = 0
    NON_FINITE = 1
    LOSS_SPIKE = 2
    COLLAPSE = 3


def random_guess_loss(host: HostConfig) -> float:
    """Cross-entropy of a uniform guess, ln(classes) or ln(vocabulary): the collapse level."""
    classes = host.num_classes if isinstance(host, CNNHostConfig) else host.vocab_size
    return math.log(classes)


def _where_env(take: torch.Tensor, new: TensorDict, old: TensorDict) -> TensorDict:
    """Per env, `new` where `take [N]` else `old` (same keys and shapes)."""
    return new.apply(lambda a, b: torch.where(take.view((-1,) + (1,) * (a.dim() - 1)), a, b), old)


def _snapshot_of(state: TensorDict) -> TensorDict:
    """The parts of `state` a snapshot keeps, as views (callers copy or `where` them)."""
    n_envs = state.batch_size[0]
    return TensorDict(
        {
            "params": state["params"],
            "buffers": state["buffers"],
            "momentum": state["momentum"],
            "metrics": state["metrics"],
            "fossilized": state["slots", "stage"] == int(Stage.FOSSILIZED),
        },
        batch_size=[n_envs],
    )


def init_governor(config: GovernorConfig, state: TensorDict) -> TensorDict:
    """Empty history, no streak, and a snapshot of `state` as it is now."""
    n_envs = state.batch_size[0]
    device = state["epoch"].device
    zeros = torch.zeros(n_envs, dtype=torch.int64, device=device)
    return TensorDict(
        {
            "loss_history": torch.zeros(n_envs, config.window, device=device),
            "history_len": zeros,
            "spike_streak": zeros.clone(),
            "rollbacks": zeros.clone(),
            "snapshot_epoch": state["epoch"].clone(),
            "snapshot": _snapshot_of(state).clone(),
        },
        batch_size=[n_envs],
    )


def take_snapshots(state: TensorDict, take: torch.Tensor) -> TensorDict:
    """The state with a fresh snapshot for the envs where `take [N]`; others keep theirs."""
    governor = state["governor"].clone(recurse=False)
    # `where` writes new tensors: the snapshot never aliases the live state.
    governor["snapshot"] = _where_env(take, _snapshot_of(state), governor["snapshot"])
    governor["snapshot_epoch"] = torch.where(take, state["epoch"], governor["snapshot_epoch"])
    new_state = state.clone(recurse=False)
    new_state["governor"] = governor
    return new_state


def check(
    config: GovernorConfig, guess_loss: float, governor: TensorDict, metrics: TensorDict
) -> tuple[TensorDict, torch.Tensor]:
    """Health check of one epoch's `metrics` (`train_loss`, `val_loss` `[N]`).

    Returns the governor with its history and streak advanced, and the panic cause `[N]`
    (`Panic` values). Anomalous and panicking losses are not added to the history.
    """
    history, length, streak = governor["loss_history"], governor["history_len"], governor["spike_streak"]
    window = history.shape[1]
    loss = metrics["val_loss"]
    finite = torch.isfinite(loss) & torch.isfinite(metrics["train_loss"])

    valid = torch.arange(window, device=loss.device) >= (window - length).unsqueeze(-1)
    count = length.clamp(min=1).to(loss.dtype)
    mean = torch.where(valid, history, 0.0).sum(-1) / count
    std = (torch.where(valid, history - mean.unsqueeze(-1), 0.0).pow(2).sum(-1) / count).sqrt()
    enough = length >= config.min_samples

    anomalous = (
        finite
        & enough
        & (loss > mean + config.spike_sigma * std)
        & (loss > config.spike_mean_factor * mean)
        & (loss > config.spike_min_loss_factor * guess_loss)
    )
    streak = torch.where(anomalous, streak + 1, 0)
    spike = streak >= config.consecutive_spikes
    collapse = (
        finite
        & enough
        & (mean < config.collapse_history_fraction * guess_loss)
        & ((loss - guess_loss).abs() < config.collapse_tolerance * guess_loss)
    )
    cause = torch.where(
        ~finite,
        int(Panic.NON_FINITE),
        torch.where(spike, int(Panic.LOSS_SPIKE), torch.where(collapse, int(Panic.COLLAPSE), int(Panic.NONE))),
    )
    if not config.enabled:
        cause = torch.zeros_like(cause)
    panic = cause != int(Panic.NONE)

    append = finite & ~anomalous & ~panic
    shifted = torch.cat((history[:, 1:], torch.where(finite, loss, 0.0).unsqueeze(-1)), dim=-1)
    new = governor.clone(recurse=False)
    new["loss_history"] = torch.where(append.unsqueeze(-1), shifted, history)
    new["history_len"] = torch.where(append, (length + 1).clamp(max=window), length)
    new["spike_streak"] = torch.where(panic, 0, streak)
    new["rollbacks"] = governor["rollbacks"] + panic.long()
    return new, cause


def rollback(
    model: Model, state: TensorDict, metrics: TensorDict, panic: torch.Tensor
) -> tuple[TensorDict, TensorDict]:
    """Roll the envs where `panic [N]` back to their snapshots, before the epoch's tick.

    Restores params, buffers and momentum; culls every seed that was not FOSSILIZED at the
    snapshot (zeroing its momentum); replaces the epoch's metrics with the snapshot's
    (contribution and gradient ratio 0), so that nothing non-finite reaches the tick, the
    reward or the observation. Other envs are returned unchanged.
    """
    snapshot = state["governor", "snapshot"]
    slots = state["slots"]
    stage = slots["stage"]
    fossilized_now = stage == int(Stage.FOSSILIZED)
    culled = panic.unsqueeze(-1) & (stage_lookup(LIVE, stage) | (fossilized_now & ~snapshot["fossilized"]))

    momentum = _where_env(panic, snapshot["momentum"], state["momentum"])
    for s, names in enumerate(model.slot_param_names):
        keep = ~(panic & ~snapshot["fossilized"][:, s])  # only restored fossils keep momentum
        for name in names:
            momentum[name] = momentum[name] * keep.view((-1,) + (1,) * (momentum[name].dim() - 1))

    new_slots = slots.clone()
    new_slots.update(
        {
            "prev_stage": torch.where(culled, stage, slots["prev_stage"]),
            "prev_epochs_in_stage": torch.where(culled, slots["epochs_in_stage"], slots["prev_epochs_in_stage"]),
            "epochs_in_stage": torch.where(culled, 0, slots["epochs_in_stage"]),
            "acc_at_stage_start": torch.where(
                culled, snapshot["metrics", "val_accuracy"].unsqueeze(-1), slots["acc_at_stage_start"]
            ),
            "stage": torch.where(culled, int(Stage.CULLED), stage),
            "alpha": torch.where(culled, 0.0, slots["alpha"]),
            "blend_step": torch.where(culled, 0, slots["blend_step"]),
        }
    )

    new_state = state.clone(recurse=False)
    new_state["params"] = _where_env(panic, snapshot["params"], state["params"])
    new_state["buffers"] = _where_env(panic, snapshot["buffers"], state["buffers"])
    new_state["momentum"] = momentum
    new_state["slots"] = new_slots

    new_metrics = metrics.clone(recurse=False)
    for key in ("val_accuracy", "val_loss", "train_loss"):
        new_metrics[key] = torch.where(panic, snapshot["metrics", key], metrics[key])
    for key in ("contribution", "grad_ratio"):
        new_metrics[key] = torch.where(panic.unsqueeze(-1), 0.0, metrics[key])
    return new_state, new_metrics


def snapshot_due(config: GovernorConfig, state: TensorDict, cause: torch.Tensor) -> torch.Tensor:
    """`[N]` envs to snapshot after this step's tick: healthy, no spike pending, on schedule."""
    healthy = (cause == int(Panic.NONE)) & (state["governor", "spike_streak"] == 0)
    return healthy & (state["epoch"] % config.snapshot_every == 0)
