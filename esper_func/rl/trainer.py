"""PPO training of the controller with TorchRL parts: `Collector`, `GAE`, `ClipPPOLoss`.

One episode batch = one rollout of a whole episode in every env (`[N, T]`), then one
update: GAE (the episode's last epoch terminates it: nothing is bootstrapped past it), several passes of
minibatches (whole sequences with the LSTM), a KL stop checked before each optimizer
step, gradient clipping. Observation normalization lives in the policy
(`policies.ppo.ObservationNormalizer`, buffers the weight sync carries) and reward
scaling happens here before GAE; both statistics are frozen during a rollout and
refreshed after the update, so the batch is exactly what the policy saw. One that its
`PPOConfig` setting turns off stays the identity.

The loop calls hooks at four points with one `TrainerState`:
- `after_rollout`: `state.rollout` holds the batch's statistics;
- `after_update`: `state.losses` holds the update's statistics and anomalies;
- `after_batch`: normalizers refreshed, counters advanced (checkpoint, logging and early
  stopping are hooks here);
- `end_of_run`: after the last batch (and the comparison, when configured).
Register with `trainer.register_hook(point, fn)`; a hook may set `state.stop = True`.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.collectors import Collector
from torchrl.envs import Compose, EnvBase, InitTracker, Transform, TransformedEnv
from torchrl.modules import set_recurrent_mode
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE
from torchrl.record.loggers import Logger
from tqdm import tqdm

from envs.morphogenetic import MorphogeneticEnv, canonical_device
from envs.sharded import ShardedEnv, build_env, shard_sizes
from envs.transforms import ActionMaskCheck
from esper_func.core.features import CRITIC_FEATURES
from esper_func.core.stages import ACTION_HEADS
from esper_func.rl.checkpoints import CheckpointError
from esper_func.rl.distributed import DistributedRollouts, require_launcher_packages, shard_factories
from esper_func.rl.loggers import make_logger, require_logger_packages
from esper_func.rl.multiprocess import MultiprocessRollouts
from esper_func.rl.normalizers import Normalizers
from esper_func.rl.run_config import TrainingConfig
from esper_func.rl.run_sections import TELEMETRY_LEVELS
from esper_func.rl.telemetry import JsonlWriter, lifecycle_events, rollback_events, step_record
from esper_func.rl.update_stats import approx_kl, detect_anomalies, ratio_diagnostics, rollout_statistics
from policies.ppo import ENTROPY_KEYS, ActorCritic, make_actor_critic

HOOK_POINTS: tuple[str, ...] = ("after_rollout", "after_update", "after_batch", "end_of_run")
SCALED_REWARD = "reward_scaled"
def policy_transforms(nets: ActorCritic, extra: Sequence[Transform] = ()) -> list[Transform]:
    """What the PPO policy needs around the env: `extra` user transforms (followed by a
    check that they left every env a legal action), then the LSTM state. Stateless: what
    the policy learns from (normalization statistics, weights) lives in the policy, so a
    remote worker can rebuild these from a pickled copy."""
    transforms: list[Transform] = [*extra, *([ActionMaskCheck()] if extra else [])]
    if nets.lstm is not None:
        transforms += [InitTracker(), nets.lstm.make_tensordict_primer()]
    return transforms


def policy_env(base: EnvBase, nets: ActorCritic, extra: Sequence[Transform] = ()) -> TransformedEnv:
    """`base` as the PPO policy sees it (`policy_transforms`)."""
    return TransformedEnv(base, Compose(*policy_transforms(nets, extra)))


def initial_nets(config: TrainingConfig, observation_size: int, n_slots: int, n_blueprints: int) -> ActorCritic:
    """The networks a PPO run of `config` starts from, normalizers at the identity. Torch's
    generator is seeded with the run's seed right before they are built, so they depend
    on nothing else: the trainer's first policy, a `--frozen-policy` run's only one, and
    the evaluation's `untrained` controller are the same networks."""
    torch.manual_seed(config.env.seed)
    return make_actor_critic(
        observation_size,
        n_slots,
        n_blueprints,
        config.policy,
        canonical_device(config.device),
        critic_observation_size(config),
    )


