"""Vectorized training: one iteration trains all N envs' hosts and seeds in one call.

`train_iteration` is a pure function of plain tensors (what `torch.compile` traces): every
env's gradient of its cross-entropy (`vmap` over envs of `grad` through `functional_call`,
or one backward through the packed forward, `CoreConfig.env_batching`), then per-env
gradient clipping of the host and of each slot's seed as separate groups, the per-slot
parameter-normalized gradient ratio from the same backward, and functional SGD (host:
momentum and weight decay; seeds: momentum, and only in stages whose seed trains). Each
group's parameters travel as one flat `[N, P]` tensor (`FlatGroup`), so the update is a
handful of ops per group. `train_epoch` loops over iterations, never over envs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch._dynamo
import torch.nn.functional as F
from tensordict import TensorDict
from torch.func import functional_call, grad, vmap

from esper_func.core.config import OptimConfig
from esper_func.core.model import BankPlan, Model, SlotPlan, bank_plan, slot_controls
from esper_func.core.packed import packed_logits, per_env_cross_entropy
from esper_func.core.packed_modules import Packed
from esper_func.core.stages import SEED_TRAINABLE, stage_lookup
from esper_func.core.state import seed_param_count

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


@dataclass(frozen=True)
class FlatGroup:
    """One update group's parameters as one flat `[..., P]` tensor: the host, or one slot's
    planned seed. An iteration updates, clips and measures a group with a handful of ops on
    its flat tensor instead of a few ops per parameter; the named parameters the forward
    reads are views into it, so a gradient with respect to the flat tensor is the group's."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    """Per-env shapes of the named parameters."""

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(shape.numel() for shape in self.shapes)

    def flatten(self, tensors: Tensors, like: torch.Tensor) -> torch.Tensor:
        """`[N, P]` from the named `[N, ...]` tensors (`like`: an `[N, ...]` parameter, for an empty group)."""
        if not self.names:
            return like.new_zeros(like.shape[0], 0)
        return torch.cat([tensors[name].reshape(like.shape[0], -1) for name in self.names], dim=1)

    def views(self, flat: torch.Tensor) -> Tensors:
        """The named parameters as views of `flat` `[..., P]` (`[N, P]`, or one env's `[P]` under vmap)."""
        batch = flat.shape[:-1]
        return {
            name: chunk.view((*batch, *shape))
            for name, chunk, shape in zip(self.names, flat.split(self.sizes, dim=-1), self.shapes)
        }


def update_groups(model: Model, plan: BankPlan) -> tuple[FlatGroup, ...]:
    """The host, then each slot's planned seed parameters (`planned_param_names`)."""
    named = dict(model.net_train.named_parameters())
    groups = [model.host_param_names, *(planned_param_names(model, s, slot_plan) for s, slot_plan in enumerate(plan))]
    return tuple(FlatGroup(names, tuple(named[name].shape for name in names)) for names in groups)


GradientFn = Callable[
    [tuple[torch.Tensor, ...], Tensors, Tensors, Tensors, torch.Tensor, torch.Tensor],
    tuple[tuple[torch.Tensor, ...], torch.Tensor, Tensors],
]
"""`(flat, frozen, buffers, controls, x, y) -> (flat grads, loss [N], new_buffers)`: every
env's gradient of its own mean loss with respect to its trained groups' flat parameters."""


def vmapped_gradients(model: Model, plan: BankPlan, groups: tuple[FlatGroup, ...]) -> GradientFn:
    """`vmap` over envs of `grad` of one env's loss through `functional_call`."""
    net = model.net_train

    def env_loss(
        flat: tuple[torch.Tensor, ...],
        frozen: Tensors,
        buffers: Tensors,
        controls: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
    ):
        buffers = {name: value.clone() for name, value in buffers.items()}  # BN writes stay local
        trained = {name: value for group, values in zip(groups, flat) for name, value in group.views(values).items()}
        with host_autocast(model):
            logits = functional_call(
                net,
                ({**frozen, **trained}, buffers),
                (
                    x,
                    controls["mode"],
                    controls["detach"],
                    controls["blueprint"],
                    controls["gated"],
                    controls["alpha"],
                    plan,
                ),
            )
        loss = task_loss(logits.float(), y)
        return loss, (loss.detach(), buffers)

    env_grad = vmap(
        grad(env_loss, has_aux=True), in_dims=(0, 0, 0, 0, None, None), chunk_size=model.config.vmap_chunk_size
    )

    def gradients(
        flat: tuple[torch.Tensor, ...],
        frozen: Tensors,
        buffers: Tensors,
        controls: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
    ):
        grads, (loss, new_buffers) = env_grad(flat, frozen, buffers, controls, x, y)
        return tuple(grads), loss, new_buffers

    return gradients


