"""The sections of a run's `TrainingConfig` that belong to the RL side: PPO's
hyperparameters and schedules, telemetry (levels, loggers, anomaly thresholds) and where
rollouts are collected (`CollectorConfig`). Frozen, validated on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, get_args

from esper_func.core.config import require, require_fields
from esper_func.core.stages import ACTION_HEADS

TelemetryLevel = Literal["off", "minimal", "normal", "debug"]
TELEMETRY_LEVELS: tuple[str, ...] = ("off", "minimal", "normal", "debug")
LoggerName = Literal["csv", "tensorboard", "wandb", "mlflow", "none"]
LOGGERS: tuple[str, ...] = get_args(LoggerName)
CollectorKind = Literal["local", "multiprocess", "distributed"]
COLLECTORS: tuple[str, ...] = get_args(CollectorKind)
Launcher = Literal["mp", "submitit", "delayed"]
LAUNCHERS: tuple[str, ...] = get_args(Launcher)



@dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters (reference defaults, with minibatching and a working KL stop)."""

    gamma: float = 0.995
    """Discount; must equal `env.rewards.gamma` (the PBRS discount)."""
    gae_lambda: float = 0.97
    clip_epsilon: float = 0.2
    value_clip: float = 10.0
    """Clip of the value update around the rollout's value (0 disables value clipping)."""
    critic_coeff: float = 0.5
    lr: float = 3e-4
    adam_eps: float = 1e-5
    max_grad_norm: float = 0.5
    epochs: int = 4
    """Passes over each rollout."""
    minibatches: int = 4
    """Minibatches per pass: of transitions, or of whole env sequences when the LSTM is on."""
    target_kl: float = 0.015
    """Stop the update's passes when the approximate KL exceeds `kl_stop_factor * target_kl`
    (checked before the optimizer step); 0 disables."""
    kl_stop_factor: float = 1.5
    entropy_coeff: float = 0.05
    """Entropy weight at the first update."""
    entropy_coeff_end: float = 0.05
    """Entropy weight after `entropy_anneal_updates` updates (linear in between)."""
    entropy_anneal_updates: int = 0
    """0: constant `entropy_coeff`."""
    entropy_weight_op: float = 1.0
    entropy_weight_slot: float = 1.0
    entropy_weight_blueprint: float = 1.3
    entropy_weight_blend: float = 1.2
    normalize_observations: bool = True
    """ObservationNorm whose statistics are frozen during a rollout and refreshed after it.
    Off: the normalizer stays the identity, so the networks' input key
    (`observation_norm`) holds the raw observation."""
    scale_rewards: bool = True
    """Divide rewards by the running std of discounted returns (refreshed after each rollout).
    Off: the scaling stays the identity, so GAE reads the raw reward (`reward_scaled`
    equals `reward`)."""
    compile_loss: bool = False
    """torch.compile ClipPPOLoss. Off: TensorDict construction inside the loss breaks the
    graph, and compiled was slower than eager at these batch sizes (docs/performance.md)."""

    def __post_init__(self) -> None:
        require_fields(self, ("gamma", "gae_lambda"), lambda value: 0.0 < value <= 1.0, "in (0, 1]")
        require_fields(
            self,
            ("clip_epsilon", "lr", "adam_eps", "max_grad_norm", "kl_stop_factor"),
            lambda value: value > 0.0,
            "> 0",
        )
        require_fields(
            self,
            ("value_clip", "critic_coeff", "target_kl", "entropy_coeff", "entropy_coeff_end", "entropy_anneal_updates"),
            lambda value: value >= 0,
            ">= 0",
        )
        require_fields(self, ("epochs", "minibatches"), lambda value: value >= 1, ">= 1")
        require_fields(self, tuple(f"entropy_weight_{head}" for head in ACTION_HEADS), lambda value: value >= 0, ">= 0")

    def entropy_at(self, update: int) -> float:
        """Entropy weight at update `update` (0-based): linear from start to end, then constant."""
        if self.entropy_anneal_updates == 0:
            return self.entropy_coeff
        progress = min(1.0, update / self.entropy_anneal_updates)
        return self.entropy_coeff + progress * (self.entropy_coeff_end - self.entropy_coeff)


