"""Host networks, split into segments at the injection slots.

A host runs `segment(0)`, slot early, `segment(1)`, slot mid, `segment(2)`, slot late,
then `tail` (the remaining layers and the head). Hosts are ordinary `nn.Module`s; the
core calls them through `torch.func.functional_call` with one env's parameters.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from esper_func.core.blueprints import Topology, gpt_linear_overrides
from esper_func.core.config import CNNHostConfig, HostConfig, TransformerHostConfig
from esper_func.core.initialization import Init, Initialized
from esper_func.core.layers import CausalSelfAttention

if TYPE_CHECKING:
    from esper_func.core.packed_modules import Packed


class Host(Initialized):
    topology: Topology
    segments: nn.ModuleList

    def segment(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.segments[index](x)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Fp32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm on an fp32 input: under bf16 autocast its statistics stay fp32 (and vmap's
    batch-norm rule rejects a bf16 input with fp32 statistics). A no-op cast without autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float())


class ConvBlock(nn.Sequential):
    """conv3x3 (no bias) -> BatchNorm -> ReLU -> maxpool 2x2 (the pool deferred past the
    slot when the slot sits before it)."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool = True) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            Fp32BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.MaxPool2d(2) if pool else nn.Identity(),
        )


class CNNHost(Host):
    topology: Topology = "cnn"

    def __init__(self, config: CNNHostConfig) -> None:
        super().__init__()
        channels = config.block_channels()
        self.slot_before_pool = config.slot_before_pool
        slot_blocks = {p - 1 for p in config.slot_after}
        blocks = [
            ConvBlock(
                config.in_channels if i == 0 else channels[i - 1],
                channels[i],
                pool=not (config.slot_before_pool and i in slot_blocks),
            )
            for i in range(config.n_blocks)
        ]
        bounds = (0, *config.slot_after)
        self.segments = nn.ModuleList(nn.Sequential(*blocks[a:b]) for a, b in zip(bounds, bounds[1:]))
        self.rest = nn.Sequential(*blocks[config.slot_after[-1] :])
        self.head = nn.Linear(channels[-1], config.num_classes)

    def segment(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.slot_before_pool and index > 0:
            x = F.max_pool2d(x, 2)  # the pool of the block before the previous slot
        return self.segments[index](x)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot_before_pool:
            x = F.max_pool2d(x, 2)
        return self.head(self.rest(x).mean(dim=(-2, -1)))

    def packed_segment(self, packed: Packed, index: int, x: torch.Tensor) -> torch.Tensor:
        """`segment` of all envs on packed features (`esper_func/core/packed.py`)."""
        if self.slot_before_pool and index > 0:
            x = F.max_pool2d(x, 2)
        return packed.run(self.segments[index], f"host.segments.{index}.", x)

    def packed_tail(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        """`tail` of all envs: packed features -> logits `[B, N, classes]`."""
        if self.slot_before_pool:
            x = F.max_pool2d(x, 2)
        return packed.linear("host.head.", packed.pooled(packed.run(self.rest, "host.rest.", x)))


class TransformerBlock(nn.Module):
    """Pre-norm GPT block: x + attn(LN x), then x + MLP(LN x)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class Embedding(nn.Module):
    """Token embedding plus a learned positional embedding."""

    def __init__(self, vocab_size: int, dim: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(context, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[-1]
        if length > self.context:
            raise ValueError(f"sequence length {length} exceeds the host context {self.context}")
        return self.token(tokens) + self.position[:length]


class TransformerHost(Host):
    topology: Topology = "transformer"

    def __init__(self, config: TransformerHostConfig) -> None:
        super().__init__()
        self.n_layers = config.n_layers
        self.embed = Embedding(config.vocab_size, config.dim, config.context)
        layers = [TransformerBlock(config.dim, config.n_heads) for _ in range(config.n_layers)]
        bounds = (0, *config.slot_after)
        self.segments = nn.ModuleList(nn.Sequential(*layers[a:b]) for a, b in zip(bounds, bounds[1:]))
        self.rest = nn.Sequential(*layers[config.slot_after[-1] :])
        self.ln_f = nn.LayerNorm(config.dim)

    def init_overrides(self) -> dict[str, Init]:
        rules = gpt_linear_overrides(self)
        residual = Init("normal", 0.02 / math.sqrt(2 * self.n_layers))
        for name, _ in self.named_parameters():
            if name.endswith(("attn.proj.weight", ".proj.weight")):
                rules[name] = residual
        rules["embed.token.weight"] = Init("normal", 0.02)
        rules["embed.position"] = Init("normal", 0.02)
        return rules

    def segment(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            x = self.embed(x)
        return self.segments[index](x)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Remaining layers, final norm, and the head tied to the token embedding."""
        return F.linear(self.ln_f(self.rest(x)), self.embed.token.weight)


def build_host(config: HostConfig) -> Host:
    if isinstance(config, CNNHostConfig):
        return CNNHost(config)
    return TransformerHost(config)
