"""`python -m esper_func.bench_distributed`: PPO rollouts collected here against W workers, in one run.

Both sides collect the same batches (the default main job's envs and the initial PPO
policy, `--batches` episode batches of `--n-envs` envs): first TorchRL's `Collector` on
this process, then `--workers` workers over loopback (`--launcher mp`), which is what
`python -m esper_func.train --collector distributed` runs. Reported: env-steps/s of each,
and what the distributed overhead is made of:
- startup: the workers starting and connecting, and the rollout TorchRL runs once on the
  trainer (one whole episode of one shard) to learn the batch layout;
- per batch: the weight sync (the actor's weights and buffers to every worker), the
  gathering (copying the received batch out of the receive buffer and stacking the
  workers' parts), and the rest, which is the workers' rollouts and the transfer.
`--json PATH` records every figure with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from tensordict import TensorDictBase
from torchrl.collectors import Collector
from torchrl.collectors.distributed import DistributedCollector

from esper_func.perf.bench_report import device_name
from esper_func.rl.distributed import DistributedRollouts, shard_factories
from esper_func.rl.run_config import TrainingConfig
from esper_func.rl.run_sections import CollectorConfig, TelemetryConfig
from esper_func.rl.trainer import PPOTrainer


class TimedDistributedCollector(DistributedCollector):
    """TorchRL's collector with its phases timed (`phases`: name -> seconds per call)."""

    phases: ClassVar[dict[str, list[float]]] = {}

    def _record(self, name: str, start: float) -> None:
        self.phases.setdefault(name, []).append(time.perf_counter() - start)

    def _init_workers(self) -> None:
        start = time.perf_counter()
        super()._init_workers()
        self._record("connect", start)

    def _make_container(self) -> None:
        start = time.perf_counter()
        super()._make_container()
        self._record("startup_rollout", start)

    def update_policy_weights_(self, *args: object, **kwargs: object) -> None:
        start = time.perf_counter()
        super().update_policy_weights_(*args, **kwargs)
        self._record("weight_sync", start)

    def _next_sync(self, total_frames: int) -> tuple[TensorDictBase, int]:
        start = time.perf_counter()
        data, total = super()._next_sync(total_frames)
        self._record("next_sync", start)
        # What gathering costs: the copy out of the receive buffer (done inside
        # `_next_sync`) and the stacking `DistributedRollouts` does, timed again here.
        start = time.perf_counter()
        torch.cat(self._tensordict_out.clone().unbind(0), 0)
        self._record("gather", start)
        return data, total


@dataclass
class CollectionTiming:
    batches: int
    frames_per_batch: int
    startup_s: float
    batch_s: list[float]

    @property
    def steady_env_steps_per_s(self) -> float:
        return self.frames_per_batch / (sum(self.batch_s) / len(self.batch_s))

    @property
    def overall_env_steps_per_s(self) -> float:
        return self.frames_per_batch * self.batches / (self.startup_s + sum(self.batch_s))


