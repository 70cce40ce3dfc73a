"""`MorphogeneticEnv`: the functional core as a batched TorchRL environment.

One step of the `[N]`-batched env is one host epoch in every environment: apply the
action, train one epoch on shared batches, evaluate with counterfactuals, tick the
lifecycle, compute the reward, build the next observation and masks: the core's
`step.step_env`, and `step.reset_state` for a reset. The env object holds the state
TensorDict and two generators, and adapts those pure functions to TorchRL.

Randomness: shard `shard` of a run seeded `seed` draws episode e from generators seeded
`esper_func.core.seeding.stream_seed(seed, shard, e, ...)` at the episode's first reset, so an
episode depends on (seed, shard, e) only. Episode 0 is drawn when the env is built; a
reset after at least one step starts the next episode; a reset before any step of the
episode changes nothing (a collector's extra resets draw nothing); `seek_episode(e)`
starts episode e (a resumed run). A reset of some but not all envs draws the fresh envs
from the running streams.

Output keys besides TorchRL's (`reward [N, 1]`, `done`, `terminated`, `truncated`):
- `"observation"` `[N, F]` float32, schema in `docs/observation.md`;
- `"critic_observation"` `[N, 1]` float32, only with a static twin
  (`RewardConfig.static_baseline`): the accuracy gap to the twin
  (`features.CRITIC_FEATURES`), for the critic only: a deployed env has no twin;
- `("action_mask", head)`: `op [N, 4]`, `slot [N, 4, S]` (row = op), `blueprint [N, B]`,
  `blend [N, 3]`; sample the op first, then the slot from that op's row;
- `("seeds", key)` `[N, S]`: stage, alpha, blueprint, epochs_in_stage, contribution (this
  epoch's measurement, pp), contribution_ema (smoothed since alpha reached 1: what the
  gates read), improvement (accuracy change since the stage began, pp);
- `("metrics", key)` `[N]`: train_loss, val_loss, val_accuracy, epoch, action_executed,
  illegal_actions (count this episode), seed_params, rolled_back (the governor restored
  the env's snapshot in this step), panic (`governor.Panic` value), rollbacks (count this
  episode);
- `("signals", key)` `[N]`: stabilized, plateau_epochs;
- `("reward_components", name)` `[N]`: the reward is exactly their sum;
- `"action_noise"` `[N, 4]` float32 in (0, 1]: one uniform per action head (op, slot,
  blueprint, blend) from the shard's policy-noise stream, fresh at every step; the PPO
  policy samples with it (inverse CDF), so its actions are a function of the shard's
  streams too.
Actions `("action", head)` `[N]` int64 for heads op, slot, blueprint, blend. An action
the masks forbid is executed as WAIT, rewarded as WAIT and counted in `illegal_actions`.

The action spec's op, blueprint and blend `Categorical`s carry the current masks (TorchRL
masked specs, updated at every reset and step), so `env.rand_action()` and
`env.rollout(k)` without a policy draw only legal values of those heads. The slot's
legality depends on the op drawn (`[N, 4, S]`), which a spec cannot hold: a random slot
can still be illegal. A `TransformedEnv` keeps its own copy of the specs; TorchRL's
`ActionMask(("action", head), ("action_mask", head))` transforms keep that copy's masks
current.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from tensordict import TensorDict, TensorDictBase
from torch.profiler import record_function
from torchrl.envs import EnvBase

from envs.specs import make_specs, update_action_masks
from esper_func.core.allocator import reuse_freed_memory
from esper_func.core.config import CNNHostConfig, ConfigError, CoreConfig, HostConfig, TransformerHostConfig
from esper_func.core.host_evaluation import evaluate
from esper_func.core.masks import action_masks
from esper_func.core.memory import MemoryEstimate, available_memory, check_fits, estimate_memory
from esper_func.core.model import build_model
from esper_func.core.reward_config import RewardConfig
from esper_func.core.rewards import reward_tables
from esper_func.core.seeding import ACTION_NOISE, ACTION_NOISE_SIZE, Stream, stream_seed
from esper_func.core.signals import SignalConfig
from esper_func.core.stages import ACTION_HEADS, preload_tables
from esper_func.core.step import StepFunctions, reset_observation, reset_state, step_env
from esper_func.data.prefetch import BatchPrefetcher
from esper_func.data.tasks import Task, TaskConfig, build_task


@dataclass(frozen=True)
class EnvConfig:
    """Everything one `MorphogeneticEnv` is made of.

    The host is `host` when given (checked against the task's data), else `host_preset`
    of the task's topology, else the task's default host; `core.host` is replaced by the
    resolved one when the env is built. `prefetch_batches` draws each step's batches at
    the end of the step before (on a side stream on CUDA; `esper_func.data.prefetch`), with
    the same draws in the same order as without it.
    """

    task: TaskConfig = field(default_factory=TaskConfig)
    core: CoreConfig = field(default_factory=lambda: CoreConfig(compile=False))
    rewards: RewardConfig = field(default_factory=RewardConfig)
    signals: SignalConfig = field(default_factory=SignalConfig)
    host_preset: str | None = None
    host: HostConfig | None = None
    n_envs: int = 4
    seed: int = 0
    prefetch_batches: bool = True

    def __post_init__(self) -> None:
        if self.n_envs < 1:
            raise ConfigError(f"EnvConfig.n_envs must be >= 1, got {self.n_envs}")
        if self.seed < 0:
            raise ConfigError(f"EnvConfig.seed must be >= 0, got {self.seed}")
        if self.host is not None and self.host_preset is not None:
            raise ConfigError("EnvConfig sets both host and host_preset; keep one")


def resolve_host(task: Task, preset: str | None, host: HostConfig | None = None) -> HostConfig:
    """`host`, or the named preset of the task's topology, or the task's host, checked
    against the data."""
    default = task.host_config
    if host is not None:
        return _checked_host(task, host)
    if preset is None:
        return default
    if isinstance(default, CNNHostConfig):
        host = replace(CNNHostConfig.preset(preset), num_classes=task.num_classes)
        if host.image_size != default.image_size or host.in_channels != default.in_channels:
            raise ConfigError(
                f"host preset {preset!r} takes {host.in_channels}x{host.image_size}x{host.image_size} images but task "
                f"{task.config.name!r} has {default.in_channels}x{default.image_size}x{default.image_size}; "
                "choose a preset for that input size"
            )
        return host
    host = replace(TransformerHostConfig.preset(preset), vocab_size=task.num_classes)
    if host.context < task.config.context:
        raise ConfigError(
            f"host preset {preset!r} has context {host.context} but task {task.config.name!r} windows are "
            f"{task.config.context} tokens; set the task's context <= {host.context}"
        )
    return host


def fit_context(task: TaskConfig, host_preset: str | None) -> TaskConfig:
    """`task` with its text windows shortened to the context of `host_preset` when they are
    longer (a transformer preset's context bounds the windows); other tasks unchanged."""
    if host_preset is None or task.name != "tinystories":
        return task
    return replace(task, context=min(task.context, TransformerHostConfig.preset(host_preset).context))


def _checked_host(task: Task, host: HostConfig) -> HostConfig:
    """An explicit host must fit the task's inputs and classes exactly."""
    default = task.host_config
    name = task.config.name
    if isinstance(default, CNNHostConfig):
        if not isinstance(host, CNNHostConfig):
            raise ConfigError(f"task {name!r} needs a CNN host (kind 'cnn'), got kind {host.kind!r}")
        for field_name in ("in_channels", "image_size", "num_classes"):
            if getattr(host, field_name) != getattr(default, field_name):
                raise ConfigError(
                    f"EnvConfig.host.{field_name}={getattr(host, field_name)} does not fit task {name!r}, which needs "
                    f"{getattr(default, field_name)}; set host.{field_name}={getattr(default, field_name)}"
                )
        return host
    if not isinstance(host, TransformerHostConfig):
        raise ConfigError(f"task {name!r} needs a transformer host (kind 'transformer'), got kind {host.kind!r}")
    if host.vocab_size != task.num_classes:
        raise ConfigError(
            f"EnvConfig.host.vocab_size={host.vocab_size} does not fit task {name!r}; set it to {task.num_classes}"
        )
    if host.context < task.config.context:
        raise ConfigError(
            f"EnvConfig.host.context={host.context} is shorter than task {name!r} windows ({task.config.context}); "
            "raise it"
        )
    return host


def canonical_device(device: torch.device | str) -> torch.device:
    """`device` as tensors on it report theirs (`cuda` -> `cuda:0`), so that comparing a
    tensor's device with the env's, or looking up a copy cached per device, matches."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class MorphogeneticEnv(EnvBase):
    """N morphogenetic training environments stepped together (`batch_size=[N]`)."""

    def __init__(
        self, config: EnvConfig, device: torch.device | str = "cpu", shard: int = 0, first_episode: int = 0
    ) -> None:
        """`shard`: this env batch's index among the run's shards (its random streams'
        key); `first_episode`: the episode the env starts in."""
        if shard < 0 or first_episode < 0:
            raise ConfigError(f"MorphogeneticEnv shard and first_episode must be >= 0, got {shard} and {first_episode}")
        device = canonical_device(device)
        if device.type == "cpu":
            reuse_freed_memory()  # a packed CPU step's large blocks would otherwise fault in anew each iteration
        super().__init__(device=device, batch_size=torch.Size([config.n_envs]))
        self.task = build_task(config.task, device)
        host = resolve_host(self.task, config.host_preset, config.host)
        self.config = replace(config, core=replace(config.core, host=host))
        self.model = build_model(self.config.core, device)
        reward_tables(self.config.rewards)
        preload_tables(device)  # every lookup table on the device before the first step reads it
        check_fits(config.n_envs, self._memory_estimate(), available_memory(device), device)
        self.steps = StepFunctions(self.model)
        self.max_epochs = self.config.core.lifecycle.max_epochs
        self.shard = shard
        self.generator = torch.Generator(device=device)
        self.noise_generator = torch.Generator(device=device)
        self.batches = BatchPrefetcher(self.task, self.generator, config.prefetch_batches)
        self.state: TensorDict
        self.action_noise: torch.Tensor
        self.seek_episode(first_episode)
        self._make_specs()
        update_action_masks(self.full_action_spec, action_masks(self.model, self.state))

    def _memory_estimate(self) -> MemoryEstimate:
        """Worst case (every blueprint running), checked before the N envs are allocated."""
        val_x, val_y = self.task.val_x, self.task.val_y
        batch = max(self.config.task.batch_size, val_x.shape[1])
        return estimate_memory(self.config.core, (batch, *val_x.shape[2:]), val_x.dtype, (batch, *val_y.shape[2:]))

    # -- specs -------------------------------------------------------------------------

    def _make_specs(self) -> None:
        self.full_action_spec, self.full_observation_spec, self.full_reward_spec, self.full_done_spec = make_specs(
            self.model, self.config.rewards, self.config.n_envs, self.device
        )

    # -- episodes and their random streams ------------------------------------------------

    def seek_episode(self, episode: int) -> None:
        """Start episode `episode`: seed both streams from (seed, shard, episode) and draw
        its fresh hosts; the next reset before a step returns them."""
        self.batches.drop()
        self.episode = episode
        self.generator.manual_seed(stream_seed(self.config.seed, self.shard, episode, Stream.ENV))
        self.noise_generator.manual_seed(stream_seed(self.config.seed, self.shard, episode, Stream.POLICY_NOISE))
        self.state = self._fresh_state()
        self.action_noise = self._draw_noise()
        self._stepped = False

    def _draw_noise(self) -> torch.Tensor:
        return 1.0 - torch.rand(
            self.config.n_envs, ACTION_NOISE_SIZE, generator=self.noise_generator, device=self.device
        )

    # -- state -------------------------------------------------------------------------

    def _fresh_state(self) -> TensorDict:
        """`reset_state` of every env, from the env stream."""
        n = self.config.n_envs
        return reset_state(
            self.steps,
            self.config.signals,
            n,
            self.generator,
            self.task.sample_batches,
            static_twin=self.config.rewards.static_baseline,
        )

    # -- EnvBase ---------------------------------------------------------------------------

    def _reset(self, tensordict: TensorDictBase | None, **kwargs: object) -> TensorDictBase:
        n = self.config.n_envs
        reset = tensordict["_reset"].reshape(n) if tensordict is not None and "_reset" in tensordict.keys() else None
        # A `_reset` that flags none of these envs (in a shard, when only other shards' envs
        # finished) changes nothing and draws nothing, as for an env that was not reset.
        if reset is None or bool(reset.all()):
            if self._stepped:
                self.seek_episode(self.episode + 1)
        elif reset.any():
            self.batches.drop()
            fresh = self._fresh_state()
            state = self.state.clone()
            state[reset] = fresh[reset]
            self.state = state
        out = reset_observation(self.model, self.config.rewards, self.state)
        out[ACTION_NOISE] = self.action_noise
        for key in ("done", "terminated", "truncated"):
            out[key] = torch.zeros(n, 1, dtype=torch.bool, device=self.device)
        update_action_masks(self.full_action_spec, out["action_mask"])
        self.batches.prefetch()
        return out

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = TensorDict({head: tensordict["action", head] for head in ACTION_HEADS}, batch_size=self.batch_size)
        batches = self.batches.take()
        out, self.state, reward, done = step_env(
            self.steps, self.config.rewards, self.config.signals, self.state, action, batches, self.generator
        )
        self._stepped = True
        with record_function("esper.observation"):
            self.action_noise = self._draw_noise()
        out[ACTION_NOISE] = self.action_noise
        out["reward"] = reward.unsqueeze(-1)
        done = done.unsqueeze(-1)
        out["done"] = done
        out["terminated"] = done
        out["truncated"] = torch.zeros_like(done)
        update_action_masks(self.full_action_spec, out["action_mask"])
        self.batches.prefetch()
        return out

    def _set_seed(self, seed: int | None) -> None:
        """TorchRL's `set_seed`: the run's seed becomes `seed` and episode 0 starts."""
        self.config = replace(self.config, seed=0 if seed is None else seed)
        self.seek_episode(0)

    def test_accuracy(self) -> torch.Tensor | None:
        """Accuracy `[N]` (percent) of every env's current network on the task's held-out
        test split, which no reward, gate or controller ever reads; None when the task has
        none (text). Final accuracies that no decision was selected on."""
        if self.task.test_x.shape[0] == 0:
            return None
        return evaluate(self.model, self.state, self.task.test_x, self.task.test_y, self.steps.eval)["val_accuracy"]

    def rng_state(self) -> dict[str, torch.Tensor]:
        """Both streams' state in the middle of an episode (to replay steps from it); a
        prefetched draw is not in it (it is drawn again after a restore). Between
        episodes the episode index is all there is to save (`seek_episode`)."""
        return {"env": self.batches.generator_state(), "noise": self.noise_generator.get_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        self.batches.drop()
        self.generator.set_state(state["env"])
        self.noise_generator.set_state(state["noise"])


def make_env(
    task: str = "synthetic",
    preset: str | None = None,
    n_envs: int = 4,
    device: torch.device | str = "cpu",
    seed: int = 0,
    data_dir: str | None = None,
    compile: bool | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    train_iters: int | None = None,
) -> MorphogeneticEnv:
    """An env for a named task with its default budget and rewards.

    `preset` names a host preset of the task's topology (default: the task's own host;
    for text, the task's windows shrink to the preset's context). `compile` defaults to on
    for CUDA and off for CPU, where compiling costs tens of seconds and does not pay.
    `batch_size` and `train_iters` override the task's per-epoch budget.
    """
    device = torch.device(device)
    overrides = {"data_dir": data_dir, "batch_size": batch_size, "train_iters": train_iters}
    task_config = fit_context(
        TaskConfig.preset(task, **{key: value for key, value in overrides.items() if value is not None}), preset
    )
    core = CoreConfig(compile=device.type == "cuda" if compile is None else compile)
    if max_epochs is not None:
        core = replace(core, lifecycle=replace(core.lifecycle, max_epochs=max_epochs))
    config = EnvConfig(
        task=task_config, core=core, rewards=RewardConfig.for_task(task), host_preset=preset, n_envs=n_envs, seed=seed
    )
    return MorphogeneticEnv(config, device)
