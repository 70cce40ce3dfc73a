"""PPO rollouts on worker processes of this machine: TorchRL's `MultiSyncCollector`.

Worker k steps shard k of the run's `env.n_envs` envs (`ShardEnvFactory`: the shard sizes
of `envs.ShardedEnv`, random streams keyed by (seed, k, episode)), so a batch equals a
local run's over as many shards, value for value (bit for bit at equal torch thread
counts), and the distributed collector's over as many workers. No network: TorchRL spawns
the workers and keeps the actor's weights and buffers (the normalizer statistics) in
shared memory, which the trainer's optimizer and normalizers update in place between
batches; the batches come back through shared buffers.

Why on a CPU: two processes of one torch thread each step two shards of a small CNN
faster than one process of two threads steps them all (1.45x on 2 cores for the main job,
docs/performance.md): the packed step's small kernels do not split well over threads.

Ctrl-C reaches the whole process group; the workers ignore SIGINT so that the trainer's
first Ctrl-C finishes the batch and checkpoints (esper_func.rl.train_cli.GracefulStop), and the
workers stop when the trainer shuts the collector down. A worker that dies mid-batch
(killed, out of memory) stops the run with a `DistributedError` naming it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence

import torch
from tensordict import TensorDictBase
from torchrl.collectors import MultiSyncCollector

from esper_func.rl.distributed import ENGINE_ERRORS, DistributedError, ShardEnvFactory

SHUTDOWN_TIMEOUT_S = 30.0
"""How long TorchRL waits for the workers to stop before it terminates them."""


def ignore_sigint() -> None:
    """Worker start-up: leave Ctrl-C to the trainer, which stops the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class MultiprocessRollouts:
    """Dense `[N, T]` batches from one worker process per env shard. Call `shutdown` in
    a `finally`: it stops the workers."""

    def __init__(
        self,
        env_factories: Sequence[ShardEnvFactory],
        policy: torch.nn.Module,
        steps: int,
        batches: int,
        worker_threads: int,
    ) -> None:
        """Worker k builds `env_factories[k]`'s shard (pickled: the workers are spawned) and
        plays `steps` steps of its envs per batch. `policy` goes to the workers once, its
        parameters and buffers in shared memory from then on."""
        self._batches = batches
        self._shut_down = False
        self._failed = False
        frames = [factory.n_envs * steps for factory in env_factories]
        self.collector = MultiSyncCollector(
            list(env_factories),
            policy,
            frames_per_batch=frames,
            total_frames=sum(frames) * batches,
            reset_at_each_iter=True,
            update_at_each_batch=True,
            cat_results=0,
            storing_device="cpu",
            use_buffers=True,
            num_threads=torch.get_num_threads(),  # the trainer's own threads, for the update
            num_sub_threads=worker_threads,
            init_fn=ignore_sigint,
            auto_register_policy_transforms=False,
        )
        self._iterator = iter(self.collector)

    def __iter__(self) -> Iterator[TensorDictBase]:
        for _ in range(self._batches):
            self._check_workers()
            try:
                batch = next(self._iterator)
            except ENGINE_ERRORS as error:
                self._failed = True
                raise DistributedError(f"a collector worker process failed: {type(error).__name__}: {error}") from error
            yield batch

    def _check_workers(self) -> None:
        """Before a batch: a worker that died between batches would otherwise block the
        weight sync until TorchRL's timeout (120 s); one that dies mid-batch TorchRL finds."""
        for k, process in enumerate(self.collector.procs):
            if not process.is_alive():
                self._failed = True
                raise DistributedError(f"collector worker process {k} exited with status {process.exitcode}")

    def shutdown(self) -> None:
        """Stop the workers (once); after a worker failed, the others, quietly."""
        if self._shut_down:
            return
        self._shut_down = True
        self.collector.shutdown(timeout=SHUTDOWN_TIMEOUT_S, raise_on_error=not self._failed)
