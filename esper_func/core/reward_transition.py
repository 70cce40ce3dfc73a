"""The transition a reward sees, and the per-stage lookup tables it reads.

`Transition` holds the tensors every component shares (`[N]` per env, `[N, S]` per slot),
built once per step by `make_transition`; the potential of potential-based shaping and the
per-op intervention cost are lookup tables indexed by stage and op."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from tensordict import TensorDict

from esper_func.core.model import Model
from esper_func.core.reward_config import RewardConfig
from esper_func.core.stages import (
    HOLDS_SEED,
    IN_FORWARD,
    LIVE,
    NUM_STAGE_VALUES,
    Op,
    Stage,
    lookup_table,
    on_device,
    stage_lookup,
)
from esper_func.core.state import seed_param_count

SEEDED = HOLDS_SEED
"""The slot holds a seed that has a potential and pays rent (live or fossilized)."""

ATTRIBUTED = lookup_table(LIVE & IN_FORWARD)
"""Seeds earning attribution: live and running in the forward (fossilized ones do not)."""

_ACTION_STAGE = lookup_table(
    torch.tensor([0, int(Stage.GERMINATED), int(Stage.CULLED), int(Stage.FOSSILIZED)], dtype=torch.int64)
)
"""Stage an executed op puts its slot in, indexed by op (WAIT's entry is never used)."""


@functools.cache
def stage_potential_table(config: RewardConfig) -> torch.Tensor:
    """`[NUM_STAGE_VALUES]` float32: `P[stage]`, 0 for stages that hold no seed (one
    cached tensor per config: treat it as read-only)."""
    table = torch.zeros(NUM_STAGE_VALUES, dtype=torch.float32)
    for stage, value in (
        (Stage.GERMINATED, config.potential_germinated),
        (Stage.TRAINING, config.potential_training),
        (Stage.BLENDING, config.potential_blending),
        (Stage.PROBATIONARY, config.potential_probationary),
        (Stage.FOSSILIZED, config.potential_fossilized),
    ):
        table[int(stage)] = value
    return lookup_table(table)


@functools.cache
def intervention_cost_table(config: RewardConfig) -> torch.Tensor:
    """`[len(Op)]` float32 reward term of each op (0 for WAIT, else minus its cost); family-aware
    (one cached tensor per config: treat it as read-only)."""
    if config.family == "simplified":
        costs = {op: config.simplified_action_cost for op in Op}
    else:
        costs = {Op.GERMINATE: config.germinate_cost, Op.CULL: config.cull_cost, Op.FOSSILIZE: config.fossilize_cost}
    return lookup_table(torch.tensor([0.0 if op == Op.WAIT else -costs[op] for op in Op], dtype=torch.float32))


STAGE_POTENTIAL = stage_potential_table(RewardConfig())
"""`P[stage]` of the default config."""

INTERVENTION_COST = intervention_cost_table(RewardConfig())
"""Reward term per op of the default config: WAIT 0, GERMINATE -0.02, CULL -0.005, FOSSILIZE -0.01."""


def potential(config: RewardConfig, slots: TensorDict) -> torch.Tensor:
    """`[N]` Phi summed over slots: `Phi = sum_s P[stage_s] + min(rate*k_s, cap)` for seeded
    stages (GERMINATED..FOSSILIZED) and 0 for empty or cooling-down ones, so stage jumps and
    culls are paid (potential_*, progress_per_epoch, progress_cap; `k` is `epochs_in_stage`
    of the state). The loss family has no in-stage progress term: `Phi = sum_s P[stage_s]`."""
    stage = slots["stage"]
    phi = stage_lookup(stage_potential_table(config), stage)
    if config.family != "loss":
        progress = (config.progress_per_epoch * slots["epochs_in_stage"]).clamp(max=config.progress_cap)
        phi = phi + torch.where(stage_lookup(SEEDED, stage), progress, 0.0)
    return phi.sum(-1)


def pbrs_shaping(
    config: RewardConfig, prev_slots: TensorDict, next_slots: TensorDict, is_last: torch.Tensor
) -> torch.Tensor:
    """`[N]` `w*(gamma*Phi(next) - Phi(prev))` (pbrs_weight; loss_pbrs_weight for the loss family).

    The last step is a true termination: `Phi(next) = 0` where `is_last`, so the shaping
    telescopes over an episode to `-w*Phi(s_0)`, whatever the stages, and leaves no residual
    in the return (v2)."""
    weight = config.loss_pbrs_weight if config.family == "loss" else config.pbrs_weight
    next_potential = torch.where(is_last, 0.0, potential(config, next_slots))
    return weight * (config.gamma * next_potential - potential(config, prev_slots))


@dataclass(frozen=True)
class Transition:
    """Tensors shared by the components; `[N]` per env, `[N, S]` per slot."""

    prev: TensorDict
    """prev_state's slots."""
    next: TensorDict
    """next_state's slots."""
    op: torch.Tensor
    """Executed op (WAIT where the action did not execute)."""
    acted: torch.Tensor
    """`[N, S]` the slot the executed op acted on (all False under WAIT)."""
    stage_run: torch.Tensor
    """`[N, S]` stage during the epoch (after the action, before the tick)."""
    epochs_run: torch.Tensor
    """`[N, S]` epochs in that stage, counting this one."""
    accuracy: torch.Tensor
    prev_accuracy: torch.Tensor
    static_gain: torch.Tensor
    """Accuracy the env's static twin gained this epoch (`RewardConfig.static_baseline`;
    0 without a twin)."""
    val_loss: torch.Tensor
    prev_val_loss: torch.Tensor
    contribution: torch.Tensor
    """`[N, S]` measured this epoch."""
    is_last: torch.Tensor
    rollback: torch.Tensor
    seed_params: torch.Tensor
    """`[N, S]` parameters of each next_state slot's seed (0 where it holds none)."""
    host_params: int


def make_transition(
    model: Model,
    prev_state: TensorDict,
    next_state: TensorDict,
    action: TensorDict,
    metrics: TensorDict,
    is_last: torch.Tensor,
    static_twin: bool,
) -> Transition:
    """The tensors the components share for the transition `prev_state -> next_state`:
    the executed op (WAIT where the action did not execute, `metrics["executed"]`), the
    acted-on slot, the stage during the epoch (after the action, before the tick), the
    epoch's metrics and, with a `static_twin` (`state["static"]`), its accuracy gain."""
    prev, nxt = prev_state["slots"], next_state["slots"]
    n_slots = prev.batch_size[1]
    op = torch.where(metrics["executed"], action["op"], int(Op.WAIT))
    acted = torch.nn.functional.one_hot(action["slot"].clamp(0, n_slots - 1), n_slots).bool()
    acted = acted & (op != int(Op.WAIT)).unsqueeze(-1)
    target = on_device(_ACTION_STAGE, op.device)[op].unsqueeze(-1)
    seeded_next = stage_lookup(SEEDED, nxt["stage"])
    return Transition(
        prev=prev,
        next=nxt,
        op=op,
        acted=acted,
        stage_run=torch.where(acted, target, prev["stage"]),
        epochs_run=torch.where(acted, 0, prev["epochs_in_stage"]) + 1,
        accuracy=metrics["val_accuracy"],
        prev_accuracy=prev_state["metrics", "val_accuracy"],
        static_gain=(
            next_state["static", "metrics", "val_accuracy"] - prev_state["static", "metrics", "val_accuracy"]
            if static_twin
            else torch.zeros_like(metrics["val_accuracy"])
        ),
        val_loss=metrics["val_loss"],
        prev_val_loss=prev_state["metrics", "val_loss"],
        contribution=metrics["contribution"],
        is_last=is_last,
        rollback=metrics["rolled_back"],
        seed_params=torch.where(seeded_next, seed_param_count(model, nxt), 0),
        host_params=model.host_param_count,
    )
