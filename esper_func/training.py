"""Vectorized training: one iteration trains all N envs' hosts and seeds in one call.

`train_iteration` is a pure function of plain tensor dicts (what `torch.compile` traces):
`vmap` over envs of `grad` of the cross-entropy through `functional_call`, then per-env
gradient clipping of the host and of each slot's seed as separate groups, the per-slot
parameter-normalized gradient ratio from the same backward, and functional SGD (host:
momentum and weight decay; seeds: momentum, and only in stages whose seed trains).
`train_epoch` loops over iterations, never over envs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar
import torch
import torch._dynamo
import torch.nn.functional as F
from tensordict import TensorDict
from torch.func import functional_call, grad, vmap

from esper_func.config import OptimConfig
from esper_func.model import BankPlan, Model, SlotPlan, bank_plan, slot_controls
from esper_func.stages import SEED_TRAINABLE, stage_lookup
from esper_func.state import seed_param_count

Tensors = dict[str, torch.Tensor]
T = TypeVar("T")
RATIO_EPS = 1e-8


def task_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; logits `[..., classes]`, integer targets `[...]` (tokens or labels)."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def host_autocast(model: Model) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast of the host forward when `config.amp` is on."""
    if not model.config.amp:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=torch.bfloat16)


def _per_env_sq_norm(tensors: Tensors, names: tuple[str, ...], like: torch.Tensor) -> torch.Tensor:
    """Sum of squares per env over the named `[N, ...]` tensors (zeros `like` when none)."""
    total = torch.zeros_like(like)
    for name in names:
        total = total + tensors[name].pow(2).reshape(like.shape[0], -1).sum(1)
    return total


