"""Where an env step's time goes: a `torch.profiler` run over whole env steps, and what
TorchRL's collector adds on top of stepping the env by hand.

The core and the env label their parts with `record_function("esper.<part>")`
(`esper_func/core/step.py`, `envs/morphogenetic.py`); this module adds `esper.policy` around
the controller's forward, profiles `steps` env steps after `warmup` untimed ones, and
reports each part's time per step and its share of the step's wall time. The
**controller's share** is policy + apply_action + tick + reward + observation (features,
masks, signals): the work a morphogenetic step adds around host training and evaluation.
A part's time is the host's wall time in its range; on CUDA the device time of the work
it launched is reported too, and a controller part counts with the larger of the two (the
host may run ahead of the device, so this bounds the share from above). With compiled
steps, the profiled steps are played once beforehand from the same RNG state, so that
every bank plan they meet is compiled before the profiler starts.

`main_job_episodes` times whole episodes of the default main job's env
(`TrainingConfig.preset("default")`) under static and heuristic control, with the envs
vmapped and packed (`CoreConfig.env_batching`) in this process, and packed over two
worker processes of one thread each (as the main job's collector runs them), side by
side and interleaved: the speed-up a user of `python -m esper_func.train` gets.

`collector_overhead` plays the same number of env steps twice, by hand (policy, `env.step`,
`step_mdp`) and through a TorchRL `Collector` (as the PPO trainer does), and reports the
collector's extra wall time as a fraction of its own.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from multiprocessing.connection import Connection
from typing import TypeVar

import torch
from tensordict import TensorDictBase
from torch.profiler import ProfilerActivity, profile, record_function
from torchrl.collectors import Collector
from torchrl.envs.utils import step_mdp

from envs import EnvConfig, MorphogeneticEnv
from envs.sharded import shard_sizes
from esper_func.core.config import CoreConfig, LifecycleConfig
from esper_func.core.reward_config import RewardConfig
from esper_func.core.stages import IN_FORWARD, stage_lookup
from esper_func.data.tasks import TaskConfig
from esper_func.rl.evaluate_cli import baseline_controller
from esper_func.rl.run_config import TrainingConfig
from policies import HeuristicConfig, HeuristicPolicy, RandomPolicy, StaticPolicy

T = TypeVar("T")

PARTS: tuple[str, ...] = (
    "policy",
    "sample_batches",
    "apply_action",
    "train_epoch",
    "evaluate",
    "governor",
    "tick",
    "reward",
    "observation",
)
CONTROLLER_PARTS: tuple[str, ...] = ("policy", "apply_action", "tick", "reward", "observation")
PROFILE_CONFIGS: dict[str, tuple[str, str, str]] = {
    "host": ("host only (static)", "static", "active"),
    "heuristic-active": ("heuristic, active bank", "heuristic", "active"),
    "heuristic-full": ("heuristic, full bank", "heuristic", "full"),
}
"""Profiled configurations by name: label, policy, bank mode."""


@dataclass(frozen=True)
class StepProfile:
    """Per-step times of one configuration (milliseconds, mean over the profiled steps)."""

    label: str
    policy: str
    bank_mode: str
    n_envs: int
    batch: int
    iters: int
    steps: int
    step_ms: float
    """Median wall time of one env step of all N envs, policy included."""
    parts_ms: dict[str, float] = field(default_factory=dict)
    """Host wall time in each part's range."""
    parts_device_ms: dict[str, float] = field(default_factory=dict)
    """Device time of the work each part launched (CUDA only)."""
    controller_share: float = 0.0
    live_seeds_per_env: float = 0.0
    """Mean number of seeds in the forward pass per env over the profiled steps."""


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Wall seconds of `run`, the device work it queued included, and what it returned."""
    synchronize(device)
    start = time.perf_counter()
    out = run()
    synchronize(device)
    return time.perf_counter() - start, out


def synthetic_env(
    device: torch.device,
    n_envs: int,
    batch: int,
    iters: int,
    max_epochs: int,
    bank_mode: str,
    compile: bool,
    amp: bool = False,
    seed: int = 0,
) -> MorphogeneticEnv:
    """The synthetic task at a given per-epoch budget (validation batches fit its validation set)."""
    preset = TaskConfig.preset("synthetic")
    val_batches = max(1, min(preset.val_batches, preset.n_val // batch))
    task = TaskConfig.preset("synthetic", batch_size=batch, train_iters=iters, val_batches=val_batches)
    core = CoreConfig(compile=compile, bank_mode=bank_mode, amp=amp, lifecycle=LifecycleConfig(max_epochs=max_epochs))  # type: ignore[arg-type]
    return MorphogeneticEnv(
        EnvConfig(task=task, core=core, rewards=RewardConfig.for_task("synthetic"), n_envs=n_envs, seed=seed), device
    )


def profile_env_steps(
    label: str,
    device: torch.device,
    n_envs: int,
    batch: int,
    iters: int,
    steps: int,
    warmup: int,
    policy_name: str,
    bank_mode: str,
    compile: bool,
) -> StepProfile:
    """Profile `steps` env steps of the synthetic task under `policy_name` (`static`: the
    host alone; `heuristic`: an eager heuristic that germinates at once)."""
    env = synthetic_env(device, n_envs, batch, iters, warmup + steps + 1, bank_mode, compile)

    def make_policy() -> torch.nn.Module:
        if policy_name == "static":
            return StaticPolicy()
        eager = HeuristicConfig(require_stabilization=False, min_epoch_to_germinate=0, plateau_epochs_to_germinate=0)
        return HeuristicPolicy(env.model.topology, n_envs, eager, device, env.model.blueprint_names)

    def one_step(policy: torch.nn.Module, td):  # type: ignore[no-untyped-def]
        with record_function("esper.policy"):
            td = policy(td)
        return env.step(td)

    episode = env.episode
    if compile:  # the same steps once, unprofiled: every bank plan they meet gets compiled now
        policy, td = make_policy(), env.reset()
        for _ in range(warmup + steps):
            td = step_mdp(one_step(policy, td))
        env.seek_episode(episode)  # the same episode again (a plain reset would start the next)
    policy, td = make_policy(), env.reset()
    for _ in range(warmup):
        td = step_mdp(one_step(policy, td))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    wall, live = [], []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            seconds, out = timed(lambda: one_step(policy, td), device)
            wall.append(seconds)
            live.append(float(stage_lookup(IN_FORWARD, out["next", "seeds", "stage"]).sum()) / n_envs)
            td = step_mdp(out)
    # The host-side ranges: on CUDA each range also has a device-side span of the same name.
    ranges = {
        event.key.removeprefix("esper."): event
        for event in prof.key_averages()
        if event.key.startswith("esper.") and event.device_type == torch.autograd.DeviceType.CPU
    }
    parts = {part: ranges[part].cpu_time_total / steps / 1000.0 for part in PARTS if part in ranges}
    device_parts = (
        {part: ranges[part].device_time_total / steps / 1000.0 for part in parts} if device.type == "cuda" else {}
    )
    step_ms = 1000.0 * statistics.median(wall)
    controller = sum(max(parts.get(part, 0.0), device_parts.get(part, 0.0)) for part in CONTROLLER_PARTS)
    return StepProfile(
        label=label,
        policy=policy_name,
        bank_mode=bank_mode,
        n_envs=n_envs,
        batch=batch,
        iters=iters,
        steps=steps,
        step_ms=step_ms,
        parts_ms=parts,
        parts_device_ms=device_parts,
        controller_share=controller / step_ms,
        live_seeds_per_env=statistics.fmean(live),
    )


def format_profiles(profiles: list[StepProfile]) -> str:
    """One row per configuration: the step, each part (ms per step), and the controller's share."""
    header = (
        f"{'configuration':<26} {'step ms':>8} "
        + " ".join(f"{part[:11]:>11}" for part in PARTS)
        + f" {'controller':>10}"
    )
    rows = [header, "-" * len(header)]
    for p in profiles:
        cells = " ".join(f"{p.parts_ms.get(part, 0.0):>11.1f}" for part in PARTS)
        rows.append(f"{p.label:<26} {p.step_ms:>8.1f} {cells} {100 * p.controller_share:>9.1f}%")
        if p.parts_device_ms:
            cells = " ".join(f"{p.parts_device_ms.get(part, 0.0):>11.1f}" for part in PARTS)
            rows.append(f"{'  (device time)':<26} {'':>8} {cells}")
    return "\n".join(rows)


