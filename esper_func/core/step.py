"""One env step composed from the pure transitions: act, train an epoch, evaluate, check
health (rolling back envs that panic), tick, snapshot.

Each part runs under a `torch.profiler.record_function` label (`esper.<part>`), so a
profile of env steps attributes time to it (`python -m esper_func.bench --profile-step`);
outside a profiler the labels cost a few microseconds per step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tensordict import TensorDict
from torch.profiler import record_function

from esper_func.core.governor import Panic, check, random_guess_loss, rollback, snapshot_due, take_snapshots
from esper_func.core.host_evaluation import EvalStepCache, evaluate
from esper_func.core.host_training import TrainStepCache, train_epoch
from esper_func.core.lifecycle import apply_action, tick
from esper_func.core.model import Model


@dataclass
class StepFunctions:
    """The step functions of one model: its train and eval functions, compiled per bank plan
    when `CoreConfig.compile` is on, built once and reused by every step."""

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
    steps: StepFunctions, state: TensorDict, action: TensorDict, batches: Batches, generator: torch.Generator
) -> tuple[TensorDict, TensorDict]:
    """Apply `action`, train one epoch, evaluate with counterfactuals, check, tick.

    Returns the new state and the epoch's metrics `[N]`: `train_loss`, `val_loss`,
    `val_accuracy`, `contribution [N, S]`, `grad_ratio [N, S]`, `executed` (the action
    was legal and ran; otherwise the env waited), `rolled_back` (the governor restored the
    env's snapshot; its metrics are then the snapshot's) and `panic` (a `Panic` value).
    """
    model = steps.model
    governor_config = model.config.governor
    with record_function("esper.apply_action"):
        state, executed = apply_action(model, state, action, generator)
    with record_function("esper.train_epoch"):
        state, train_stats = train_epoch(model, state, batches.train_x, batches.train_y, steps.train)
    with record_function("esper.evaluate"):
        metrics = evaluate(model, state, batches.val_x, batches.val_y, steps.eval)
    metrics.update(train_stats)
    with record_function("esper.governor"):
        governor, panic = check(governor_config, random_guess_loss(model.config.host), state["governor"], metrics)
        state["governor"] = governor
        rolled_back = panic != int(Panic.NONE)
        state, metrics = rollback(model, state, metrics, rolled_back)
    with record_function("esper.tick"):
        state = tick(model, state, metrics)
    with record_function("esper.governor"):
        state = take_snapshots(state, snapshot_due(governor_config, state, panic))
    metrics["executed"] = executed
    metrics["rolled_back"] = rolled_back
    metrics["panic"] = panic
    return state, metrics