def timed_batches(make: Iterator[TensorDictBase], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        next(make)
        times.append(time.perf_counter() - start)
    return times


def measure_local(config: TrainingConfig, run_dir: Path, batches: int) -> CollectionTiming:
    trainer = PPOTrainer(config, run_dir)
    start = time.perf_counter()
    collector = Collector(
        trainer.env,
        trainer.nets.actor,
        frames_per_batch=trainer.frames_per_batch,
        total_frames=trainer.frames_per_batch * batches,
        reset_at_each_iter=True,
        auto_register_policy_transforms=False,
    )
    startup = time.perf_counter() - start
    try:
        times = timed_batches(iter(collector), batches)
    finally:
        collector.shutdown()
    return CollectionTiming(batches, trainer.frames_per_batch, startup, times)


def measure_distributed(
    config: TrainingConfig, run_dir: Path, batches: int
) -> tuple[CollectionTiming, dict[str, list[float]]]:
    trainer = PPOTrainer(config, run_dir)
    TimedDistributedCollector.phases = {}
    start = time.perf_counter()
    rollouts = DistributedRollouts(
        shard_factories(config, trainer.transforms, first_episode=0),
        trainer.nets.actor,
        trainer.frames_per_batch,
        batches,
        config.collector,
        config.device,
        run_dir,
        engine=TimedDistributedCollector,
    )
    startup = time.perf_counter() - start
    try:
        times = timed_batches(iter(rollouts), batches)
    finally:
        rollouts.shutdown()
    return CollectionTiming(batches, trainer.frames_per_batch, startup, times), TimedDistributedCollector.phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m esper_func.bench_distributed", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3, help="episode batches timed on each side")
    parser.add_argument(
        "--preset", default="default", help="training preset whose envs are collected (default: the main job's)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.workers < 1 or args.batches < 1 or args.n_envs % args.workers:
        parser.error(
            f"need --workers >= 1, --batches >= 1 and --n-envs a multiple of --workers; got {args.workers}, "
            f"{args.batches}, {args.n_envs}"
        )
    base = TrainingConfig.preset(args.preset)
    quiet = TelemetryConfig(level="off", logger="none", plots=False, progress_bar=False)
    local = replace(base, env=replace(base.env, n_envs=args.n_envs), telemetry=quiet, compare_episodes=0)
    distributed = replace(local, collector=CollectorConfig(kind="distributed", workers=args.workers))
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_distributed_{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)

    print(
        f"local: {args.batches} batches of {args.n_envs} envs x {base.env.core.lifecycle.max_epochs} epochs, torch "
        f"threads {torch.get_num_threads()} ...",
        flush=True,
    )
    here = measure_local(local, run_dir, args.batches)
    print(f"distributed: {args.workers} workers (mp launcher, 127.0.0.1) ...", flush=True)
    remote, phases = measure_distributed(distributed, run_dir, args.batches)

    mean = lambda values: sum(values) / len(values)  # noqa: E731
    batch_s = mean(remote.batch_s)
    sync_s = mean(phases["weight_sync"])
    gather_s = mean(phases["gather"])
    rows = [
        (
            "local Collector",
            here.startup_s,
            mean(here.batch_s),
            here.steady_env_steps_per_s,
            here.overall_env_steps_per_s,
        ),
        (
            f"distributed, {args.workers} workers",
            remote.startup_s,
            batch_s,
            remote.steady_env_steps_per_s,
            remote.overall_env_steps_per_s,
        ),
    ]
    print("\n| collection | startup (s) | per batch (s) | env-steps/s per batch | env-steps/s with startup |")
    print("|---|---|---|---|---|")
    for name, startup, per_batch, steady, overall in rows:
        print(f"| {name} | {startup:.1f} | {per_batch:.2f} | {steady:.2f} | {overall:.2f} |")
    print("\n| distributed overhead | seconds |")
    print("|---|---|")
    print(f"| startup: workers start and connect | {mean(phases['connect']):.2f} |")
    print(
        f"| startup: the trainer's layout rollout (one episode of one shard) | {mean(phases['startup_rollout']):.2f} |"
    )
    print(f"| per batch: weight sync | {sync_s:.4f} |")
    print(f"| per batch: gathering the batch | {gather_s:.4f} |")
    print(f"| per batch: the workers' rollouts and the transfer | {batch_s - sync_s - gather_s:.2f} |")
    if args.json is not None:
        record = {
            "command": "python -m esper_func.bench_distributed " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": {
                "processor": device_name(torch.device("cpu")),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
            },
            "torch_threads_trainer": torch.get_num_threads(),
            "local": {
                **asdict(here),
                "steady_env_steps_per_s": here.steady_env_steps_per_s,
                "overall_env_steps_per_s": here.overall_env_steps_per_s,
            },
            "distributed": {
                **asdict(remote),
                "workers": args.workers,
                "steady_env_steps_per_s": remote.steady_env_steps_per_s,
                "overall_env_steps_per_s": remote.overall_env_steps_per_s,
                "phases_s": phases,
            },
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