@dataclass(frozen=True)
class CollectorOverhead:
    """Seconds for one episode of every env (median of repeats), by hand and through a Collector."""

    n_envs: int
    steps: int
    by_hand_s: float
    collector_s: float
    overhead_fraction: float
    """(collector - by hand) / collector: the share of a collected batch spent outside env and policy."""


def collector_overhead(
    device: torch.device, n_envs: int, batch: int, iters: int, steps: int, repeats: int, compile: bool
) -> CollectorOverhead:
    """One episode of `steps` env steps under a random policy, by hand and collected."""
    env = synthetic_env(device, n_envs, batch, iters, steps, "active", compile)
    policy = RandomPolicy(torch.Generator(device=device).manual_seed(0))

    def by_hand() -> None:
        td = env.reset()
        for _ in range(steps):
            td = step_mdp(env.step(policy(td)))

    def collected() -> None:
        collector = Collector(
            env,
            policy,
            frames_per_batch=n_envs * steps,
            total_frames=n_envs * steps,
            reset_at_each_iter=True,
            device=device,
            trust_policy=True,
            auto_register_policy_transforms=False,  # a parameter-free, stateless policy
        )
        for _batch in collector:
            pass
        collector.shutdown()

    by_hand()  # warm-up: caches, compiled graphs
    # Interleaved, so that drift in the machine's speed affects both sides alike.
    pairs = [(timed(by_hand, device)[0], timed(collected, device)[0]) for _ in range(repeats)]
    hand_s = statistics.median(hand for hand, _ in pairs)
    collector_s = statistics.median(collected_s for _, collected_s in pairs)
    return CollectorOverhead(n_envs, steps, hand_s, collector_s, (collector_s - hand_s) / collector_s)


