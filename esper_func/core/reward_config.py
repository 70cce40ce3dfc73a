"""The reward's configuration: the family, the ablation switches, every constant of the
formulas, and the per-task presets of the loss scale. The formulas are in
`reward_components.py`, each in the docstring of the function computing it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from esper_func.core.config import require

BUILTIN_FAMILIES: tuple[str, ...] = ("shaped", "sparse", "minimal", "simplified", "loss", "accuracy")
"""The built-in reward families, in order (their components: `rewards.FAMILY_COMPONENTS`)."""

ADDED_FAMILIES: dict[str, dict[str, Callable[..., torch.Tensor]]] = {}
"""Families added with `rewards.register_reward_family`: name -> ordered components. Kept
here, below the formulas, so that a config can check its family without importing them."""


def family_names() -> list[str]:
    """The families a `RewardConfig` may name: the built-in ones, then the added ones."""
    return [*BUILTIN_FAMILIES, *ADDED_FAMILIES]


@dataclass(frozen=True)
class RewardConfig:
    """Reward family, ablation switches and every constant of the formulas.

    Magnitudes are non-negative; the sign of each term is in its formula (the docstring
    of the component computing it, `reward_components.py`). esper-lite's values, with a
    probation penalty linear (and capped) in the epochs past the grace period.
    """

    family: str = "shaped"
    """A built-in family (`BUILTIN_FAMILIES`) or one added with `register_reward_family`."""
    gamma: float = 0.995
    """Discount of the PBRS term; must equal the PPO gamma (validated by the run config)."""
    pbrs: bool = True
    terminal: bool = True
    anti_gaming: bool = True
    """The ratio penalty `q` of attribution (off: no penalty)."""

    attribution_weight: float = 1.0
    proxy_weight: float = 0.0
    """Attribution per pp of host accuracy gain for a seed in TRAINING, whose contribution is
    not measured. The reference paid 0.3; here 0: a TRAINING seed's output is the host's
    own (gradient isolation), its contribution is exactly 0, so it cannot have caused the
    gain, and paying it taught PPO to keep many seeds in TRAINING and cull them before they
    are measured (45 germinated, 0 fossilized in an early default run)."""
    discount_steepness: float = 10.0
    ratio_penalty_min_contribution: float = 1.0
    ratio_penalty_min_discount: float = 0.5
    ratio_penalty_min_improvement: float = 0.1
    ratio_penalty_threshold: float = 5.0
    ratio_penalty_slope: float = 0.1
    ratio_penalty_cap: float = 0.3
    ratio_penalty_flat_scale: float = 10.0

    blending_warning_base: float = 0.1
    blending_warning_slope: float = 0.05
    blending_warning_cap: float = 0.3

    probation_grace_epochs: int = 2
    probation_penalty_base: float = 0.1
    probation_penalty_slope: float = 0.05
    probation_penalty_cap: float = 0.3

    pbrs_weight: float = 0.3
    potential_germinated: float = 1.0
    potential_training: float = 2.0
    potential_blending: float = 3.5
    potential_probationary: float = 5.5
    potential_fossilized: float = 7.5
    """At least potential_probationary + progress_cap, so fossilizing never loses potential
    (the reference's 6.0 made PBRS charge a fossilization after two probation epochs)."""
    progress_per_epoch: float = 0.3
    progress_cap: float = 2.0

    rent_weight: float = 0.5
    rent_cap: float = 8.0

    cull_young_age: int = 1
    cull_young_penalty: float = 0.3
    cull_harmful_threshold: float = 0.5
    cull_harmful_bonus: float = 0.3
    cull_negative_bonus: float = 0.1
    cull_helpful_base: float = 0.3
    cull_helpful_slope: float = 0.05
    cull_helpful_cap: float = 0.9
    fossilize_negative_base: float = 0.5
    fossilize_negative_slope: float = 0.2
    fossilize_negative_cap: float = 1.0
    ransomware_penalty: float = 0.3
    ransomware_min_contribution: float = 0.1
    ransomware_improvement: float = 0.2
    fossilize_min_contribution: float = 1.0
    fossilize_base_bonus: float = 0.5
    fossilize_contribution_scale: float = 0.1
    fossilize_legitimacy_epochs: int = 5
    fossilize_weak_penalty: float = 0.2

    germinate_cost: float = 0.02
    cull_cost: float = 0.005
    fossilize_cost: float = 0.01

    terminal_acc_weight: float = 0.05
    """Per pp of final validation accuracy."""
    terminal_fossil_bonus: float = 3.0
    contributing_min_contribution: float = 1.0
    """Smoothed counterfactual contribution (pp) a fossil needs at the end to earn the bonus."""

    governor_penalty: float = 10.0

    sparse_scale: float = 1.0
    sparse_param_penalty: float = 0.1
    sparse_param_budget: int = 500_000
    minimal_early_cull_age: int = 5
    minimal_early_cull_penalty: float = 0.1

    simplified_action_cost: float = 0.01
    simplified_terminal_acc_weight: float = 0.03
    """Per pp (the reference's 3 * acc / 100)."""
    simplified_fossil_bonus: float = 2.0

    loss_sigma: float = 0.05
    """Typical epoch-to-epoch change of the validation loss (task-aware)."""
    loss_clip: float = 5.0
    loss_regression_scale: float = 0.5
    loss_progress_weight: float = 5.0
    loss_rent_weight: float = 0.05
    loss_rent_cap: float = 5.0
    loss_rent_min_age: int = 3
    loss_pbrs_weight: float = 0.1
    loss_baseline: float = 2.3
    """Validation loss that earns no terminal reward (random guessing; task-aware)."""
    loss_target: float = 0.3
    """Validation loss that earns the full terminal reward (task-aware)."""
    accuracy_progress_weight: float = 1.0
    """Family "accuracy": reward per pp of validation accuracy gained in an epoch."""
    accuracy_rent_weight: float = 0.05
    """Family "accuracy": rent per epoch per host-size of seed parameters (in the units of
    one pp of accuracy at weight 1). At 0.05 a seed the size of the host must add more
    than about 1 pp over a 25-epoch episode to pay for itself."""
    static_baseline: bool = False
    """Family "accuracy": pay accuracy progress relative to a static twin, the same initial
    host trained on the same batches and never grown, which the env then trains beside
    every env. The return becomes the accuracy the controller's growth added over keeping
    the host static, minus rent: the episode's draw (host initialization, batches), which
    moves every policy's return alike, cancels out of it, and the optimal policy is
    unchanged (the twin's progress does not depend on the actions)."""

    def __post_init__(self) -> None:
        require(
            self.family in family_names(),
            f"RewardConfig.family must be one of {family_names()}, got {self.family!r}; "
            "add a family with esper_func.core.rewards.register_reward_family",
        )
        require(0.0 < self.gamma <= 1.0, f"RewardConfig.gamma must be in (0, 1], got {self.gamma}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (bool, str)):
                continue
            require(
                math.isfinite(value) and value >= 0,
                f"RewardConfig.{f.name} must be a finite number >= 0 (signs are in the formulas), got {value}",
            )
        for name in (
            "discount_steepness",
            "ratio_penalty_threshold",
            "ratio_penalty_flat_scale",
            "loss_sigma",
            "sparse_param_budget",
            "cull_young_age",
            "fossilize_legitimacy_epochs",
        ):
            require(getattr(self, name) > 0, f"RewardConfig.{name} must be > 0 (it divides), got {getattr(self, name)}")
        require(
            self.ratio_penalty_min_discount <= 1.0,
            f"RewardConfig.ratio_penalty_min_discount must be in [0, 1], got {self.ratio_penalty_min_discount}",
        )
        require(
            not self.static_baseline or self.family == "accuracy",
            f"RewardConfig.static_baseline pays accuracy progress relative to a static twin, which only the "
            f"'accuracy' family reads; got family {self.family!r}: set family='accuracy' or static_baseline=false",
        )
        require(
            self.loss_baseline > self.loss_target,
            f"RewardConfig.loss_baseline ({self.loss_baseline}) must exceed loss_target ({self.loss_target})",
        )

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> RewardConfig:
        """Defaults with the task's loss scale (sigma, baseline, target, loss rent weight)."""
        require(task in _TASK_LOSS, f"RewardConfig.for_task: unknown task {task!r}; choose one of {sorted(_TASK_LOSS)}")
        return cls(**{**_TASK_LOSS[task], **overrides})


_CIFAR_LOSS: dict[str, float] = {"loss_sigma": 0.05, "loss_baseline": 2.3, "loss_target": 0.3, "loss_rent_weight": 0.05}
_TASK_LOSS: dict[str, dict[str, float]] = {
    "synthetic": _CIFAR_LOSS,  # 10-class classification, like CIFAR-10
    "cifar10": _CIFAR_LOSS,
    # Byte-level tokens: the random-guess loss is ln 256 (the reference's 10.8 was ln of GPT-2's vocabulary).
    "tinystories": {"loss_sigma": 0.15, "loss_baseline": 5.545, "loss_target": 1.5, "loss_rent_weight": 0.01},
}
