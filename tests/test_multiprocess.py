"""Collection on worker processes of this machine (TorchRL's `MultiSyncCollector`): batches
equal to a local run's over as many shards, a lost worker, Ctrl-C, and the CLI's choice."""

from __future__ import annotations

import copy
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from esper_func.core.config import ConfigError
from esper_func.rl.distributed import DistributedError
from esper_func.rl.run_config import TrainingConfig
from esper_func.rl.run_sections import CollectorConfig
from esper_func.rl.train_cli import parse_args, resolve_config
from esper_func.rl.trainer import PPOTrainer, TrainerState
from tests.rollouts import assert_same_batches, recorded_batches, tiny, wait_for_first_update

WORKERS = CollectorConfig(kind="multiprocess", workers=2, worker_threads=1)


@pytest.mark.usefixtures("single_thread")
def test_worker_processes_collect_the_batches_of_a_local_run_over_as_many_shards(tmp_path: Path) -> None:
    """3 envs over 2 workers (shards of 2 and 1, as `ShardedEnv` splits them), three
    batches with PPO updates between them: the later ones were collected with the updated
    weights and normalizer statistics, which reach the workers through shared memory
    alone. A local run resumed on worker processes continues exactly too."""
    for name in ("local", "workers", "resumed"):
        (tmp_path / name).mkdir()
    three = tiny(episodes=3)
    three = replace(three, env=replace(three.env, n_envs=3))
    local_trainer = PPOTrainer(replace(three, devices=("cpu", "cpu")), tmp_path / "local")
    after_first: list[dict[str, object]] = []

    def keep_first(state: TrainerState) -> None:
        if state.update == 1:
            after_first.append(copy.deepcopy(local_trainer.state_dict()))

    local_trainer.register_hook("after_batch", keep_first)
    local = recorded_batches(local_trainer)
    workers = recorded_batches(PPOTrainer(replace(three, collector=WORKERS), tmp_path / "workers"))
    resumed_trainer = PPOTrainer(replace(three, collector=WORKERS), tmp_path / "resumed")
    resumed_trainer.load_weights(after_first[0])
    resumed = recorded_batches(resumed_trainer)
    assert len(local) == len(workers) == 3 and len(resumed) == 2
    for mine, theirs in [*zip(local, workers), *zip(local[1:], resumed)]:
        assert_same_batches(mine, theirs)
    assert not torch.equal(local[1][("action", "op_log_prob")], local[2][("action", "op_log_prob")])
    assert multiprocessing.active_children() == []


def test_a_worker_killed_mid_run_stops_the_run_with_an_error_and_no_process_left(tmp_path: Path) -> None:
    trainer = PPOTrainer(tiny(episodes=4, collector=WORKERS), tmp_path)

    def kill_a_worker(state: TrainerState) -> None:
        if state.update == 1:
            worker = multiprocessing.active_children()[0]
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(10)

    trainer.register_hook("after_batch", kill_a_worker)
    with pytest.raises(DistributedError, match="exited with status -9"):
        trainer.train()
    assert trainer.state.update == 1
    deadline = time.monotonic() + 30
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert multiprocessing.active_children() == []


def test_ctrl_c_in_the_terminal_finishes_the_batch_checkpoints_and_stops_the_workers(tmp_path: Path) -> None:
    """The terminal sends SIGINT to the whole process group, workers included: they leave
    it to the trainer, which finishes its batch, checkpoints and shuts them down (130)."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "esper_func.train", "--preset", "tiny", "--collector", "multiprocess", "--workers", "2",
        "--episodes", "40", "--run-dir", str(run_dir), "--logger", "none", "--no-progress",
    ]
    trainer = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_first_update(trainer, run_dir)
        os.killpg(trainer.pid, signal.SIGINT)
        _, stderr = trainer.communicate(timeout=90)
    finally:
        trainer.kill()
    assert trainer.returncode == 128 + signal.SIGINT, stderr
    assert f"continue with: python -m esper_func.train --resume {run_dir}" in stderr
    assert "Traceback" not in stderr, stderr
    stopped_at = max(int(path.stem.split("_")[1]) for path in (run_dir / "checkpoints").glob("update_*.pt"))
    assert 1 <= stopped_at < 40
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(trainer.pid, 0)  # anyone left in the trainer's process group?
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("worker processes outlived the trainer")


def test_the_default_preset_collects_on_two_workers_and_gives_way_to_chosen_devices() -> None:
    assert TrainingConfig.preset("default").collector.kind == "multiprocess"
    assert resolve_config(parse_args([])).collector.workers == 2
    assert resolve_config(parse_args(["--devices", "cpu", "cpu"])).collector.kind == "local"
    assert resolve_config(parse_args(["--device", "cpu"])).collector.kind == "multiprocess"
    assert resolve_config(parse_args(["heuristic", "--n-envs", "1"])).env.n_envs == 1  # a rule-based run plays locally
    with pytest.raises(ConfigError, match="use --devices|drop --devices"):
        resolve_config(parse_args(["--devices", "cpu", "cpu", "--collector", "multiprocess"]))


def test_more_workers_than_envs_is_refused_with_the_fix() -> None:
    with pytest.raises(
        ConfigError, match="n_envs=1 is fewer than collector.workers=2.*--workers 1 or --collector local"
    ):
        resolve_config(parse_args(["--n-envs", "1"]))
