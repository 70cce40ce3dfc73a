"""Distributed collection over loopback (127.0.0.1): the weight transport, batches equal to
a local sharded run's, workers started through the entry point, and lost workers."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from envs.morphogenetic import MorphogeneticEnv
from esper_func.rl.distributed import DistributedRollouts, free_port_block, layout_task, worker_command
from esper_func.rl.run_config import TrainingConfig, write_training_config
from esper_func.rl.run_sections import CollectorConfig
from esper_func.rl.trainer import PPOTrainer
from policies import StaticPolicy
from tests.distributed_stub import ENVS, STEPS, StubEnvFactory, make_policy, prefer
from tests.rollouts import assert_same_batches, recorded_batches, tiny, wait_for_first_update

pytestmark = pytest.mark.distributed

HOST = "127.0.0.1"


def stub_rollouts(
    tmp_path: Path, batches: int, send_weights: bool = True, **collector: object
) -> tuple[DistributedRollouts, torch.nn.Module]:
    policy = make_policy(0)
    config = CollectorConfig(kind="distributed", workers=2, master_addr=HOST, **collector)  # type: ignore[arg-type]
    frames = 2 * ENVS * STEPS
    rollouts = DistributedRollouts(
        [StubEnvFactory()] * 2, policy, frames, batches, config, "cpu", tmp_path, send_weights=send_weights
    )
    return rollouts, policy


def actions_per_batch(rollouts: DistributedRollouts, policy: torch.nn.Module) -> list[set[int]]:
    """Play every batch, changing the trainer's weights in place after each (as an update does)."""
    seen = []
    try:
        for index, batch in enumerate(rollouts):
            assert batch.shape == (2 * ENVS, STEPS)
            seen.append(set(batch["action"].unique().tolist()))
            prefer(policy, index + 1)
    finally:
        rollouts.shutdown()
    return seen


def test_weights_travel_through_the_engine_and_workers_without_them_go_stale(tmp_path: Path) -> None:
    rollouts, policy = stub_rollouts(tmp_path, batches=3)
    assert actions_per_batch(rollouts, policy) == [{0}, {1}, {2}]
    assert [process.returncode for process in rollouts.processes] == [0, 0]
    # The control: workers are separate processes, so without the sync they keep the
    # weights they started with (shared memory would make them follow).
    rollouts, policy = stub_rollouts(tmp_path, batches=3, send_weights=False)
    assert actions_per_batch(rollouts, policy) == [{0}, {0}, {0}]


class ExitedProcess:
    """A worker process as `subprocess.Popen.poll` sees it: its exit status, or None while it runs."""

    def __init__(self, code: int | None) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code


class SilentHeartbeats:
    def problem(self) -> str:
        return "worker rank 1 sent no heartbeat for 10 s"


@pytest.mark.parametrize(
    "shutting_down, code, expected",
    [
        (True, 0, None),  # the engine's shutdown call may still be returning when a worker has exited cleanly
        (True, 1, "worker rank 1 exited with status 1"),
        (False, 0, "worker rank 1 exited with status 0"),
        (False, None, "worker rank 1 sent no heartbeat for 10 s"),
    ],
)
def test_only_a_clean_exit_during_shutdown_is_not_a_problem(
    shutting_down: bool, code: int | None, expected: str | None
) -> None:
    rollouts = object.__new__(DistributedRollouts)  # the watcher's state alone, no engine
    rollouts.processes = [ExitedProcess(code)]
    rollouts.heartbeats = SilentHeartbeats()
    rollouts._shut_down = shutting_down
    assert rollouts._problem() == expected


def test_workers_started_through_the_entry_point_collect_and_exit_0(tmp_path: Path) -> None:
    port = free_port_block(HOST)
    workers = [subprocess.Popen(worker_command(rank, 3, HOST, port, threads=1)) for rank in (1, 2)]
    try:
        rollouts, policy = stub_rollouts(tmp_path, batches=2, launcher="delayed", port=port)
        assert actions_per_batch(rollouts, policy) == [{0}, {1}]
        assert [worker.wait(timeout=60) for worker in workers] == [0, 0]
    finally:
        for worker in workers:
            worker.kill()


@pytest.mark.usefixtures("single_thread")
def test_a_distributed_run_collects_the_batches_of_a_local_run_over_as_many_shards(tmp_path: Path) -> None:
    """Two batches with a PPO update between them: the second batch was collected with
    weights (and normalizer statistics) that only the engine carried to the workers. A
    local run resumed on workers continues exactly too. One torch thread on both sides
    (other thread counts round the hosts' sums differently)."""
    for name in ("local", "remote", "resumed"):
        (tmp_path / name).mkdir()
    local_trainer = PPOTrainer(tiny(devices=("cpu", "cpu")), tmp_path / "local")
    after_first: list[dict[str, object]] = []
    local_trainer.register_hook(
        "after_batch",
        lambda state: after_first.append(copy.deepcopy(local_trainer.state_dict())) if state.update == 1 else None,
    )
    local = recorded_batches(local_trainer)
    distributed = tiny(collector=CollectorConfig(kind="distributed", workers=2, master_addr=HOST, worker_threads=1))
    remote = recorded_batches(PPOTrainer(distributed, tmp_path / "remote"))
    resumed_trainer = PPOTrainer(distributed, tmp_path / "resumed")
    resumed_trainer.load_weights(after_first[0])
    resumed = recorded_batches(resumed_trainer)
    assert len(local) == len(remote) == 2 and len(resumed) == 1
    for mine, theirs in [*zip(local, remote), (local[1], resumed[0])]:
        assert_same_batches(mine, theirs)
    assert not torch.equal(local[0]["observation"], local[1]["observation"])


