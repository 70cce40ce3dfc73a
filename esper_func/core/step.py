"""One env step, top to bottom: `step_env` applies the action, trains an epoch, evaluates,
checks health (rolling back envs that panic), ticks, snapshots, computes the reward, updates
the signals and the illegal-action count, and builds the next observation and masks; like
gymnax's `step_env` it returns (observation, state, reward, done). `reset_state` is the
pure reset. `MorphogeneticEnv` adapts both to TorchRL (its action noise stream and specs).

Each part runs under a `torch.profiler.record_function` label (`esper.<part>`), so a
profile of env steps attributes time to it (`python -m esper_func.bench --profile-step`);
outside a profiler the labels cost a few microseconds per step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict
from torch.profiler import record_function

from esper_func.core.features import observe, observe_critic
from esper_func.core.governor import Panic, check, random_guess_loss, rollback, snapshot_due, take_snapshots
from esper_func.core.host_evaluation import EvalStepCache, evaluate
from esper_func.core.host_training import TrainStepCache, train_epoch
from esper_func.core.lifecycle import apply_action, tick
from esper_func.core.masks import action_masks
from esper_func.core.model import Model
from esper_func.core.reward_config import RewardConfig
from esper_func.core.reward_transition import SEEDED
from esper_func.core.rewards import component_names, compute_reward, total
from esper_func.core.signals import SignalConfig, init_signals, update_signals
from esper_func.core.stages import stage_lookup
from esper_func.core.state import init_state, seed_param_count

SEED_KEYS: tuple[str, ...] = (
    "stage",
    "alpha",
    "blueprint",
    "epochs_in_stage",
    "contribution",
    "contribution_ema",
    "improvement",
)
METRIC_KEYS: tuple[str, ...] = ("train_loss", "val_loss", "val_accuracy")
SIGNAL_KEYS: tuple[str, ...] = ("stabilized", "plateau_epochs")


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


STATIC_TWIN_KEYS: tuple[str, ...] = ("params", "buffers", "momentum", "slots", "metrics", "epoch")
"""What `state["static"]`, an env's static twin, holds: the parts of a state that train and evaluate."""


def step_static_twin(functions: StepFunctions, twin: TensorDict, batches: Batches) -> TensorDict:
    """One epoch of the static twin (`state["static"]`): train on the env's batches,
    evaluate on its validation batches, advance the epoch. Its slots stay empty, so this
    is the host-only train and evaluation step; no action or tick applies. A twin whose
    epoch ends with a non-finite loss keeps its state from before the epoch (only its
    epoch advances), so its gain is 0: a diverging static host must not pay the
    controller for its collapse, as the governor keeps the env's own host from doing."""
    model = functions.model
    trained, train_stats = train_epoch(model, twin, batches.train_x, batches.train_y, functions.train)
    metrics = evaluate(model, trained, batches.val_x, batches.val_y, functions.eval)
    trained["metrics"] = TensorDict(
        {
            "val_accuracy": metrics["val_accuracy"],
            "val_loss": metrics["val_loss"],
            "train_loss": train_stats["train_loss"],
        },
        batch_size=twin.batch_size,
    )
    healthy = torch.isfinite(metrics["val_loss"]) & torch.isfinite(train_stats["train_loss"])
    kept_keys = [key for key in STATIC_TWIN_KEYS if key != "epoch"]
    new_twin = trained.select(*kept_keys).apply(
        lambda new, old: torch.where(healthy.view((-1,) + (1,) * (new.dim() - 1)), new, old), twin.select(*kept_keys)
    )
    new_twin["epoch"] = twin["epoch"] + 1
    return new_twin


def reset_state(
    functions: StepFunctions,
    signals: SignalConfig,
    n_envs: int,
    generator: torch.Generator,
    draw_batches: Callable[[torch.Generator], Batches],
    static_twin: bool = False,
) -> TensorDict:
    """Fresh hosts for `n_envs` envs, evaluated once so the first observation is real.

    Draws from `generator` in a fixed order: the hosts (`init_state`), then one epoch's
    batches (`draw_batches`, a task's `sample_batches`) whose validation batches evaluate
    them. The evaluation is the signals' first epoch, so deltas at step 1 are real; the
    first snapshot holds the evaluated hosts, so a rollback restores real metrics. With
    `static_twin`, `state["static"]` is a copy of the evaluated hosts (`STATIC_TWIN_KEYS`)
    that `step_env` trains on the same batches and never grows (`RewardConfig.static_baseline`).
    """
    model = functions.model
    state = init_state(model, n_envs, generator)
    batches = draw_batches(generator)
    metrics = evaluate(model, state, batches.val_x, batches.val_y, functions.eval)
    state["metrics", "val_loss"] = metrics["val_loss"]
    state["metrics", "val_accuracy"] = metrics["val_accuracy"]
    state["signals"] = update_signals(signals, init_signals(signals, n_envs, model.device), metrics)
    state["illegal_actions"] = torch.zeros(n_envs, dtype=torch.int64, device=model.device)
    if static_twin:
        state["static"] = state.select(*STATIC_TWIN_KEYS).clone()
    return take_snapshots(state, torch.ones(n_envs, dtype=torch.bool, device=model.device))


