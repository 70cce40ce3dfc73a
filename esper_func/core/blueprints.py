"""The blueprint catalogue: seed modules that can grow into a slot.

Every blueprint maps features to features of the same shape. Where the design allows,
its output branch starts at zero (a zero-initialized layer or layer scale), so that a
seed entering the forward pass leaves the host's function unchanged. CNN blueprints see
`[B, C, H, W]`, transformer blueprints `[B, T, D]`. The index of a blueprint is its
position in its topology's catalogue; that index is what state and actions carry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from esper_func.core.initialization import ONE, ZERO, Init, Initialized
from esper_func.core.layers import CausalSelfAttention, group_count

if TYPE_CHECKING:
    from esper_func.core.packed_modules import Packed

Topology = Literal["cnn", "transformer"]


class Blueprint(Initialized):
    """A seed architecture for a slot with `channels` features."""

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def packed_forward(self, packed: Packed, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """The forward of all envs at once on packed features `[B, N*C, H, W]`
        (`esper_func/core/packed.py`), parameters under `prefix` in `packed`. CNN blueprints
        define it; a blueprint without it runs under `CoreConfig.env_batching="vmap"`."""
        raise NotImplementedError(f"blueprint {self.name!r} has no packed_forward")

    @classmethod
    def packs(cls) -> bool:
        """Whether this blueprint runs on packed envs (it defines `packed_forward`)."""
        return cls.packed_forward is not Blueprint.packed_forward


class Noop(Blueprint):
    name = "noop"
    description = "identity; no parameters"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def packed_forward(self, packed: Packed, prefix: str, x: torch.Tensor) -> torch.Tensor:
        return x


# --- CNN -----------------------------------------------------------------------------


class ConvNormScale(Blueprint):
    """x + tanh(sigma) * (GroupNorm(x) - x): a bounded pull towards normalized features."""

    name = "norm"
    description = "x + tanh(s)(GN(x) - x), s = 0 at birth"

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.norm = nn.GroupNorm(group_count(channels), channels)
        self.sigma = nn.Parameter(torch.zeros(()))

    def init_overrides(self) -> dict[str, Init]:
        return {"sigma": ZERO}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.sigma) * (self.norm(x) - x)

    def packed_forward(self, packed: Packed, prefix: str, x: torch.Tensor) -> torch.Tensor:
        pull = packed.run(self.norm, prefix + "norm.", x) - x
        return x + packed.scale_envs(pull, torch.tanh(packed.param(prefix + "sigma")))


class SqueezeExcite(Blueprint):
    """Channel attention x * 2 sigmoid(W2 ReLU(W1 avgpool x)); W2 = 0 gives scale exactly 1."""

    name = "attention"
    description = "squeeze-excitation channel gate, scale in (0, 2), 1 at birth"

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        reduced = max(1, channels // 4)
        self.fc1 = nn.Linear(channels, reduced)
        self.fc2 = nn.Linear(reduced, channels)

    def init_overrides(self) -> dict[str, Init]:
        return {"fc2.weight": ZERO, "fc2.bias": ZERO}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2 * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(-2, -1))))))
        return x * scale[..., None, None]

    def packed_forward(self, packed: Packed, prefix: str, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(packed.linear(prefix + "fc1.", packed.pooled(x)))
        scale = 2 * torch.sigmoid(packed.linear(prefix + "fc2.", hidden))  # [B, N, C]
        return x * scale.flatten(1)[..., None, None]


class LayerScaled(Blueprint):
    """Residual x + gamma * branch(x) with a per-channel gamma that starts at zero."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.gamma = nn.Parameter(torch.zeros(channels))

    def init_overrides(self) -> dict[str, Init]:
        return {"gamma": ZERO}

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma[:, None, None] * self.branch(x)

    def packed_branch(self, packed: Packed, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """`branch` on packed features; the default runs the `block` layers."""
        return packed.run(self.block, prefix + "block.", x)

    def packed_forward(self, packed: Packed, prefix: str, x: torch.Tensor) -> torch.Tensor:
        return x + packed.param(prefix + "gamma").flatten()[:, None, None] * self.packed_branch(packed, prefix, x)


def conv_norm_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.GroupNorm(group_count(channels), channels),
        nn.ReLU(),
    )


class Depthwise(LayerScaled):
    name = "depthwise"
    description = "x + g * ReLU(GN(pw1x1(dw3x3 x)))"

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pw = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.GroupNorm(group_count(channels), channels)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.pw(self.dw(x))))

    def packed_branch(self, packed: Packed, prefix: str, x: torch.Tensor) -> torch.Tensor:
        h = packed.run(self.pw, prefix + "pw.", packed.run(self.dw, prefix + "dw.", x))
        return F.relu(packed.run(self.norm, prefix + "norm.", h))


class ConvLight(LayerScaled):
    name = "conv_light"
    description = "x + g * conv3x3-GN-ReLU(x)"

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.block = conv_norm_relu(channels)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ConvHeavy(LayerScaled):
    name = "conv_heavy"
    description = "x + g * (conv3x3-GN-ReLU)^2(x)"

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.block = nn.Sequential(conv_norm_relu(channels), conv_norm_relu(channels))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ConvWide(LayerScaled):
    """Adds width inside the block: a seed at C channels computes 2C features at its slot's
    resolution before projecting back to C, which a narrow host lacks (docs/tasks.md)."""

    name = "conv_wide"
    description = "x + g * (conv3x3 C->2C -GN-ReLU, conv3x3 2C->C -GN-ReLU)(x)"
    expansion: ClassVar[int] = 2

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        hidden = self.expansion * channels
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.GroupNorm(group_count(hidden), hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 3, padding=1, bias=False),
            nn.GroupNorm(group_count(channels), channels),
            nn.ReLU(),
        )

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


