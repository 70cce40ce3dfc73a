"""Alpha schedules and the learned blend gate.

A BLENDING seed ramps alpha over `blend_steps` epochs: alpha(k) = curve(k / blend_steps)
for k = 1..blend_steps, so the ramp ends at exactly 1. Curves: linear; sigmoid rescaled
to hit exactly 0 and 1; gated uses the linear ramp as an amplitude that multiplies a
learned per-sample gate (per token for transformers, so no future token leaks in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from esper_func.core.initialization import ZERO, Init, Initialized
from esper_func.core.stages import BlendMode

if TYPE_CHECKING:
    from esper_func.core.packed_modules import Packed


def alpha_schedule(
    blend: torch.Tensor, step: torch.Tensor, total: int, steepness: float | torch.Tensor
) -> torch.Tensor:
    """Scheduled alpha for blend modes `blend` at integer `step` of `total` (any shape).

    `steepness` may be a tensor (broadcast against `step`), so a sweep over it is one
    `vmap` or one broadcast call."""
    t = (step.to(torch.float32) / total).clamp(0.0, 1.0)
    # A float is filled on the device (no host-to-device copy); a tensor is used as is.
    half = steepness / 2 if isinstance(steepness, torch.Tensor) else t.new_full((), steepness / 2)
    low, high = torch.sigmoid(-half), torch.sigmoid(half)
    sigmoid = ((torch.sigmoid(steepness * (t - 0.5)) - low) / (high - low)).clamp(0.0, 1.0)
    # Exact endpoints regardless of rounding in the rescale.
    sigmoid = torch.where(t >= 1.0, torch.ones_like(t), torch.where(t <= 0.0, torch.zeros_like(t), sigmoid))
    return torch.where(blend == int(BlendMode.SIGMOID), sigmoid, t)


class BlendGate(Initialized):
    """Per-sample gate in (0, 1) read from the seed's input: pooled -> MLP -> sigmoid.

    CNN features `[B, C, H, W]` are pooled over space, giving `[B, 1, 1, 1]`; transformer
    features `[B, T, D]` are gated per token, giving `[B, T, 1]`. Starts at 0.5.
    """

    def __init__(self, channels: int, spatial: bool) -> None:
        super().__init__()
        hidden = max(1, channels // 4)
        self.spatial = spatial
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def init_overrides(self) -> dict[str, Init]:
        return {"fc2.weight": ZERO, "fc2.bias": ZERO}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial:
            gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(-2, -1))))))
            return gate[..., None, None]
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(x))))

    def packed_forward(self, packed: Packed, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """The spatial gate of all envs on packed features: `[B, N*C, H, W]` -> `[B, N]`."""
        hidden = torch.relu(packed.linear(prefix + "fc1.", packed.pooled(x)))
        return torch.sigmoid(packed.linear(prefix + "fc2.", hidden)).squeeze(-1)
