"""Rewards: one transition's reward as named components, pure and vectorized.

A transition is `prev_state --action--> next_state` (act, train one epoch, evaluate,
tick); its reward is computed after the step and is exactly `total(components)`, the sum
of its family's components (normalization and scaling are transforms on top). Each
component's formula is in the docstring of the function computing it
(`reward_components.py`, which also states the notation); the constants and the per-task
presets are `RewardConfig` fields (`reward_config.py`); the shared transition and the
stage tables are in `reward_transition.py`.

The families and their components, in order:
- "shaped" (default): `attribution`, `blending_warning`, `probation_indecision`, `pbrs`,
  `rent`, `action_shaping`, `intervention_cost`, `terminal`, `governor`;
- "sparse": `sparse`, `governor`;
- "minimal": `sparse`, `action_shaping` (early culls only), `governor`;
- "simplified": `pbrs`, `intervention_cost` (one cost for every op but WAIT), `terminal`,
  `governor`;
- "loss": `loss_progress`, `pbrs` (no progress term in the potential), `rent` (aged seeds
  only), `terminal` (from the validation loss), `governor`;
- "accuracy" (the learning preset's): `accuracy_progress`, `rent` (linear), `governor`.
"""

from __future__ import annotations

import operator
from functools import reduce

import torch
from tensordict import TensorDict

from esper_func.core.config import require
from esper_func.core.model import Model
from esper_func.core.reward_components import BUILTIN_COMPONENTS, Component, governor
from esper_func.core.reward_config import ADDED_FAMILIES, RewardConfig
from esper_func.core.reward_transition import intervention_cost_table, make_transition, stage_potential_table

FAMILY_COMPONENTS: dict[str, tuple[str, ...]] = {family: tuple(fns) for family, fns in BUILTIN_COMPONENTS.items()}
"""The fixed, ordered component keys of each built-in family."""


def reward_tables(config: RewardConfig) -> tuple[torch.Tensor, ...]:
    """The per-config tables a step under `config` looks up, made (and registered) when an
    env is built rather than at their first use inside a step."""
    return stage_potential_table(config), intervention_cost_table(config)


def _family(config: RewardConfig) -> dict[str, Component]:
    """The ordered components of `config`'s family, built-in or added."""
    return BUILTIN_COMPONENTS.get(config.family) or ADDED_FAMILIES[config.family]


def register_reward_family(name: str, components: dict[str, Component]) -> None:
    """Add a reward family: ordered components `fn(config, transition) -> [N] float32`,
    each a pure tensor function of `RewardConfig` and `Transition`. The `governor`
    component (the rollback penalty) is appended when missing, so that the reward stays
    exactly the sum of its components and a rollback is always penalized. Registering the
    same components again is a no-op; built-in families cannot be replaced."""
    require(name.isidentifier(), f"reward family name must be an identifier, got {name!r}")
    require(name not in FAMILY_COMPONENTS, f"{name!r} is a built-in reward family; pick another name")
    require(
        bool(components) and all(callable(fn) for fn in components.values()),
        "components must be a non-empty dict of callables",
    )
    require(
        all(key.isidentifier() for key in components), f"component names must be identifiers, got {list(components)}"
    )
    family = {**components}
    family.setdefault("governor", governor)
    require(
        name not in ADDED_FAMILIES or ADDED_FAMILIES[name] == family,
        f"reward family {name!r} is already registered with other components; pick another name",
    )
    ADDED_FAMILIES[name] = family


def component_names(config: RewardConfig) -> tuple[str, ...]:
    """The keys `compute_reward` returns for this config (for specs, without a probe)."""
    return tuple(_family(config))


def compute_reward(
    config: RewardConfig,
    model: Model,
    prev_state: TensorDict,
    next_state: TensorDict,
    action: TensorDict,
    metrics: TensorDict,
    is_last: torch.Tensor,
) -> TensorDict:
    """Reward components `[N]` (float32) of the transition `prev_state -> next_state`.

    `action`: heads `op`, `slot` (others unused); `metrics`: the epoch's, from `env_step`:
    `val_accuracy`, `val_loss` `[N]`, `contribution` `[N, S]`, `executed` `[N]` bool (False:
    rewarded as WAIT) and `rolled_back` `[N]` bool (the governor rolled the env back in
    this step); `is_last` `[N]` bool: the episode's last step. `prev_state["metrics"]` must
    be the previous evaluation (the env evaluates at reset); with `static_baseline` both
    states hold the static twin (`step.step_static_twin`). Pure; no host sync; keys are
    `component_names(config)` in order.
    """
    t = make_transition(model, prev_state, next_state, action, metrics, is_last, config.static_baseline)
    components = {name: fn(config, t) for name, fn in _family(config).items()}
    return TensorDict(components, batch_size=prev_state.batch_size, device=prev_state.device)


def total(components: TensorDict) -> torch.Tensor:
    """`[N]` the reward: the components summed in key order (`sum(components.values())`)."""
    return reduce(operator.add, components.values())
