"""The packed interpreter: template modules run on N envs' features packed into the
channel dimension (`[B, N*C, H, W]`, env-major), with one set of stacked `[N, ...]`
parameters. `esper_func/core/packed.py` runs the model's forward with it; blueprints and
hosts bring a `packed_forward` that calls back into it, so it imports nothing of the core."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensors = dict[str, torch.Tensor]


def per_channel(values: torch.Tensor, channels: int) -> torch.Tensor:
    """Per-env values `[..., N]` repeated over each env's `channels`, shaped to broadcast
    against packed features: `[N]` -> `[1, N*C, 1, 1]`, `[B, N]` -> `[B, N*C, 1, 1]`. On a
    channels_last tensor this broadcast runs along the contiguous channel dimension."""
    repeated = values.repeat_interleave(channels, dim=-1)
    return repeated.view(*(repeated.shape if repeated.dim() > 1 else (1, *repeated.shape)), 1, 1)


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
                if (
                    isinstance(children[i], nn.ReLU)
                    and i + 1 < len(children)
                    and isinstance(children[i + 1], nn.MaxPool2d)
                ):
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
    packed.new_buffers.update(
        {names[0]: mean.view(n, -1), names[1]: var.view(n, -1), names[2]: packed.buffer(names[2]) + 1}
    )
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
