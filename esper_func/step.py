"""One env step composed from the pure transitions: act, train an epoch, evaluate, tick."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from esper_func.evaluation import EvalStepCache, evaluate
from esper_func.lifecycle import apply_action, tick
from esper_func.model import Model
from esper_func.training import TrainStepCache, train_epoch


@dataclass
class Steps:
    """The (compiled, per bank plan) train and eval functions of one model."""

    model: Model
    train: TrainStepCache = field(init=False)
    eval: EvalStepCache = field(init=False)

    def __post_init__(self) -> None:
        self.train = TrainStepCache(self.model)
        self.eval = EvalStepCache(self.model)


@dataclass(frozen=True)
class Batches:
    """Shared data for one env step: `train_x [I, B, ...]`, `train_y [I, B, ...]`, and
    validation batches `val_x [V, B, ...]`, `val_y [V, B, ...]`."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def env_step(
    steps: Steps, state: TensorDict, action: TensorDict, batches: Batches, generator: torch.Generator
) -> tuple[TensorDict, TensorDict]:
    """Apply `action`, train one epoch, evaluate with counterfactuals, tick.

    Returns the new state and the epoch's metrics `[N]`: `train_loss`, `val_loss`,
    `val_accuracy`, `contribution [N, S]`, `grad_ratio [N, S]`, `executed` (the action
    was legal and ran; otherwise the env waited).
    """
    model = steps.model
    state, executed = apply_action(model, state, action, generator)
    state, train_stats = train_epoch(model, state, batches.train_x, batches.train_y, steps.train)
    metrics = evaluate(model, state, batches.val_x, batches.val_y, steps.eval)
    metrics.update(train_stats)
    state = tick(model, state, metrics)
    metrics["executed"] = executed
    return state, metrics
