"""Envs packed into the channel dimension: the CNN core without `vmap`.

Under `torch.func.vmap`, a convolution over N envs' weights already becomes one grouped
convolution on a `[B, N*C, H, W]` tensor; vmap gets there by moving the env dimension
around every op, and on a CPU the NCHW max-pool and convolution kernels are slow on that
layout. Here the N envs' feature maps live packed in the channel dimension of one
channels_last tensor `[B, N*C, H, W]`, env-major, from the first layer on:

- a convolution is one grouped convolution over `N * groups` groups (the first layer's
  shared input is convolved once with all N envs' filters);
- BatchNorm normalizes per channel and GroupNorm per group, which on the packed tensor is
  per env channel and per env group, exactly as each env alone;
- a per-env value (a gate, an alpha, a blueprint choice) broadcasts as a per-channel
  scale (`per_channel`); per-env linear layers are one batched matmul.

The values are the vmapped path's (tests/test_packed.py). `CoreConfig.env_batching`
chooses the path; docs/performance.md has the timings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from esper_func.core.model import BankPlan, MorphogeneticNet, SlotMode, SlotPlan

Tensors = dict[str, torch.Tensor]


def per_channel(values: torch.Tensor, channels: int) -> torch.Tensor:
    """Per-env values `[..., N]` repeated over each env's `channels`, shaped to broadcast
    against packed features: `[N]` -> `[1, N*C, 1, 1]`, `[B, N]` -> `[B, N*C, 1, 1]`. On a
    channels_last tensor this broadcast runs along the contiguous channel dimension."""
    repeated = values.repeat_interleave(channels, dim=-1)
    return repeated.view(*(repeated.shape if repeated.dim() > 1 else (1, *repeated.shape)), 1, 1)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale`. Per-env detach
    (scale 0 or 1 per channel) without a where over the features, or a copy in the forward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale, None


class _StraightThrough(torch.autograd.Function):
    """Forward `out` unchanged; the backward also hands `out`'s gradient, scaled by `scale`,
    to `seed`: the straight-through estimator (value of the host, gradient into the seed)
    for the envs where `scale` is 1, in no extra op on the forward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, out: torch.Tensor, seed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad, grad * scale, None


