"""`python -m esper_func.train` end to end on a tiny budget, and its error paths."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from envs.morphogenetic import fit_context
from esper_func.core.config import TransformerHostConfig
from esper_func.data.tasks import TaskConfig
from esper_func.rl.checkpoints import load_checkpoint
from esper_func.rl.evaluate_cli import load_policy
from esper_func.rl.run_config import load_training_config
from esper_func.rl.train_cli import main

TINY = ["--n-envs", "2", "--max-epochs", "3", "--batch-size", "8", "--train-iters", "1", "--no-progress"]


@pytest.mark.parametrize("controller", ["static", "random", "heuristic"])
def test_cli_writes_a_complete_run_directory(
    controller: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert main([controller, *TINY, "--run-dir", str(run_dir), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert f"episode 0 [{controller}] final acc" in out and "env-steps/s" in out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["controller"] == controller
    assert config["env"]["n_envs"] == 2 and config["env"]["core"]["lifecycle"]["max_epochs"] == 3
    assert config["env"]["task"]["batch_size"] == 8
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(len(r["val_accuracy"]) == 2 for r in records)
    for record in records:
        total = [sum(parts) for parts in zip(*record["reward_components"].values())]
        assert total == pytest.approx(record["reward"], abs=1e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary[0]["controller"] == controller
    assert (run_dir / "lifecycle.jsonl").exists()


def test_random_controller_logs_lifecycle_events(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert main(["random", *TINY, "--max-epochs", "4", "--run-dir", str(run_dir)]) == 0
    events = [json.loads(line) for line in (run_dir / "lifecycle.jsonl").read_text().splitlines()]
    assert events, "a random controller germinates within four epochs"
    assert {"episode", "env", "epoch", "slot", "from", "to", "blueprint", "cause"} <= set(events[0])
    assert any(e["cause"] == "action:GERMINATE" for e in events)


def test_cli_refuses_a_non_empty_run_dir_and_keeps_its_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("precious\n")
    assert main(["static", *TINY, "--run-dir", str(run_dir)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == "precious\n"


def test_cli_reports_a_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert (
        main(["static", *TINY, "--task", "cifar10", "--data-dir", str(missing), "--run-dir", str(tmp_path / "r")]) == 2
    )
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_rejects_bad_numbers() -> None:
    with pytest.raises(SystemExit):
        main(["static", "--n-envs", "0"])


def test_a_rule_based_run_does_not_validate_the_ppo_settings_it_never_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One env of two epochs is 2 transitions, fewer than the default preset's 4 PPO minibatches."""
    short = ["--n-envs", "1", "--max-epochs", "2", "--batch-size", "8", "--train-iters", "1", "--no-progress"]
    assert main(["heuristic", *short, "--run-dir", str(tmp_path / "heuristic")]) == 0
    assert json.loads((tmp_path / "heuristic" / "config.json").read_text())["ppo"]["minibatches"] == 4
    assert main(["ppo", *short, "--run-dir", str(tmp_path / "ppo")]) == 2
    assert "ppo.minibatches=4 exceeds the 2 transitions of one rollout" in capsys.readouterr().err
    assert not (tmp_path / "ppo").exists()


def test_a_host_preset_shortens_the_text_windows_to_its_context(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "static",
        "--task",
        "tinystories",
        "--host",
        "tiny",
        "--n-envs",
        "1",
        "--max-epochs",
        "2",
        "--batch-size",
        "4",
        "--train-iters",
        "1",
    ]
    assert main([*args, "--no-progress", "--run-dir", str(run_dir)]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    tiny_context = TransformerHostConfig.preset("tiny").context
    assert (
        config["env"]["host_preset"] == "tiny"
        and config["env"]["task"]["context"] == tiny_context < TaskConfig.preset("tinystories").context
    )
    # Shorter windows stay, and tasks without windows are left alone.
    assert fit_context(TaskConfig.preset("tinystories", context=8), "tiny").context == 8
    assert fit_context(TaskConfig.preset("synthetic"), "tiny") == TaskConfig.preset("synthetic")


def test_a_logger_without_its_package_stops_the_cli_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "tensorboard" else real(name, *args)
    )
    assert (
        main(
            ["ppo", "--preset", "tiny", "--logger", "tensorboard", "--run-dir", str(tmp_path / "run"), "--no-progress"]
        )
        == 2
    )
    assert "telemetry.logger='tensorboard' needs the package(s) tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main(["ppo", "--logger", "neptune"])


