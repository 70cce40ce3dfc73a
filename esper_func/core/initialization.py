"""Vectorized parameter initialization: fresh parameters for N envs in one draw.

Each parameter has an `Init` rule, derived from its layer type (PyTorch's defaults) and
overridden by the module that owns it (zero-initialized outputs, GPT-style normals).
`draw_parameters` samples all N copies at once from an explicit generator, so germinating
a seed in any subset of envs needs no loop over envs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class Init:
    """How one parameter is drawn: uniform(-scale, scale), normal(0, scale) or constant."""

    kind: Literal["uniform", "normal", "const"]
    scale: float


ZERO = Init("const", 0.0)
ONE = Init("const", 1.0)


class Initialized(nn.Module):
    """A module that overrides the default init of some of its own (local) parameters."""

    def init_overrides(self) -> dict[str, Init]:
        """Init rules keyed by parameter name relative to this module."""
        return {}


def _default_rule(module: nn.Module, name: str, param: nn.Parameter) -> Init:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = param.shape[1:].numel() if name == "weight" else module.weight.shape[1:].numel()
        return Init("uniform", 1.0 / math.sqrt(fan_in))
    if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
        return ONE if name == "weight" else ZERO
    if isinstance(module, nn.Embedding):
        return Init("normal", 1.0)
    raise TypeError(
        f"no init rule for parameter {name!r} of {type(module).__name__}; "
        "declare it in that module's init_overrides()"
    )


def init_rules(root: nn.Module) -> dict[str, Init]:
    """The init rule of every parameter of `root`, keyed by its full dotted name."""
    rules: dict[str, Init] = {}
    overrides: dict[str, Init] = {}
    for prefix, module in root.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, Initialized):
            overrides.update({dot + local: rule for local, rule in module.init_overrides().items()})
        for name, param in module.named_parameters(recurse=False):
            if dot + name not in overrides:
                rules[dot + name] = _default_rule(module, name, param)
    unknown = sorted(set(overrides) - {name for name, _ in root.named_parameters()})
    if unknown:
        raise KeyError(f"init_overrides name parameters that do not exist: {unknown}")
    rules.update(overrides)
    return rules


def draw(rule: Init, shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    if rule.kind == "const":
        return torch.full(shape, rule.scale, device=device)
    if rule.kind == "uniform":
        return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * rule.scale
    return torch.randn(shape, generator=generator, device=device) * rule.scale


def draw_parameters(
    root: nn.Module, names: tuple[str, ...], n: int, generator: torch.Generator, device: torch.device
) -> dict[str, torch.Tensor]:
    """Fresh values `[n, *shape]` for the named parameters of `root`, in `names` order."""
    rules = init_rules(root)
    params = dict(root.named_parameters())
    return {name: draw(rules[name], torch.Size((n, *params[name].shape)), generator, device) for name in names}
