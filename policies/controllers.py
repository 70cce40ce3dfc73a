"""Rule-based controllers as TensorDict modules over all envs at once.

Each reads the env's output keys (`("action_mask", head)`, `("seeds", key)`,
`("metrics", key)`, `("signals", key)`) and writes `("action", head)` for the heads op,
slot, blueprint and blend. Sampling is op first, then the slot from that op's mask row,
so every action they emit is legal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from esper_func.core.blueprints import Topology, catalogue
from esper_func.core.config import ConfigError
from esper_func.core.masks import EXCLUDED_BLUEPRINTS
from esper_func.core.stages import ACTION_HEADS, LIVE, BlendMode, Op, Stage, stage_lookup

ACTION_KEYS = [("action", head) for head in ACTION_HEADS]
MASK_KEYS = [("action_mask", head) for head in ACTION_HEADS]


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (0 when none)."""
    return mask.long().argmax(-1)


def check_slot_order(slot_order: tuple[int, ...], owner: str) -> None:
    """A germination order must list each slot index exactly once."""
    if not slot_order or sorted(slot_order) != list(range(len(slot_order))):
        raise ConfigError(f"{owner}.slot_order must list each slot index once, got {slot_order}")


def slot_row(slot_mask: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """`[N, S]` slot mask for each env's op, from the op-conditioned `[N, 4, S]` mask."""
    return slot_mask.gather(1, op.view(-1, 1, 1).expand(-1, 1, slot_mask.shape[-1])).squeeze(1)


class StaticPolicy(TensorDictModuleBase):
    """Always WAIT: the host trains alone."""

    in_keys = MASK_KEYS
    out_keys = ACTION_KEYS

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        op_mask = tensordict["action_mask", "op"]
        zeros = torch.zeros(op_mask.shape[:-1], dtype=torch.int64, device=op_mask.device)
        for head in ACTION_HEADS:
            tensordict["action", head] = zeros
        return tensordict


class RandomPolicy(TensorDictModuleBase):
    """Uniform over legal actions: op uniform over legal ops, then slot, blueprint, blend."""

    in_keys = MASK_KEYS
    out_keys = ACTION_KEYS

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = generator

    def _sample(self, mask: torch.Tensor) -> torch.Tensor:
        if not bool(mask.any(-1).all()):
            bad = torch.nonzero(~mask.any(-1)).flatten().tolist()
            raise ValueError(f"action mask has no legal entry for env(s) {bad}")
        weights = mask.to(torch.float32)
        return torch.multinomial(weights, 1, generator=self.generator).squeeze(-1)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        op = self._sample(tensordict["action_mask", "op"])
        tensordict["action", "op"] = op
        tensordict["action", "slot"] = self._sample(slot_row(tensordict["action_mask", "slot"], op))
        tensordict["action", "blueprint"] = self._sample(tensordict["action_mask", "blueprint"])
        tensordict["action", "blend"] = self._sample(tensordict["action_mask", "blend"])
        return tensordict


class ScriptedGrowthPolicy(TensorDictModuleBase):
    """"Grow early and keep": germinate `blueprint` in every empty slot as soon as legal
    (one per epoch, in `slot_order`), fossilize as soon as the gate (G5) allows, never
    cull. The lifecycle's own rules (TRAINING timeout, probation cull) still apply, and a
    slot they free is grown again once it is DORMANT. An upper reference for what growing
    one blueprint everywhere buys, with no judgement about when or where."""

    in_keys = MASK_KEYS
    out_keys = ACTION_KEYS

    def __init__(
        self, blueprint: int, slot_order: tuple[int, ...] = (0, 1, 2), blend: int = int(BlendMode.SIGMOID)
    ) -> None:
        super().__init__()
        check_slot_order(slot_order, "ScriptedGrowthPolicy")
        self.blueprint = blueprint
        self.register_buffer("slot_order", torch.tensor(slot_order, dtype=torch.int64))
        self.blend = blend

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        slot_mask = tensordict["action_mask", "slot"]
        order = self.slot_order
        fossilizable = slot_mask[:, int(Op.FOSSILIZE)]
        empty = slot_mask[:, int(Op.GERMINATE)][:, order]
        fossilize = fossilizable.any(-1)
        germinate = ~fossilize & empty.any(-1)
        op = torch.where(fossilize, int(Op.FOSSILIZE), torch.where(germinate, int(Op.GERMINATE), int(Op.WAIT)))
        tensordict["action", "op"] = op
        tensordict["action", "slot"] = torch.where(fossilize, first_true(fossilizable), order[first_true(empty)])
        tensordict["action", "blueprint"] = torch.full_like(op, self.blueprint)
        tensordict["action", "blend"] = torch.full_like(op, self.blend)
        return tensordict


@dataclass(frozen=True)
class HeuristicConfig:
    """The reference's rule constants (Tamiyo)."""

    require_stabilization: bool = True
    """Germinate only after the host's loss has stabilized (the signals' latch)."""
    min_epoch_to_germinate: int = 3
    plateau_epochs_to_germinate: int = 2
    germinate_by_epoch: int | None = 6
    """Germinate from this epoch on even if the host has not plateaued.

    Not in the reference, whose epochs were ~12k samples: under the default cosine rate the
    host is still improving when the episode ends, so the plateau rule alone grows too late
    to pay (a seed needs about 6 epochs from germination to fossilization, and what it adds
    shows over the epochs after that). v2 values (reference 5, 3, and no deadline):
    docs/architecture.md."""
    slot_order: tuple[int, ...] = (0, 1, 2)
    """Slots in the order empty ones are germinated (v1 always took the first empty slot in
    canonical order, and could take no other)."""
    max_live_seeds: int = 2
    """Germinate only while fewer seeds than this are live (the reference: one at a time,
    which leaves a 25-epoch episode room for about two seeds)."""
    cull_after_epochs: int = 5
    cull_below_improvement: float = -2.0
    blueprint_penalty_on_cull: float = 2.0
    blueprint_penalty_decay: float = 0.5
    blueprint_penalty_threshold: float = 3.0
    blend: int = int(BlendMode.SIGMOID)

    def __post_init__(self) -> None:
        if not 0.0 <= self.blueprint_penalty_decay <= 1.0:
            raise ConfigError("HeuristicConfig.blueprint_penalty_decay must be in [0, 1]")
        check_slot_order(self.slot_order, "HeuristicConfig")
        if self.max_live_seeds < 1:
            raise ConfigError(f"HeuristicConfig.max_live_seeds must be >= 1, got {self.max_live_seeds}")


ROTATION: dict[Topology, tuple[str, ...]] = {
    "cnn": ("conv_wide", "conv_heavy", "conv_light", "attention", "depthwise", "norm"),
    "transformer": ("lora", "attention", "mlp", "norm"),
}


class HeuristicPolicy(TensorDictModuleBase):
    """The reference heuristic, per env, as tensor operations.

    One op per env and epoch, by priority: fossilize a PROBATIONARY seed the gate (G5, on
    the smoothed contribution) allows; cull a TRAINING/BLENDING seed that has been in its
    stage 5 epochs while accuracy fell more than 2 pp since the stage began; germinate,
    while fewer than `max_live_seeds` seeds are live, in the first empty slot of
    `slot_order`, once the host has stabilized, after `min_epoch_to_germinate`, on a
    plateau of `plateau_epochs_to_germinate` epochs, or in any case from
    `germinate_by_epoch` on. PROBATIONARY seeds that do not contribute are left to the
    lifecycle's own probation cull (on the smoothed contribution, not one noisy epoch). The
    blueprint rotates through `ROTATION` (those the model carries, then any other blueprint
    of `blueprint_names` the masks offer), skipping blueprints whose penalty (+2 per cull,
    halved each epoch) is at least 3. Its memory (rotation position, penalties) is per env
    and starts over when an env's epoch is 0.
    """

    in_keys = MASK_KEYS + [
        ("seeds", "stage"),
        ("seeds", "blueprint"),
        ("seeds", "epochs_in_stage"),
        ("seeds", "improvement"),
        ("metrics", "epoch"),
        ("signals", "stabilized"),
        ("signals", "plateau_epochs"),
    ]
    out_keys = ACTION_KEYS

    def __init__(
        self,
        topology: Topology,
        n_envs: int,
        config: HeuristicConfig = HeuristicConfig(),
        device: torch.device | str = "cpu",
        blueprint_names: tuple[str, ...] = (),
    ) -> None:
        """`blueprint_names`: the model's blueprints in index order (`model.blueprint_names`);
        empty means the topology's default catalogue."""
        super().__init__()
        self.config = config
        names = blueprint_names or tuple(cls.name for cls in catalogue(topology))
        extra = [name for name in names if name not in ROTATION[topology] and name not in EXCLUDED_BLUEPRINTS]
        rotation = [names.index(name) for name in ROTATION[topology] if name in names] + [
            names.index(name) for name in extra
        ]
        if not rotation:
            raise ValueError(f"no blueprint to germinate among {list(names)}")
        self.register_buffer("rotation", torch.tensor(rotation, dtype=torch.int64, device=device))
        self.register_buffer("slot_order", torch.tensor(config.slot_order, dtype=torch.int64, device=device))
        self.register_buffer("next_pick", torch.zeros(n_envs, dtype=torch.int64, device=device))
        self.register_buffer("penalty", torch.zeros(n_envs, len(rotation), device=device))
        self.register_buffer("last_epoch", torch.full((n_envs,), -1, dtype=torch.int64, device=device))

    def _choose_blueprint(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotation pick `[N]` (blueprint index) and its rotation position."""
        n_rot = self.rotation.numel()
        order = (self.next_pick.unsqueeze(-1) + torch.arange(n_rot, device=self.rotation.device)) % n_rot
        allowed = self.penalty.gather(1, order) < self.config.blueprint_penalty_threshold
        least = self.penalty.argmin(-1)
        position = torch.where(allowed.any(-1), order.gather(1, first_true(allowed).unsqueeze(-1)).squeeze(-1), least)
        return self.rotation[position], position

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        config = self.config
        epoch = tensordict["metrics", "epoch"]
        fresh_episode = epoch == 0
        self.next_pick = torch.where(fresh_episode, 0, self.next_pick)
        self.penalty = torch.where(fresh_episode.unsqueeze(-1), 0.0, self.penalty)
        new_epoch = (epoch != self.last_epoch).unsqueeze(-1)
        decayed = self.penalty * config.blueprint_penalty_decay
        self.penalty = torch.where(new_epoch, torch.where(decayed < 0.1, 0.0, decayed), self.penalty)
        self.last_epoch = epoch

        stage = tensordict["seeds", "stage"]
        live = stage_lookup(LIVE, stage)
        slot_mask = tensordict["action_mask", "slot"]
        growing = (stage == int(Stage.TRAINING)) | (stage == int(Stage.BLENDING))
        declining = (tensordict["seeds", "epochs_in_stage"] >= config.cull_after_epochs) & (
            tensordict["seeds", "improvement"] < config.cull_below_improvement
        )
        fossilizable = (stage == int(Stage.PROBATIONARY)) & slot_mask[:, int(Op.FOSSILIZE)]
        cullable = growing & declining & slot_mask[:, int(Op.CULL)]
        order = self.slot_order
        empty_in_order = slot_mask[:, int(Op.GERMINATE)][:, order]
        plateaued = (
            (tensordict["signals", "stabilized"] | (not config.require_stabilization))
            & (epoch >= config.min_epoch_to_germinate)
            & (tensordict["signals", "plateau_epochs"] >= config.plateau_epochs_to_germinate)
        )
        no_deadline = config.germinate_by_epoch is None
        deadline = torch.zeros_like(plateaued) if no_deadline else epoch >= config.germinate_by_epoch
        room = live.sum(-1) < config.max_live_seeds
        fossilize = fossilizable.any(-1)
        cull = ~fossilize & cullable.any(-1)
        germinate = ~fossilize & ~cull & room & empty_in_order.any(-1) & (plateaued | deadline)
        blueprint, position = self._choose_blueprint()

        op = torch.full_like(epoch, int(Op.WAIT))
        op = torch.where(germinate, int(Op.GERMINATE), op)
        op = torch.where(cull, int(Op.CULL), op)
        op = torch.where(fossilize, int(Op.FOSSILIZE), op)
        slot = torch.where(
            fossilize,
            first_true(fossilizable),
            torch.where(cull, first_true(cullable), order[first_true(empty_in_order)]),
        )

        culled_blueprint = tensordict["seeds", "blueprint"].gather(1, slot.unsqueeze(-1)).squeeze(-1)
        culled_position = (self.rotation.unsqueeze(0) == culled_blueprint.unsqueeze(-1)).long().argmax(-1)
        in_rotation = (self.rotation.unsqueeze(0) == culled_blueprint.unsqueeze(-1)).any(-1)
        bump = torch.nn.functional.one_hot(culled_position, self.rotation.numel()) * (cull & in_rotation).unsqueeze(-1)
        self.penalty = self.penalty + config.blueprint_penalty_on_cull * bump
        self.next_pick = torch.where(germinate, (position + 1) % self.rotation.numel(), self.next_pick)

        tensordict["action", "op"] = op
        tensordict["action", "slot"] = slot
        tensordict["action", "blueprint"] = blueprint
        tensordict["action", "blend"] = torch.full_like(op, config.blend)
        return tensordict
