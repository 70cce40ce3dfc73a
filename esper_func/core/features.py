"""The controller's observation: a documented, versioned, bounded feature vector.

`observe(model, state, signals, max_epochs)` returns `[N, F]` float32 with the columns
named by `feature_names(model)`: a global block, then one block per slot in canonical
order early, mid, late (`stages.SLOT_NAMES`; the same order as the masks and the slot
head). `feature_spec(model)` gives each column's formula and range; `docs/observation.md`
has the table for the CNN topology and the version policy.

Every feature is bounded by construction (clamp, tanh, `x / (x + k)` or a one-hot), so
the raw vector is already in [-1, 1] and NaN-free even for NaN or infinite inputs; running
normalization is a TorchRL transform on top. Scalings:
- losses: `clamp(log1p(loss) / ln 16, 0, 1)` (a loss of 15 or more, NaN or +inf reads 1);
- accuracies: `clamp(acc / 100, 0, 1)`;
- signed quantities (pp, relative loss change): `tanh(x / scale)`;
- non-negative ratios: `x / (x + k)`, 0.5 at `x = k`;
- counts of epochs: `clamp(n / max_epochs, 0, 1)`.

Current metrics (train/val loss, val accuracy) come from `state["metrics"]`; the temporal
ones (deltas, plateau, best values, histories, stabilization) from the signals
(`esper_func.core.signals`). A slot block is all zeros for an empty (DORMANT) slot; its stage
one-hot therefore covers the 8 other real stages (a DORMANT column would be constant 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict

from esper_func.core.model import Model
from esper_func.core.stages import HOLDS_SEED, SLOT_NAMES, Stage, stage_lookup
from esper_func.core.state import seed_param_count

FEATURE_SCHEMA_VERSION = 2
"""Bump on any change of the columns' names, order, formulas or ranges (docs/observation.md)."""

HISTORY_FEATURES = 5
"""Validation losses and accuracies exposed, newest last; fewer recorded epochs read 0."""

LOSS_LOG_SCALE = math.log(16.0)
"""`log1p(loss)` is divided by this: a loss of 15 reads 1 (ln 256 ~ 5.5 reads 0.68)."""

RELATIVE_LOSS_DELTA_SCALE = 0.1
"""A 10 % loss improvement reads tanh(1) = 0.76."""

PP_SCALE = 5.0
"""Percentage-point quantities (accuracy change, contribution): 5 pp reads tanh(1) = 0.76."""

GRAD_RATIO_HALF = 0.1
"""The gradient-ratio EMA reads 0.5 at this value (G2's default threshold 0.05 reads 0.33)."""

GROWTH_HALF = 1.0
"""Parameter growth reads 0.5 when the seeds add as many parameters as the host has."""

MIN_PREV_LOSS = 1e-3
"""Floor of the previous loss when the loss change is made relative."""

SLOT_STAGES: tuple[Stage, ...] = tuple(s for s in Stage if s != Stage.DORMANT)
"""Stages with a one-hot column in a slot block (DORMANT is the all-zero block)."""

@dataclass(frozen=True)
class Feature:
    """One column of the observation: name, how it is computed, and its closed range."""

    name: str
    formula: str
    low: float
    high: float


def _global_spec() -> list[Feature]:
    loss = "clamp(log1p({}) / ln 16, 0, 1); NaN reads 1"
    acc = "clamp({} / 100, 0, 1); NaN reads 0"
    spec = [
        Feature("epoch_fraction", "clamp(epoch / max_epochs, 0, 1)", 0.0, 1.0),
        Feature("train_loss", loss.format("train_loss"), 0.0, 1.0),
        Feature("val_loss", loss.format("val_loss"), 0.0, 1.0),
        Feature("best_val_loss", loss.format("best_val_loss") + " (min over the signal history)", 0.0, 1.0),
        Feature(
            "loss_delta",
            f"tanh(loss_delta / max(prev_val_loss, {MIN_PREV_LOSS}) / {RELATIVE_LOSS_DELTA_SCALE}); 0 without a "
            "previous epoch; NaN reads 0",
            -1.0,
            1.0,
        ),
        Feature("val_accuracy", acc.format("val_accuracy"), 0.0, 1.0),
        Feature("best_val_accuracy", acc.format("best_val_accuracy") + " (all-time max)", 0.0, 1.0),
        Feature("acc_delta", f"tanh(acc_delta / {PP_SCALE}), acc_delta in pp; NaN reads 0", -1.0, 1.0),
        Feature("plateau_epochs", "clamp(plateau_epochs / max_epochs, 0, 1)", 0.0, 1.0),
        Feature("stabilized", "1 once the host has stabilized (latch), else 0", 0.0, 1.0),
    ]
    for k in range(HISTORY_FEATURES):
        back = f"[{k - HISTORY_FEATURES}]"
        spec.append(
            Feature(f"val_loss_history.{k}", loss.format(f"val_loss_history{back}") + "; 0 if not recorded", 0.0, 1.0)
        )
    for k in range(HISTORY_FEATURES):
        back = f"[{k - HISTORY_FEATURES}]"
        spec.append(
            Feature(f"val_acc_history.{k}", acc.format(f"val_acc_history{back}") + "; 0 if not recorded", 0.0, 1.0)
        )
    spec.append(
        Feature(
            "param_growth",
            f"g / (g + {GROWTH_HALF}), g = seed params / host params; seeds of live and fossilized slots, gate "
            "included",
            0.0,
            1.0,
        )
    )
    return spec