def critic_observation_size(config: TrainingConfig) -> int:
    """Columns of the env's `"critic_observation"` the critic reads: the static twin's
    gap when the reward has a twin (`features.CRITIC_FEATURES`), else none."""
    return len(CRITIC_FEATURES) if config.env.rewards.static_baseline else 0


def build_trainer_env(config: TrainingConfig) -> MorphogeneticEnv | ShardedEnv:
    """The env the trainer holds. Local collection: all `env.n_envs` envs (sharded over
    `devices` when given). Worker processes (multiprocess, distributed): the first
    worker's shard, for the specs and the model (the workers step the envs), which also
    checks that a shard fits the device."""
    if config.collector.kind != "local":
        shard = shard_sizes(config.env.n_envs, config.collector.workers)[0]
        return MorphogeneticEnv(replace(config.env, n_envs=shard), config.device)
    return build_env(config.env, canonical_device(config.device), config.devices)


# --- state and hooks ---------------------------------------------------------------------


@dataclass
class TrainerState:
    """What hooks see. Filled before each hook point runs."""

    config: TrainingConfig
    run_dir: Path
    nets: ActorCritic
    logger: Logger | None
    update: int = 0
    """PPO updates done (= episode batches done)."""
    frames: int = 0
    """Env steps collected, summed over envs."""
    rollout: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    """Filled by the comparison at the end of the run (controller -> summary)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One short record per update (return, accuracy, losses), for plots and resume."""
    checkpoint_path: Path | None = None
    telemetry_level: str = "normal"
    debug_updates_left: int = 0
    stop: bool = False
    wall_time: float = 0.0


Hook = Callable[[TrainerState], None]


# --- the trainer -------------------------------------------------------------------------


