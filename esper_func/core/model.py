"""The morphogenetic network and its static description.

`MorphogeneticNet` is a template `nn.Module`: a host plus, per slot, a seed bank holding
every blueprint of the host's topology and a blend gate. It is never trained in place;
the core calls it with one env's parameters through `functional_call` under `vmap`.
Which stage a slot is in arrives as data (`mode`, `detach`, `blueprint`, `gated`,
`alpha`), so one traced graph serves every env in every stage.

`Model` bundles the templates with the static facts the pure functions need (parameter
names by group, parameter counts, the topology); all mutable data lives in the state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import IntEnum

import torch
from tensordict import TensorDict
from torch import nn

from esper_func.core.blending import BlendGate
from esper_func.core.blueprints import Blueprint, Topology, catalogue
from esper_func.core.config import CoreConfig
from esper_func.core.hosts import Host, build_host
from esper_func.core.stages import BLENDED, IN_FORWARD, STRAIGHT_THROUGH, BlendMode, stage_lookup


class SlotMode(IntEnum):
    """What a slot's output is, per env: derived from the stage (or forced for counterfactuals)."""

    IDENTITY = 0  # host features pass through; the seed does not run
    STRAIGHT_THROUGH = 1  # value of the host, gradient into the seed (GERMINATED, TRAINING)
    BLEND = 2  # value lerp(host, seed, alpha) (BLENDING, PROBATIONARY, FOSSILIZED)


@dataclass(frozen=True)
class SlotPlan:
    """The part of a slot's bank that some env uses: blueprint indices and whether a gate runs."""

    blueprints: tuple[int, ...]
    gated: bool


BankPlan = tuple[SlotPlan, ...]


class SeedBank(nn.Module):
    def __init__(self, topology: Topology, classes: tuple[type[Blueprint], ...], channels: int) -> None:
        super().__init__()
        self.blueprints = nn.ModuleDict({cls.name: cls(channels) for cls in classes})
        self.gate = BlendGate(channels, spatial=topology == "cnn")


class MorphogeneticNet(nn.Module):
    def __init__(self, config: CoreConfig) -> None:
        super().__init__()
        self.host: Host = build_host(config.host)
        self.topology: Topology = self.host.topology
        classes = catalogue(self.topology, config.blueprints)
        self.names = tuple(cls.name for cls in classes)
        self.banks = nn.ModuleList(SeedBank(self.topology, classes, c) for c in config.host.slot_channels())

    def forward(
        self,
        x: torch.Tensor,
        mode: torch.Tensor,
        detach: torch.Tensor,
        blueprint: torch.Tensor,
        gated: torch.Tensor,
        alpha: torch.Tensor,
        plan: BankPlan,
    ) -> torch.Tensor:
        """Logits for one env: per-slot controls are `[S]` tensors, `plan` is static."""
        h = x
        for s, slot_plan in enumerate(plan):
            h = self.host.segment(s, h)
            if slot_plan.blueprints:
                h = self.slot(s, h, mode[s], detach[s], blueprint[s], gated[s], alpha[s], slot_plan)
        return self.host.tail(h)

    def slot(
        self,
        s: int,
        h: torch.Tensor,
        mode: torch.Tensor,
        detach: torch.Tensor,
        blueprint: torch.Tensor,
        gated: torch.Tensor,
        alpha: torch.Tensor,
        plan: SlotPlan,
    ) -> torch.Tensor:
        """The morphogenetic forward at one slot (docs/architecture.md, where each lifecycle stage lives)."""
        bank = self.banks[s]
        seed_input = torch.where(detach, h.detach(), h)
        seed = None
        for index in plan.blueprints:
            out = bank.blueprints[self.names[index]](seed_input)
            seed = out if seed is None else torch.where(blueprint == index, out, seed)
        assert seed is not None
        seed = seed.to(h.dtype)  # under bf16 autocast a seed's convs are bf16, the host's stream fp32
        weight = alpha
        if plan.gated:
            weight = torch.where(gated, alpha * bank.gate(seed_input), alpha).to(h.dtype)
        # Value lerp(h, seed, weight). Written as a residual on the seed's own input so that
        # the host keeps its full identity gradient when that input is detached (v2; the
        # v1 lerp(h, s(h.detach()), alpha) scaled the gradient into every host layer before
        # the slot by 1 - alpha, to none at alpha 1). Undetached, it equals the lerp.
        blended = h + weight * (seed - seed_input)
        straight_through = h + (seed - seed.detach())
        return torch.where(
            mode == int(SlotMode.BLEND),
            blended,
            torch.where(mode == int(SlotMode.STRAIGHT_THROUGH), straight_through, h),
        )