def packed_gradients(model: Model, plan: BankPlan, groups: tuple[FlatGroup, ...]) -> GradientFn:
    """All envs' losses in one packed forward (`esper_func/core/packed.py`), one backward of their
    sum: env k's loss depends on env k's parameters only, so each gradient is its own."""
    net = model.net_train

    def gradients(
        flat: tuple[torch.Tensor, ...],
        frozen: Tensors,
        buffers: Tensors,
        controls: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
    ):
        # Grad mode on whatever the caller's (TorchRL collectors step envs under no_grad):
        # the views into the leaves must be recorded too, or no gradient reaches them.
        with torch.enable_grad():
            leaves = tuple(values.detach().requires_grad_() for values in flat)
            trained = {
                name: value for group, values in zip(groups, leaves) for name, value in group.views(values).items()
            }
            packed = Packed({**frozen, **trained}, buffers, controls["mode"].shape[0], training=True)
            with host_autocast(model):
                logits = packed_logits(net, packed, x, controls, controls["mode"], plan)
            loss = per_env_cross_entropy(logits.float(), y)
            grads = torch.autograd.grad(loss.sum(), leaves, materialize_grads=True)
        return grads, loss.detach(), {**buffers, **packed.new_buffers}

    return gradients


TrainIteration = Callable[..., tuple[tuple[torch.Tensor, ...], Tensors, tuple[torch.Tensor, ...], Tensors]]


