"""TrainingConfig: presets, strict JSON, cross-field rules, CLI overrides."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from esper_func.core.config import ConfigError
from esper_func.core.config_json import to_dict
from esper_func.core.reward_config import RewardConfig
from esper_func.rl import collect_worker
from esper_func.rl.distributed import require_launcher_packages
from esper_func.rl.run_config import PRESETS, TrainingConfig, load_training_config, read_training_config
from esper_func.rl.run_sections import CollectorConfig, PPOConfig
from esper_func.rl.train_cli import parse_args, resolve_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name: str) -> None:
    config = TrainingConfig.preset(name)
    assert load_training_config(json.loads(json.dumps(to_dict(config)))) == config


def test_unknown_and_mistyped_keys_are_named() -> None:
    data = to_dict(TrainingConfig.preset("tiny"))
    with pytest.raises(ConfigError, match=r"TrainingConfig.ppo: unknown key\(s\) \['learning_rate'\]"):
        load_training_config({**data, "ppo": {**data["ppo"], "learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match=r"TrainingConfig.episodes: expected int, got str"):
        load_training_config({**data, "episodes": "10"})
    with pytest.raises(ConfigError, match=r"TrainingConfig.telemetry.level: 'loud' is not one of"):
        load_training_config({**data, "telemetry": {**data["telemetry"], "level": "loud"}})
    with pytest.raises(ConfigError, match=r"TrainingConfig.env.task.name"):
        load_training_config({**data, "env": {**data["env"], "task": {**data["env"]["task"], "name": "mnist"}}})


def test_missing_keys_take_defaults() -> None:
    assert load_training_config({"episodes": 3}) == replace(TrainingConfig(), episodes=3)


def test_pbrs_gamma_must_equal_ppo_gamma() -> None:
    config = TrainingConfig.preset("tiny")
    with pytest.raises(ConfigError, match="ppo.gamma=0.99 differs from env.rewards.gamma=0.995"):
        replace(config, ppo=replace(config.ppo, gamma=0.99))
    same = replace(
        config,
        ppo=replace(config.ppo, gamma=0.99),
        env=replace(config.env, rewards=RewardConfig.for_task("synthetic", gamma=0.99)),
    )
    assert same.ppo.gamma == 0.99


def test_cross_field_rules_name_the_fix() -> None:
    config = TrainingConfig.preset("tiny")
    with pytest.raises(ConfigError, match="minibatches=8 exceeds env.n_envs=4"):
        replace(config, policy=replace(config.policy, lstm=True), ppo=replace(config.ppo, minibatches=8))
    assert replace(config, devices=("cpu", "cpu")).devices == ("cpu", "cpu")
    with pytest.raises(ConfigError, match=r"must start with device='cpu'"):
        replace(config, devices=("meta", "cpu"))
    with pytest.raises(ConfigError, match="5 devices for env.n_envs=4"):
        replace(config, devices=("cpu",) * 5)
    with pytest.raises(ConfigError, match="is not a device"):
        replace(config, device="gpu7")
    with pytest.raises(ConfigError, match="PPOConfig.epochs must be >= 1"):
        PPOConfig(epochs=0)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        TrainingConfig.preset("huge")
    with pytest.raises(ConfigError, match=r"compare_seeds \[0, 1\] include the training seed env.seed=0"):
        replace(config, compare_seeds=(0, 1))
    with pytest.raises(ConfigError, match="repeat a seed"):
        replace(config, compare_seeds=(1, 1))
    learn = TrainingConfig.preset("learn")
    assert learn.compare_seeds == (0, 1, 2) and learn.env.seed not in learn.compare_seeds
    assert learn.env.rewards.family == "accuracy" and learn.env.task.train_iters == 64  # the growth benchmark's budget
    default = TrainingConfig.preset("default")
    assert default.env.rewards.static_baseline and not learn.env.rewards.static_baseline
    assert default.episodes == default.ppo.entropy_anneal_updates
    as_learn = replace(
        default,
        env=replace(default.env, rewards=learn.env.rewards, seed=learn.env.seed),
        ppo=replace(default.ppo, entropy_anneal_updates=learn.ppo.entropy_anneal_updates),
        episodes=learn.episodes,
        compare_seeds=learn.compare_seeds,
    )
    assert as_learn == learn  # otherwise the learning run's settings


def test_entropy_schedule_anneals_linearly_then_holds() -> None:
    ppo = PPOConfig(entropy_coeff=0.1, entropy_coeff_end=0.02, entropy_anneal_updates=4)
    assert [round(ppo.entropy_at(u), 6) for u in range(6)] == [0.1, 0.08, 0.06, 0.04, 0.02, 0.02]
    assert PPOConfig(entropy_coeff=0.07).entropy_at(100) == 0.07


def test_cli_flags_override_the_preset() -> None:
    args = parse_args(
        [
            "--preset",
            "tiny",
            "--n-envs",
            "3",
            "--episodes",
            "5",
            "--seed",
            "7",
            "--max-epochs",
            "4",
            "--train-iters",
            "3",
            "--telemetry-level",
            "debug",
            "--no-compile",
        ]
    )
    config = resolve_config(args)
    assert config.env.n_envs == 3 and config.episodes == 5 and config.env.seed == 7
    assert config.env.core.lifecycle.max_epochs == 4 and config.env.task.train_iters == 3
    assert config.telemetry.level == "debug" and config.env.core.compile is False
    assert config.env.task.batch_size == TrainingConfig.preset("tiny").env.task.batch_size


def test_cli_precision_and_compile_mode_flags() -> None:
    core = resolve_config(
        parse_args(["--preset", "tiny", "--amp", "--compile", "--compile-mode", "reduce-overhead"])
    ).env.core
    assert core.amp is True and core.compile is True and core.compile_mode == "reduce-overhead"
    assert resolve_config(parse_args(["--preset", "tiny"])).env.core.amp is False
    with pytest.raises(ConfigError, match="needs compile=True"):
        resolve_config(parse_args(["--preset", "tiny", "--no-compile", "--compile-mode", "reduce-overhead"]))


def test_cli_task_flag_switches_task_and_reward_scale() -> None:
    config = resolve_config(parse_args(["--preset", "tiny", "--task", "tinystories"]))
    assert config.env.task.name == "tinystories"
    assert config.env.rewards.loss_baseline == RewardConfig.for_task("tinystories").loss_baseline


def test_config_json_file_is_loaded_strictly(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**to_dict(TrainingConfig.preset("tiny")), "episodes": 4}))
    assert resolve_config(parse_args(["--config-json", str(path)])).episodes == 4
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        read_training_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_training_config(tmp_path / "absent.json")
    data = to_dict(TrainingConfig.preset("tiny"))
    data["env"]["core"]["governor"]["window"] = "20"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"config.json: TrainingConfig.env.core.governor.window: expected int"):
        read_training_config(path)


def test_cli_rejects_contradictory_flags() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--preset", "tiny", "--config-json", "x.json"])
    with pytest.raises(SystemExit):
        parse_args(["--resume", "runs/x", "--n-envs", "3"])


def test_collector_settings_are_checked_with_the_fix_named() -> None:
    base = TrainingConfig.preset("tiny")
    distributed = CollectorConfig(kind="distributed", workers=3)
    with pytest.raises(ConfigError, match=r"env.n_envs=4 is not a multiple of collector.workers=3.*use n_envs=3"):
        replace(base, collector=distributed)
    with pytest.raises(ConfigError, match="a distributed run shards the envs over workers, not devices"):
        replace(base, collector=replace(distributed, workers=2), devices=("cpu", "cpu"))
    with pytest.raises(ConfigError, match="a heuristic run plays locally"):
        replace(base, controller="heuristic", collector=replace(distributed, workers=2))
    with pytest.raises(ConfigError, match="cannot know; set --port"):
        CollectorConfig(kind="distributed", launcher="delayed")
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        CollectorConfig(workers=0)
    with pytest.raises(ConfigError, match="port must be in"):
        CollectorConfig(port=65535)
    with pytest.raises(ConfigError, match="heartbeat_timeout_s must be >= 3"):
        CollectorConfig(heartbeat_timeout_s=1.0)
    with pytest.raises(ConfigError, match="worker_threads must be >= 0"):
        CollectorConfig(worker_threads=-1)
    with pytest.raises(ConfigError, match=r"needs the package submitit, missing here; pip install submitit"):
        require_launcher_packages(CollectorConfig(kind="distributed", launcher="submitit", port=29500))


def test_cli_collector_flags_override_the_preset_and_may_change_on_resume() -> None:
    args = parse_args(
        [
            "--preset",
            "tiny",
            "--collector",
            "distributed",
            "--workers",
            "2",
            "--launcher",
            "delayed",
            "--port",
            "29500",
            "--master-addr",
            "10.0.0.1",
            "--connect-timeout",
            "30",
        ]
    )
    collector = resolve_config(args).collector
    assert collector == CollectorConfig(
        kind="distributed", workers=2, launcher="delayed", master_addr="10.0.0.1", port=29500, connect_timeout_s=30.0
    )
    assert parse_args(["--resume", "runs/x", "--collector", "distributed"]).collector == "distributed"


def test_the_worker_entry_point_rejects_bad_ranks_naming_the_fix(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    common = ["--world-size", "3", "--master-addr", "127.0.0.1", "--port", "29500"]
    for rank, message in (
        ("3", "--rank must be in 1..2"),
        ("0", "--rank must be in 1..2"),
        ("x", "integer or 'env'"),
        ("env", "reads the environment variable RANK"),
    ):
        with pytest.raises(SystemExit):
            collect_worker.main(["--rank", rank, *common])
        assert message in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    assert collect_worker.resolve_rank(argparse.ArgumentParser(), "env") == 2