@dataclass(frozen=True)
class EpisodeTiming:
    """Whole episodes of the default main job's env under one controller and one env batching."""

    controller: str
    env_batching: str
    processes: int
    """1: all envs in this process (its threads); W: shard k of the envs in worker process
    k of one torch thread, as the main job's multiprocess collector runs them."""
    n_envs: int
    steps: int
    episode_s: list[float]
    env_steps_per_s: float
    """N * steps / median episode seconds (reset included)."""
    speedup_vs_vmap: float
    """Against the vmapped env in one process: how the main job ran before packing."""


def play(env: MorphogeneticEnv, policy: Callable[[TensorDictBase], TensorDictBase]) -> None:
    """One whole episode of `env` under `policy`."""
    td = env.reset()
    for _ in range(env.max_epochs):
        td = step_mdp(env.step(policy(td)))


def _episode_server(connection: Connection, env: EnvConfig, shard: int, controller: str, device: str) -> None:
    """A worker process of `ShardProcesses`: one episode of its shard per request."""
    torch.set_num_threads(1)
    shard_env = MorphogeneticEnv(env, device, shard=shard)
    policy = baseline_controller(controller, shard_env, seed=0)
    while connection.recv():
        play(shard_env, policy)
        connection.send(None)


class ShardProcesses:
    """`workers` spawned processes, worker k holding shard k of `env`'s envs (the sizes
    of `envs.ShardedEnv`) under `controller`, playing an episode each in step."""

    def __init__(self, env: EnvConfig, workers: int, controller: str, device: torch.device) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for k, size in enumerate(shard_sizes(env.n_envs, workers)):
            mine, theirs = context.Pipe()
            process = context.Process(
                target=_episode_server,
                args=(theirs, replace(env, n_envs=size), k, controller, str(device)),
                daemon=True,
            )
            process.start()
            self.connections.append(mine)
            self.processes.append(process)

    def play(self) -> None:
        for connection in self.connections:
            connection.send(True)
        for connection in self.connections:
            connection.recv()

    def close(self) -> None:
        for connection, process in zip(self.connections, self.processes):
            connection.send(False)
            process.join(30)


def main_job_episodes(device: torch.device, n_envs: int, repeats: int, workers: int = 2) -> list[EpisodeTiming]:
    """`repeats` episodes per (controller, env batching, processes) after one untimed
    episode each, in turns so that drift in a shared machine's speed hits all alike. The
    worker-process case (packed, `workers` processes; CPU only) is the main job's
    collection; its shards draw other envs than the one-process env (streams are keyed by
    shard), so under heuristic control it grows other seeds."""
    base = TrainingConfig.preset("default").env
    cases = [(controller, batching, 1) for controller in ("static", "heuristic") for batching in ("vmap", "packed")]
    if device.type == "cpu" and workers > 1:
        cases += [(controller, "packed", workers) for controller in ("static", "heuristic")]
    players: dict[tuple[str, str, int], Callable[[], None]] = {}
    pools: list[ShardProcesses] = []
    for case in cases:
        controller, batching, processes = case
        env = replace(base, n_envs=n_envs, core=replace(base.core, env_batching=batching))
        if processes == 1:
            local = MorphogeneticEnv(env, device)
            players[case] = partial(play, local, baseline_controller(controller, local, seed=0))
        else:
            pools.append(ShardProcesses(env, processes, controller, device))
            players[case] = pools[-1].play
    times: dict[tuple[str, str, int], list[float]] = {case: [] for case in cases}
    try:
        for case in cases:
            timed(players[case], device)  # warm-up (and the workers' start)
        for _ in range(repeats):
            for case in cases:
                times[case].append(timed(players[case], device)[0])
    finally:
        for pool in pools:
            pool.close()
    steps = base.core.lifecycle.max_epochs
    rates = {case: n_envs * steps / statistics.median(times[case]) for case in cases}
    return [
        EpisodeTiming(*case, n_envs, steps, times[case], rates[case], rates[case] / rates[case[0], "vmap", 1])
        for case in cases
    ]


def format_episodes(timings: list[EpisodeTiming]) -> str:
    header = (
        f"{'controller':<11} {'env batching':<13} {'processes':>9} {'episode s':>10} {'env-steps/s':>12} {'vs vmap':>8}"
    )
    rows = [header, "-" * len(header)]
    for t in timings:
        median_s = statistics.median(t.episode_s)
        rows.append(
            f"{t.controller:<11} {t.env_batching:<13} {t.processes:>9} {median_s:>10.2f} {t.env_steps_per_s:>12.1f} "
            f"{t.speedup_vs_vmap:>7.2f}x"
        )
    return "\n".join(rows)