# --- Transformer ---------------------------------------------------------------------


def gpt_linear_overrides(module: nn.Module) -> dict[str, Init]:
    """GPT-style init for every Linear inside `module`: weight N(0, 0.02), bias 0."""
    rules: dict[str, Init] = {}
    for prefix, child in module.named_modules():
        if isinstance(child, nn.Linear):
            dot = f"{prefix}." if prefix else ""
            rules[dot + "weight"] = Init("normal", 0.02)
            if child.bias is not None:
                rules[dot + "bias"] = ZERO
    return rules


class TokenNormScale(Blueprint):
    name = "norm"
    description = "x + tanh(s)(LN(x) - x), s = 0 at birth"

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.norm = nn.LayerNorm(channels)
        self.sigma = nn.Parameter(torch.zeros(()))

    def init_overrides(self) -> dict[str, Init]:
        return {"sigma": ZERO, "norm.weight": ONE, "norm.bias": ZERO}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.sigma) * (self.norm(x) - x)


class LoRA(Blueprint):
    name = "lora"
    description = "x + up(down(x)), rank 8, up = 0 at birth"
    rank: ClassVar[int] = 8

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.down = nn.Linear(channels, self.rank, bias=False)
        self.up = nn.Linear(self.rank, channels, bias=False)

    def init_overrides(self) -> dict[str, Init]:
        return {**gpt_linear_overrides(self), "up.weight": ZERO}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.down(x))


class SelfAttentionSeed(Blueprint):
    name = "attention"
    description = "x + causal self-attention (4 heads), output projection 0 at birth"
    n_heads: ClassVar[int] = 4

    def __init__(self, channels: int) -> None:
        if channels % self.n_heads != 0:
            raise ValueError(
                f"blueprint 'attention' needs dim divisible by its {self.n_heads} heads, got dim={channels}"
            )
        super().__init__(channels)
        self.attn = CausalSelfAttention(channels, self.n_heads)

    def init_overrides(self) -> dict[str, Init]:
        return {**gpt_linear_overrides(self), "attn.proj.weight": ZERO}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)


class MLPSeed(Blueprint):
    name = "mlp"
    description = "x + fc2(GELU(fc1 x)), hidden 4D, fc2 = 0 at birth"

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.fc2 = nn.Linear(4 * channels, channels)

    def init_overrides(self) -> dict[str, Init]:
        return {**gpt_linear_overrides(self), "fc2.weight": ZERO}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


CATALOGUE: dict[Topology, tuple[type[Blueprint], ...]] = {
    "cnn": (Noop, ConvNormScale, SqueezeExcite, Depthwise, ConvLight, ConvHeavy, ConvWide),
    "transformer": (Noop, TokenNormScale, LoRA, SelfAttentionSeed, MLPSeed),
}
"""The default blueprints per topology; a blueprint's index is its position here, unless
`CoreConfig.blueprints` names another list."""

_REGISTRY: dict[Topology, dict[str, type[Blueprint]]] = {
    topology: {cls.name: cls for cls in classes} for topology, classes in CATALOGUE.items()
}


def register_blueprint(topology: Topology, blueprint: type[Blueprint]) -> type[Blueprint]:
    """Make `blueprint` available, under its `name`, to models whose `CoreConfig.blueprints`
    list it. Registering the same class again is a no-op; another class under a taken
    name is an error. Returns the class, so it also works as a decorator's body."""
    if topology not in _REGISTRY:
        raise ValueError(f"unknown topology {topology!r}; choose one of {sorted(_REGISTRY)}")
    if not (isinstance(blueprint, type) and issubclass(blueprint, Blueprint)):
        raise TypeError(f"{blueprint!r} is not a subclass of esper_func.core.blueprints.Blueprint")
    name = blueprint.__dict__.get("name")
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"{blueprint.__name__} needs a class attribute `name`, a Python identifier, got {name!r}")
    taken = _REGISTRY[topology].get(name)
    if taken is not None and taken is not blueprint:
        raise ValueError(
            f"{topology} blueprint name {name!r} is taken by {taken.__module__}.{taken.__qualname__}; pick another name"
        )
    _REGISTRY[topology][name] = blueprint
    return blueprint


def catalogue(topology: Topology, names: tuple[str, ...] = ()) -> tuple[type[Blueprint], ...]:
    """The blueprints a model carries, in index order: `names` from the registry, or the
    topology's default `CATALOGUE` when `names` is empty."""
    if not names:
        return CATALOGUE[topology]
    if len(set(names)) != len(names):
        raise ValueError(f"blueprint names must be unique, got {list(names)}")
    unknown = [name for name in names if name not in _REGISTRY[topology]]
    if unknown:
        raise ValueError(
            f"unknown {topology} blueprint(s) {unknown}; registered: {sorted(_REGISTRY[topology])}. "
            "Call esper_func.core.blueprints.register_blueprint before building the model"
        )
    return tuple(_REGISTRY[topology][name] for name in names)


def blueprint_names(topology: Topology) -> tuple[str, ...]:
    return tuple(cls.name for cls in CATALOGUE[topology])


def blueprint_index(topology: Topology, name: str) -> int:
    names = blueprint_names(topology)
    if name not in names:
        raise KeyError(f"unknown {topology} blueprint {name!r}; choose one of {list(names)}")
    return names.index(name)


def build_blueprint(topology: Topology, name: str, channels: int) -> Blueprint:
    return CATALOGUE[topology][blueprint_index(topology, name)](channels)


def param_count(topology: Topology, name: str, channels: int) -> int:
    return sum(p.numel() for p in build_blueprint(topology, name, channels).parameters())