def test_ppo_cli_trains_checkpoints_compares_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "ppo"
    assert (
        main(
            ["ppo", "--preset", "tiny", "--n-envs", "2", "--episodes", "1", "--run-dir", str(run_dir), "--no-progress"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "| controller (seed 10000) | final val acc (%) | test acc (%) |" in out
        and "| ppo |" in out
        and "| heuristic |" in out
    )
    for name in (
        "config.json",
        "updates.jsonl",
        "metrics.jsonl",
        "lifecycle.jsonl",
        "comparison.json",
        "checkpoints/latest.pt",
        "accuracy_by_controller.png",
        "return_per_update.png",
        "lifecycle_timeline.png",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "logger").rglob("*.csv")), "the TorchRL CSV logger wrote scalars"
    assert list((run_dir / "logger").rglob("hparams*.txt")), "and the config as hyperparameters"
    updates = [json.loads(line) for line in (run_dir / "updates.jsonl").read_text().splitlines()]
    assert [u["update"] for u in updates] == [1]
    assert {"loss_objective", "loss_critic", "kl_approx", "clip_fraction", "explained_variance", "entropy_op"} <= set(
        updates[0]["losses"]
    )
    assert {"action_distribution", "reward_components", "illegal_actions"} <= set(updates[0]["rollout"])
    config_before = (run_dir / "config.json").read_text()

    assert main(["--resume", str(run_dir), "--episodes", "2", "--no-progress"]) == 0
    updates = [json.loads(line) for line in (run_dir / "updates.jsonl").read_text().splitlines()]
    assert [u["update"] for u in updates] == [1, 2]
    assert (run_dir / "checkpoints" / "update_00001.pt").is_file() and (
        run_dir / "checkpoints" / "update_00002.pt"
    ).is_file()
    assert (run_dir / "config.json").read_text() == config_before

    from esper_func.rl.evaluate_cli import main as evaluate

    assert evaluate([str(run_dir), "--no-progress", "--seeds", "5", "6"]) == 0
    assert "| controller (mean ± std over 2 seeds) |" in capsys.readouterr().out
    evaluation = json.loads((run_dir / "evaluation-1.json").read_text())
    assert evaluation["seeds"] == [5, 6]
    table = evaluation["table"]
    assert [row["controller"] for row in table] == ["static", "heuristic", "ppo"]
    assert table[0]["params_added"] == 0.0 and table[0]["params_added_std"] == 0.0
    assert all(row["final_accuracy_std"] >= 0.0 and 0.0 <= row["test_accuracy"] <= 100.0 for row in table)

    # A tampered latest.pt: resume names it and refuses, and every file stays as it was.
    latest = run_dir / "checkpoints" / "latest.pt"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0x01
    latest.write_bytes(bytes(data))
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in run_dir.rglob("*") if path.is_file()}
    assert main(["--resume", str(run_dir), "--episodes", "3", "--no-progress"]) == 2
    assert str(latest) in capsys.readouterr().err
    assert {
        path: (path.read_bytes(), path.stat().st_mtime_ns) for path in run_dir.rglob("*") if path.is_file()
    } == before


def test_evaluate_untrained_plays_the_policy_the_run_started_from(tmp_path: Path) -> None:
    """A `--frozen-policy` run never leaves its first policy, so on the same envs and
    action noise its `ppo` row and the `untrained` row are the same episodes."""
    from esper_func.rl.evaluate_cli import main as evaluate

    run_dir = tmp_path / "frozen"
    args = ["ppo", "--preset", "tiny", "--n-envs", "2", "--episodes", "1", "--frozen-policy", "--no-progress"]
    assert main([*args, "--run-dir", str(run_dir)]) == 0
    assert evaluate([str(run_dir), "--no-progress", "--seeds", "5", "--untrained"]) == 0
    table = json.loads((run_dir / "evaluation-1.json").read_text())["table"]
    assert [row["controller"] for row in table] == ["static", "heuristic", "ppo", "untrained"]
    ppo, untrained = table[2], table[3]
    assert {key: value for key, value in ppo.items() if key != "controller"} == {
        key: value for key, value in untrained.items() if key != "controller"
    }
    # Not just alike in play (near-uniform first policies can sample alike): the same weights.
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    nets, first = load_policy(checkpoint, load_training_config(checkpoint["config"]))
    for mine, theirs in ((nets.actor, first.actor), (nets.critic, first.critic)):
        for (name, value), (_, expected) in zip(mine.state_dict().items(), theirs.state_dict().items(), strict=True):
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)


def test_ppo_cli_trains_with_envs_sharded_over_repeated_cpu_devices(tmp_path: Path) -> None:
    run_dir = tmp_path / "sharded"
    args = ["ppo", "--preset", "tiny", "--n-envs", "3", "--episodes", "1", "--devices", "cpu", "cpu", "--no-progress"]
    assert main([*args, "--run-dir", str(run_dir)]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["devices"] == ["cpu", "cpu"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(len(record["val_accuracy"]) == 3 for record in records)


def test_resume_and_evaluate_report_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--resume", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    from esper_func.rl.evaluate_cli import main as evaluate

    assert evaluate([str(tmp_path)]) == 2


def test_sigterm_stops_after_the_batch_with_a_resumable_checkpoint(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "esper_func.train",
        "--preset",
        "tiny",
        "--n-envs",
        "2",
        "--episodes",
        "500",
        "--run-dir",
        str(run_dir),
        "--no-progress",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    updates = run_dir / "updates.jsonl"
    deadline = time.monotonic() + 120
    while not (updates.exists() and updates.read_text().count("\n") >= 1):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no update within 120 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err
    done = [json.loads(line)["update"] for line in updates.read_text().splitlines()]
    assert 1 <= len(done) < 500 and done == list(range(1, len(done) + 1))
    from esper_func.rl.checkpoints import latest_checkpoint, load_checkpoint

    assert load_checkpoint(latest_checkpoint(run_dir))["counters"]["update"] == len(done)
    assert main(["--resume", str(run_dir), "--episodes", str(len(done) + 1), "--no-progress"]) == 0
    done_after = [json.loads(line)["update"] for line in updates.read_text().splitlines()]
    assert done_after == list(range(1, len(done) + 2))
