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

from esper_func.blueprints import Topology, catalogue
from esper_func.masks import EXCLUDED_BLUEPRINTS
from esper_func.config import ConfigError
from esper_func.stages import LIVE, BlendMode, Op, Stage, stage_lookup

HEADS: tuple[str, ...] = ("op", "slot", "blueprint", "blend")
ACTION_KEYS = [("action", head) for head in HEADS]
MASK_KEYS = [("action_mask", head) for head in HEADS]


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (0 when none)."""
    return mask.long().argmax(-1)


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
        for head in HEADS:
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


@dataclass(frozen=True)
class HeuristicConfig:
    """The reference's rule constants (Tamiyo)."""

    require_stabilization: bool = True
    """Germinate only after the host's loss has stabilized (the signals' latch)."""
    min_epoch_to_germinate: int = 5
    plateau_epochs_to_germinate: int = 3
    germinate_by_epoch: int | None = 10
    """With no live seed, germinate from this epoch on even if the host has not plateaued.

    Not in the reference, whose epochs were ~12k samples: with short epochs the host is
    still improving when the episode ends, so the plateau rule alone never grows anything
    in time (a seed needs about 10 epochs from germination to fossilization)."""
    cull_after_epochs: int = 5
    cull_below_improvement: float = -2.0
    blueprint_penalty_on_cull: float = 2.0
    blueprint_penalty_decay: float = 0.5
    blueprint_penalty_threshold: float = 3.0
    blend: int = int(BlendMode.SIGMOID)

    def __post_init__(self) -> None:
        if not 0.0 <= self.blueprint_penalty_decay <= 1.0:
            raise ConfigError("HeuristicConfig.blueprint_penalty_decay must be in [0, 1]")


ROTATION: dict[Topology, tuple[str, ...]] = {
    "cnn": ("conv_light", "conv_heavy", "attention", "norm", "depthwise"),
    "transformer": ("lora", "attention", "mlp", "norm"),
}


class HeuristicPolicy(TensorDictModuleBase):
    """The reference heuristic, per env, as tensor operations.

    With no live seed: germinate in the first empty slot once the host has stabilized, after
    `min_epoch_to_germinate`, on a plateau of `plateau_epochs_to_germinate` epochs, or in
    any case from `germinate_by_epoch` on; the
    blueprint rotates through `ROTATION` (those the model carries, then any other blueprint
    of `blueprint_names` the masks offer), skipping blueprints whose penalty (+2 per cull,
    halved each epoch) is at least 3. With a live seed (the first in canonical order):
    cull it in TRAINING/BLENDING after 5 epochs in stage if accuracy fell more than 2 pp
    since the stage began; in PROBATIONARY fossilize when the gate allows it, cull when the
    contribution is not positive, otherwise wait for the timeout. Its memory (rotation
    position, penalties) is per env and starts over when an env's epoch is 0.
    """

    in_keys = MASK_KEYS + [
        ("seeds", "stage"),
        ("seeds", "blueprint"),
        ("seeds", "epochs_in_stage"),
        ("seeds", "contribution"),
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
        rotation = [names.index(name) for name in ROTATION[topology] if name in names] + [names.index(name) for name in extra]
        if not rotation:
            raise ValueError(f"no blueprint to germinate among {list(names)}")
        self.register_buffer("rotation", torch.tensor(rotation, dtype=torch.int64, device=device))
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
        has_live = live.any(-1)
        first = first_true(live)
        at = first.unsqueeze(-1)
        live_stage = stage.gather(1, at).squeeze(-1)
        eis = tensordict["seeds", "epochs_in_stage"].gather(1, at).squeeze(-1)
        improvement = tensordict["seeds", "improvement"].gather(1, at).squeeze(-1)
        contribution = tensordict["seeds", "contribution"].gather(1, at).squeeze(-1)
        slot_mask = tensordict["action_mask", "slot"]

        def legal_at(op: Op, slot: torch.Tensor) -> torch.Tensor:
            return slot_mask[:, int(op)].gather(1, slot.unsqueeze(-1)).squeeze(-1)

        growing = (live_stage == int(Stage.TRAINING)) | (live_stage == int(Stage.BLENDING))
        cull_growing = growing & (eis >= config.cull_after_epochs) & (improvement < config.cull_below_improvement)
        probation = live_stage == int(Stage.PROBATIONARY)
        fossilize = has_live & probation & legal_at(Op.FOSSILIZE, first)
        cull = has_live & (cull_growing | (probation & (contribution <= 0))) & legal_at(Op.CULL, first)

        empty = slot_mask[:, int(Op.GERMINATE)]
        plateaued = (
            (tensordict["signals", "stabilized"] | (not config.require_stabilization))
            & (epoch >= config.min_epoch_to_germinate)
            & (tensordict["signals", "plateau_epochs"] >= config.plateau_epochs_to_germinate)
        )
        no_deadline = config.germinate_by_epoch is None
        deadline = torch.zeros_like(plateaued) if no_deadline else epoch >= config.germinate_by_epoch
        germinate = ~has_live & empty.any(-1) & (plateaued | deadline)
        blueprint, position = self._choose_blueprint()

        op = torch.full_like(epoch, int(Op.WAIT))
        op = torch.where(germinate, int(Op.GERMINATE), op)
        op = torch.where(cull, int(Op.CULL), op)
        op = torch.where(fossilize, int(Op.FOSSILIZE), op)
        slot = torch.where(germinate, first_true(empty), first)

        culled_blueprint = tensordict["seeds", "blueprint"].gather(1, at).squeeze(-1)
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
