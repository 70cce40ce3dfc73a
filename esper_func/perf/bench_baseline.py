"""The benchmark's reference-style baseline: N separate eager modules, each with its own
`torch.optim.SGD` (hyperparameters and per-group gradient clipping from `OptimConfig`),
stepped in a Python loop over envs for every batch; on CUDA each env on its own stream.
It trains exactly what the vmapped core trains (`bench.max_param_difference` checks it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

from esper_func.core.blueprints import Blueprint, build_blueprint
from esper_func.core.config import CoreConfig, OptimConfig
from esper_func.core.hosts import Host, build_host
from esper_func.core.model import Model

SEED_SLOT = 1  # the `mid` slot
SEED_BLUEPRINT = "conv_light"
SEED_ALPHA = 0.5
"""The seeded scenario's seed is BLENDING at this alpha: in the forward, and training."""


class BaselineNet(nn.Module):
    """A host, plus optionally one BLENDING seed at `SEED_SLOT` (alpha `SEED_ALPHA`)."""

    def __init__(self, host: Host, seed: Blueprint | None) -> None:
        super().__init__()
        self.host = host
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for s in range(len(self.host.segments)):
            h = self.host.segment(s, h)
            if self.seed is not None and s == SEED_SLOT:
                detached = h.detach()  # a CNN seed reads a detached input while blending
                h = h + SEED_ALPHA * (self.seed(detached) - detached)
        return self.host.tail(h)


def state_key(baseline_name: str) -> str:
    """The state's name for a baseline parameter or buffer (`host.*` match, `seed.*` map to the bank)."""
    if baseline_name.startswith("seed."):
        return f"banks.{SEED_SLOT}.blueprints.{SEED_BLUEPRINT}." + baseline_name.removeprefix("seed.")
    return baseline_name


def build_baseline_net(config: CoreConfig, scenario: str) -> BaselineNet:
    seed = None
    if scenario == "seeded":
        seed = build_blueprint("cnn", SEED_BLUEPRINT, config.host.slot_channels()[SEED_SLOT])
    return BaselineNet(build_host(config.host), seed)


@dataclass
class BaselineEnv:
    """One env of the baseline: its module, its optimizers, and a running loss (no host sync)."""

    net: BaselineNet
    optimizers: list[torch.optim.Optimizer]
    clip_norm: float | None
    loss_sum: torch.Tensor

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.net(x), y)
        loss.backward()
        if self.clip_norm is not None:  # per group, as the core: the host, and the seed
            nn.utils.clip_grad_norm_(self.net.host.parameters(), self.clip_norm)
            if self.net.seed is not None:
                nn.utils.clip_grad_norm_(self.net.seed.parameters(), self.clip_norm)
        for optimizer in self.optimizers:
            optimizer.step()
        self.loss_sum = self.loss_sum + loss.detach()


def baseline_envs(model: Model, state: TensorDict, scenario: str) -> list[BaselineEnv]:
    """One eager model per env, starting from that env's parameters and buffers in `state`."""
    config, optim = model.config, model.config.optim
    envs = []
    for k in range(state.batch_size[0]):
        net = build_baseline_net(config, scenario).to(model.device).train()
        load_env(net, state, k)
        envs.append(
            BaselineEnv(
                net, baseline_optimizers(net, optim), optim.grad_clip_norm, torch.zeros((), device=model.device)
            )
        )
    return envs


@torch.no_grad()
def load_env(net: BaselineNet, state: TensorDict, k: int) -> None:
    """Copy env `k`'s parameters and BatchNorm buffers from the stacked state into `net`."""
    for name, param in net.named_parameters():
        param.copy_(state["params", state_key(name)][k])
    for name, buffer in net.named_buffers():
        buffer.copy_(state["buffers", state_key(name)][k])


def baseline_optimizers(net: BaselineNet, optim: OptimConfig) -> list[torch.optim.Optimizer]:
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.SGD(
            net.host.parameters(), lr=optim.host_lr, momentum=optim.host_momentum, weight_decay=optim.host_weight_decay
        )
    ]
    if net.seed is not None:
        optimizers.append(torch.optim.SGD(net.seed.parameters(), lr=optim.seed_lr, momentum=optim.seed_momentum))
    return optimizers


def baseline_epoch(
    envs: Sequence[BaselineEnv], streams: Sequence[torch.cuda.Stream | None], x: torch.Tensor, y: torch.Tensor
) -> None:
    """Every batch, step every env in a Python loop (each on its own stream on CUDA)."""
    main = torch.cuda.current_stream(streams[0].device) if streams[0] is not None else None
    for stream in streams:
        if stream is not None:
            stream.wait_stream(main)  # the shared batches are ready
    for i in range(x.shape[0]):
        for env, stream in zip(envs, streams):
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                env.step(x[i], y[i])
    for stream in streams:
        if stream is not None:
            main.wait_stream(stream)
