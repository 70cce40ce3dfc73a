"""Vectorized evaluation with counterfactual contributions.

For every env, the validation batches run under up to S+1 slot configurations at once:
config 0 is the model as it is; one more config per slot that some env's seed runs in
forces that slot to identity (its alpha to 0). A slot's counterfactual contribution is
accuracy(config 0) - accuracy(its config), in percentage points, measured on the same
batches; a slot with no seed running in any env is its own identity, so its contribution
is exactly 0 and its config is not computed. Under `vmap`, envs and configurations are two
nested `vmap`s over one `functional_call`; packed (`CoreConfig.env_batching`), every
configuration of every env is one packed env, and the layers before a counterfactual slot
run once for all configurations. Nothing is read back to the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch.func import functional_call, vmap

from esper_func.core.host_training import begin_step, compile_per_plan, host_autocast
from esper_func.core.model import BankPlan, Model, SlotMode, bank_plan, slot_controls
from esper_func.core.packed import packed_counterfactual_logits, per_env_cross_entropy

Tensors = dict[str, torch.Tensor]


def counterfactual_modes(mode: torch.Tensor) -> torch.Tensor:
    """`[N, S]` slot modes -> `[N, S+1, S]`: as-is, then each slot forced to identity."""
    n_slots = mode.shape[-1]
    off = torch.cat(
        (
            torch.zeros(1, n_slots, dtype=torch.bool, device=mode.device),
            torch.eye(n_slots, dtype=torch.bool, device=mode.device),
        )
    )
    return torch.where(off, int(SlotMode.IDENTITY), mode.unsqueeze(-2))


def running_slots(plan: BankPlan) -> tuple[int, ...]:
    """Slots where some env's seed runs: the slots with a counterfactual configuration."""
    return tuple(s for s, slot_plan in enumerate(plan) if slot_plan.blueprints)


def make_eval_batch(model: Model, plan: BankPlan) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Pure evaluation of one batch: `(params, buffers, controls, x, y)` -> `(loss_sum [N, K],
    correct [N, K])`, summed over the batch's targets; configuration 0 is the network as it
    is, configuration 1 + i has the i-th of `running_slots(plan)` forced to identity."""
    return (packed_eval_batch if model.packed else vmapped_eval_batch)(model, plan)


def vmapped_eval_batch(model: Model, plan: BankPlan) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Configurations and envs as two nested `vmap`s over one env's `functional_call`."""
    net = model.net_eval
    configs = (0, *(1 + s for s in running_slots(plan)))

    def one(params: Tensors, buffers: Tensors, controls: Tensors, mode: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        with host_autocast(model):
            logits = functional_call(
                net,
                (params, buffers),
                (x, mode, controls["detach"], controls["blueprint"], controls["gated"], controls["alpha"], plan),
            )
        flat = logits.float().flatten(0, -2)
        loss_sum = F.cross_entropy(flat, y.flatten(), reduction="sum")
        correct = (flat.argmax(-1) == y.flatten()).sum()
        return loss_sum, correct

    over_configs = vmap(one, in_dims=(None, None, None, 0, None, None))
    over_envs = vmap(over_configs, in_dims=(0, 0, 0, 0, None, None), chunk_size=model.config.vmap_chunk_size)

    @torch.no_grad()
    def eval_batch(params: Tensors, buffers: Tensors, controls: Tensors, x: torch.Tensor, y: torch.Tensor):
        every = counterfactual_modes(controls["mode"])  # configs picked by plain indexing: no index tensor to copy
        modes = torch.stack([every[:, k] for k in configs], dim=1)
        return over_envs(params, buffers, controls, modes, x, y)

    return eval_batch


def packed_eval_batch(model: Model, plan: BankPlan) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """All configurations of all envs in one packed forward that shares the layers before
    each counterfactual slot (`packed.packed_counterfactual_logits`)."""
    net = model.net_eval

    @torch.no_grad()
    def eval_batch(params: Tensors, buffers: Tensors, controls: Tensors, x: torch.Tensor, y: torch.Tensor):
        with host_autocast(model):
            logits = packed_counterfactual_logits(net, params, buffers, x, controls, plan)
        logits = logits.float().flatten(1, 2)  # [B, K*N, classes], configuration-major
        n_envs = controls["mode"].shape[0]
        loss_sum = per_env_cross_entropy(logits, y, reduction="sum").view(-1, n_envs).T
        correct = (logits.argmax(-1) == y.unsqueeze(1)).sum(0).view(-1, n_envs).T
        return loss_sum, correct

    return eval_batch


class EvalStepCache:
    """Evaluation functions per bank plan, compiled once each when `compile` is on."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._steps: dict[BankPlan, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}

    def __call__(self, plan: BankPlan) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        if plan not in self._steps:
            step = make_eval_batch(self.model, plan)
            config = self.model.config
            self._steps[plan] = compile_per_plan(step, config.compile_mode) if config.compile else step
        return self._steps[plan]


def evaluate(model: Model, state: TensorDict, x: torch.Tensor, y: torch.Tensor, steps: EvalStepCache) -> TensorDict:
    """Validation metrics `[N]` on batches `x[v]`, `y[v]` (shared by all envs).

    Returns `val_loss`, `val_accuracy` (percent) and `contribution` `[N, S]` (pp).
    """
    slots = state["slots"]
    n_envs = slots.batch_size[0]
    plan = bank_plan(model, slots)
    step = steps(plan)
    controls = slot_controls(model, slots)
    running = running_slots(plan)
    params, buffers = state["params"].to_dict(), state["buffers"].to_dict()
    loss_sum = torch.zeros(n_envs, len(running) + 1, device=model.device)
    correct = torch.zeros(n_envs, len(running) + 1, dtype=torch.int64, device=model.device)
    for v in range(x.shape[0]):
        begin_step(model)
        batch_loss, batch_correct = step(params, buffers, controls, x[v], y[v])
        loss_sum = loss_sum + batch_loss
        correct = correct + batch_correct
    count = y.numel()
    accuracy = 100.0 * correct.to(torch.float32) / count
    measured = dict(zip(running, (accuracy[:, :1] - accuracy[:, 1:]).unbind(-1)))
    zero = torch.zeros_like(accuracy[:, 0])
    contribution = torch.stack([measured.get(s, zero) for s in range(model.n_slots)], dim=-1)
    return TensorDict(
        {
            "val_loss": loss_sum[:, 0] / count,
            "val_accuracy": accuracy[:, 0],
            "contribution": contribution,
        },
        batch_size=[n_envs],
    )