def observation(
    model: Model, state: TensorDict, executed: torch.Tensor, panic: torch.Tensor, components: TensorDict
) -> TensorDict:
    """What a step shows the controller (keys documented in `envs/morphogenetic.py`; the
    env adds its action noise): the observation vector, the action masks, the seeds'
    fields, the metrics (with `executed` `[N]` and the governor's `panic` `[N]`), the
    signals and the reward `components`; with a static twin, the critic's privileged
    columns (`features.observe_critic`)."""
    n = state.batch_size[0]
    slots = state["slots"]
    occupied_params = seed_param_count(model, slots)
    seeds = {key: slots[key] for key in SEED_KEYS if key != "improvement"}
    seeds["improvement"] = state["metrics", "val_accuracy"].unsqueeze(-1) - slots["acc_at_stage_start"]
    live_params = torch.where(stage_lookup(SEEDED, slots["stage"]), occupied_params, 0).sum(-1)
    critic = {"critic_observation": observe_critic(state)} if "static" in state.keys() else {}
    return TensorDict(
        {
            "observation": observe(model, state, state["signals"], model.config.lifecycle.max_epochs),
            **critic,
            "action_mask": action_masks(model, state),
            "seeds": TensorDict(seeds, batch_size=[n]),
            "metrics": TensorDict(
                {
                    **{key: state["metrics", key] for key in METRIC_KEYS},
                    "epoch": state["epoch"],
                    "action_executed": executed,
                    "illegal_actions": state["illegal_actions"],
                    "seed_params": live_params,
                    "rolled_back": panic != int(Panic.NONE),
                    "panic": panic,
                    "rollbacks": state["governor", "rollbacks"],
                },
                batch_size=[n],
            ),
            "signals": TensorDict({key: state["signals", key] for key in SIGNAL_KEYS}, batch_size=[n]),
            "reward_components": components,
        },
        batch_size=[n],
        device=model.device,
    )


def reset_observation(model: Model, rewards: RewardConfig, state: TensorDict) -> TensorDict:
    """The observation of a state no step led to: every action executed, no panic, zero
    reward components."""
    n = state.batch_size[0]
    device = model.device
    zero_components = TensorDict(
        {name: torch.zeros(n, device=device) for name in component_names(rewards)}, batch_size=[n]
    )
    executed = torch.ones(n, dtype=torch.bool, device=device)
    return observation(model, state, executed, torch.zeros(n, dtype=torch.int64, device=device), zero_components)


def step_env(
    functions: StepFunctions,
    rewards: RewardConfig,
    signals: SignalConfig,
    state: TensorDict,
    action: TensorDict,
    batches: Batches,
    generator: torch.Generator,
) -> tuple[TensorDict, TensorDict, torch.Tensor, torch.Tensor]:
    """One whole env step: `(observation, next state, reward [N], done [N])`.

    `env_step` (act, train, evaluate, check, tick, snapshot), the static twin's epoch
    when the reward reads it (`step_static_twin`), then the reward components
    (`compute_reward`; the reward is their `total`), the signals, the count of actions that
    could not execute, and the `observation`. The fixed horizon is a true termination (the
    observation carries the epoch fraction): `done` where the episode's last epoch ran.
    """
    model = functions.model
    next_state, metrics = env_step(functions, state, action, batches, generator)
    if rewards.static_baseline:
        with record_function("esper.static_twin"):
            next_state["static"] = step_static_twin(functions, state["static"], batches)
    done = next_state["epoch"] >= model.config.lifecycle.max_epochs
    with record_function("esper.reward"):
        components = compute_reward(rewards, model, state, next_state, action, metrics, done)
    with record_function("esper.observation"):
        next_state["signals"] = update_signals(signals, state["signals"], metrics)
        next_state["illegal_actions"] = state["illegal_actions"] + (~metrics["executed"]).long()
        out = observation(model, next_state, metrics["executed"], metrics["panic"], components)
    return out, next_state, total(components), done
