"""Configuration of the functional core: dataclasses with validation.

Every constant the core uses lives here. Each class validates itself on construction and
names the field and the fix when a value is wrong. `config_json.from_dict` loads nested
dataclasses strictly: an unknown or mistyped key is an error that names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch

from esper_func.core.blueprints import catalogue
from esper_func.core.stages import SLOT_NAMES


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def require(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `condition`: the one way configs reject a value."""
    if not condition:
        raise ConfigError(message)


def require_fields(config: object, names: tuple[str, ...], valid: Callable[[Any], bool], requirement: str) -> None:
    """Raise `ConfigError` "<Class>.<name> must be <requirement>, got <value>" for the first
    of the fields `names` of `config` whose value fails `valid`."""
    for name in names:
        value = getattr(config, name)
        require(valid(value), f"{type(config).__name__}.{name} must be {requirement}, got {value}")


def spread_positions(depth: int, n_slots: int = len(SLOT_NAMES)) -> tuple[int, ...]:
    """Slot positions (1-indexed block/layer after which each slot sits), spread evenly."""
    return tuple(round((k + 1) * depth / n_slots) for k in range(n_slots))


@dataclass(frozen=True)
class CNNHostConfig:
    """CNN host: blocks of conv3x3 -> BatchNorm -> ReLU -> maxpool, then a linear head.

    Block i has `base_channels * channel_factor**i` channels. Slot k sits after block
    `slot_after[k]` (1-indexed), in canonical order early, mid, late.
    """

    kind: Literal["cnn"] = "cnn"
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    n_blocks: int = 3
    base_channels: int = 8
    channel_factor: int = 2
    """Channel multiplier from one block to the next (1: every block `base_channels` wide)."""
    slot_after: tuple[int, ...] = (1, 2, 3)
    slot_before_pool: bool = False
    """Slots sit inside their block, after the ReLU and before the maxpool, so a seed works
    at the block's full resolution (4x the positions of the pooled map, for the same
    parameters); False: after the pool."""

    def __post_init__(self) -> None:
        require(self.kind == "cnn", f"CNNHostConfig.kind must be 'cnn', got {self.kind!r}")
        require_fields(
            self,
            ("in_channels", "image_size", "num_classes", "n_blocks", "base_channels", "channel_factor"),
            lambda value: value >= 1,
            ">= 1",
        )
        require(self.num_classes >= 2, f"CNNHostConfig.num_classes must be >= 2, got {self.num_classes}")
        min_size = 2**self.n_blocks
        require(
            self.image_size % min_size == 0,
            f"CNNHostConfig.image_size={self.image_size} must be divisible by 2**n_blocks={min_size} "
            f"(each of the {self.n_blocks} blocks halves it); use a multiple of {min_size} or fewer blocks",
        )
        _check_slot_positions("CNNHostConfig", self.slot_after, self.n_blocks, "n_blocks")

    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * self.channel_factor**i for i in range(self.n_blocks))

    def slot_channels(self) -> tuple[int, ...]:
        channels = self.block_channels()
        return tuple(channels[p - 1] for p in self.slot_after)

    @classmethod
    def preset(cls, name: str) -> CNNHostConfig:
        presets = {
            "cifar": cls(),
            # The synthetic task's host: 16x16 images, three blocks 8 channels wide. Narrow and
            # shallow enough to plateau within an episode, wide enough at its first block that
            # seeds can use what it passes on (docs/tasks.md, calibration).
            "synthetic": cls(image_size=16, base_channels=8, channel_factor=1),
            "cifar_deep": cls(n_blocks=5, slot_after=spread_positions(5)),
            "tiny": cls(image_size=8, base_channels=4),
        }
        require(name in presets, f"unknown CNN host preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]


@dataclass(frozen=True)
class TransformerHostConfig:
    """GPT-style pre-norm transformer with a tied head; slot k sits after layer `slot_after[k]`."""

    kind: Literal["transformer"] = "transformer"
    vocab_size: int = 256
    dim: int = 384
    n_heads: int = 6
    n_layers: int = 6
    context: int = 256
    slot_after: tuple[int, ...] = (2, 4, 6)

    def __post_init__(self) -> None:
        require(
            self.kind == "transformer", f"TransformerHostConfig.kind must be 'transformer', got {self.kind!r}"
        )
        require_fields(self, ("vocab_size", "dim", "n_heads", "n_layers", "context"), lambda value: value >= 1, ">= 1")
        require(
            self.dim % self.n_heads == 0,
            f"TransformerHostConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}; "
            f"pick a dim that is a multiple of {self.n_heads}",
        )
        _check_slot_positions("TransformerHostConfig", self.slot_after, self.n_layers, "n_layers")

    def slot_channels(self) -> tuple[int, ...]:
        return tuple(self.dim for _ in self.slot_after)

    @classmethod
    def preset(cls, name: str) -> TransformerHostConfig:
        presets = {
            "tinystories": cls(),
            "tiny": cls(dim=32, n_heads=2, n_layers=3, context=16, slot_after=(1, 2, 3)),
        }
        require(name in presets, f"unknown transformer host preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]


HostConfig = Union[CNNHostConfig, TransformerHostConfig]


def _check_slot_positions(owner: str, positions: tuple[int, ...], depth: int, depth_name: str) -> None:
    require(
        len(positions) == len(SLOT_NAMES),
        f"{owner}.slot_after needs one position per slot {SLOT_NAMES}, got {positions}",
    )
    require(
        all(1 <= p <= depth for p in positions),
        f"{owner}.slot_after={positions} must lie in 1..{depth_name}={depth}",
    )
    require(
        all(a < b for a, b in zip(positions, positions[1:])),
        f"{owner}.slot_after={positions} must be strictly increasing (canonical order early, mid, late)",
    )


@dataclass(frozen=True)
class LifecycleConfig:
    """Lifecycle timing and gate thresholds (reference values; accuracies in percent)."""

    max_epochs: int = 25
    """Episode length in epochs; the TRAINING dwell and the probation timeout derive from it."""
    min_training_epochs: int = 1
    """v2 (reference 3): with the seed's update withheld before BLENDING (`stages.SEED_TRAINABLE`),
    a longer dwell only delays the seed; the germination epoch counts (a seed's age)."""
    train_dwell_fraction: float = 0.1
    grad_ratio_threshold: float = 0.01
    """G2: parameter-normalized seed/host gradient ratio EMA needed to start BLENDING. v2
    (reference 0.05): measured at birth on the synthetic host, every blueprint with
    parameters reads 0.046 to 1.6 (a zero-initialized layer scale leaves only the scale
    with gradient, and the ratio divides by all of the seed's parameters), noop 0
    (docs/architecture.md); 0.01 passes every learnable seed and no dead one."""
    grad_ratio_ema_decay: float = 0.9
    training_grace_epochs: int = 3
    """v2: epochs past the TRAINING dwell a seed may wait for G2; then it is culled, so no
    seed holds a slot (and pays rent) forever."""
    blend_steps: int = 3
    """BLENDING lasts this many epochs; alpha ramps k/blend_steps, k = 1..blend_steps. v2
    (reference 5): the seed learns from the real loss from BLENDING on, and a shorter ramp
    leaves it more of the episode at full weight (docs/architecture.md)."""
    sigmoid_steepness: float = 12.0
    fossilize_min_contribution: float = 1.0
    """G5: smoothed counterfactual contribution (percentage points) needed to fossilize."""
    contribution_ema_decay: float = 0.5
    """v2: the contribution that G5, the probation cull and the fossil bonus read is an EMA
    of the per-epoch measurement from the epoch alpha reached 1, not one noisy epoch."""
    probation_judge_epochs: int = 2
    """v2: epochs in PROBATIONARY before the automatic cull on a non-positive smoothed
    contribution may fire (the EMA then holds judge_epochs + 1 measurements)."""
    probation_min_epochs: int = 5
    probation_timeout_fraction: float = 0.1
    embargo_epochs: int = 5
    reset_epochs: int = 1
    min_cull_age: int = 1

    def __post_init__(self) -> None:
        require_fields(
            self,
            ("max_epochs", "min_training_epochs", "blend_steps", "probation_min_epochs"),
            lambda value: value >= 1,
            ">= 1",
        )
        require_fields(
            self,
            ("embargo_epochs", "reset_epochs"),
            lambda value: value >= 1,
            ">= 1 (each cooldown stage is observed for at least one epoch)",
        )
        require(self.min_cull_age >= 0, f"LifecycleConfig.min_cull_age must be >= 0, got {self.min_cull_age}")
        require_fields(self, ("training_grace_epochs", "probation_judge_epochs"), lambda value: value >= 0, ">= 0")
        require(
            0.0 <= self.contribution_ema_decay < 1.0,
            f"LifecycleConfig.contribution_ema_decay must be in [0, 1), got {self.contribution_ema_decay}",
        )
        require(
            0.0 <= self.grad_ratio_ema_decay < 1.0,
            f"LifecycleConfig.grad_ratio_ema_decay must be in [0, 1), got {self.grad_ratio_ema_decay}",
        )
        require(self.sigmoid_steepness > 0, "LifecycleConfig.sigmoid_steepness must be > 0")
        require(self.grad_ratio_threshold >= 0, "LifecycleConfig.grad_ratio_threshold must be >= 0")
        require_fields(
            self, ("train_dwell_fraction", "probation_timeout_fraction"), lambda value: 0.0 <= value <= 1.0, "in [0, 1]"
        )

    @property
    def training_epochs(self) -> int:
        """Epochs a seed must spend in TRAINING before G2 is checked: max(3, dwell)."""
        dwell = max(1, int(self.max_epochs * self.train_dwell_fraction))
        return max(self.min_training_epochs, dwell)

    @property
    def training_timeout(self) -> int:
        """Seed age (epochs, the germination epoch included) at which a seed still in
        TRAINING is culled because G2 never passed."""
        return self.training_epochs + self.training_grace_epochs

    @property
    def probation_timeout(self) -> int:
        return max(self.probation_min_epochs, int(self.probation_timeout_fraction * self.max_epochs))


@dataclass(frozen=True)
class OptimConfig:
    """Functional SGD for host and seeds; per-env gradient clipping per parameter group."""

    host_lr: float = 0.05
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """'cosine' anneals the host's and the seeds' rates over the episode
    (`LifecycleConfig.max_epochs`) to `lr_floor` times their base rate."""
    lr_floor: float = 0.02
    host_momentum: float = 0.9
    host_weight_decay: float = 5e-4
    seed_lr: float = 0.05
    seed_momentum: float = 0.9
    seed_weight_decay: float = 0.0
    grad_clip_norm: float | None = 5.0
    """Max gradient norm per env and group (the host; each slot's seed); None disables clipping.
    Groups are clipped separately so that a seed never changes the host's update."""

    def __post_init__(self) -> None:
        require_fields(self, ("host_lr", "seed_lr"), lambda value: value > 0, "> 0")
        require(
            self.lr_schedule in ("constant", "cosine"),
            f"OptimConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}",
        )
        require(0.0 <= self.lr_floor <= 1.0, f"OptimConfig.lr_floor must be in [0, 1], got {self.lr_floor}")
        require_fields(self, ("host_momentum", "seed_momentum"), lambda value: 0.0 <= value < 1.0, "in [0, 1)")
        require_fields(self, ("host_weight_decay", "seed_weight_decay"), lambda value: value >= 0, ">= 0")
        require(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            f"OptimConfig.grad_clip_norm must be > 0 or null, got {self.grad_clip_norm}",
        )


@dataclass(frozen=True)
class GovernorConfig:
    """Health checks and rollbacks (docs/reliability.md). Loss thresholds are multiples of
    the task's random-guess loss ln(classes), so one config fits CIFAR (ln 10) and a
    50k-token vocabulary (ln 50257) alike; the reference used 12.0 and ln 10 for every task."""

    enabled: bool = True
    window: int = 20
    """Healthy validation losses kept for the spike statistics."""
    min_samples: int = 10
    """Spike and collapse checks start once the window holds this many losses."""
    spike_sigma: float = 6.0
    spike_mean_factor: float = 3.0
    spike_min_loss_factor: float = 1.2
    """A spike must also exceed this multiple of the random-guess loss."""
    consecutive_spikes: int = 3
    collapse_history_fraction: float = 0.6
    """Collapse needs a window mean below this fraction of the random-guess loss..."""
    collapse_tolerance: float = 0.065
    """...then a loss within this fraction of the random-guess loss (a uniform guess)."""
    snapshot_every: int = 5
    """Epochs between snapshots (each taken only after a passed check)."""

    def __post_init__(self) -> None:
        require(self.window >= 2, f"GovernorConfig.window must be >= 2, got {self.window}")
        require(
            1 <= self.min_samples <= self.window,
            f"GovernorConfig.min_samples must be in 1..window={self.window}, got {self.min_samples}",
        )
        require_fields(
            self, ("spike_sigma", "spike_mean_factor", "spike_min_loss_factor"), lambda value: value > 0, "> 0"
        )
        require_fields(self, ("consecutive_spikes", "snapshot_every"), lambda value: value >= 1, ">= 1")
        require_fields(
            self, ("collapse_history_fraction", "collapse_tolerance"), lambda value: 0.0 < value < 1.0, "in (0, 1)"
        )


def _default_host() -> HostConfig:
    return CNNHostConfig()


@dataclass(frozen=True)
class CoreConfig:
    """Everything the functional core needs: host, lifecycle, optimizer, governor, compilation."""

    host: HostConfig = field(default_factory=_default_host)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    governor: GovernorConfig = field(default_factory=GovernorConfig)
    blueprints: tuple[str, ...] = ()
    """Blueprints every slot's bank carries, in index order (the action space and the
    observation schema follow it); empty: the host topology's default catalogue. Custom
    blueprints must be registered first (`blueprints.register_blueprint`)."""
    compile: bool = True
    """torch.compile the train iteration and the evaluation."""
    compile_mode: Literal["default", "reduce-overhead"] = "default"
    """torch.compile mode: 'reduce-overhead' also captures CUDA graphs of the train and
    evaluation steps (on CUDA; on a CPU it compiles as 'default'). Needs `compile`."""
    vmap_chunk_size: int | None = None
    """Envs per vmapped slice of a train iteration and of an evaluation batch
    (`torch.func.vmap(chunk_size=...)`), still one call and one compiled graph; None: all N
    at once (the GPU's choice). On 2 CPU cores slices of 2 trained 40 % faster than all 8
    envs at once: a convolution vmapped over many envs becomes one large grouped
    convolution, which is slow there (docs/performance.md)."""
    amp: bool = False
    """bf16 autocast of the host and seed forward in training and evaluation; parameters,
    optimizer state, BatchNorm statistics and the loss stay fp32."""
    bank_mode: Literal["active", "full"] = "active"
    """'full' computes every blueprint of every slot (one graph); 'active' computes only the
    blueprints some env uses (one graph per active set, read once per epoch)."""
    env_batching: Literal["auto", "vmap", "packed"] = "auto"
    """How one call trains all N envs. 'vmap': `torch.func.vmap` over envs of one env's
    forward (any host). 'packed' (CNN hosts): the envs packed into the channel dimension of
    one channels_last tensor, convolutions grouped by env (`esper_func/core/packed.py`); same
    values, about 3x faster than vmap on 2 CPU cores (docs/performance.md). 'auto': packed
    for CNN hosts on a CPU when every blueprint supports it, vmap otherwise (the GPU path
    stays vmap until packed is measured there)."""

    def __post_init__(self) -> None:
        if self.blueprints:
            try:
                catalogue(self.host.kind, self.blueprints)
            except ValueError as error:
                raise ConfigError(f"CoreConfig.blueprints: {error}") from error
        require(
            self.env_batching in ("auto", "vmap", "packed"),
            f"CoreConfig.env_batching must be 'auto', 'vmap' or 'packed', got {self.env_batching!r}",
        )
        unpacked = [cls.name for cls in catalogue(self.host.kind, self.blueprints) if not cls.packs()]
        require(
            self.env_batching != "packed" or (self.host.kind == "cnn" and not unpacked),
            f"CoreConfig.env_batching='packed' needs a CNN host whose blueprints all define packed_forward "
            f"(host {self.host.kind!r}, without it: {unpacked}); use env_batching='vmap' or 'auto'",
        )
        require(
            self.bank_mode in ("active", "full"),
            f"CoreConfig.bank_mode must be 'active' or 'full', got {self.bank_mode!r}",
        )
        require(
            self.compile_mode in ("default", "reduce-overhead"),
            f"CoreConfig.compile_mode must be 'default' or 'reduce-overhead', got {self.compile_mode!r}",
        )
        require(
            self.vmap_chunk_size is None or self.vmap_chunk_size >= 1,
            f"CoreConfig.vmap_chunk_size must be None (all envs at once) or >= 1, got {self.vmap_chunk_size}",
        )
        require(
            self.compile or self.compile_mode == "default",
            f"CoreConfig.compile_mode={self.compile_mode!r} needs compile=True (CUDA graphs are captured by "
            "torch.compile)",
        )

    def packs_envs(self, device: torch.device) -> bool:
        """Whether the core runs the packed path on `device` (`env_batching` resolved)."""
        if self.env_batching == "auto":
            return (
                device.type == "cpu"
                and self.host.kind == "cnn"
                and all(cls.packs() for cls in catalogue(self.host.kind, self.blueprints))
            )
        return self.env_batching == "packed"