def find_worker(port: int, rank: int) -> int:
    """The pid of the collect_worker of `rank` that serves `port` (Linux /proc)."""
    wanted = ["--rank", str(rank), "--world-size"]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if (
            "esper_func.collect_worker" in argv
            and str(port) in argv
            and argv[argv.index("--rank") : argv.index("--rank") + 3] == wanted
        ):
            return int(entry.name)
    raise LookupError(f"no collect_worker of rank {rank} on port {port}")


def train_command(run_dir: Path, port: int, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "esper_func.train", "--preset", "tiny", "--collector", "distributed", "--workers", "2",
        "--port", str(port), "--run-dir", str(run_dir), "--logger", "none", "--no-progress", *flags,
    ]


def test_a_worker_killed_mid_run_stops_the_trainer_with_an_error_naming_it(tmp_path: Path) -> None:
    port = free_port_block(HOST)
    run_dir = tmp_path / "run"
    trainer = subprocess.Popen(train_command(run_dir, port, "--episodes", "4"), stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_update(trainer, run_dir)
        os.kill(find_worker(port, 1), signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = trainer.communicate(timeout=60)
    finally:
        trainer.kill()
    assert trainer.returncode == 1, stderr
    assert time.monotonic() - killed_at < 30
    assert "worker rank 1 exited with status -9" in stderr or "worker rank 1 stopped" in stderr, stderr
    assert f"--resume {run_dir}" in stderr
    assert (run_dir / "checkpoints" / "update_00001.pt").exists()
    with pytest.raises(LookupError):
        find_worker(port, 2)  # the trainer ended the other worker too


def test_a_worker_that_never_connects_stops_the_trainer_with_an_error_naming_it(tmp_path: Path) -> None:
    port = free_port_block(HOST)
    started = time.monotonic()
    trainer = subprocess.Popen(
        train_command(tmp_path / "run", port, "--launcher", "delayed", "--connect-timeout", "5"),
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = subprocess.Popen(worker_command(1, 3, HOST, port, threads=1), stderr=subprocess.DEVNULL)
    try:
        _, stderr = trainer.communicate(timeout=90)
        assert trainer.returncode == 1, stderr
        assert "worker rank 2 did not connect within 5 s" in stderr, stderr
        assert "python -m esper_func.collect_worker --rank 2 --world-size 3" in stderr  # how to start the workers
        assert time.monotonic() - started < 60
        # The worker left alone does not wait for ever: it fails its rendezvous (1) or sees
        # its heartbeat store gone (3), whichever comes first.
        assert worker.wait(timeout=30) in (1, 3)
    finally:
        trainer.kill()
        worker.kill()


def test_ctrl_c_on_the_trainer_checkpoints_and_shuts_the_workers_down(tmp_path: Path) -> None:
    """As on the local path: the batch in flight finishes, a checkpoint is written, the
    workers are told to stop (each exits 0: the trainer checks) and the trainer exits 130."""
    port = free_port_block(HOST)
    run_dir = tmp_path / "run"
    trainer = subprocess.Popen(train_command(run_dir, port, "--episodes", "6"), stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_update(trainer, run_dir)
        trainer.send_signal(signal.SIGINT)
        _, stderr = trainer.communicate(timeout=90)
    finally:
        trainer.kill()
    assert trainer.returncode == 128 + signal.SIGINT, stderr
    assert f"continue with: python -m esper_func.train --resume {run_dir}" in stderr
    stopped_at = max(int(path.stem.split("_")[1]) for path in (run_dir / "checkpoints").glob("update_*.pt"))
    assert 2 <= stopped_at < 6
    for rank in (1, 2):
        with pytest.raises(LookupError):
            find_worker(port, rank)


def test_the_layout_env_has_the_real_envs_keys_and_shapes_for_less_work() -> None:
    """What TorchRL's startup rollout on the trainer learns the batch layout from."""
    config = TrainingConfig.preset("default")
    real = MorphogeneticEnv(replace(config.env, n_envs=2))
    layout = MorphogeneticEnv(replace(config.env, n_envs=2, task=layout_task(config.env.task)))
    assert layout.config.task.train_iters == 1 < real.config.task.train_iters
    shapes = [
        {
            key: (value.shape, value.dtype)
            for key, value in env.rollout(2, StaticPolicy(), break_when_any_done=False).items(True, True)
        }
        for env in (real, layout)
    ]
    assert shapes[0] == shapes[1]


def test_a_hung_worker_is_found_by_its_heartbeat(tmp_path: Path) -> None:
    """A stopped (SIGSTOP) worker is alive to the OS and silent to gloo, which would wait
    for it for 1000 days: its heartbeat going quiet stops the run, naming it."""
    port = free_port_block(HOST)
    run_dir = tmp_path / "run"
    config = TrainingConfig.preset("tiny")
    config = replace(
        config,
        collector=CollectorConfig(kind="distributed", workers=2, master_addr=HOST, port=port, heartbeat_timeout_s=3.0),
    )
    config_json = tmp_path / "config.json"
    write_training_config(config, config_json)
    command = [sys.executable, "-m", "esper_func.train", "--config-json", str(config_json), "--episodes", "4"]
    command += ["--run-dir", str(run_dir), "--logger", "none", "--no-progress"]
    trainer = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_update(trainer, run_dir)
        os.kill(find_worker(port, 2), signal.SIGSTOP)
        _, stderr = trainer.communicate(timeout=60)
    finally:
        trainer.kill()
    assert trainer.returncode == 1, stderr
    assert "worker rank 2 stopped: no heartbeat for" in stderr, stderr
    with pytest.raises(LookupError):
        find_worker(port, 2)  # the trainer ended it
