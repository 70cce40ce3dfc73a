"""The environment state schema, in one place, and its initialization.

State is one `TensorDict` with batch size `[N]` (N environments):

| key | shape | dtype | meaning |
|---|---|---|---|
| `("params", name)` | `[N, *shape]` | float32 | host and seed-bank parameters, keyed by dotted module path (`host.*`, `banks.<slot>.blueprints.<name>.*`, `banks.<slot>.gate.*`) |
| `("buffers", name)` | `[N, *shape]` | float32 / int64 | BatchNorm running statistics and batch counts of the host |
| `("momentum", name)` | `[N, *shape]` | float32 | SGD momentum buffer of each parameter (zero when fresh) |
| `("slots", field)` | `[N, S]` | see `SLOT_FIELDS` | lifecycle state per slot, slots in canonical order early, mid, late |
| `("metrics", "val_accuracy")` | `[N]` | float32 | latest validation accuracy, percent |
| `("metrics", "val_loss")` | `[N]` | float32 | latest validation loss |
| `("metrics", "train_loss")` | `[N]` | float32 | mean training loss of the latest epoch |
| `"epoch"` | `[N]` | int64 | host epochs completed |
| `("governor", ...)` | `[N, ...]` | | health-check history and the rollback snapshot (`esper_func.core.governor`) |
| `("signals", ...)` | `[N]`, `[N, H]` | | training signals: plateau, stabilization, best values, short histories (`esper_func.core.signals`) |
| `"illegal_actions"` | `[N]` | int64 | actions this episode that the masks forbade (each executed as WAIT) |
| `("static", ...)` | `[N, ...]` | | only with `RewardConfig.static_baseline`: the static twin, a copy of the fresh hosts' `params`, `buffers`, `momentum`, `slots` (empty), `metrics` and `epoch`, trained on the same batches and never grown (`step.step_static_twin`) |

`init_state` makes all but the last three; `step.reset_state` adds them (the fresh hosts'
evaluation is the signals' first epoch) and `step.step_env` updates them.

Blueprint indices refer to the host topology's catalogue (`blueprints.CATALOGUE`); stage
values are `stages.Stage`; blend values are `stages.BlendMode`. A slot's seed bank holds
every blueprint's parameters; only the blueprint named in `("slots", "blueprint")` runs.
"""  # noqa: E501 (the table keeps one row per line)

from __future__ import annotations

import torch
from tensordict import TensorDict

from esper_func.core.governor import init_governor
from esper_func.core.initialization import draw_parameters
from esper_func.core.model import Model
from esper_func.core.stages import BlendMode, Stage

SLOT_FIELDS: dict[str, tuple[torch.dtype, str]] = {
    "stage": (torch.int64, "lifecycle stage (Stage value)"),
    "blueprint": (torch.int64, "blueprint index of the seed (meaningful while occupied)"),
    "blend": (torch.int64, "blend mode (BlendMode value)"),
    "alpha": (torch.float32, "blend weight in [0, 1]; exactly 1 once PROBATIONARY or FOSSILIZED"),
    "blend_step": (torch.int64, "alpha ramp step k in 1..blend_steps while BLENDING"),
    "epochs_in_stage": (torch.int64, "ticks since the current stage was entered"),
    "epochs_total": (torch.int64, "age of the seed in epochs (ticks since germination)"),
    "prev_stage": (torch.int64, "stage before the latest transition"),
    "prev_epochs_in_stage": (torch.int64, "epochs spent in the previous stage"),
    "acc_at_germination": (torch.float32, "validation accuracy (%) when the seed was germinated"),
    "acc_at_stage_start": (torch.float32, "validation accuracy (%) when the current stage began"),
    "contribution": (torch.float32, "counterfactual contribution (pp): accuracy minus accuracy with this slot off"),
    "contribution_ema": (
        torch.float32,
        "EMA of the contribution (pp) since alpha reached 1 (PROBATIONARY, FOSSILIZED): what G5, the probation cull "
        "and the fossil bonus read",
    ),
    "grad_ratio_ema": (torch.float32, "EMA of the parameter-normalized seed/host gradient-norm ratio"),
    "grad_ratio_seen": (torch.bool, "the EMA has been initialized since germination"),
    "embargo_remaining": (torch.int64, "epochs of embargo left (EMBARGOED only)"),
}

METRIC_FIELDS: tuple[str, ...] = ("val_accuracy", "val_loss", "train_loss")


def empty_slots(n_envs: int, n_slots: int, device: torch.device) -> TensorDict:
    """All slots DORMANT with zeroed fields."""
    fields = {
        name: torch.zeros(n_envs, n_slots, dtype=dtype, device=device) for name, (dtype, _) in SLOT_FIELDS.items()
    }
    fields["stage"].fill_(int(Stage.DORMANT))
    fields["prev_stage"].fill_(int(Stage.DORMANT))
    return TensorDict(fields, batch_size=[n_envs, n_slots], device=device)


def init_state(model: Model, n_envs: int, generator: torch.Generator) -> TensorDict:
    """Fresh hosts (and seed banks) for `n_envs` environments, every slot DORMANT, snapshotted."""
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    device = model.device
    params = draw_parameters(model.net_train, model.param_names, n_envs, generator, device)
    template_buffers = dict(model.net_train.named_buffers())
    buffers = {
        name: template_buffers[name].expand(n_envs, *template_buffers[name].shape).clone()
        for name in model.buffer_names
    }
    state = TensorDict(
        {
            "params": TensorDict(params, batch_size=[n_envs]),
            "buffers": TensorDict(buffers, batch_size=[n_envs]),
            "momentum": TensorDict({k: torch.zeros_like(v) for k, v in params.items()}, batch_size=[n_envs]),
            "slots": empty_slots(n_envs, model.n_slots, device),
            "metrics": TensorDict(
                {name: torch.zeros(n_envs, device=device) for name in METRIC_FIELDS}, batch_size=[n_envs]
            ),
            "epoch": torch.zeros(n_envs, dtype=torch.int64, device=device),
        },
        batch_size=[n_envs],
        device=device,
    )
    state["governor"] = init_governor(model.config.governor, state)
    return state


def seed_param_count(model: Model, slots: TensorDict) -> torch.Tensor:
    """`[N, S]` parameters each slot's seed adds (blueprint, plus the gate when gated)."""
    counts = model.blueprint_param_count.expand(slots.batch_size[0], -1, -1)
    chosen = counts.gather(-1, slots["blueprint"].unsqueeze(-1)).squeeze(-1)
    gate = torch.where(slots["blend"] == int(BlendMode.GATED), model.gate_param_count, 0)
    return chosen + gate
