"""Pure lifecycle transitions: the controller's action, and the end-of-epoch tick.

One env step is `apply_action` -> `train_epoch` -> `evaluate` -> `tick`. Both functions
here take a state and return a new one; inputs are never modified. Every decision is a
tensor expression over all envs and slots (no Python branch on data, no host sync).

Transitions (docs/architecture.md has the diagram and the rules):
- action: GERMINATE (DORMANT slot) -> GERMINATED with a fresh seed and optimizer state;
  CULL (live stage, age >= min_cull_age) -> CULLED; FOSSILIZE (PROBATIONARY and G5:
  smoothed contribution >= fossilize_min_contribution) -> FOSSILIZED. An action that is not legal
  is not executed: the env behaves as under WAIT and `executed` is False for it.
- tick: GERMINATED -> TRAINING (the seed ran straight-through in its germination epoch;
  its update is withheld until BLENDING, `stages.SEED_TRAINABLE`);
  TRAINING -> BLENDING once the seed is `training_epochs` old and G2 (gradient-ratio EMA
  >= threshold) holds, TRAINING -> CULLED at `training_timeout` without G2; BLENDING ->
  PROBATIONARY after `blend_steps` epochs (alpha has reached exactly 1); PROBATIONARY ->
  CULLED when the smoothed contribution is <= 0 after `probation_judge_epochs`, or after
  `probation_timeout` epochs; CULLED -> EMBARGOED -> (embargo_epochs) -> RESETTING ->
  (reset_epochs) -> DORMANT.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from esper_func.core.blending import alpha_schedule
from esper_func.core.initialization import draw_parameters
from esper_func.core.model import Model
from esper_func.core.stages import COUNTS_AGE, LIVE, BlendMode, Op, Stage, stage_lookup


def _record_transition(
    slots: TensorDict, changed: torch.Tensor, new_stage: torch.Tensor, accuracy: torch.Tensor
) -> TensorDict:
    """Stage bookkeeping shared by every transition: previous stage, its epochs, baselines."""
    return slots.update(
        {
            "prev_stage": torch.where(changed, slots["stage"], slots["prev_stage"]),
            "prev_epochs_in_stage": torch.where(changed, slots["epochs_in_stage"], slots["prev_epochs_in_stage"]),
            "epochs_in_stage": torch.where(changed, 0, slots["epochs_in_stage"]),
            "acc_at_stage_start": torch.where(changed, accuracy, slots["acc_at_stage_start"]),
            "stage": new_stage,
        }
    )


def slot_op_legality(model: Model, state: TensorDict) -> torch.Tensor:
    """`[N, len(Op), S]` bool: op `o` can be executed at slot `s` (blueprint and blend aside).

    The single source of legality: `action_legality` and the action masks both derive from
    it. WAIT is legal at every slot (its slot is ignored).
    """
    slots = state["slots"]
    stage = slots["stage"]
    lifecycle = model.config.lifecycle
    wait = torch.ones_like(stage, dtype=torch.bool)
    germinate = stage == int(Stage.DORMANT)
    cull = stage_lookup(LIVE, stage) & (slots["epochs_total"] >= lifecycle.min_cull_age)
    fossilize = (stage == int(Stage.PROBATIONARY)) & (slots["contribution_ema"] >= lifecycle.fossilize_min_contribution)
    by_op = {Op.WAIT: wait, Op.GERMINATE: germinate, Op.CULL: cull, Op.FOSSILIZE: fossilize}
    return torch.stack([by_op[op] for op in Op], dim=-2)


def action_legality(model: Model, state: TensorDict, action: TensorDict) -> torch.Tensor:
    """`[N]` bool: the action can be executed as given (WAIT always can)."""
    n_slots = model.n_slots
    op, slot = action["op"], action["slot"]
    op_ok = (op >= 0) & (op < len(Op))
    slot_ok = (slot >= 0) & (slot < n_slots)
    legal = slot_op_legality(model, state)
    index = torch.stack((op.clamp(0, len(Op) - 1), slot.clamp(0, n_slots - 1)), dim=-1)
    at = legal[torch.arange(op.shape[0], device=op.device), index[:, 0], index[:, 1]]
    blueprint_ok = (action["blueprint"] >= 0) & (action["blueprint"] < len(model.blueprint_names))
    blend_ok = (action["blend"] >= 0) & (action["blend"] < len(BlendMode))
    germinate_args_ok = (op != int(Op.GERMINATE)) | (blueprint_ok & blend_ok)
    return (op == int(Op.WAIT)) | (op_ok & slot_ok & at & germinate_args_ok)


def apply_action(
    model: Model, state: TensorDict, action: TensorDict, generator: torch.Generator
) -> tuple[TensorDict, torch.Tensor]:
    """Execute one action per env. Returns the new state and `executed` `[N]` bool.

    Germination draws fresh parameters for the slot's whole seed bank (and zeroes its
    momentum) from `generator`; fresh values are drawn for every env and slot so that the
    draw does not depend on the actions (no host sync), and kept only where germinated.
    """
    slots = state["slots"]
    n_envs, n_slots = slots.batch_size
    executed = action_legality(model, state, action)
    op = torch.where(executed, action["op"], int(Op.WAIT))
    at_slot = torch.nn.functional.one_hot(action["slot"].clamp(0, n_slots - 1), n_slots).bool()
    germinate = at_slot & (op == int(Op.GERMINATE)).unsqueeze(-1)
    cull = at_slot & (op == int(Op.CULL)).unsqueeze(-1)
    fossilize = at_slot & (op == int(Op.FOSSILIZE)).unsqueeze(-1)

    stage = slots["stage"]
    new_stage = torch.where(germinate, int(Stage.GERMINATED), stage)
    new_stage = torch.where(cull, int(Stage.CULLED), new_stage)
    new_stage = torch.where(fossilize, int(Stage.FOSSILIZED), new_stage)
    accuracy = state["metrics", "val_accuracy"].unsqueeze(-1).expand(n_envs, n_slots)

    new_slots = _record_transition(slots.clone(), germinate | cull | fossilize, new_stage, accuracy)
    zero_f = torch.zeros_like(slots["alpha"])
    new_slots.update(
        {
            "blueprint": torch.where(germinate, action["blueprint"].unsqueeze(-1), slots["blueprint"]),
            "blend": torch.where(germinate, action["blend"].unsqueeze(-1), slots["blend"]),
            "alpha": torch.where(germinate | cull, zero_f, torch.where(fossilize, 1.0, slots["alpha"])),
            "blend_step": torch.where(germinate | cull, 0, slots["blend_step"]),
            "epochs_total": torch.where(germinate, 0, slots["epochs_total"]),
            "acc_at_germination": torch.where(germinate, accuracy, slots["acc_at_germination"]),
            "contribution": torch.where(germinate, zero_f, slots["contribution"]),
            "contribution_ema": torch.where(germinate, zero_f, slots["contribution_ema"]),
            "grad_ratio_ema": torch.where(germinate, zero_f, slots["grad_ratio_ema"]),
            "grad_ratio_seen": slots["grad_ratio_seen"] & ~germinate,
        }
    )

    params = state["params"].clone(recurse=False)
    momentum = state["momentum"].clone(recurse=False)
    for s, names in enumerate(model.slot_param_names):
        fresh = draw_parameters(model.net_train, names, n_envs, generator, model.device)
        renew = germinate[:, s]
        reset_momentum = renew | cull[:, s]
        for name in names:
            shape = (n_envs,) + (1,) * (params[name].dim() - 1)
            params[name] = torch.where(renew.view(shape), fresh[name], params[name])
            momentum[name] = torch.where(reset_momentum.view(shape), 0.0, momentum[name])

    new_state = state.clone(recurse=False)
    new_state["slots"] = new_slots
    new_state["params"] = params
    new_state["momentum"] = momentum
    return new_state, executed


def tick(model: Model, state: TensorDict, metrics: TensorDict) -> TensorDict:
    """End-of-epoch mechanics: record metrics, advance counters, automatic transitions, alpha.

    `metrics` `[N]`: `train_loss`, `val_loss`, `val_accuracy` (percent), `contribution`
    `[N, S]` (pp) and `grad_ratio` `[N, S]` (epoch mean), as returned by the train and
    evaluation steps. Each slot moves at most one stage per tick, decided from the stage
    it held when the tick began.
    """
    config = model.config.lifecycle
    slots = state["slots"]
    n_envs, n_slots = slots.batch_size
    stage = slots["stage"]
    accuracy = metrics["val_accuracy"].unsqueeze(-1).expand(n_envs, n_slots)
    contribution = metrics["contribution"]

    ratio_tracked = (stage == int(Stage.GERMINATED)) | (stage == int(Stage.TRAINING)) | (stage == int(Stage.BLENDING))
    seen = slots["grad_ratio_seen"]
    decay = config.grad_ratio_ema_decay
    ema = torch.where(
        ratio_tracked,
        torch.where(seen, decay * slots["grad_ratio_ema"] + (1 - decay) * metrics["grad_ratio"], metrics["grad_ratio"]),
        slots["grad_ratio_ema"],
    )

    epochs_in_stage = torch.where(stage == int(Stage.DORMANT), 0, slots["epochs_in_stage"] + 1)
    epochs_total = torch.where(stage_lookup(COUNTS_AGE, stage), slots["epochs_total"] + 1, slots["epochs_total"])

    to_training = stage == int(Stage.GERMINATED)
    learning = ema >= config.grad_ratio_threshold
    in_training = stage == int(Stage.TRAINING)
    to_blending = in_training & (epochs_total >= config.training_epochs) & learning
    training_timeout = in_training & (epochs_total >= config.training_timeout) & ~learning
    to_probation = (stage == int(Stage.BLENDING)) & (epochs_in_stage >= config.blend_steps)
    # The smoothed contribution: restarted with the first measurement at alpha 1 (the last
    # BLENDING epoch runs at alpha 1), then an EMA while PROBATIONARY or FOSSILIZED.
    at_full_alpha = (stage == int(Stage.PROBATIONARY)) | (stage == int(Stage.FOSSILIZED))
    smoothing = config.contribution_ema_decay
    contribution_ema = torch.where(
        to_probation,
        contribution,
        torch.where(
            at_full_alpha,
            smoothing * slots["contribution_ema"] + (1 - smoothing) * contribution,
            slots["contribution_ema"],
        ),
    )
    probation_cull = (stage == int(Stage.PROBATIONARY)) & (
        ((epochs_in_stage >= config.probation_judge_epochs) & (contribution_ema <= 0))
        | (epochs_in_stage >= config.probation_timeout)
    )
    to_embargo = stage == int(Stage.CULLED)
    to_resetting = (stage == int(Stage.EMBARGOED)) & (epochs_in_stage >= config.embargo_epochs)
    to_dormant = (stage == int(Stage.RESETTING)) & (epochs_in_stage >= config.reset_epochs)

    new_stage = stage
    for condition, target in (
        (to_training, Stage.TRAINING),
        (to_blending, Stage.BLENDING),
        (to_probation, Stage.PROBATIONARY),
        (training_timeout, Stage.CULLED),
        (probation_cull, Stage.CULLED),
        (to_embargo, Stage.EMBARGOED),
        (to_resetting, Stage.RESETTING),
        (to_dormant, Stage.DORMANT),
    ):
        new_stage = torch.where(condition, int(target), new_stage)
    changed = new_stage != stage

    blending = new_stage == int(Stage.BLENDING)
    blend_step = torch.where(blending, torch.where(to_blending, 1, epochs_in_stage + 1), slots["blend_step"])
    blend_step = torch.where(probation_cull | to_dormant, 0, blend_step)
    scheduled = alpha_schedule(slots["blend"], blend_step, config.blend_steps, config.sigmoid_steepness)
    alpha = torch.where(blending, scheduled, slots["alpha"])
    alpha = torch.where(new_stage == int(Stage.PROBATIONARY), 1.0, alpha)
    alpha = torch.where(probation_cull | to_dormant, 0.0, alpha)

    new_slots = slots.clone()
    new_slots.update(
        {
            "epochs_in_stage": epochs_in_stage,
            "epochs_total": torch.where(to_dormant, 0, epochs_total),
            "contribution": contribution,
            "contribution_ema": contribution_ema,
            "grad_ratio_ema": ema,
            "grad_ratio_seen": seen | ratio_tracked,
            "blend_step": blend_step,
            "alpha": alpha,
        }
    )
    new_slots = _record_transition(new_slots, changed, new_stage, accuracy)
    new_slots["embargo_remaining"] = torch.where(
        new_stage == int(Stage.EMBARGOED), config.embargo_epochs - new_slots["epochs_in_stage"], 0
    )

    new_state = state.clone(recurse=False)
    new_state["slots"] = new_slots
    new_state["metrics"] = TensorDict(
        {key: metrics[key] for key in ("val_accuracy", "val_loss", "train_loss")}, batch_size=[n_envs]
    )
    new_state["epoch"] = state["epoch"] + 1
    return new_state
