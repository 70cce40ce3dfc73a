"""Small layers shared by hosts and blueprints, written to batch cleanly under vmap."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def group_count(channels: int) -> int:
    """GroupNorm groups: the largest of 32..1 dividing C with >= 16 channels per group, else 1."""
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0 and channels // groups >= 16:
            return groups
    return 1


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention over `[..., T, head_dim]`.

    Written out (not SDPA) because SDPA has no vmap batching rule on CPU and would fall
    back to a per-sample loop; these ops batch into single kernels.
    """
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: qkv = Linear(D, 3D), out = Linear(D, D)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads != 0:
            raise ValueError(f"attention dim={dim} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_heads)
        return self.proj(rearrange(causal_attention(q, k, v), "b h t d -> b t (h d)"))