def _slot_spec(model: Model, slot: str) -> list[Feature]:
    spec = [
        Feature(f"{slot}.stage.{stage.name.lower()}", f"1 if the stage is {stage.name}", 0.0, 1.0)
        for stage in SLOT_STAGES
    ]
    spec += [
        Feature(f"{slot}.alpha", "clamp(alpha, 0, 1); NaN reads 0", 0.0, 1.0),
        Feature(
            f"{slot}.contribution",
            f"tanh(contribution / {PP_SCALE}), counterfactual contribution in pp; NaN reads 0",
            -1.0,
            1.0,
        ),
        Feature(
            f"{slot}.contribution_ema",
            f"tanh(contribution_ema / {PP_SCALE}), the smoothed contribution the gates read (pp); NaN reads 0",
            -1.0,
            1.0,
        ),
        Feature(
            f"{slot}.grad_ratio", f"r / (r + {GRAD_RATIO_HALF}), r = max(gradient-ratio EMA, 0); NaN reads 0", 0.0, 1.0
        ),
        Feature(f"{slot}.epochs_in_stage", "clamp(epochs_in_stage / max_epochs, 0, 1)", 0.0, 1.0),
    ]
    spec += [
        Feature(f"{slot}.blueprint.{name}", f"1 if the seed's blueprint is {name}", 0.0, 1.0)
        for name in model.blueprint_names
    ]
    spec.append(
        Feature(
            f"{slot}.param_share",
            "seed params / (host params + all seed params); 0 unless live or fossilized",
            0.0,
            1.0,
        )
    )
    return spec


def feature_spec(model: Model) -> tuple[Feature, ...]:
    """Every column of `observe`'s output, in order."""
    spec = _global_spec()
    for slot in SLOT_NAMES[: model.n_slots]:
        spec += _slot_spec(model, slot)
    return tuple(spec)


def feature_names(model: Model) -> tuple[str, ...]:
    return tuple(feature.name for feature in feature_spec(model))


# --- scalings (each bounded for any input, NaN and infinities included) ---------------


def _loss(x: torch.Tensor) -> torch.Tensor:
    x = torch.nan_to_num(x.float(), nan=math.inf).clamp(min=0.0)
    return (torch.log1p(x) / LOSS_LOG_SCALE).clamp(max=1.0)


def _percent(x: torch.Tensor) -> torch.Tensor:
    return (torch.nan_to_num(x.float(), nan=0.0) / 100.0).clamp(0.0, 1.0)


