"""The reward components: pure tensor functions `fn(config, transition) -> [N]` float32,
each with its formula in its docstring; `BUILTIN_COMPONENTS` groups them into the families.

Notation: `op` is the executed op (an action that could not execute counts as WAIT,
whatever its heads say); `a` is the acted-on slot (there is none under WAIT, so WAIT's
reward does not depend on the slot head); `acc` is the epoch's validation accuracy (%);
for a slot `s`, `c_s` is its counterfactual contribution measured this epoch (pp),
`T_s = acc - acc_at_germination_s` the seed's improvement since germination (pp), `k_s`
the epochs it has spent in its stage counting this one, "during the epoch" means the
stage after the action and before the tick. Primed values (`c'_a`, `T'_a`, `k'_a`,
`age'_a`) are the acted-on slot's values in `prev_state`, the ones the decision saw.
Every constant is a `RewardConfig` field (named in parentheses).

Ablations: `pbrs=False` zeroes `pbrs`, `terminal=False` zeroes `terminal` (the sparse
family's reward is its own terminal and is unaffected), `anti_gaming=False` zeroes the
ratio penalty `q` of attribution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict

from esper_func.core.reward_config import RewardConfig
from esper_func.core.reward_transition import ATTRIBUTED, Transition, intervention_cost_table, pbrs_shaping
from esper_func.core.stages import BLENDED, Op, Stage, on_device, stage_lookup


def _sum_where(mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`[N]` sum over slots of `value` where `mask`."""
    return torch.where(mask, value, 0.0).sum(-1)


def _measured_attribution(config: RewardConfig, contribution: torch.Tensor, improvement: torch.Tensor) -> torch.Tensor:
    """Attribution `A` of a seed whose contribution was measured (BLENDING, PROBATIONARY), elementwise.

    `A = w*c` if `c < 0`, else `w*(g*d + q)` with progress cap `g = 0` if `T <= 0`,
    `sqrt(T*c)` if `c >= T`, `c` otherwise; discount `d = sigmoid(steepness*T)` if `T < 0`
    else 1; ratio penalty `q` (0 unless anti_gaming, `c > min_contribution` and
    `d >= min_discount`): `-min(cap, slope*(c/T - thr)/thr)` if `T > min_improvement` and
    `c/T > thr`, `-cap*min(1, c/flat_scale)` if `T <= min_improvement`, else 0
    (attribution_weight, discount_steepness, ratio_penalty_*)."""
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
    """`[N, S]` attribution `A_s` of each seed that ran during the epoch: measured
    (`_measured_attribution`) in BLENDING and PROBATIONARY; not measured (GERMINATED,
    TRAINING): `A = proxy_weight * max(acc - acc_prev, 0)`."""
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
    """`attribution` = sum of `A_s` over seeds GERMINATED, TRAINING, BLENDING or PROBATIONARY
    during the epoch, minus `A'_a` (contribution-based part only) when op = CULL: culling a
    helpful seed costs its attribution, culling a harmful one earns it."""
    decided = _measured_attribution(config, t.prev["contribution"], _improvement(t.prev, t.prev_accuracy))
    culled = torch.where(_decision_measured(t.prev), decided, 0.0)
    return _seed_attribution(config, t).sum(-1) - _sum_where(_acted(t, Op.CULL), culled)


