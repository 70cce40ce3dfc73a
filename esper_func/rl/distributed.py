"""PPO rollouts on TorchRL's `DistributedCollector`: W worker processes, one env shard each.

Worker k (rank k + 1 of torch.distributed's world of W + 1; the trainer is rank 0) steps
shard k of the run's `env.n_envs` envs: a `MorphogeneticEnv` of n_envs / W envs with
shard index k, whose random streams are keyed by (seed, k, episode) (`esper_func.core.seeding`),
and samples actions with the policy and the env's noise. So a batch gathered from W
workers equals a local run's over W shards (`envs.ShardedEnv`), value for value (bit for
bit at equal torch thread counts).

What travels through the engine: the env factory and a pickled copy of the actor once,
at the start; then, before every batch, the actor's weights and buffers (the observation
normalizer's statistics are buffers) over gloo; then the batch back. Nothing is shared
memory: the `mp` launcher starts workers as separate `python -m esper_func.collect_worker`
processes, exactly as on a cluster, and TorchRL's delayed launch hands them their job.

Watching the workers: each worker ticks a heartbeat counter in a small store the trainer
hosts (port + 3) once a second. The trainer runs the blocking TorchRL calls on a helper
thread and, while it waits, checks that every rank connected within
`CollectorConfig.connect_timeout_s` and ticked within `heartbeat_timeout_s`; a rank that
never connected, died or hung stops the run with a `DistributedError` that names it,
instead of a hang (gloo alone waits 1000 days for a hung peer). Ports: `port` (rendezvous), port + 1 (TorchRL's
store), port + 2 (TorchRL's weight sync), port + 3 (heartbeats).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from tensordict import TensorDictBase
from torchrl.collectors.distributed import DistributedCollector
from torchrl.collectors.distributed.generic import _distributed_init_delayed
from torchrl.envs import Compose, EnvBase, Transform, TransformedEnv

from envs.morphogenetic import EnvConfig, MorphogeneticEnv
from envs.sharded import shard_sizes
from esper_func.core.config import ConfigError
from esper_func.data.tasks import TaskConfig
from esper_func.rl.run_config import TrainingConfig
from esper_func.rl.run_sections import CollectorConfig

PORTS_USED = 4
"""`port` to `port + 3`: rendezvous, TorchRL's store, TorchRL's weight sync, heartbeats."""
HEARTBEAT_PERIOD_S = 1.0
POLL_S = 0.25
ENGINE_ERRORS = (RuntimeError, OSError, ValueError, TypeError, KeyError)
"""What TorchRL and torch.distributed raise (their `DistError`s are RuntimeErrors)."""

ENGINE_THREAD = "esper-distributed-engine"
T = TypeVar("T")


class DistributedError(RuntimeError):
    """A worker never connected or stopped, or the engine failed (distributed or
    multiprocess collection); the message names what was lost."""


# --- what each worker builds ---------------------------------------------------------------


def layout_task(task: TaskConfig) -> TaskConfig:
    """The smallest training and validation budget of `task`: an env built with it
    returns the same keys and shapes (they depend on the host, the slots and the
    blueprints, not on the budget) for a small fraction of the work."""
    budget = replace(task, batch_size=2, train_iters=1, val_batches=1)
    return replace(budget, n_train=64, n_val=2, n_test=2) if task.name == "synthetic" else budget


@dataclass(frozen=True)
class ShardEnvFactory:
    """Builds worker `shard`'s env: its n_envs / workers envs of the run, starting in
    `first_episode` (a resumed run's next episode), wrapped in the policy's transforms.
    Pickled to the worker.

    TorchRL also builds worker 0's env once on the trainer (rank 0), to learn the layout
    of a batch from one whole rollout (`DistributedCollector._make_container`). Built
    there, the env gets `layout_task`'s budget: the main job's startup rollout took 57 s
    with the real budget, while the workers waited."""

    env: EnvConfig
    workers: int
    shard: int
    first_episode: int
    device: str
    transforms: tuple[Transform, ...]

    @property
    def n_envs(self) -> int:
        """This shard's envs: `envs.ShardedEnv`'s split of the run's over `workers`."""
        return shard_sizes(self.env.n_envs, self.workers)[self.shard]

    def __call__(self) -> EnvBase:
        env = replace(self.env, n_envs=self.n_envs)
        if dist.is_initialized() and dist.get_rank() == 0:
            env = replace(env, task=layout_task(env.task))
        base = MorphogeneticEnv(env, self.device, shard=self.shard, first_episode=self.first_episode)
        return TransformedEnv(base, Compose(*(transform.clone() for transform in self.transforms)))


# --- ports, launch, heartbeats ---------------------------------------------------------------


def free_port_block(host: str, count: int = PORTS_USED) -> int:
    """A port p such that p .. p + count - 1 are free on `host` now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((host, port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise DistributedError(f"found no {count} consecutive free ports on {host}; set collector.port")


def worker_command(rank: int, world_size: int, master_addr: str, port: int, threads: int | None = None) -> list[str]:
    """The command line that starts worker `rank` (`python -m esper_func.collect_worker`)."""
    command = [sys.executable, "-m", "esper_func.collect_worker", "--rank", str(rank), "--world-size", str(world_size)]
    command += ["--master-addr", master_addr, "--port", str(port)]
    return command + (["--threads", str(threads)] if threads is not None else [])


def require_launcher_packages(collector: CollectorConfig) -> None:
    """The submitit launcher needs submitit: say so before anything is built."""
    if (
        collector.kind == "distributed"
        and collector.launcher == "submitit"
        and importlib.util.find_spec("submitit") is None
    ):
        raise ConfigError(
            "collector.launcher='submitit' needs the package submitit, missing here; pip install submitit, or use "
            "--launcher delayed"
        )


class Heartbeats:
    """The trainer's view of the workers' heartbeat counters (a TCPStore it hosts)."""

    def __init__(
        self, host: str, port: int, workers: int, connect_timeout_s: float, heartbeat_timeout_s: float
    ) -> None:
        self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
        self.workers = workers
        self.connect_timeout_s = connect_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.started = time.monotonic()
        self.seen: dict[int, tuple[int, float]] = {}

    def problem(self) -> str | None:
        """Why the run cannot go on (a rank never connected, or stopped ticking), or None."""
        now = time.monotonic()
        for rank in range(1, self.workers + 1):
            count = int(self.store.add(f"beats/{rank}", 0))
            if count == 0:
                if now - self.started > self.connect_timeout_s:
                    return f"worker rank {rank} did not connect within {self.connect_timeout_s:.0f} s"
                continue
            previous = self.seen.get(rank)
            if previous is None or previous[0] != count:
                self.seen[rank] = (count, now)
            elif now - previous[1] > self.heartbeat_timeout_s:
                quiet = f"{now - previous[1]:.0f} s"
                return f"worker rank {rank} stopped: no heartbeat for {quiet} (it died, hung or lost the network)"
        return None


def beat_forever(host: str, port: int, rank: int, connect_timeout_s: float) -> None:
    """Worker side: tick this rank's counter once a second. When the trainer is gone the
    worker has nothing left to do: it exits (status 3) instead of waiting for ever."""
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=connect_timeout_s))
        while True:
            store.add(f"beats/{rank}", 1)
            time.sleep(HEARTBEAT_PERIOD_S)
    except (RuntimeError, OSError) as error:  # DistStoreError and DistNetworkError are RuntimeErrors
        print(
            f"collect_worker rank {rank}: the trainer at {host}:{port} is gone ({error}); exiting",
            file=sys.stderr,
            flush=True,
        )
        os._exit(3)


def engine_left_running() -> bool:
    """Whether this process still holds a distributed engine that was not shut down: a
    process group, or an engine call blocked on a lost worker. Its threads (gloo's,
    TorchRL's weight sync) make a normal interpreter exit abort with SIGABRT."""
    return dist.is_initialized() or any(
        thread.name == ENGINE_THREAD and thread.is_alive() for thread in threading.enumerate()
    )


def exit_now(code: int) -> None:
    """Flush and end the process without the interpreter's teardown, which TorchRL 0.14.1's
    weight-sync thread and a blocked engine turn into SIGABRT (status 134). Logs and
    checkpoints are flushed when written, so nothing is lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(rank: int, world_size: int, master_addr: str, port: int, connect_timeout_s: float = 120.0) -> None:
    """Collect for the trainer until it shuts the run down (returns then). The heartbeat
    thread lets the trainer tell a lost worker from a slow one."""
    threading.Thread(target=beat_forever, args=(master_addr, port + 3, rank, connect_timeout_s), daemon=True).start()
    _distributed_init_delayed(rank, "gloo", master_addr, port, world_size)


def serve_then_exit(rank: int, world_size: int, master_addr: str, port: int, connect_timeout_s: float = 120.0) -> None:
    """`serve`, then end the process with status 0 (a SLURM job submitted by the
    `submitit` launcher; `exit_now` says why not a normal exit)."""
    serve(rank, world_size, master_addr, port, connect_timeout_s)
    exit_now(0)


# --- the trainer's collector ---------------------------------------------------------------


def shard_factories(
    config: TrainingConfig, transforms: Sequence[Transform], first_episode: int
) -> list[ShardEnvFactory]:
    """One env factory per worker of `config.collector`: shard k of the run's envs."""
    workers = config.collector.workers
    return [
        ShardEnvFactory(config.env, workers, k, first_episode, config.device, tuple(transforms)) for k in range(workers)
    ]


class DistributedRollouts:
    """Dense batches from `collector.workers` workers, the weights sent before each: with
    `shard_factories`, `[N, T]` batches equal to a local run's over that many shards.
    Call `shutdown` in a `finally`: it stops the workers (each exits 0) and the engine."""

    def __init__(
        self,
        env_factories: Sequence[Callable[[], EnvBase]],
        policy: torch.nn.Module,
        frames_per_batch: int,
        batches: int,
        collector: CollectorConfig,
        device: torch.device | str,
        run_dir: Path,
        send_weights: bool = True,
        engine: type[DistributedCollector] = DistributedCollector,
    ) -> None:
        """`env_factories[k]` builds worker k's env (picklable); `policy` is pickled to the
        workers once, then its weights and buffers are sent before every batch.
        `send_weights=False` is the control that shows the transport matters: the workers
        keep the weights they started with. `engine`: TorchRL's collector class (the
        benchmark passes one that times its phases)."""
        require_launcher_packages(collector)
        if len(env_factories) != collector.workers:
            raise ValueError(
                f"{len(env_factories)} env factories for collector.workers={collector.workers}; pass one per worker"
            )
        self.workers = collector.workers
        self.device = torch.device(device)
        self.port = collector.port or free_port_block(collector.master_addr)
        world_size = self.workers + 1
        self.heartbeats = Heartbeats(
            collector.master_addr,
            self.port + 3,
            self.workers,
            collector.connect_timeout_s,
            collector.heartbeat_timeout_s,
        )
        self.processes: list[subprocess.Popen[bytes]] = []
        self._in_flight: threading.Thread | None = None
        self._shut_down = False
        self._launch(collector, world_size, run_dir)
        self.collector: DistributedCollector = self._watched(
            lambda: engine(
                list(env_factories),
                policy,
                frames_per_batch=frames_per_batch,
                total_frames=frames_per_batch * batches,
                sync=True,
                update_after_each_batch=send_weights,
                launcher="submitit_delayed",
                tcp_port=self.port,
                backend="gloo",
                reset_at_each_iter=True,
                storing_device="cpu",
                collector_kwargs={"auto_register_policy_transforms": False},
            )
        )
        self._batches = batches
        self._iterator = iter(self.collector)

    def _launch(self, collector: CollectorConfig, world_size: int, run_dir: Path) -> None:
        addr, port = collector.master_addr, self.port
        if collector.launcher == "mp":
            threads = collector.threads_per_worker
            for rank in range(1, world_size):
                # A session of its own: a Ctrl-C in the trainer's terminal reaches the trainer
                # alone, which then stops the workers cleanly.
                self.processes.append(
                    subprocess.Popen(worker_command(rank, world_size, addr, port, threads), start_new_session=True)
                )
        elif collector.launcher == "submitit":
            import submitit  # checked by require_launcher_packages

            executor = submitit.AutoExecutor(folder=run_dir / "slurm")
            slurm = {"timeout_min": collector.slurm_timeout_min, "cpus_per_task": collector.slurm_cpus_per_task}
            if collector.slurm_partition:
                slurm["slurm_partition"] = collector.slurm_partition
            executor.update_parameters(**slurm)
            for rank in range(1, world_size):
                executor.submit(serve_then_exit, rank, world_size, addr, port, collector.connect_timeout_s)
        else:
            lines = "\n".join(
                "  python " + " ".join(worker_command(rank, world_size, addr, port)[1:])
                for rank in range(1, world_size)
            )
            print(
                f"waiting {collector.connect_timeout_s:.0f} s for {self.workers} workers; start them with:\n{lines}",
                file=sys.stderr,
                flush=True,
            )

    def _watched(self, call: Callable[[], T]) -> T:
        """Run a blocking engine call on a helper thread; meanwhile watch the workers."""
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                outcome["value"] = call()
            except ENGINE_ERRORS as error:  # handed to the caller's thread below
                outcome["error"] = error

        thread = threading.Thread(target=run, name=ENGINE_THREAD, daemon=True)
        self._in_flight = thread
        thread.start()
        while thread.is_alive():
            thread.join(POLL_S)
            if thread.is_alive():
                problem = self._problem()
                if problem is not None:
                    self._abort()
                    raise DistributedError(problem)
        self._in_flight = None
        if not outcome:  # an error outside ENGINE_ERRORS: threading printed its traceback
            self._abort()
            raise DistributedError("the distributed collector's thread died; its traceback is printed above")
        if "error" in outcome:
            problem = self._problem_after_error()
            self._abort()
            error = outcome["error"]
            assert isinstance(error, BaseException)
            raise DistributedError(
                problem or f"the distributed collector failed: {type(error).__name__}: {error}"
            ) from error
        return outcome["value"]  # type: ignore[return-value]

    def _problem(self) -> str | None:
        """A worker that exited or went silent. During `shutdown` the workers exit 0 and stop
        beating while the engine's call may still be returning: only another status counts."""
        for rank, process in enumerate(self.processes, start=1):
            code = process.poll()
            if code is not None and not (self._shut_down and code == 0):
                return f"worker rank {rank} exited with status {code}"
        return None if self._shut_down else self.heartbeats.problem()

    def _problem_after_error(self) -> str | None:
        """The rank behind an engine error: a lost peer shows as a stale heartbeat within
        the heartbeat timeout."""
        deadline = time.monotonic() + self.heartbeats.heartbeat_timeout_s + 2 * HEARTBEAT_PERIOD_S
        while time.monotonic() < deadline:
            problem = self._problem()
            if problem is not None:
                return problem
            time.sleep(POLL_S)
        return None

    def _abort(self) -> None:
        """After a failure: end the workers this trainer started; the engine is left as it is."""
        self._shut_down = True
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    def __iter__(self) -> Iterator[TensorDictBase]:
        for _ in range(self._batches):
            batch = self._watched(lambda: next(self._iterator))
            yield torch.cat(batch.unbind(0), 0).to(self.device)

    def shutdown(self) -> None:
        """Stop the workers and the engine (workers exit 0). After an abort, or with a call
        still in flight (a second Ctrl-C), only end the processes this trainer started."""
        if self._shut_down or (self._in_flight is not None and self._in_flight.is_alive()):
            self._abort()
            return
        self._shut_down = True
        self._watched(self.collector.shutdown)
        for rank, process in enumerate(self.processes, start=1):
            code = process.wait(timeout=30)
            if code != 0:
                raise DistributedError(
                    f"worker rank {rank} exited with status {code} after a clean shutdown (0 expected)"
                )
