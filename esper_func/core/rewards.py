"""Rewards: one transition's reward as named components, pure and vectorized.

A transition is `prev_state --action--> next_state` (act, train one epoch, evaluate,
tick); its reward is computed after the step and is exactly `total(components)`, the sum
of the components below (normalization and scaling are transforms on top). Notation:
`op` is the executed op (an action that could not execute counts as WAIT, whatever its
heads say); `a` is the acted-on slot (there is none under WAIT, so WAIT's reward does not
depend on the slot head); `acc` is the epoch's validation accuracy (%); for a slot `s`,
`c_s` is its counterfactual contribution measured this epoch (pp), `T_s = acc -
acc_at_germination_s` the seed's improvement since germination (pp), `k_s` the epochs it
has spent in its stage counting this one, "during the epoch" means the stage after the
action and before the tick. Primed values (`c'_a`, `T'_a`, `k'_a`, `age'_a`) are the
acted-on slot's values in `prev_state`, the ones the decision saw. Every constant is a
`RewardConfig` field (named in parentheses).

Family "shaped" (default):
- `attribution` = sum of `A_s` over seeds GERMINATED, TRAINING, BLENDING or PROBATIONARY during the
  epoch, minus `A'_a` (contribution-based part only) when op = CULL: culling a helpful
  seed costs its attribution, culling a harmful one earns it. Contribution measured
  (BLENDING/PROBATIONARY): `A = w*c` if `c < 0`, else `w*(g*d + q)` with progress cap
  `g = 0` if `T <= 0`, `sqrt(T*c)` if `c >= T`, `c` otherwise; discount
  `d = sigmoid(steepness*T)` if `T < 0` else 1; ratio penalty `q` (0 unless anti_gaming,
  `c > min_contribution` and `d >= min_discount`): `-min(cap, slope*(c/T - thr)/thr)` if
  `T > min_improvement` and `c/T > thr`, `-cap*min(1, c/flat_scale)` if
  `T <= min_improvement`, else 0 (attribution_weight, discount_steepness,
  ratio_penalty_*). Not measured (GERMINATED, TRAINING): `A = proxy_weight * max(acc - acc_prev, 0)`.
- `blending_warning` = sum over BLENDING seeds with `T_s < 0` of
  `-(base + min(slope*k_s, cap))` (blending_warning_*).
- `probation_indecision` = sum over PROBATIONARY seeds with `k_s >= grace` and `A_s > 0`
  of `-min(base + slope*max(0, k_s - grace), cap)`: linear and capped
  (probation_grace_epochs, probation_penalty_*).
- `pbrs` = `w*(gamma*Phi(next_state) - Phi(prev_state))`, `Phi = sum_s P[stage_s] +
  min(rate*k_s, cap)` for seeded stages (GERMINATED..FOSSILIZED) and 0 for empty or
  cooling-down ones, so stage jumps and culls are paid (pbrs_weight, potential_*,
  progress_per_epoch, progress_cap; `k` is `epochs_in_stage` of the state). The last step
  is a true termination: `Phi(next_state) = 0` there, so the shaping telescopes to
  `-Phi(s_0)` over an episode and leaves no residual in the return (v2).
- `rent` = `-min(w*ln(1 + seed_params/host_params), cap)`, seed parameters of every slot
  holding a seed (fossilized included) in next_state (rent_weight, rent_cap).
- `action_shaping`: CULL: `-young*(1 - age'/young_age)` if `age' < young_age`; else, if
  `c'` was measured: `+harmful_bonus` if `c' < -harmful_threshold`, `+negative_bonus` if
  `c' < 0`, else `-min(base + slope*c', cap)`; unmeasured: 0 (cull_*). FOSSILIZE:
  `T' < 0`: `-(base + min(slope*|T'|, cap))`, minus `ransomware_penalty` if
  `c' > ransomware_min_contribution` and `T' < -ransomware_improvement`; else
  `(base_bonus + scale*c')*min(1, k'/legitimacy_epochs)` if `c' >= min_contribution`,
  `-weak_penalty` otherwise (fossilize_*). WAIT, GERMINATE: 0 (germination is paid by
  pbrs).
- `intervention_cost` = `INTERVENTION_COST[op]`: 0 for WAIT, minus the op's cost otherwise
  (germinate_cost, cull_cost, fossilize_cost).
- `terminal` (last step) = `w*acc + bonus*F`, F = fossilized seeds whose own smoothed
  counterfactual contribution (`contribution_ema`) is at least the minimum at the end,
  never the host's drift since germination (v2) (terminal_acc_weight,
  terminal_fossil_bonus, contributing_min_contribution).
- `governor` = `-governor_penalty` where the governor rolled the env back in this step.

Family "sparse": `sparse` (last step) = `scale*clamp(acc/100 - penalty*seed_params/budget,
-1, 1)` (clamped before scaling), `governor`. Family "minimal": sparse, plus
`action_shaping` = `-minimal_early_cull_penalty` for a CULL of a seed younger than
`minimal_early_cull_age`, `governor`. Family "simplified": `pbrs`, `intervention_cost` =
`-simplified_action_cost` for any op but WAIT, `terminal` = `w*acc + bonus*F`
(simplified_terminal_acc_weight, simplified_fossil_bonus), `governor`. Family "loss":
`loss_progress` = `-weight*n'` with `n = clamp((val_loss - val_loss_prev)/sigma, -clip,
clip)` and `n' = regression_scale*n` where `n > 0` (a loss decrease is rewarded),
`pbrs` with `Phi = sum_s P[stage_s]` (no progress term) and weight loss_pbrs_weight,
`rent` = `-min(w*ln(1 + growth), cap)` over seeds at least `loss_rent_min_age` epochs old,
`terminal` = `clamp((baseline - val_loss)/(baseline - target), 0, 1)`, `governor`.

Family "accuracy" (the learning preset's): `accuracy_progress` = `w*(acc - acc_prev)`,
whose sum over an episode is `w` times the final accuracy minus the first reading, so the
return is the accuracy the controller's network ends with, paid as it is earned
(accuracy_progress_weight); `rent` = `-r * sum_s seed_params_s / host_params`, every
step, for every slot holding a seed in next_state (fossils included): a seed must earn
`r / w` pp per host-size of parameters per epoch it lives (accuracy_rent_weight);
`governor`.

Ablations: `pbrs=False` zeroes `pbrs`, `terminal=False` zeroes `terminal` (the sparse
family's reward is its own terminal and is unaffected), `anti_gaming=False` zeroes the
ratio penalty `q`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
from tensordict import TensorDict

from esper_func.core.config import require
from esper_func.core.model import Model
from esper_func.core.stages import BLENDED, HOLDS_SEED, IN_FORWARD, LIVE, NUM_STAGE_VALUES, Op, Stage, lookup_table, on_device, stage_lookup
from esper_func.core.state import seed_param_count



@dataclass(frozen=True)
class RewardConfig:
    """Reward family, ablation switches and every constant of the formulas.

    Magnitudes are non-negative; the sign of each term is in its formula (module
    docstring). esper-lite's values, with a probation penalty linear (and capped) in the
    epochs past the grace period.
    """

    family: str = "shaped"
    """A built-in family ("shaped", "sparse", "minimal", "simplified", "loss") or one added
    with `register_reward_family`."""
    gamma: float = 0.995
    """Discount of the PBRS term; must equal the PPO gamma (validated by the run config)."""
    pbrs: bool = True
    terminal: bool = True
    anti_gaming: bool = True
    """The ratio penalty `q` of attribution (off: no penalty)."""

    attribution_weight: float = 1.0
    proxy_weight: float = 0.0
    """Attribution per pp of host accuracy gain for a seed in TRAINING, whose contribution is
    not measured. The reference paid 0.3; here 0: a TRAINING seed's output is the host's
    own (gradient isolation), its contribution is exactly 0, so it cannot have caused the
    gain, and paying it taught PPO to keep many seeds in TRAINING and cull them before they
    are measured (45 germinated, 0 fossilized in an early default run)."""
    discount_steepness: float = 10.0
    ratio_penalty_min_contribution: float = 1.0
    ratio_penalty_min_discount: float = 0.5
    ratio_penalty_min_improvement: float = 0.1
    ratio_penalty_threshold: float = 5.0
    ratio_penalty_slope: float = 0.1
    ratio_penalty_cap: float = 0.3
    ratio_penalty_flat_scale: float = 10.0

    blending_warning_base: float = 0.1
    blending_warning_slope: float = 0.05
    blending_warning_cap: float = 0.3

    probation_grace_epochs: int = 2
    probation_penalty_base: float = 0.1
    probation_penalty_slope: float = 0.05
    probation_penalty_cap: float = 0.3

    pbrs_weight: float = 0.3
    potential_germinated: float = 1.0
    potential_training: float = 2.0
    potential_blending: float = 3.5
    potential_probationary: float = 5.5
    potential_fossilized: float = 7.5
    """At least potential_probationary + progress_cap, so fossilizing never loses potential
    (the reference's 6.0 made PBRS charge a fossilization after two probation epochs)."""
    progress_per_epoch: float = 0.3
    progress_cap: float = 2.0

    rent_weight: float = 0.5
    rent_cap: float = 8.0

    cull_young_age: int = 1
    cull_young_penalty: float = 0.3
    cull_harmful_threshold: float = 0.5
    cull_harmful_bonus: float = 0.3
    cull_negative_bonus: float = 0.1
    cull_helpful_base: float = 0.3
    cull_helpful_slope: float = 0.05
    cull_helpful_cap: float = 0.9
    fossilize_negative_base: float = 0.5
    fossilize_negative_slope: float = 0.2
    fossilize_negative_cap: float = 1.0
    ransomware_penalty: float = 0.3
    ransomware_min_contribution: float = 0.1
    ransomware_improvement: float = 0.2
    fossilize_min_contribution: float = 1.0
    fossilize_base_bonus: float = 0.5
    fossilize_contribution_scale: float = 0.1
    fossilize_legitimacy_epochs: int = 5
    fossilize_weak_penalty: float = 0.2

    germinate_cost: float = 0.02
    cull_cost: float = 0.005
    fossilize_cost: float = 0.01

    terminal_acc_weight: float = 0.05
    """Per pp of final validation accuracy."""
    terminal_fossil_bonus: float = 3.0
    contributing_min_contribution: float = 1.0
    """Smoothed counterfactual contribution (pp) a fossil needs at the end to earn the bonus."""

    governor_penalty: float = 10.0

    sparse_scale: float = 1.0
    sparse_param_penalty: float = 0.1
    sparse_param_budget: int = 500_000
    minimal_early_cull_age: int = 5
    minimal_early_cull_penalty: float = 0.1

    simplified_action_cost: float = 0.01
    simplified_terminal_acc_weight: float = 0.03
    """Per pp (the reference's 3 * acc / 100)."""
    simplified_fossil_bonus: float = 2.0

    loss_sigma: float = 0.05
    """Typical epoch-to-epoch change of the validation loss (task-aware)."""
    loss_clip: float = 5.0
    loss_regression_scale: float = 0.5
    loss_progress_weight: float = 5.0
    loss_rent_weight: float = 0.05
    loss_rent_cap: float = 5.0
    loss_rent_min_age: int = 3
    loss_pbrs_weight: float = 0.1
    loss_baseline: float = 2.3
    """Validation loss that earns no terminal reward (random guessing; task-aware)."""
    loss_target: float = 0.3
    """Validation loss that earns the full terminal reward (task-aware)."""
    accuracy_progress_weight: float = 1.0
    """Family "accuracy": reward per pp of validation accuracy gained in an epoch."""
    accuracy_rent_weight: float = 0.05
    """Family "accuracy": rent per epoch per host-size of seed parameters (in the units of
    one pp of accuracy at weight 1). At 0.05 a seed the size of the host must add more
    than about 1 pp over a 25-epoch episode to pay for itself."""

    def __post_init__(self) -> None:
        require(
            self.family in _COMPONENTS,
            f"RewardConfig.family must be one of {list(_COMPONENTS)}, got {self.family!r}; "
            "add a family with esper_func.core.rewards.register_reward_family",
        )
        require(0.0 < self.gamma <= 1.0, f"RewardConfig.gamma must be in (0, 1], got {self.gamma}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (bool, str)):
                continue
            require(
                math.isfinite(value) and value >= 0,
                f"RewardConfig.{f.name} must be a finite number >= 0 (signs are in the formulas), got {value}",
            )
        for name in (
            "discount_steepness",
            "ratio_penalty_threshold",
            "ratio_penalty_flat_scale",
            "loss_sigma",
            "sparse_param_budget",
            "cull_young_age",
            "fossilize_legitimacy_epochs",
        ):
            require(getattr(self, name) > 0, f"RewardConfig.{name} must be > 0 (it divides), got {getattr(self, name)}")
        require(
            self.ratio_penalty_min_discount <= 1.0,
            f"RewardConfig.ratio_penalty_min_discount must be in [0, 1], got {self.ratio_penalty_min_discount}",
        )
        require(
            self.loss_baseline > self.loss_target,
            f"RewardConfig.loss_baseline ({self.loss_baseline}) must exceed loss_target ({self.loss_target})",
        )

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> RewardConfig:
        """Defaults with the task's loss scale (sigma, baseline, target, loss rent weight)."""
        require(task in _TASK_LOSS, f"RewardConfig.for_task: unknown task {task!r}; choose one of {sorted(_TASK_LOSS)}")
        return cls(**{**_TASK_LOSS[task], **overrides})


_CIFAR_LOSS: dict[str, float] = {"loss_sigma": 0.05, "loss_baseline": 2.3, "loss_target": 0.3, "loss_rent_weight": 0.05}
_TASK_LOSS: dict[str, dict[str, float]] = {
    "synthetic": _CIFAR_LOSS,  # 10-class classification, like CIFAR-10
    "cifar10": _CIFAR_LOSS,
    # Byte-level tokens: the random-guess loss is ln 256 (the reference's 10.8 was ln of GPT-2's vocabulary).
    "tinystories": {"loss_sigma": 0.15, "loss_baseline": 5.545, "loss_target": 1.5, "loss_rent_weight": 0.01},
}



# -- lookup tables -------------------------------------------------------------------------


SEEDED = HOLDS_SEED
"""The slot holds a seed that has a potential and pays rent (live or fossilized)."""

ATTRIBUTED = lookup_table(LIVE & IN_FORWARD)
"""Seeds earning attribution: live and running in the forward (fossilized ones do not)."""

_ACTION_STAGE = lookup_table(torch.tensor([0, int(Stage.GERMINATED), int(Stage.CULLED), int(Stage.FOSSILIZED)], dtype=torch.int64))
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




# -- potential-based shaping -----------------------------------------------------------------


def potential(config: RewardConfig, slots: TensorDict) -> torch.Tensor:
    """`[N]` Phi summed over slots. The loss family has no in-stage progress term."""
    stage = slots["stage"]
    phi = stage_lookup(stage_potential_table(config), stage)
    if config.family != "loss":
        progress = (config.progress_per_epoch * slots["epochs_in_stage"]).clamp(max=config.progress_cap)
        phi = phi + torch.where(stage_lookup(SEEDED, stage), progress, 0.0)
    return phi.sum(-1)


def pbrs_shaping(
    config: RewardConfig, prev_slots: TensorDict, next_slots: TensorDict, is_last: torch.Tensor
) -> torch.Tensor:
    """`[N]` w*(gamma*Phi(next) - Phi(prev)), with Phi(next) = 0 where `is_last` (the
    terminal state): telescopes over an episode to -w*Phi(s_0), whatever the stages."""
    weight = config.loss_pbrs_weight if config.family == "loss" else config.pbrs_weight
    next_potential = torch.where(is_last, 0.0, potential(config, next_slots))
    return weight * (config.gamma * next_potential - potential(config, prev_slots))


# -- the transition as the components see it ------------------------------------------------


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
    val_loss: torch.Tensor
    prev_val_loss: torch.Tensor
    contribution: torch.Tensor
    """`[N, S]` measured this epoch."""
    is_last: torch.Tensor
    rollback: torch.Tensor
    seed_params: torch.Tensor
    """`[N, S]` parameters of each next_state slot's seed (0 where it holds none)."""
    host_params: int


def _transition(
    model: Model,
    prev_state: TensorDict,
    next_state: TensorDict,
    action: TensorDict,
    executed: torch.Tensor,
    metrics: TensorDict,
    is_last: torch.Tensor,
    rollback: torch.Tensor | None,
) -> Transition:
    prev, nxt = prev_state["slots"], next_state["slots"]
    n_slots = prev.batch_size[1]
    op = torch.where(executed, action["op"], int(Op.WAIT))
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
        val_loss=metrics["val_loss"],
        prev_val_loss=prev_state["metrics", "val_loss"],
        contribution=metrics["contribution"],
        is_last=is_last,
        rollback=torch.zeros_like(executed) if rollback is None else rollback,
        seed_params=torch.where(seeded_next, seed_param_count(model, nxt), 0),
        host_params=model.host_param_count,
    )


def _sum_where(mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`[N]` sum over slots of `value` where `mask`."""
    return torch.where(mask, value, 0.0).sum(-1)


def _measured_attribution(config: RewardConfig, contribution: torch.Tensor, improvement: torch.Tensor) -> torch.Tensor:
    """Attribution of a seed whose contribution was measured (elementwise)."""
    c, t = contribution, improvement
    discount = torch.where(t < 0, torch.sigmoid(config.discount_steepness * t), 1.0)
    capped = torch.where(t <= 0, 0.0, torch.where(c >= t, torch.sqrt((t * c).clamp(min=0.0)), c))
    penalty = torch.zeros_like(c)
    if config.anti_gaming:
        threshold = config.ratio_penalty_threshold
        ratio = c / torch.where(t > config.ratio_penalty_min_improvement, t, 1.0)
        high = torch.where(
            ratio > threshold,
            -(config.ratio_penalty_slope * (ratio - threshold) / threshold).clamp(max=config.ratio_penalty_cap),
            0.0,
        )
        flat = -config.ratio_penalty_cap * (c / config.ratio_penalty_flat_scale).clamp(max=1.0)
        applies = (c > config.ratio_penalty_min_contribution) & (discount >= config.ratio_penalty_min_discount)
        penalty = torch.where(applies, torch.where(t > config.ratio_penalty_min_improvement, high, flat), 0.0)
    return config.attribution_weight * torch.where(c < 0, c, capped * discount + penalty)


def _improvement(slots: TensorDict, accuracy: torch.Tensor) -> torch.Tensor:
    """`[N, S]` accuracy gain (pp) since each slot's seed was germinated."""
    return accuracy.unsqueeze(-1) - slots["acc_at_germination"]


def _seed_attribution(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`[N, S]` attribution of each seed that ran during the epoch."""
    measured = _measured_attribution(config, t.contribution, _improvement(t.next, t.accuracy))
    gain = (t.accuracy - t.prev_accuracy).clamp(min=0.0).unsqueeze(-1)
    per_slot = torch.where(stage_lookup(BLENDED, t.stage_run), measured, config.proxy_weight * gain)
    return torch.where(stage_lookup(ATTRIBUTED, t.stage_run), per_slot, 0.0)


def _decision_measured(slots: TensorDict) -> torch.Tensor:
    """`[N, S]` the slot's stored contribution was measured (it was blended at that evaluation).

    A stage entered at the last tick has `epochs_in_stage == 0`; the evaluation before that
    tick ran under `prev_stage`.
    """
    evaluated = torch.where(slots["epochs_in_stage"] == 0, slots["prev_stage"], slots["stage"])
    return stage_lookup(BLENDED, evaluated)


def _acted(t: Transition, op: Op) -> torch.Tensor:
    return t.acted & (t.op == int(op)).unsqueeze(-1)


# -- components ------------------------------------------------------------------------------


def _attribution(config: RewardConfig, t: Transition) -> torch.Tensor:
    decided = _measured_attribution(config, t.prev["contribution"], _improvement(t.prev, t.prev_accuracy))
    culled = torch.where(_decision_measured(t.prev), decided, 0.0)
    return _seed_attribution(config, t).sum(-1) - _sum_where(_acted(t, Op.CULL), culled)


def _blending_warning(config: RewardConfig, t: Transition) -> torch.Tensor:
    declining = (t.stage_run == int(Stage.BLENDING)) & (_improvement(t.next, t.accuracy) < 0)
    ramp = (config.blending_warning_slope * t.epochs_run).clamp(max=config.blending_warning_cap)
    warning = -(config.blending_warning_base + ramp)
    return _sum_where(declining, warning)


def _probation_indecision(config: RewardConfig, t: Transition) -> torch.Tensor:
    grace = config.probation_grace_epochs
    holding = (
        (t.stage_run == int(Stage.PROBATIONARY)) & (t.epochs_run >= grace) & (_seed_attribution(config, t) > 0)
    )
    overdue = (t.epochs_run - grace).clamp(min=0)
    penalty = -(config.probation_penalty_base + config.probation_penalty_slope * overdue).clamp(
        max=config.probation_penalty_cap
    )
    return _sum_where(holding, penalty)


def _pbrs(config: RewardConfig, t: Transition) -> torch.Tensor:
    if not config.pbrs:
        return torch.zeros_like(t.accuracy)
    return pbrs_shaping(config, t.prev, t.next, t.is_last)


def _rent(t: Transition, weight: float, cap: float, params: torch.Tensor) -> torch.Tensor:
    """Log of the parameter growth `params` `[N, S]` brings to the host, capped."""
    growth = params.sum(-1) / t.host_params
    return -(weight * torch.log1p(growth)).clamp(max=cap)


def _shaped_rent(config: RewardConfig, t: Transition) -> torch.Tensor:
    return _rent(t, config.rent_weight, config.rent_cap, t.seed_params)


def _loss_rent(config: RewardConfig, t: Transition) -> torch.Tensor:
    aged = torch.where(t.next["epochs_total"] >= config.loss_rent_min_age, t.seed_params, 0)
    return _rent(t, config.loss_rent_weight, config.loss_rent_cap, aged)


def _cull_shaping(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`[N, S]` shaping for culling each slot's seed, from decision-time values."""
    age = t.prev["epochs_total"]
    c = t.prev["contribution"]
    young = -config.cull_young_penalty * (1 - age / config.cull_young_age)
    judged = torch.where(
        c < -config.cull_harmful_threshold,
        config.cull_harmful_bonus,
        torch.where(
            c < 0,
            config.cull_negative_bonus,
            -(config.cull_helpful_base + config.cull_helpful_slope * c).clamp(max=config.cull_helpful_cap),
        ),
    )
    return torch.where(age < config.cull_young_age, young, torch.where(_decision_measured(t.prev), judged, 0.0))


def _fossilize_shaping(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`[N, S]` shaping for fossilizing each slot's seed, from decision-time values."""
    c = t.prev["contribution"]
    improvement = _improvement(t.prev, t.prev_accuracy)
    ransom = (c > config.ransomware_min_contribution) & (improvement < -config.ransomware_improvement)
    shortfall = (config.fossilize_negative_slope * improvement.abs()).clamp(max=config.fossilize_negative_cap)
    declined = -(config.fossilize_negative_base + shortfall)
    declined = declined - torch.where(ransom, config.ransomware_penalty, 0.0)
    legitimacy = (t.prev["epochs_in_stage"] / config.fossilize_legitimacy_epochs).clamp(max=1.0)
    earned = torch.where(
        c >= config.fossilize_min_contribution,
        (config.fossilize_base_bonus + config.fossilize_contribution_scale * c) * legitimacy,
        -config.fossilize_weak_penalty,
    )
    return torch.where(improvement < 0, declined, earned)


def _shaped_action(config: RewardConfig, t: Transition) -> torch.Tensor:
    return _sum_where(_acted(t, Op.CULL), _cull_shaping(config, t)) + _sum_where(
        _acted(t, Op.FOSSILIZE), _fossilize_shaping(config, t)
    )


def _minimal_action(config: RewardConfig, t: Transition) -> torch.Tensor:
    early = _acted(t, Op.CULL) & (t.prev["epochs_total"] < config.minimal_early_cull_age)
    return torch.where(early.any(-1), -config.minimal_early_cull_penalty, 0.0)


def _intervention_cost(config: RewardConfig, t: Transition) -> torch.Tensor:
    return on_device(intervention_cost_table(config), t.op.device)[t.op]


def _contributing_fossils(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`[N]` fossilized seeds whose own smoothed counterfactual contribution reaches the minimum."""
    own = t.next["contribution_ema"]
    contributing = (t.next["stage"] == int(Stage.FOSSILIZED)) & (own >= config.contributing_min_contribution)
    return contributing.sum(-1).to(torch.float32)


def _final(config: RewardConfig, t: Transition, value: torch.Tensor) -> torch.Tensor:
    """`value` on the last step (if terminal rewards are on), 0 elsewhere."""
    if not config.terminal:
        return torch.zeros_like(value)
    return torch.where(t.is_last, value, 0.0)


def _shaped_terminal(config: RewardConfig, t: Transition) -> torch.Tensor:
    value = config.terminal_acc_weight * t.accuracy + config.terminal_fossil_bonus * _contributing_fossils(config, t)
    return _final(config, t, value)


def _simplified_terminal(config: RewardConfig, t: Transition) -> torch.Tensor:
    fossils = _contributing_fossils(config, t)
    value = config.simplified_terminal_acc_weight * t.accuracy + config.simplified_fossil_bonus * fossils
    return _final(config, t, value)


def _loss_terminal(config: RewardConfig, t: Transition) -> torch.Tensor:
    value = ((config.loss_baseline - t.val_loss) / (config.loss_baseline - config.loss_target)).clamp(0.0, 1.0)
    return _final(config, t, value)


def _loss_progress(config: RewardConfig, t: Transition) -> torch.Tensor:
    n = ((t.val_loss - t.prev_val_loss) / config.loss_sigma).clamp(-config.loss_clip, config.loss_clip)
    n = torch.where(n > 0, config.loss_regression_scale * n, n)
    return -config.loss_progress_weight * n


def _sparse(config: RewardConfig, t: Transition) -> torch.Tensor:
    base = t.accuracy / 100 - config.sparse_param_penalty * t.seed_params.sum(-1) / config.sparse_param_budget
    return torch.where(t.is_last, config.sparse_scale * base.clamp(-1.0, 1.0), 0.0)


def _accuracy_progress(config: RewardConfig, t: Transition) -> torch.Tensor:
    return config.accuracy_progress_weight * (t.accuracy - t.prev_accuracy)


def _accuracy_rent(config: RewardConfig, t: Transition) -> torch.Tensor:
    return -config.accuracy_rent_weight * t.seed_params.sum(-1).to(torch.float32) / t.host_params


def _governor(config: RewardConfig, t: Transition) -> torch.Tensor:
    return torch.where(t.rollback, -config.governor_penalty, 0.0)


Component = Callable[[RewardConfig, Transition], torch.Tensor]

_COMPONENTS: dict[str, dict[str, Component]] = {
    "shaped": {
        "attribution": _attribution,
        "blending_warning": _blending_warning,
        "probation_indecision": _probation_indecision,
        "pbrs": _pbrs,
        "rent": _shaped_rent,
        "action_shaping": _shaped_action,
        "intervention_cost": _intervention_cost,
        "terminal": _shaped_terminal,
        "governor": _governor,
    },
    "sparse": {"sparse": _sparse, "governor": _governor},
    "minimal": {"sparse": _sparse, "action_shaping": _minimal_action, "governor": _governor},
    "simplified": {
        "pbrs": _pbrs,
        "intervention_cost": _intervention_cost,
        "terminal": _simplified_terminal,
        "governor": _governor,
    },
    "loss": {
        "loss_progress": _loss_progress,
        "pbrs": _pbrs,
        "rent": _loss_rent,
        "terminal": _loss_terminal,
        "governor": _governor,
    },
    "accuracy": {"accuracy_progress": _accuracy_progress, "rent": _accuracy_rent, "governor": _governor},
}

FAMILY_COMPONENTS: dict[str, tuple[str, ...]] = {family: tuple(fns) for family, fns in _COMPONENTS.items()}
"""The fixed, ordered component keys of each built-in family."""


def reward_tables(config: RewardConfig) -> tuple[torch.Tensor, ...]:
    """The per-config tables a step under `config` looks up, made (and registered) when an
    env is built rather than at their first use inside a step."""
    return stage_potential_table(config), intervention_cost_table(config)


STAGE_POTENTIAL = stage_potential_table(RewardConfig())
"""`P[stage]` of the default config."""

INTERVENTION_COST = intervention_cost_table(RewardConfig())
"""Reward term per op of the default config: WAIT 0, GERMINATE -0.02, CULL -0.005, FOSSILIZE -0.01."""


def register_reward_family(name: str, components: dict[str, Component]) -> None:
    """Add a reward family: ordered components `fn(config, transition) -> [N] float32`,
    each a pure tensor function of `RewardConfig` and `Transition`. The `governor`
    component (the rollback penalty) is appended when missing, so that the reward stays
    exactly the sum of its components and a rollback is always penalized. Registering the
    same components again is a no-op; built-in families cannot be replaced."""
    require(name.isidentifier(), f"reward family name must be an identifier, got {name!r}")
    require(name not in FAMILY_COMPONENTS, f"{name!r} is a built-in reward family; pick another name")
    require(bool(components) and all(callable(fn) for fn in components.values()), "components must be a non-empty dict of callables")
    require(all(key.isidentifier() for key in components), f"component names must be identifiers, got {list(components)}")
    family = {**components}
    family.setdefault("governor", _governor)
    require(
        name not in _COMPONENTS or _COMPONENTS[name] == family,
        f"reward family {name!r} is already registered with other components; pick another name",
    )
    _COMPONENTS[name] = family


def component_names(config: RewardConfig) -> tuple[str, ...]:
    """The keys `compute_reward` returns for this config (for specs, without a probe)."""
    return tuple(_COMPONENTS[config.family])


def compute_reward(
    config: RewardConfig,
    model: Model,
    prev_state: TensorDict,
    next_state: TensorDict,
    action: TensorDict,
    executed: torch.Tensor,
    metrics: TensorDict,
    is_last: torch.Tensor,
    rollback: torch.Tensor | None = None,
) -> TensorDict:
    """Reward components `[N]` (float32) of the transition `prev_state -> next_state`.

    `action`: heads `op`, `slot` (others unused); `executed` `[N]` bool from `env_step`
    (False: rewarded as WAIT); `metrics`: the epoch's `val_accuracy`, `val_loss` `[N]` and
    `contribution` `[N, S]`; `is_last` `[N]` bool: the episode's last step; `rollback`
    `[N]` bool: the governor rolled the env back in this step (None: nowhere).
    `prev_state["metrics"]` must be the previous evaluation (the env evaluates at reset).
    Pure; no host sync; keys are `component_names(config)` in order.
    """
    t = _transition(model, prev_state, next_state, action, executed, metrics, is_last, rollback)
    components = {name: fn(config, t) for name, fn in _COMPONENTS[config.family].items()}
    return TensorDict(components, batch_size=prev_state.batch_size, device=prev_state.device)


def total(components: TensorDict) -> torch.Tensor:
    """`[N]` the reward: the components summed in key order (`sum(components.values())`)."""
    return reduce(operator.add, components.values())