def _sgd(
    param: torch.Tensor, grad_: torch.Tensor, buf: torch.Tensor, lr: torch.Tensor, momentum: float, weight_decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.optim.SGD (dampening 0, no Nesterov) as a function, at per-env rates `lr` `[N]`;
    a zero buffer is a fresh one."""
    step = grad_ + weight_decay * param if weight_decay else grad_
    buf = momentum * buf + step
    return param - lr.view((-1,) + (1,) * (param.dim() - 1)) * buf, buf


def lr_factor(optim: OptimConfig, epoch: torch.Tensor, max_epochs: int) -> torch.Tensor:
    """`[N]` multiplier of the host's and the seeds' learning rates for the epoch each env
    is in (0-indexed `epoch`).

    'cosine' anneals from 1 to `lr_floor` over the episode, so the final accuracy is the
    network's settled value at its size rather than a sample of a noisy constant-rate
    trajectory (docs/tasks.md). Seeds follow the same schedule: they are part of the
    network, and a seed left at a high rate keeps the end of the episode noisy."""
    if optim.lr_schedule == "constant":
        return torch.ones_like(epoch, dtype=torch.float32)
    progress = (epoch.to(torch.float32) / max_epochs).clamp(0.0, 1.0)
    return optim.lr_floor + (1 - optim.lr_floor) * 0.5 * (1 + torch.cos(torch.pi * progress))


def make_train_iteration(model: Model, plan: BankPlan) -> Callable[..., tuple[Tensors, Tensors, Tensors, Tensors]]:
    """The pure train iteration for a static bank plan.

    Signature: `(params, buffers, momentum, controls, seed_trainable [N,S], seed_counts
    [N,S], lr_scale [N], x, y) -> (params, buffers, momentum, stats)` with `stats = {"loss":
    [N], "grad_ratio": [N, S]}`. Batches `x`, `y` are shared by all envs.
    """
    net = model.net_train
    optim: OptimConfig = model.config.optim
    host_names = model.host_param_names
    slot_names = tuple(planned_param_names(model, s, slot_plan) for s, slot_plan in enumerate(plan))
    trained_names = host_names + tuple(name for names in slot_names for name in names)
    host_count = float(model.host_param_count)

    def env_loss(trained: Tensors, frozen: Tensors, buffers: Tensors, controls: Tensors, x: torch.Tensor, y: torch.Tensor):
        buffers = {name: value.clone() for name, value in buffers.items()}  # BN writes stay local
        with host_autocast(model):
            logits = functional_call(
                net,
                ({**frozen, **trained}, buffers),
                (x, controls["mode"], controls["detach"], controls["blueprint"], controls["gated"], controls["alpha"], plan),
            )
        loss = task_loss(logits.float(), y)
        return loss, (loss.detach(), buffers)

    env_grad = vmap(grad(env_loss, has_aux=True), in_dims=(0, 0, 0, 0, None, None), chunk_size=model.config.vmap_chunk_size)

    def train_iteration(
        params: Tensors,
        buffers: Tensors,
        momentum: Tensors,
        controls: Tensors,
        seed_trainable: torch.Tensor,
        seed_counts: torch.Tensor,
        lr_scale: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[Tensors, Tensors, Tensors, Tensors]:
        trained = {name: params[name] for name in trained_names}
        frozen = {name: value for name, value in params.items() if name not in trained}
        grads, (loss, new_buffers) = env_grad(trained, frozen, buffers, controls, x, y)

        host_sq = _per_env_sq_norm(grads, host_names, loss)
        seed_sq = torch.stack([_per_env_sq_norm(grads, names, loss) for names in slot_names], dim=-1)
        host_norm, seed_norm = host_sq.sqrt(), seed_sq.sqrt()
        per_param = (seed_norm / seed_counts.clamp(min=1).sqrt()) / (host_norm / host_count**0.5 + RATIO_EPS).unsqueeze(-1)
        valid = (seed_norm >= RATIO_EPS) & (host_norm >= RATIO_EPS).unsqueeze(-1) & (seed_counts > 0)
        ratio = torch.where(valid, per_param, 0.0)

        if optim.grad_clip_norm is not None:
            # Host and each slot's seed are clipped as separate groups, so a seed's gradient
            # never changes the host's update (isolation holds with clipping active).
            host_scale = (optim.grad_clip_norm / (host_norm + 1e-6)).clamp(max=1.0)
            seed_scale = (optim.grad_clip_norm / (seed_norm + 1e-6)).clamp(max=1.0)
            scales = {name: host_scale for name in host_names}
            for s, names in enumerate(slot_names):
                scales.update({name: seed_scale[:, s] for name in names})
            grads = {name: g * scales[name].view((-1,) + (1,) * (g.dim() - 1)) for name, g in grads.items()}

        new_params, new_momentum = dict(params), dict(momentum)
        for name in host_names:
            new_params[name], new_momentum[name] = _sgd(
                params[name], grads[name], momentum[name], optim.host_lr * lr_scale, optim.host_momentum, optim.host_weight_decay
            )
        for s, names in enumerate(slot_names):
            trains = seed_trainable[:, s]
            for name in names:
                p, buf = _sgd(params[name], grads[name], momentum[name], optim.seed_lr * lr_scale, optim.seed_momentum, optim.seed_weight_decay)
                keep = trains.view((-1,) + (1,) * (p.dim() - 1))
                new_params[name] = torch.where(keep, p, params[name])
                new_momentum[name] = torch.where(keep, buf, momentum[name])
        return new_params, new_buffers, new_momentum, {"loss": loss, "grad_ratio": ratio}

    return train_iteration


def planned_param_names(model: Model, slot: int, plan: SlotPlan) -> tuple[str, ...]:
    """Bank parameters of `slot` that `plan` runs: its blueprints, and the gate if gated.

    Every other bank parameter has zero gradient and zero momentum (momentum is zeroed at
    germination and cull), so leaving it out of the update is exact.
    """
    prefixes = tuple(f"banks.{slot}.blueprints.{model.blueprint_names[b]}." for b in plan.blueprints)
    if plan.gated:
        prefixes += (f"banks.{slot}.gate.",)
    return tuple(name for name in model.slot_param_names[slot] if name.startswith(prefixes)) if prefixes else ()


PLAN_RECOMPILE_LIMIT = 64
"""Each bank plan is a closure over the same code, and dynamo counts recompiles per code
object (default limit 8, then it silently runs eager). Distinct plans are bounded by the
blueprint sets in use, so the limit is raised to this when compiling."""


def compile_per_plan(function: Callable[..., T], mode: str) -> Callable[..., T]:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, PLAN_RECOMPILE_LIMIT)
    return torch.compile(function, dynamic=False, mode=mode)


def captures_graphs(model: Model) -> bool:
    """Whether the compiled steps capture CUDA graphs (`compile_mode="reduce-overhead"`;
    on a CPU it compiles as "default", and the step marking and copies below still run)."""
    return model.config.compile and model.config.compile_mode == "reduce-overhead"


def begin_step(model: Model) -> None:
    """Mark a new CUDA-graph step, so a replay may reuse the memory of the last one's outputs.

    Callers sum each step's statistics into fresh tensors before the next call, and copy
    out (`keep_outside_graphs`) every output that outlives the step, the state fed to the
    next call included: starting a step frees the last one's outputs, and a graph's input
    that is a freed output of the graph before it fails (pytorch/pytorch#152887)."""
    if captures_graphs(model):
        torch.compiler.cudagraph_mark_step_begin()


def keep_outside_graphs(model: Model, tensors: Tensors) -> Tensors:
    """Copies of CUDA-graph outputs, outside the graphs' memory pool (the tensors themselves when no graphs are captured)."""
    if captures_graphs(model):
        return {name: value.clone() for name, value in tensors.items()}
    return tensors


class TrainStepCache:
    """Train iterations per bank plan, compiled once each when `compile` is on."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._steps: dict[BankPlan, Callable[..., tuple[Tensors, Tensors, Tensors, Tensors]]] = {}

    def __call__(self, plan: BankPlan) -> Callable[..., tuple[Tensors, Tensors, Tensors, Tensors]]:
        if plan not in self._steps:
            step = make_train_iteration(self.model, plan)
            config = self.model.config
            self._steps[plan] = compile_per_plan(step, config.compile_mode) if config.compile else step
        return self._steps[plan]


def train_epoch(
    model: Model, state: TensorDict, x: torch.Tensor, y: torch.Tensor, steps: TrainStepCache
) -> tuple[TensorDict, TensorDict]:
    """Train every env for `x.shape[0]` iterations on the shared batches `x[i]`, `y[i]`.

    Returns the new state and `[N]` stats: `train_loss` (epoch mean) and `grad_ratio`
    `[N, S]` (epoch mean of the per-iteration ratio).
    """
    slots = state["slots"]
    plan = bank_plan(model, slots)
    step = steps(plan)
    controls = slot_controls(model, slots)
    trainable = stage_lookup(SEED_TRAINABLE, slots["stage"])
    counts = seed_param_count(model, slots).to(torch.float32)
    lr = lr_factor(model.config.optim, state["epoch"], model.config.lifecycle.max_epochs)
    params = state["params"].to_dict()
    buffers = state["buffers"].to_dict()
    momentum = state["momentum"].to_dict()
    loss_sum = torch.zeros(slots.batch_size[0], device=model.device)
    ratio_sum = torch.zeros(slots.batch_size, device=model.device)
    for i in range(x.shape[0]):
        begin_step(model)
        params, buffers, momentum, stats = step(params, buffers, momentum, controls, trainable, counts, lr, x[i], y[i])
        params, buffers, momentum = (keep_outside_graphs(model, tensors) for tensors in (params, buffers, momentum))
        loss_sum = loss_sum + stats["loss"]
        ratio_sum = ratio_sum + stats["grad_ratio"]
    n_envs = slots.batch_size[0]
    new_state = state.clone(recurse=False)
    new_state["params"] = TensorDict(params, batch_size=[n_envs])
    new_state["buffers"] = TensorDict(buffers, batch_size=[n_envs])
    new_state["momentum"] = TensorDict(momentum, batch_size=[n_envs])
    stats = TensorDict(
        {"train_loss": loss_sum / x.shape[0], "grad_ratio": ratio_sum / x.shape[0]}, batch_size=[n_envs]
    )
    return new_state, stats

