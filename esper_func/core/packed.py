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

import torch
import torch.nn.functional as F

from esper_func.core.model import BankPlan, MorphogeneticNet, SlotMode, SlotPlan
from esper_func.core.packed_modules import Packed, Tensors, per_channel


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
    def forward(
        ctx: torch.autograd.function.FunctionCtx, out: torch.Tensor, seed: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return out.view_as(out)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad, grad * scale, None


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
        seed = (
            out if seed is None else torch.where(per_channel(controls["blueprint"][:, s] == index, channels), out, seed)
        )
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
    to identity (the counterfactual of `host_evaluation.evaluate`), in slot order.

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
            h = torch.cat(
                (packed_slot(net, packed, s, h, tiled, tiled["mode"][:, s], slot_plan), passed_through), dim=1
            )
            branches += 1
            packed = Packed(params, buffers, n_envs * branches, training=False, tile=branches)
    return net.host.packed_tail(packed, h).unflatten(1, (branches, n_envs))