def make_train_iteration(model: Model, plan: BankPlan) -> TrainIteration:
    """The pure train iteration for a static bank plan, on the flat groups of `update_groups`.

    Signature: `(flat_params, frozen, buffers, flat_momentum, seed_trainable [N,S],
    seed_counts [N,S], lr_scale [N], controls, x, y) -> (flat_params, buffers,
    flat_momentum, stats)` with `stats = {"loss": [N], "grad_ratio": [N, S]}`; `flat_*`
    hold one `[N, P]` tensor per group (host first), `frozen` the parameters no group
    trains. Batches `x`, `y` are shared by all envs.
    """
    optim: OptimConfig = model.config.optim
    groups = update_groups(model, plan)
    seed_sizes = [float(sum(group.sizes)) for group in groups[1:]]
    host_count = float(model.host_param_count)
    gradients = (packed_gradients if model.packed else vmapped_gradients)(model, plan, groups)

    def train_iteration(
        flat_params: tuple[torch.Tensor, ...],
        frozen: Tensors,
        buffers: Tensors,
        flat_momentum: tuple[torch.Tensor, ...],
        seed_trainable: torch.Tensor,
        seed_counts: torch.Tensor,
        lr_scale: torch.Tensor,
        controls: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[tuple[torch.Tensor, ...], Tensors, tuple[torch.Tensor, ...], Tensors]:
        grads, loss, new_buffers = gradients(flat_params, frozen, buffers, controls, x, y)
        norms = torch.stack([g.pow(2).sum(-1) for g in grads], dim=-1).sqrt()  # [N, 1 + S]
        host_norm, seed_norm = norms[:, 0], norms[:, 1:]
        host_per_param = host_norm / host_count**0.5 + RATIO_EPS
        per_param = (seed_norm / seed_counts.clamp(min=1).sqrt()) / host_per_param.unsqueeze(-1)
        valid = (seed_norm >= RATIO_EPS) & (host_norm >= RATIO_EPS).unsqueeze(-1) & (seed_counts > 0)
        ratio = torch.where(valid, per_param, 0.0)

        if optim.grad_clip_norm is not None:
            # Host and each slot's seed are clipped as separate groups, so a seed's gradient
            # never changes the host's update (isolation holds with clipping active).
            scale = (optim.grad_clip_norm / (norms + 1e-6)).clamp(max=1.0)
            grads = tuple(g * scale[:, k : k + 1] for k, g in enumerate(grads))

        host, host_buf = _sgd(
            flat_params[0],
            grads[0],
            flat_momentum[0],
            optim.host_lr * lr_scale,
            optim.host_momentum,
            optim.host_weight_decay,
        )
        new_params, new_momentum = [host], [host_buf]
        for s, size in enumerate(seed_sizes):
            p, buf = flat_params[1 + s], flat_momentum[1 + s]
            if size == 0:
                new_params.append(p)
                new_momentum.append(buf)
                continue
            stepped, stepped_buf = _sgd(
                p, grads[1 + s], buf, optim.seed_lr * lr_scale, optim.seed_momentum, optim.seed_weight_decay
            )
            keep = seed_trainable[:, s : s + 1]
            new_params.append(torch.where(keep, stepped, p))
            new_momentum.append(torch.where(keep, stepped_buf, buf))
        return tuple(new_params), new_buffers, tuple(new_momentum), {"loss": loss, "grad_ratio": ratio}

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


def keep_outside_graphs(model: Model, tensors: T) -> T:
    """Copies of CUDA-graph outputs (a dict or a tuple of tensors), outside the graphs' memory
    pool (the tensors themselves when no graphs are captured)."""
    if not captures_graphs(model):
        return tensors
    if isinstance(tensors, dict):
        return {name: value.clone() for name, value in tensors.items()}  # type: ignore[return-value]
    return tuple(value.clone() for value in tensors)  # type: ignore[return-value]


class TrainStepCache:
    """Train iterations per bank plan, compiled once each when `compile` is on."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._steps: dict[BankPlan, TrainIteration] = {}

    def __call__(self, plan: BankPlan) -> TrainIteration:
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
    `[N, S]` (epoch mean of the per-iteration ratio). The groups' parameters and momentum
    are flattened once per epoch and written back to the state's names at its end.
    """
    slots = state["slots"]
    plan = bank_plan(model, slots)
    step = steps(plan)
    groups = update_groups(model, plan)
    controls = slot_controls(model, slots)
    trainable = stage_lookup(SEED_TRAINABLE, slots["stage"])
    counts = seed_param_count(model, slots).to(torch.float32)
    lr = lr_factor(model.config.optim, state["epoch"], model.config.lifecycle.max_epochs)
    params = state["params"].to_dict()
    momentum = state["momentum"].to_dict()
    buffers = state["buffers"].to_dict()
    trained = {name for group in groups for name in group.names}
    frozen = {name: value for name, value in params.items() if name not in trained}
    like = params[model.host_param_names[0]]
    flat_params = tuple(group.flatten(params, like) for group in groups)
    flat_momentum = tuple(group.flatten(momentum, like) for group in groups)
    loss_sum = torch.zeros(slots.batch_size[0], device=model.device)
    ratio_sum = torch.zeros(slots.batch_size, device=model.device)
    for i in range(x.shape[0]):
        begin_step(model)
        flat_params, buffers, flat_momentum, stats = step(
            flat_params, frozen, buffers, flat_momentum, trainable, counts, lr, controls, x[i], y[i]
        )
        flat_params, buffers, flat_momentum = (
            keep_outside_graphs(model, tensors) for tensors in (flat_params, buffers, flat_momentum)
        )
        loss_sum = loss_sum + stats["loss"]
        ratio_sum = ratio_sum + stats["grad_ratio"]
    for group, flat_p, flat_m in zip(groups, flat_params, flat_momentum):
        params.update({name: value.clone() for name, value in group.views(flat_p).items()})
        momentum.update({name: value.clone() for name, value in group.views(flat_m).items()})
    n_envs = slots.batch_size[0]
    new_state = state.clone(recurse=False)
    new_state["params"] = TensorDict(params, batch_size=[n_envs])
    new_state["buffers"] = TensorDict(buffers, batch_size=[n_envs])
    new_state["momentum"] = TensorDict(momentum, batch_size=[n_envs])
    stats = TensorDict(
        {"train_loss": loss_sum / x.shape[0], "grad_ratio": ratio_sum / x.shape[0]}, batch_size=[n_envs]
    )
    return new_state, stats