@dataclass(frozen=True)
class TelemetryConfig:
    """What a run records. Levels: `off` (summary and checkpoints only), `minimal` (+ per-update
    metrics and lifecycle events), `normal` (+ per-step metrics), `debug` (+ per-update ratio
    diagnostics); an anomaly raises the level to `debug` for `anomaly_debug_updates` updates."""

    level: TelemetryLevel = "normal"
    logger: LoggerName = "csv"
    """A TorchRL logger by its `get_logger` name, under `RUN_DIR/logger` (`none`: no logger).
    `tensorboard`, `wandb` and `mlflow` need their packages; `wandb` and `mlflow` read their
    usual environment variables (e.g. `WANDB_MODE=offline`)."""
    plots: bool = True
    """PNG plots at the end of a run (accuracy per epoch, return per update, lifecycle timeline)."""
    anomaly_debug_updates: int = 5
    ratio_explosion: float = 5.0
    """A joint ratio above this on any transition is an anomaly (`ratio_explosion`)."""
    ratio_collapse: float = 0.1
    """A joint ratio below this on any transition is an anomaly (`ratio_collapse`)."""
    progress_bar: bool = True

    def __post_init__(self) -> None:
        require(self.logger in LOGGERS, f"TelemetryConfig.logger must be one of {list(LOGGERS)}, got {self.logger!r}")
        require(
            self.anomaly_debug_updates >= 0,
            f"TelemetryConfig.anomaly_debug_updates must be >= 0, got {self.anomaly_debug_updates}",
        )
        require(self.ratio_explosion > 1.0, f"TelemetryConfig.ratio_explosion must be > 1, got {self.ratio_explosion}")
        require(
            0.0 < self.ratio_collapse < 1.0,
            f"TelemetryConfig.ratio_collapse must be in (0, 1), got {self.ratio_collapse}",
        )


@dataclass(frozen=True)
class CollectorConfig:
    """Where PPO's rollouts run (docs/distributed.md).

    `local`: TorchRL's `Collector` on this process (envs sharded over `devices` if given).
    `multiprocess`: TorchRL's `MultiSyncCollector`: `workers` processes on this machine,
    each stepping shard k of the envs, the policy in shared memory; the batch equals a
    local run's over `workers` shards. The main job's choice on a CPU, where two 1-thread
    processes step the envs faster than one 2-thread process (docs/performance.md).
    `distributed`: TorchRL's `DistributedCollector` over torch.distributed (gloo): `workers`
    processes each step shard k of the `env.n_envs` envs and receive the policy's weights
    (normalizer statistics included) before every batch; the batch equals a local run's
    over `workers` shards. Launchers: `mp` spawns the workers on this machine, `submitit`
    submits them as SLURM jobs, `delayed` waits for workers started by hand (`python -m
    esper_func.collect_worker`)."""

    kind: CollectorKind = "local"
    workers: int = 2
    launcher: Launcher = "mp"
    master_addr: str = "127.0.0.1"
    """The trainer's address as the workers reach it (rank 0 listens there)."""
    port: int = 0
    """The rendezvous port; TorchRL also uses port + 1 (its store). 0: a free port, for
    `mp` only (hand-started or SLURM workers must be told the port)."""
    worker_threads: int = 0
    """`multiprocess`, and `distributed` with `mp`: torch threads per worker (0: this
    machine's cores divided by the workers). Workers and a local run give bit-identical
    batches at equal thread counts, and equal to float rounding otherwise."""
    connect_timeout_s: float = 120.0
    """How long the trainer waits for every worker to connect before it stops with an
    error naming the rank."""
    heartbeat_timeout_s: float = 10.0
    """A connected worker whose heartbeat (a tick a second) has been quiet this long is
    lost (dead, hung or cut off): the trainer stops with an error naming it."""
    slurm_partition: str = ""
    """`submitit` only: the SLURM partition (empty: the cluster's default)."""
    slurm_timeout_min: int = 60
    slurm_cpus_per_task: int = 2

    @property
    def threads_per_worker(self) -> int:
        """`worker_threads`, or this machine's cores divided by the workers (at least 1)."""
        return self.worker_threads or max(1, (os.cpu_count() or 1) // self.workers)

    def __post_init__(self) -> None:
        require(self.kind in COLLECTORS, f"CollectorConfig.kind must be one of {list(COLLECTORS)}, got {self.kind!r}")
        require(
            self.launcher in LAUNCHERS,
            f"CollectorConfig.launcher must be one of {list(LAUNCHERS)}, got {self.launcher!r}",
        )
        require(self.workers >= 1, f"CollectorConfig.workers must be >= 1, got {self.workers}")
        require(
            self.worker_threads >= 0,
            f"CollectorConfig.worker_threads must be >= 0 (0: cores / workers), got {self.worker_threads}",
        )
        require(
            0 <= self.port <= 65534,
            f"CollectorConfig.port must be in [0, 65534] (port + 1 is used too), got {self.port}",
        )
        require(
            self.port != 0 or self.launcher == "mp" or self.kind == "local",
            f"CollectorConfig.port=0 picks a free port, which workers started by {self.launcher!r} cannot know; set "
            "--port",
        )
        require(
            self.connect_timeout_s > 0, f"CollectorConfig.connect_timeout_s must be > 0, got {self.connect_timeout_s}"
        )
        require(
            self.heartbeat_timeout_s >= 3.0,
            "CollectorConfig.heartbeat_timeout_s must be >= 3 (workers tick once a second), got "
            f"{self.heartbeat_timeout_s}",
        )
        require(
            self.slurm_timeout_min >= 1 and self.slurm_cpus_per_task >= 1,
            "CollectorConfig.slurm_timeout_min and slurm_cpus_per_task must be >= 1",
        )
