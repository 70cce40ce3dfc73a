"""Frozen-policy reference runs, and `python -m esper_func.curves` (did these runs learn?)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from esper_func.core.config import ConfigError
from esper_func.rl.curves_cli import main as curves_main
from esper_func.rl.curves_cli import read_curve
from esper_func.rl.run_config import TrainingConfig, write_training_config
from esper_func.rl.trainer import PPOTrainer
from tests.rollouts import tiny


def test_a_frozen_policy_run_plays_the_learning_runs_episodes_with_the_untrained_policy(tmp_path: Path) -> None:
    for name in ("learning", "frozen"):
        (tmp_path / name).mkdir()
    learning = PPOTrainer(tiny(episodes=2), tmp_path / "learning")
    initial = {name: value.clone() for name, value in learning.nets.actor.state_dict().items()}
    learned = learning.train()
    frozen_trainer = PPOTrainer(tiny(episodes=2, frozen_policy=True), tmp_path / "frozen")
    frozen = frozen_trainer.train()
    after = frozen_trainer.nets.actor.state_dict()
    assert all(torch.equal(initial[name], after[name]) for name in initial)  # weights and normalizer statistics
    assert any(not torch.equal(initial[name], value) for name, value in learning.nets.actor.state_dict().items())
    # The first batch is the same episode played by the same (initial) policy.
    assert frozen.history[0]["return"] == learned.history[0]["return"]
    assert frozen.losses["optimizer_steps"] == 0


def test_a_rule_based_run_cannot_be_frozen() -> None:
    with pytest.raises(ConfigError, match="frozen_policy freezes a PPO policy; a heuristic run has none"):
        replace(TrainingConfig.preset("tiny"), controller="heuristic", frozen_policy=True)


def fake_run(
    run_dir: Path, returns: list[float], seed: int = 0, frozen: bool = False, n_train: int | None = None
) -> Path:
    """A run directory with a config and one `updates.jsonl` record per return."""
    run_dir.mkdir(parents=True)
    config = TrainingConfig.preset("tiny")
    task = replace(config.env.task, n_train=n_train or config.env.task.n_train)
    config = replace(config, env=replace(config.env, seed=seed, task=task), frozen_policy=frozen)
    write_training_config(config, run_dir / "config.json")
    lines = [json.dumps({"update": u + 1, "rollout": {"return": value}}) for u, value in enumerate(returns)]
    (run_dir / "updates.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def test_curves_reports_each_rise_and_their_spread_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = fake_run(tmp_path / "a", [1.0, 2.0, 3.0, 4.0])
    b = fake_run(tmp_path / "b", [2.0, 2.0, 1.0, 1.0, 9.0])
    plot = tmp_path / "curves.png"
    assert curves_main([str(a), str(b), "--window", "2", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "1.50    3.50   +2.00" in out  # a: first 2 mean 1.5, last 2 mean 3.5
    assert "2.00    5.00   +3.00" in out  # b: 2.0, then (1 + 9) / 2
    assert "+2.50 mean, 0.71 std, 0.50 standard error; 2 of 2 rose" in out
    assert plot.stat().st_size > 0


def test_a_resumed_runs_repeated_update_counts_once_with_its_last_record(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "a", [1.0, 2.0])
    with (run / "updates.jsonl").open("a") as log:
        log.write(json.dumps({"update": 2, "rollout": {"return": 5.0}}) + "\n")
    assert read_curve(run).returns == [1.0, 5.0]


def test_curves_subtract_the_frozen_run_with_the_same_seed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = [fake_run(tmp_path / "s0", [5.0, 7.0, 9.0]), fake_run(tmp_path / "s1", [1.0, 1.0, 1.0], seed=1)]
    references = [
        fake_run(tmp_path / "r0", [5.0, 6.0, 6.0], frozen=True),
        fake_run(tmp_path / "r1", [1.0, 2.0, 0.0], seed=1, frozen=True),
    ]
    args = [*map(str, runs), "--window", "1", "--reference", *map(str, references)]
    assert curves_main(args) == 0
    out = capsys.readouterr().out
    assert "return minus the frozen policy's on the same episodes" in out
    assert "0.00    3.00   +3.00" in out  # s0: 0, 1, 3
    assert "0.00    1.00   +1.00" in out  # s1: 0, -1, 1
    assert "2 of 2 rose" in out


@pytest.mark.parametrize(
    "case, message",
    [
        ("no log", "updates.jsonl does not exist: give the directory of a PPO run"),
        ("short", "has 3 updates, too few for two windows of 2: give --window 1 or less"),
        ("learned reference", "learned: a reference is a run trained with --frozen-policy"),
        ("other seed", r"no reference plays the episodes of .* \(seed 0, 4 envs in 1 shard\(s\)\)"),
        ("bad record", r"updates.jsonl, line 1: not an update record \(KeyError"),
        ("other envs", r"plays the episodes of .* in other envs \(env.task differs\), so their returns do not compare"),
    ],
)
def test_curves_errors_name_the_problem_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture, case: str, message: str
) -> None:
    run = fake_run(tmp_path / "run", [1.0, 2.0, 3.0])
    args = [str(run), "--window", "1"]
    if case == "no log":
        (run / "updates.jsonl").unlink()
    elif case == "short":
        args = [str(run), "--window", "2"]
    elif case == "learned reference":
        args += ["--reference", str(fake_run(tmp_path / "ref", [1.0, 1.0, 1.0]))]
    elif case == "other seed":
        args += ["--reference", str(fake_run(tmp_path / "ref", [1.0, 1.0, 1.0], seed=3, frozen=True))]
    elif case == "other envs":
        args += ["--reference", str(fake_run(tmp_path / "ref", [1.0, 1.0, 1.0], frozen=True, n_train=512))]
    else:
        (run / "updates.jsonl").write_text(json.dumps({"update": 1}) + "\n")
    assert curves_main(args) == 2
    assert re.search(message, capsys.readouterr().err)