@dataclass(frozen=True, eq=False)
class Model:
    """Templates (train- and eval-mode) plus static facts; holds no per-env data."""

    config: CoreConfig
    device: torch.device
    net_train: MorphogeneticNet
    net_eval: MorphogeneticNet
    param_names: tuple[str, ...]
    buffer_names: tuple[str, ...]
    host_param_names: tuple[str, ...]
    slot_param_names: tuple[tuple[str, ...], ...]
    """Per slot: every bank parameter (all blueprints and the gate)."""
    blueprint_param_count: torch.Tensor
    """`[S, n_blueprints]` int64: parameters of each blueprint at each slot."""
    gate_param_count: torch.Tensor
    """`[S]` int64: parameters of each slot's blend gate."""
    host_param_count: int
    packed: bool
    """Whether training and evaluation run the envs packed (`CoreConfig.env_batching`,
    `esper_func/core/packed.py`) rather than under `vmap`."""

    @property
    def topology(self) -> Topology:
        return self.net_train.topology

    @property
    def blueprint_names(self) -> tuple[str, ...]:
        return self.net_train.names

    @property
    def n_slots(self) -> int:
        return len(self.slot_param_names)


def build_model(config: CoreConfig, device: torch.device | str = "cpu") -> Model:
    device = torch.device(device)
    net = MorphogeneticNet(config).to(device)
    names = tuple(name for name, _ in net.named_parameters())
    host_names = tuple(n for n in names if n.startswith("host."))
    slot_names = tuple(tuple(n for n in names if n.startswith(f"banks.{s}.")) for s in range(len(net.banks)))
    counts = [
        [sum(p.numel() for p in bank.blueprints[name].parameters()) for name in net.names] for bank in net.banks
    ]
    return Model(
        config=config,
        device=device,
        net_train=net.train(),
        net_eval=copy.deepcopy(net).eval(),
        param_names=names,
        buffer_names=tuple(name for name, _ in net.named_buffers()),
        host_param_names=host_names,
        slot_param_names=slot_names,
        blueprint_param_count=torch.tensor(counts, dtype=torch.int64, device=device),
        gate_param_count=torch.tensor(
            [sum(p.numel() for p in bank.gate.parameters()) for bank in net.banks], device=device
        ),
        host_param_count=sum(p.numel() for p in net.host.parameters()),
        packed=config.packs_envs(device),
    )


def slot_controls(model: Model, slots: TensorDict) -> dict[str, torch.Tensor]:
    """Forward controls `[N, S]` from the lifecycle fields: mode, detach, blueprint, gated, alpha.

    The seed reads a detached input in GERMINATED and TRAINING, and in
    BLENDING/PROBATIONARY for CNN hosts (spatial hierarchies should not co-adapt); the
    host's own path keeps its full gradient in every stage. FOSSILIZED seeds are never
    detached.
    """
    stage = slots["stage"]
    mode = torch.where(
        stage_lookup(STRAIGHT_THROUGH, stage),
        int(SlotMode.STRAIGHT_THROUGH),
        torch.where(stage_lookup(IN_FORWARD, stage), int(SlotMode.BLEND), int(SlotMode.IDENTITY)),
    )
    detach = stage_lookup(STRAIGHT_THROUGH, stage)
    if model.topology == "cnn":
        detach = detach | stage_lookup(BLENDED, stage)
    return {
        "mode": mode,
        "detach": detach,
        "blueprint": slots["blueprint"],
        "gated": slots["blend"] == int(BlendMode.GATED),
        "alpha": slots["alpha"],
    }


def full_plan(model: Model) -> BankPlan:
    """Every blueprint and the gate at every slot: one graph for all states."""
    every = tuple(range(len(model.blueprint_names)))
    return tuple(SlotPlan(every, True) for _ in range(model.n_slots))


def active_plan(model: Model, slots: TensorDict) -> BankPlan:
    """Only what some env's seed in the forward pass uses. Reads `[N, S]` fields to host once."""
    packed = torch.stack(
        (
            stage_lookup(IN_FORWARD, slots["stage"]).long(),
            slots["blueprint"],
            (slots["blend"] == int(BlendMode.GATED)).long(),
        )
    ).cpu()
    in_forward, blueprint, gated = packed[0].bool(), packed[1], packed[2].bool()
    plans = []
    for s in range(model.n_slots):
        used = in_forward[:, s]
        plans.append(
            SlotPlan(
                tuple(sorted(set(blueprint[used, s].tolist()))),
                bool((gated[:, s] & used).any()),
            )
        )
    return tuple(plans)


def bank_plan(model: Model, slots: TensorDict) -> BankPlan:
    return full_plan(model) if model.config.bank_mode == "full" else active_plan(model, slots)