class PPOTrainer:
    """Builds env, policy, loss and optimizer from a `TrainingConfig` and runs the loop."""

    def __init__(
        self,
        config: TrainingConfig,
        run_dir: Path,
        transforms: Sequence[Transform] = (),
        env: MorphogeneticEnv | ShardedEnv | None = None,
    ) -> None:
        """`transforms` (TorchRL) go between the env and the normalizers: a custom reward term
        added there is scaled and learned like the env's own. `env`: an env already built
        from `config` by `build_trainer_env` (the CLI builds it first so a data error creates
        no run directory)."""
        require_logger_packages(config.telemetry)
        require_launcher_packages(config.collector)
        self.config = config
        self.device = canonical_device(config.device)
        self.base_env = build_trainer_env(config) if env is None else env
        observation_size = self.base_env.observation_spec["observation"].shape[-1]
        model = self.base_env.model
        # Built after the env: building env templates draws from the default generator,
        # and the policy's initial weights must not depend on the env's layout.
        self.nets = initial_nets(config, observation_size, model.n_slots, len(model.blueprint_names))
        self.transforms = policy_transforms(self.nets, transforms)
        self.env = TransformedEnv(self.base_env, Compose(*self.transforms))
        self.normalizers = Normalizers(observation_size, config.ppo, self.device, critic_observation_size(config))
        self.reward_scale = self.normalizers.reward_scale()
        ppo = config.ppo
        weights = {
            "op": ppo.entropy_weight_op,
            "slot": ppo.entropy_weight_slot,
            "blueprint": ppo.entropy_weight_blueprint,
            "blend": ppo.entropy_weight_blend,
        }
        self.loss = ClipPPOLoss(
            self.nets.actor,
            self.nets.critic,
            clip_epsilon=ppo.clip_epsilon,
            entropy_coeff={key: weights[head] for key, head in zip(ENTROPY_KEYS, ACTION_HEADS)},
            critic_coeff=ppo.critic_coeff,
            clip_value=ppo.value_clip if ppo.value_clip > 0 else False,
            normalize_advantage=False,
        )
        self.loss_fn = torch.compile(self.loss) if ppo.compile_loss else self.loss
        self.gae = GAE(gamma=ppo.gamma, lmbda=ppo.gae_lambda, value_network=self.nets.critic, average_gae=True)
        self.gae.set_keys(reward=SCALED_REWARD)
        self.optimizer = torch.optim.Adam(self.loss.parameters(), lr=ppo.lr, eps=ppo.adam_eps)
        self.minibatch_generator = torch.Generator().manual_seed(config.env.seed)
        self.state = TrainerState(
            config=config,
            run_dir=run_dir,
            nets=self.nets,
            logger=make_logger(config, run_dir),
            telemetry_level=config.telemetry.level,
        )
        self.hooks: dict[str, list[Hook]] = {point: [] for point in HOOK_POINTS}
        self.frames_per_batch = config.env.n_envs * self.base_env.max_epochs

    def register_hook(self, point: str, hook: Hook) -> None:
        if point not in self.hooks:
            raise ValueError(f"unknown hook point {point!r}; choose one of {list(HOOK_POINTS)}")
        self.hooks[point].append(hook)

    def _run_hooks(self, point: str) -> None:
        for hook in self.hooks[point]:
            hook(self.state)

    # -- checkpoint state --

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, normalizers, counters,
        the minibatch generator. The env's streams need no saving: batch U is episode U of
        every shard (`esper_func.core.seeding`), and the actions are sampled with the env's noise."""
        return {
            "actor": self.nets.actor.state_dict(),
            "critic": self.nets.critic.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "normalizers": self.normalizers.state_dict(),
            "counters": {"update": self.state.update, "frames": self.state.frames},
            "history": self.state.history,
            "rng": {"minibatch": self.minibatch_generator.get_state()},
        }

    def load_weights(self, checkpoint: dict[str, Any], source: Path | str = "the checkpoint") -> None:
        """Restore everything `state_dict` saved; a checkpoint that does not fit these networks
        (another policy size or observation schema) raises `CheckpointError` naming `source`,
        before anything is changed."""
        probe = copy.deepcopy((self.nets.actor, self.nets.critic, self.optimizer, self.normalizers))
        try:
            for module, key in zip(probe, ("actor", "critic", "optimizer", "normalizers")):
                module.load_state_dict(checkpoint[key])
            counters = (int(checkpoint["counters"]["update"]), int(checkpoint["counters"]["frames"]))
            minibatch_rng = checkpoint["rng"]["minibatch"]
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            raise CheckpointError(
                f"{source} does not fit this run's networks ({type(error).__name__}: {error}); "
                "resume with the config the checkpoint was written with"
            ) from error
        self.nets.actor.load_state_dict(checkpoint["actor"])
        self.nets.critic.load_state_dict(checkpoint["critic"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.normalizers.load_state_dict(checkpoint["normalizers"])
        self._refresh_normalizers()
        self.state.update, self.state.frames = counters
        self.state.history = list(checkpoint["history"])
        self.minibatch_generator.set_state(minibatch_rng)

    # -- the loop --

    def train(self) -> TrainerState:
        config = self.config
        remaining = config.episodes - self.state.update
        if remaining <= 0:
            self._run_hooks("end_of_run")
            return self.state
        collector = self._collector(remaining)
        start = time.perf_counter()
        progress = tqdm(
            total=config.episodes, initial=self.state.update, desc="ppo", disable=not config.telemetry.progress_bar
        )
        with _shut_down_at_exit(collector), self._logs() as logs:
            for batch in collector:
                self.state.rollout = rollout_statistics(batch, self.base_env.model.host_param_count)
                self._log_steps(batch, logs)
                self._run_hooks("after_rollout")
                self.state.losses = frozen_losses() if config.frozen_policy else self.update(batch)
                self._run_hooks("after_update")
                if not config.frozen_policy:
                    self.normalizers.update(batch)
                    self._refresh_normalizers()
                self.state.update += 1
                self.state.frames += batch.numel()
                self.state.wall_time = time.perf_counter() - start
                self.state.history.append(history_record(self.state))
                progress.update(1)
                progress.set_postfix(
                    ret=f"{self.state.rollout['return']:.2f}", acc=f"{self.state.rollout['final_accuracy']:.1f}"
                )
                self._run_hooks("after_batch")
                if self.state.stop:
                    break
        progress.close()
        self._run_hooks("end_of_run")
        return self.state

    def _collector(self, batches: int) -> Collector | MultiprocessRollouts | DistributedRollouts:
        """`batches` episode batches from the envs here, or from `collector.workers` worker
        processes (here or distributed). Batch U is episode U of every env either way: a
        resumed run's first rollout replays the uninterrupted run's (a collector's resets
        before a step draw nothing)."""
        collector = self.config.collector
        if collector.kind == "multiprocess":
            factories = shard_factories(self.config, self.transforms, first_episode=self.state.update)
            steps = self.base_env.max_epochs
            return MultiprocessRollouts(factories, self.nets.actor, steps, batches, collector.threads_per_worker)
        if collector.kind == "distributed":
            factories = shard_factories(self.config, self.transforms, first_episode=self.state.update)
            return DistributedRollouts(
                factories, self.nets.actor, self.frames_per_batch, batches, collector, self.device, self.state.run_dir
            )
        if self.base_env.episode != self.state.update:
            self.base_env.seek_episode(self.state.update)
        return Collector(
            self.env,
            self.nets.actor,
            frames_per_batch=self.frames_per_batch,
            total_frames=self.frames_per_batch * batches,
            reset_at_each_iter=True,
            device=self.device,
            auto_register_policy_transforms=False,
        )

    def _refresh_normalizers(self) -> None:
        """The statistics so far into the policy and the reward scale (between rollouts)."""
        self.normalizers.apply(self.nets.normalizer, self.nets.critic_normalizer)
        self.reward_scale = self.normalizers.reward_scale()

    def _logs(self) -> _RunLogs:
        return _RunLogs(self.state.run_dir)

    def _log_steps(self, batch: TensorDictBase, logs: _RunLogs) -> None:
        level = TELEMETRY_LEVELS.index(self.state.telemetry_level)
        if level < TELEMETRY_LEVELS.index("minimal"):
            return
        names = self.base_env.model.blueprint_names
        episode = self.state.update
        for t in range(batch.shape[1]):
            step = batch[:, t]
            for event in lifecycle_events(step, step, names, episode):
                logs.lifecycle.write({"controller": "ppo", **event.record()})
            for record in rollback_events(step, episode):
                logs.lifecycle.write({"controller": "ppo", **record})
            if level >= TELEMETRY_LEVELS.index("normal"):
                logs.metrics.write(step_record(step, episode))

    def update(self, batch: TensorDictBase) -> dict[str, Any]:
        """GAE, then epochs of minibatches of ClipPPOLoss; returns the update's statistics."""
        ppo = self.config.ppo
        recurrent = self.nets.lstm is not None
        batch["next", SCALED_REWARD] = batch["next", "reward"] / self.reward_scale
        with torch.no_grad():
            self.gae(batch)
        entropy_coeff = ppo.entropy_at(self.state.update)
        records: list[torch.Tensor] = []
        stopped_at: int | None = None
        flat = batch if recurrent else batch.reshape(-1)
        units = flat.shape[0]
        for epoch in range(ppo.epochs):
            order = torch.randperm(units, generator=self.minibatch_generator).to(self.device)
            for indices in order.tensor_split(ppo.minibatches):
                minibatch = flat[indices]
                with set_recurrent_mode(recurrent):
                    kl = approx_kl(self.nets, minibatch)
                    if ppo.target_kl > 0 and kl.item() > ppo.kl_stop_factor * ppo.target_kl:
                        stopped_at = epoch
                        break
                    out = self.loss_fn(minibatch)
                total = out["loss_objective"] + out["loss_critic"] + entropy_coeff * out["loss_entropy"]
                self.optimizer.zero_grad()
                total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.loss.parameters(), ppo.max_grad_norm)
                self.optimizer.step()
                entropies = [out["composite_entropy", key].mean() for key in ENTROPY_KEYS]
                losses = [out[key].detach() for key in ("loss_objective", "loss_critic", "loss_entropy")]
                diagnostics = [kl, out["clip_fraction"], out["explained_variance"].mean(), grad_norm]
                records.append(torch.stack([*losses, *diagnostics, *entropies]))
            if stopped_at is not None:
                break
        names = [
            "loss_objective",
            "loss_critic",
            "loss_entropy",
            "kl_approx",
            "clip_fraction",
            "explained_variance",
            "grad_norm",
        ]
        names += [f"entropy_{head}" for head in ACTION_HEADS]
        # One read-back per update; no loss statistics when the KL stop fired before any step.
        stats: dict[str, Any] = dict(zip(names, torch.stack(records).mean(0).tolist())) if records else {}
        stats.update(
            optimizer_steps=len(records),
            kl_stopped_at_epoch=stopped_at,
            entropy_coeff=entropy_coeff,
            **ratio_diagnostics(
                self.nets, batch, recurrent, self.config.telemetry.ratio_explosion, self.config.telemetry.ratio_collapse
            ),
        )
        stats["anomalies"] = detect_anomalies(stats, self.state.update / self.config.episodes, self.config.telemetry)
        if stats["anomalies"]:
            self.state.debug_updates_left = self.config.telemetry.anomaly_debug_updates
        if self.state.debug_updates_left > 0:
            self.state.telemetry_level = "debug"
            self.state.debug_updates_left -= 1
        else:
            self.state.telemetry_level = self.config.telemetry.level
            stats.pop("ratio_offenders")
        return stats


@contextlib.contextmanager
def _shut_down_at_exit(collector: Collector | MultiprocessRollouts | DistributedRollouts) -> Iterator[None]:
    """Shut the collector down however the loop ends (workers must not outlive a failed run)."""
    try:
        yield
    finally:
        collector.shutdown()


class _RunLogs:
    """The run's JSONL logs (appending, so a resumed run continues them)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def __enter__(self) -> _RunLogs:
        self.metrics = JsonlWriter(self.run_dir / "metrics.jsonl")
        self.lifecycle = JsonlWriter(self.run_dir / "lifecycle.jsonl")
        return self

    def __exit__(self, *exc: object) -> None:
        self.metrics.close()
        self.lifecycle.close()


def frozen_losses() -> dict[str, Any]:
    """The update statistics of a `frozen_policy` run's batch (a new dict: hooks may edit theirs)."""
    return {"optimizer_steps": 0, "anomalies": []}


def history_record(state: TrainerState) -> dict[str, float]:
    losses = state.losses
    return {
        "update": state.update,
        "return": state.rollout["return"],
        "final_accuracy": state.rollout["final_accuracy"],
        "param_growth": state.rollout["param_growth"],
        "loss_objective": losses.get("loss_objective", float("nan")),
        "loss_critic": losses.get("loss_critic", float("nan")),
        "kl_approx": losses.get("kl_approx", float("nan")),
    }


def scalar_metrics(state: TrainerState) -> dict[str, float]:
    """Flat scalars of the latest batch for the TorchRL logger and `updates.jsonl`."""
    scalars: dict[str, float] = {}
    for key, value in state.rollout.items():
        if isinstance(value, dict):
            scalars.update({f"{key}/{name}": float(item) for name, item in value.items()})
        else:
            scalars[f"rollout/{key}"] = float(value)
    for key, value in state.losses.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[f"train/{key}"] = float(value)
    return scalars