def _blending_warning(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`blending_warning` = sum over BLENDING seeds with `T_s < 0` of
    `-(base + min(slope*k_s, cap))` (blending_warning_*)."""
    declining = (t.stage_run == int(Stage.BLENDING)) & (_improvement(t.next, t.accuracy) < 0)
    ramp = (config.blending_warning_slope * t.epochs_run).clamp(max=config.blending_warning_cap)
    warning = -(config.blending_warning_base + ramp)
    return _sum_where(declining, warning)


def _probation_indecision(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`probation_indecision` = sum over PROBATIONARY seeds with `k_s >= grace` and `A_s > 0`
    of `-min(base + slope*max(0, k_s - grace), cap)`: linear and capped
    (probation_grace_epochs, probation_penalty_*)."""
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
    """`pbrs` = `pbrs_shaping` of the slots before and after (0 with the `pbrs` ablation)."""
    if not config.pbrs:
        return torch.zeros_like(t.accuracy)
    return pbrs_shaping(config, t.prev, t.next, t.is_last)


def _rent(t: Transition, weight: float, cap: float, params: torch.Tensor) -> torch.Tensor:
    """Log of the parameter growth `params` `[N, S]` brings to the host, capped."""
    growth = params.sum(-1) / t.host_params
    return -(weight * torch.log1p(growth)).clamp(max=cap)


def _shaped_rent(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`rent` (shaped) = `-min(w*ln(1 + seed_params/host_params), cap)`, seed parameters of every
    slot holding a seed (fossilized included) in next_state (rent_weight, rent_cap)."""
    return _rent(t, config.rent_weight, config.rent_cap, t.seed_params)


def _loss_rent(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`rent` (loss) = `-min(w*ln(1 + growth), cap)` over seeds at least `loss_rent_min_age`
    epochs old (loss_rent_weight, loss_rent_cap, loss_rent_min_age)."""
    aged = torch.where(t.next["epochs_total"] >= config.loss_rent_min_age, t.seed_params, 0)
    return _rent(t, config.loss_rent_weight, config.loss_rent_cap, aged)


def _cull_shaping(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`[N, S]` shaping for culling each slot's seed, from decision-time values:
    `-young*(1 - age'/young_age)` if `age' < young_age`; else, if `c'` was measured:
    `+harmful_bonus` if `c' < -harmful_threshold`, `+negative_bonus` if `c' < 0`, else
    `-min(base + slope*c', cap)`; unmeasured: 0 (cull_*)."""
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
    """`[N, S]` shaping for fossilizing each slot's seed, from decision-time values:
    `T' < 0`: `-(base + min(slope*|T'|, cap))`, minus `ransomware_penalty` if
    `c' > ransomware_min_contribution` and `T' < -ransomware_improvement`; else
    `(base_bonus + scale*c')*min(1, k'/legitimacy_epochs)` if `c' >= min_contribution`,
    `-weak_penalty` otherwise (fossilize_*)."""
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
    """`action_shaping` (shaped): CULL pays the acted-on slot's `_cull_shaping`, FOSSILIZE its
    `_fossilize_shaping`; WAIT and GERMINATE 0 (germination is paid by pbrs)."""
    return _sum_where(_acted(t, Op.CULL), _cull_shaping(config, t)) + _sum_where(
        _acted(t, Op.FOSSILIZE), _fossilize_shaping(config, t)
    )


def _minimal_action(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`action_shaping` (minimal) = `-minimal_early_cull_penalty` for a CULL of a seed younger
    than `minimal_early_cull_age`."""
    early = _acted(t, Op.CULL) & (t.prev["epochs_total"] < config.minimal_early_cull_age)
    return torch.where(early.any(-1), -config.minimal_early_cull_penalty, 0.0)


def _intervention_cost(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`intervention_cost` = `INTERVENTION_COST[op]`: 0 for WAIT, minus the op's cost otherwise
    (germinate_cost, cull_cost, fossilize_cost); the simplified family's is
    `-simplified_action_cost` for any op but WAIT."""
    return on_device(intervention_cost_table(config), t.op.device)[t.op]


def _contributing_fossils(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`[N]` F: fossilized seeds whose own smoothed counterfactual contribution
    (`contribution_ema`) reaches the minimum at the end, never the host's drift since
    germination (v2) (contributing_min_contribution)."""
    own = t.next["contribution_ema"]
    contributing = (t.next["stage"] == int(Stage.FOSSILIZED)) & (own >= config.contributing_min_contribution)
    return contributing.sum(-1).to(torch.float32)


def _final(config: RewardConfig, t: Transition, value: torch.Tensor) -> torch.Tensor:
    """`value` on the last step (if terminal rewards are on), 0 elsewhere."""
    if not config.terminal:
        return torch.zeros_like(value)
    return torch.where(t.is_last, value, 0.0)


def _shaped_terminal(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`terminal` (shaped, last step) = `w*acc + bonus*F`, F from `_contributing_fossils`
    (terminal_acc_weight, terminal_fossil_bonus)."""
    value = config.terminal_acc_weight * t.accuracy + config.terminal_fossil_bonus * _contributing_fossils(config, t)
    return _final(config, t, value)


def _simplified_terminal(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`terminal` (simplified, last step) = `w*acc + bonus*F`
    (simplified_terminal_acc_weight, simplified_fossil_bonus)."""
    fossils = _contributing_fossils(config, t)
    value = config.simplified_terminal_acc_weight * t.accuracy + config.simplified_fossil_bonus * fossils
    return _final(config, t, value)


def _loss_terminal(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`terminal` (loss, last step) = `clamp((baseline - val_loss)/(baseline - target), 0, 1)`
    (loss_baseline, loss_target)."""
    value = ((config.loss_baseline - t.val_loss) / (config.loss_baseline - config.loss_target)).clamp(0.0, 1.0)
    return _final(config, t, value)


def _loss_progress(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`loss_progress` = `-weight*n'` with `n = clamp((val_loss - val_loss_prev)/sigma, -clip,
    clip)` and `n' = regression_scale*n` where `n > 0`: a loss decrease is rewarded
    (loss_progress_weight, loss_sigma, loss_clip, loss_regression_scale)."""
    n = ((t.val_loss - t.prev_val_loss) / config.loss_sigma).clamp(-config.loss_clip, config.loss_clip)
    n = torch.where(n > 0, config.loss_regression_scale * n, n)
    return -config.loss_progress_weight * n


def _sparse(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`sparse` (last step) = `scale*clamp(acc/100 - penalty*seed_params/budget, -1, 1)`, clamped
    before scaling (sparse_scale, sparse_param_penalty, sparse_param_budget)."""
    base = t.accuracy / 100 - config.sparse_param_penalty * t.seed_params.sum(-1) / config.sparse_param_budget
    return torch.where(t.is_last, config.sparse_scale * base.clamp(-1.0, 1.0), 0.0)


def _accuracy_progress(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`accuracy_progress` = `w*(acc - acc_prev)`, whose sum over an episode is `w` times the
    final accuracy minus the first reading, so the return is the accuracy the controller's
    network ends with, paid as it is earned (accuracy_progress_weight). With
    `static_baseline`, `w*((acc - acc_prev) - (acc_static - acc_static_prev))`: the twin
    starts from the same host, so the sum is `w` times the final accuracy's gain over the
    static twin's."""
    return config.accuracy_progress_weight * (t.accuracy - t.prev_accuracy - t.static_gain)


def _accuracy_rent(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`rent` (accuracy) = `-r * sum_s seed_params_s / host_params`, every step, for every slot
    holding a seed in next_state (fossils included): a seed must earn `r / w` pp per
    host-size of parameters per epoch it lives (accuracy_rent_weight)."""
    return -config.accuracy_rent_weight * t.seed_params.sum(-1).to(torch.float32) / t.host_params


def governor(config: RewardConfig, t: Transition) -> torch.Tensor:
    """`governor` = `-governor_penalty` where the governor rolled the env back in this step."""
    return torch.where(t.rollback, -config.governor_penalty, 0.0)


Component = Callable[[RewardConfig, Transition], torch.Tensor]


BUILTIN_COMPONENTS: dict[str, dict[str, Component]] = {
    "shaped": {
        "attribution": _attribution,
        "blending_warning": _blending_warning,
        "probation_indecision": _probation_indecision,
        "pbrs": _pbrs,
        "rent": _shaped_rent,
        "action_shaping": _shaped_action,
        "intervention_cost": _intervention_cost,
        "terminal": _shaped_terminal,
        "governor": governor,
    },
    "sparse": {"sparse": _sparse, "governor": governor},
    "minimal": {"sparse": _sparse, "action_shaping": _minimal_action, "governor": governor},
    "simplified": {
        "pbrs": _pbrs,
        "intervention_cost": _intervention_cost,
        "terminal": _simplified_terminal,
        "governor": governor,
    },
    "loss": {
        "loss_progress": _loss_progress,
        "pbrs": _pbrs,
        "rent": _loss_rent,
        "terminal": _loss_terminal,
        "governor": governor,
    },
    "accuracy": {"accuracy_progress": _accuracy_progress, "rent": _accuracy_rent, "governor": governor},
}
"""The built-in families' ordered components (`reward_config.BUILTIN_FAMILIES`, in that order)."""
