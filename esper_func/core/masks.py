"""Per-head action masks, exact with respect to the lifecycle's legality.

`action_masks(model, state)` returns a TensorDict `[N]` of bool masks:

| key | shape | True where |
|---|---|---|
| `op` | `[N, 4]` | the op is legal at some slot (WAIT always) |
| `slot` | `[N, 4, S]` | row `o`: the slots where op `o` is legal; WAIT's row is all True (WAIT ignores the slot) |
| `blueprint` | `[N, B]` | every blueprint of the topology's catalogue except `noop` (B = catalogue size) |
| `blend` | `[N, 3]` | every blend mode |

Sampling contract: draw the op from `op`, then the slot from `slot[op]`, the blueprint
and the blend from theirs; every such combination executes (`lifecycle.action_legality`
is True), and every executable (op, slot) pair is allowed. Both masks and legality
derive from `lifecycle.slot_op_legality`, so they cannot drift apart. `noop` is masked
although it is legal: a parameter-free seed only costs a slot and an episode's time.
Slots are in canonical order (`stages.SLOT_NAMES`), as in the features.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from esper_func.core.lifecycle import slot_op_legality
from esper_func.core.model import Model
from esper_func.core.stages import BlendMode

EXCLUDED_BLUEPRINTS: tuple[str, ...] = ("noop",)
"""Legal for the core, never offered to a controller."""


def action_masks(model: Model, state: TensorDict) -> TensorDict:
    """Masks for every head; pure and sync-free."""
    legal = slot_op_legality(model, state)
    n_envs = legal.shape[0]
    device = legal.device
    blueprint = torch.ones(n_envs, len(model.blueprint_names), dtype=torch.bool, device=device)
    for index, name in enumerate(model.blueprint_names):
        if name in EXCLUDED_BLUEPRINTS:
            blueprint[:, index] = False
    return TensorDict(
        {
            "op": legal.any(dim=-1),
            "slot": legal,
            "blueprint": blueprint,
            "blend": torch.ones(n_envs, len(BlendMode), dtype=torch.bool, device=device),
        },
        batch_size=[n_envs],
        device=device,
    )


def check_masks(masks: TensorDict) -> None:
    """Raise `ValueError` naming the envs where a head has nothing to sample.

    Checked: the op row; the slot row of every allowed op; the blueprint and blend rows.
    Costs one host sync: call it where that is acceptable (tests, debug runs), not inside
    a compiled step.
    """
    op = masks["op"]
    empty = {
        "op": ~op.any(dim=-1),
        "slot": (op & ~masks["slot"].any(dim=-1)).any(dim=-1),
        "blueprint": ~masks["blueprint"].any(dim=-1),
        "blend": ~masks["blend"].any(dim=-1),
    }
    bad = torch.stack(list(empty.values()), dim=-1)
    envs = bad.any(dim=-1).nonzero().flatten().tolist()
    if envs:
        rows = bad[envs].tolist()
        detail = "; ".join(
            f"env {env}: {', '.join(head for head, is_empty in zip(empty, row) if is_empty)}"
            for env, row in zip(envs, rows)
        )
        raise ValueError(f"action masks with no legal action in envs {envs} ({detail})")