def _signed(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.tanh(torch.nan_to_num(x.float() / scale, nan=0.0))


def _ratio(x: torch.Tensor, half: float) -> torch.Tensor:
    """`x / (x + half)`; `nan_to_num` maps +inf to the largest float, which reads 1."""
    x = torch.nan_to_num(x.float(), nan=0.0).clamp(min=0.0)
    return x / (x + half)


def _epochs(x: torch.Tensor, max_epochs: int) -> torch.Tensor:
    return (x.float() / max_epochs).clamp(0.0, 1.0)


def _last(history: torch.Tensor, k: int) -> torch.Tensor:
    """The last `k` columns of `[N, H]`, left-padded with 0 when H < k."""
    tail = history[:, -k:]
    return torch.nn.functional.pad(tail, (k - tail.shape[-1], 0))


def observe(model: Model, state: TensorDict, signals: TensorDict, max_epochs: int) -> torch.Tensor:
    """`[N, F]` float32 observation, columns as in `feature_names(model)`."""
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    if signals.batch_size != state.batch_size:
        raise ValueError(f"signals batch {tuple(signals.batch_size)} != state batch {tuple(state.batch_size)}")
    metrics, slots = state["metrics"], state["slots"]
    stage = slots["stage"]
    columns: dict[str, torch.Tensor] = {
        "epoch_fraction": _epochs(state["epoch"], max_epochs),
        "train_loss": _loss(metrics["train_loss"]),
        "val_loss": _loss(metrics["val_loss"]),
        "best_val_loss": _loss(signals["best_val_loss"]),
        "loss_delta": _signed(
            signals["loss_delta"] / signals["prev_val_loss"].clamp(min=MIN_PREV_LOSS), RELATIVE_LOSS_DELTA_SCALE
        ),
        "val_accuracy": _percent(metrics["val_accuracy"]),
        "best_val_accuracy": _percent(signals["best_val_accuracy"]),
        "acc_delta": _signed(signals["acc_delta"], PP_SCALE),
        "plateau_epochs": _epochs(signals["plateau_epochs"], max_epochs),
        "stabilized": signals["stabilized"].float(),
    }
    # History padding is 0, and a 0 loss or accuracy reads 0: unrecorded epochs read 0.
    losses = _loss(_last(signals["val_loss_history"], HISTORY_FEATURES))
    accuracies = _percent(_last(signals["val_acc_history"], HISTORY_FEATURES))
    for k in range(HISTORY_FEATURES):
        columns[f"val_loss_history.{k}"] = losses[:, k]
        columns[f"val_acc_history.{k}"] = accuracies[:, k]

    present = stage != int(Stage.DORMANT)
    seed_params = torch.where(stage_lookup(HOLDS_SEED, stage), seed_param_count(model, slots), 0).float()
    total_seed = seed_params.sum(-1)
    columns["param_growth"] = _ratio(total_seed / model.host_param_count, GROWTH_HALF)
    share = seed_params / (model.host_param_count + total_seed).unsqueeze(-1)

    per_slot = {
        "alpha": slots["alpha"].float().nan_to_num(0.0).clamp(0.0, 1.0),
        "contribution": _signed(slots["contribution"], PP_SCALE),
        "contribution_ema": _signed(slots["contribution_ema"], PP_SCALE),
        "grad_ratio": _ratio(slots["grad_ratio_ema"], GRAD_RATIO_HALF),
        "epochs_in_stage": _epochs(slots["epochs_in_stage"], max_epochs),
        "param_share": share,
    }
    for stage_value in SLOT_STAGES:
        per_slot[f"stage.{stage_value.name.lower()}"] = (stage == int(stage_value)).float()
    for index, name in enumerate(model.blueprint_names):
        per_slot[f"blueprint.{name}"] = (slots["blueprint"] == index).float()
    for s, slot in enumerate(SLOT_NAMES[: model.n_slots]):
        for key, value in per_slot.items():
            columns[f"{slot}.{key}"] = torch.where(present[:, s], value[:, s], 0.0)

    return torch.stack([columns[name] for name in feature_names(model)], dim=-1)


CRITIC_FEATURES: tuple[Feature, ...] = (
    Feature(
        "static_gap",
        f"tanh((val_accuracy - static twin's val_accuracy) / {PP_SCALE}), in pp; NaN reads 0",
        -1.0,
        1.0,
    ),
)
"""The critic-only columns of an env with a static twin (`RewardConfig.static_baseline`):
privileged information the reward reads and the actor must not (a deployed env has no
twin)."""


def observe_critic(state: TensorDict) -> torch.Tensor:
    """`[N, len(CRITIC_FEATURES)]` float32 of a state with a static twin (`state["static"]`).

    Why: the twin's reward pays `(acc - acc_prev) - (twin - twin_prev)`, so the return to
    go from epoch t is the final gap minus the current one. A critic that does not see
    the current gap must treat its epoch-to-epoch noise as unexplained return."""
    gap = state["metrics", "val_accuracy"] - state["static", "metrics", "val_accuracy"]
    return _signed(gap, PP_SCALE).unsqueeze(-1)