class Packed:
    """Runs template modules on packed features with one set of stacked `[N, ...]` parameters.

    `run(module, prefix, x)` interprets a module tree: leaf layers (Conv2d, BatchNorm2d,
    GroupNorm, ReLU, MaxPool2d, Identity) and `nn.Sequential` directly, anything else
    through its own `packed_forward(packed, prefix, x)`. BatchNorm running statistics
    updated in training are collected in `new_buffers` (the inputs are never written).
    """

    def __init__(self, params: Tensors, buffers: Tensors, n_envs: int, training: bool, tile: int = 1) -> None:
        """`params` and `buffers` are `[n_envs / tile, ...]`; with `tile` > 1 each is read
        repeated `tile` times along envs (branch-major: packed env j is env j mod N), once."""
        self.params = params
        self.buffers = buffers
        self.n_envs = n_envs
        self.training = training
        self.tile = tile
        self._tiled: Tensors = {}
        self.new_buffers: Tensors = {}

    def _read(self, source: Tensors, name: str) -> torch.Tensor:
        if self.tile == 1:
            return source[name]
        if name not in self._tiled:
            value = source[name]
            self._tiled[name] = value.repeat(self.tile, *(1,) * (value.dim() - 1))
        return self._tiled[name]

    def param(self, name: str) -> torch.Tensor:
        return self._read(self.params, name)

    def optional_param(self, name: str) -> torch.Tensor | None:
        """A parameter that a layer may not have (a bias)."""
        return self.param(name) if name in self.params else None

    def buffer(self, name: str) -> torch.Tensor:
        return self._read(self.buffers, name)

    def run(self, module: nn.Module, prefix: str, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Sequential):
            children = list(module)
            i = 0
            while i < len(children):
                if isinstance(children[i], nn.ReLU) and i + 1 < len(children) and isinstance(children[i + 1], nn.MaxPool2d):
                    # ReLU and max-pool commute (both monotone): pooling first runs the ReLU,
                    # forward and backward, on a quarter of the values. Same values and gradients.
                    x = F.relu(self.run(children[i + 1], f"{prefix}{i + 1}.", x))
                    i += 2
                else:
                    x = self.run(children[i], f"{prefix}{i}.", x)
                    i += 1
            return x
        leaf = _LEAVES.get(type(module)) or next((f for cls, f in _LEAVES.items() if isinstance(module, cls)), None)
        if leaf is not None:
            return leaf(self, module, prefix, x)
        return module.packed_forward(self, prefix, x)

    def linear(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """Per-env `nn.Linear` at `prefix` on `[B, N, in]` -> `[B, N, out]` (one batched matmul)."""
        weight = self.param(prefix + "weight")  # [N, out, in]
        out = torch.bmm(x.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)
        bias = self.optional_param(prefix + "bias")
        return out if bias is None else out + bias

    def scale_envs(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Packed features `x` with env k's part multiplied by `values[k]` (`[N]`)."""
        return x * per_channel(values, x.shape[1] // self.n_envs)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial mean of packed features: `[B, N*C, H, W]` -> `[B, N, C]`."""
        return x.mean(dim=(-2, -1)).unflatten(1, (self.n_envs, -1))


def _conv(packed: Packed, conv: nn.Conv2d, prefix: str, x: torch.Tensor) -> torch.Tensor:
    weight = packed.param(prefix + "weight")  # [N, out, in / groups, k, k]
    shared = x.shape[1] == conv.in_channels and packed.n_envs > 1
    if shared and conv.groups != 1:
        raise ValueError(f"{prefix}: a grouped convolution cannot read the shared (unpacked) input")
    bias = packed.optional_param(prefix + "bias")
    return F.conv2d(
        x,
        weight.flatten(0, 1),
        None if bias is None else bias.flatten(),
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups * (1 if shared else packed.n_envs),
    )


def _batch_norm(packed: Packed, norm: nn.BatchNorm2d, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Per env channel; fp32 like `hosts.Fp32BatchNorm2d` (a no-op cast without autocast)."""
    names = [prefix + key for key in ("running_mean", "running_var", "num_batches_tracked")]
    mean, var = (packed.buffer(name).flatten() for name in names[:2])
    weight, bias = packed.param(prefix + "weight").flatten(), packed.param(prefix + "bias").flatten()
    if not packed.training:
        return F.batch_norm(x.float(), mean, var, weight, bias, False, 0.0, norm.eps)
    mean, var = mean.clone(), var.clone()  # F.batch_norm updates the running statistics in place
    out = F.batch_norm(x.float(), mean, var, weight, bias, True, norm.momentum, norm.eps)
    n = packed.n_envs
    packed.new_buffers.update({names[0]: mean.view(n, -1), names[1]: var.view(n, -1), names[2]: packed.buffer(names[2]) + 1})
    return out


def _group_norm(packed: Packed, norm: nn.GroupNorm, prefix: str, x: torch.Tensor) -> torch.Tensor:
    weight, bias = packed.param(prefix + "weight").flatten(), packed.param(prefix + "bias").flatten()
    return F.group_norm(x, norm.num_groups * packed.n_envs, weight, bias, norm.eps)


def _max_pool(packed: Packed, pool: nn.MaxPool2d, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)


_LEAVES: dict[type[nn.Module], Callable[[Packed, nn.Module, str, torch.Tensor], torch.Tensor]] = {
    nn.Conv2d: _conv,  # type: ignore[dict-item]
    nn.BatchNorm2d: _batch_norm,  # type: ignore[dict-item]
    nn.GroupNorm: _group_norm,  # type: ignore[dict-item]
    nn.ReLU: lambda packed, module, prefix, x: F.relu(x),
    nn.MaxPool2d: _max_pool,  # type: ignore[dict-item]
    nn.Identity: lambda packed, module, prefix, x: x,
}
"""Layers the interpreter runs itself; every other module brings `packed_forward`."""


def packed_slot(
    net: MorphogeneticNet,
    packed: Packed,
    s: int,
    h: torch.Tensor,
    controls: Tensors,
    mode: torch.Tensor,
    plan: SlotPlan,
) -> torch.Tensor:
    """`MorphogeneticNet.slot` for all envs at once (controls `[N, S]`, `mode` `[N]`).

    Per env, the value is `h + w * (seed - seed_input)` with `w` the blend weight in BLEND
    and 0 otherwise, so IDENTITY and STRAIGHT_THROUGH give `h` exactly; STRAIGHT_THROUGH
    envs also pass the gradient into the seed (`_StraightThrough`), and a detached input
    blocks the gradient per env (`_ScaleGradient`). Per-env choices are per-channel scales,
    not selections over the features. (A non-finite seed output would show through the
    zero weight; the governor rolls back any env whose loss stops being finite.)"""
    n = packed.n_envs
    channels = h.shape[1] // n
    bank = net.banks[s]
    prefix = f"banks.{s}."
    keep_gradient = per_channel((~controls["detach"][:, s]).to(h.dtype), channels)
    seed_input = _ScaleGradient.apply(h, keep_gradient) if torch.is_grad_enabled() else h
    seed = None
    for index in plan.blueprints:
        name = net.names[index]
        out = packed.run(bank.blueprints[name], f"{prefix}blueprints.{name}.", seed_input)
        seed = out if seed is None else torch.where(per_channel(controls["blueprint"][:, s] == index, channels), out, seed)
    assert seed is not None
    seed = seed.to(h.dtype)
    blend = (mode == int(SlotMode.BLEND)).to(h.dtype)
    weight = (controls["alpha"][:, s] * blend).unsqueeze(0)  # [1, N]
    if plan.gated:
        gate = packed.run(bank.gate, f"{prefix}gate.", seed_input)  # [B, N]
        weight = torch.where(controls["gated"][:, s], weight * gate, weight).to(h.dtype)
    out = h + per_channel(weight, channels) * (seed - seed_input)
    if not torch.is_grad_enabled():
        return out
    straight_through = per_channel((mode == int(SlotMode.STRAIGHT_THROUGH)).to(h.dtype), channels)
    return _StraightThrough.apply(out, seed, straight_through)


def packed_logits(
    net: MorphogeneticNet, packed: Packed, x: torch.Tensor, controls: Tensors, modes: torch.Tensor, plan: BankPlan
) -> torch.Tensor:
    """Logits `[B, N, classes]` of every env on the shared images `x` `[B, C, H, W]`;
    `controls` `[N, S]` (`slot_controls`), `modes` `[N, S]` (the controls' mode, or a
    counterfactual one)."""
    h = x.contiguous(memory_format=torch.channels_last)
    for s, slot_plan in enumerate(plan):
        h = net.host.packed_segment(packed, s, h)
        if slot_plan.blueprints:
            h = packed_slot(net, packed, s, h, controls, modes[:, s], slot_plan)
    return net.host.packed_tail(packed, h)


def per_env_cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `[B, N, classes]` logits against labels `[B]` shared by the envs: `[N]`."""
    losses = F.cross_entropy(logits.permute(0, 2, 1), y.unsqueeze(1).expand(-1, logits.shape[1]), reduction="none")
    return losses.mean(0) if reduction == "mean" else losses.sum(0)


def packed_counterfactual_logits(
    net: MorphogeneticNet, params: Tensors, buffers: Tensors, x: torch.Tensor, controls: Tensors, plan: BankPlan
) -> torch.Tensor:
    """Evaluation logits `[B, K, N, classes]` of every env under K configurations: k = 0 the
    network as it is, then one per slot with a seed running in some env, that slot forced
    to identity (the counterfactual of `evaluation.evaluate`), in slot order.

    A configuration that switches slot s off equals the network as it is up to slot s, so
    it branches off there: the packed tensor gains one branch (the slot's input, passed
    through) and every branch runs the rest of the network. The segments before a slot
    run once for all configurations."""
    n_envs = controls["mode"].shape[0]
    h = x.contiguous(memory_format=torch.channels_last)
    branches = 1
    packed = Packed(params, buffers, n_envs, training=False)
    for s, slot_plan in enumerate(plan):
        h = net.host.packed_segment(packed, s, h)
        if slot_plan.blueprints:
            tiled = {key: value.repeat(branches, 1) for key, value in controls.items()}
            passed_through = h[:, : h.shape[1] // branches]  # the first branch: the network as it is
            h = torch.cat((packed_slot(net, packed, s, h, tiled, tiled["mode"][:, s], slot_plan), passed_through), dim=1)
            branches += 1
            packed = Packed(params, buffers, n_envs * branches, training=False, tile=branches)
    return net.host.packed_tail(packed, h).unflatten(1, (branches, n_envs))
