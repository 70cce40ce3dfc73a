"""The benchmark runs end to end at tiny sizes, reports sane figures, and compares like with like."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from esper_func import bench
from esper_func.blueprints import param_count

TINY = ["--n-envs", "2", "--batch", "8", "--iters", "2", "--repeats", "1", "--no-compile", "--host-preset", "tiny"]
FIGURES = ("median_s", "env_steps_per_s", "samples_per_s", "iterations_per_s", "env_iterations_per_s", "speedup_vs_baseline")


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """`--threads` sets torch's global thread count; put it back for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_main_writes_report_with_positive_figures(tmp_path: Path, restore_threads: None) -> None:
    path = tmp_path / "out" / "bench.json"
    assert bench.main([*TINY, "--threads", "1", "--json", str(path)]) == 0

    report = json.loads(path.read_text())
    for key in ("device", "torch_version", "tensordict_version", "n_envs", "batch", "iters", "dtype", "compile_mode", "results", "param_checks"):
        assert key in report, key
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert (report["n_envs"], report["batch"], report["iters"], report["dtype"]) == (2, 8, 2, "float32")
    assert report["compile_mode"] == "none"

    rows = {(r["scenario"], r["variant"]): r for r in report["results"]}
    assert set(rows) == {(s, v) for s in ("host", "seeded") for v in ("baseline", "vmap_eager")}
    for row in rows.values():
        for figure in FIGURES:
            assert math.isfinite(row[figure]) and row[figure] > 0, (row["scenario"], row["variant"], figure)
        assert len(row["times_s"]) == 1 and len(row["warmup_s"]) == 1
        n_envs, samples = 2, 2 * 8 * 2
        assert row["env_steps_per_s"] == pytest.approx(n_envs / row["median_s"])
        assert row["samples_per_s"] == pytest.approx(samples / row["median_s"])
    for scenario in ("host", "seeded"):
        assert rows[scenario, "baseline"]["speedup_vs_baseline"] == pytest.approx(1.0)
        assert rows[scenario, "baseline"]["trained_params_per_env"] == rows[scenario, "vmap_eager"]["trained_params_per_env"]

    # Both sides trained the same parameters from the same state to the same values.
    for check in report["param_checks"]:
        assert check["baseline_params_per_env"] == check["vmapped_params_per_env"] > 0
        assert check["max_abs_param_diff"] < 1e-5, check


@pytest.mark.parametrize("scenario", bench.SCENARIOS)
def test_both_sides_train_the_same_architecture(scenario: str) -> None:
    baseline, vmapped = bench.trained_param_counts("cifar", scenario)
    assert baseline == vmapped
    seed = param_count("cnn", bench.SEED_BLUEPRINT, 16) if scenario == "seeded" else 0
    assert baseline == 6418 + seed  # the cifar host (STACK-NOTES), plus conv_light at the 16-channel mid slot


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n-envs", "0"], "--n-envs"),
        (["--batch", "0"], "--batch"),
        (["--iters", "-1"], "--iters"),
        (["--scenarios", "bogus"], "invalid choice"),
        (["--host-preset", "huge"], "unknown CNN host preset"),
        (["--variants", "vmap_compiled", "--no-compile"], "no variant left"),
    ],
)
def test_bad_flags_are_clear_errors(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_sweep_and_step_profile_report_every_n_and_every_part(tmp_path: Path, restore_threads: None) -> None:
    path = tmp_path / "bench.json"
    assert bench.main([*TINY, "--threads", "1", "--scenarios", "host", "--sweep-n", "1", "3", "--profile-step", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    by_n = {(r["n_envs"], r["variant"]): r for r in report["results"]}
    assert set(by_n) == {(n, v) for n in (1, 3) for v in ("baseline", "vmap_eager")}
    assert by_n[3, "vmap_eager"]["env_steps_per_s"] == pytest.approx(3 / by_n[3, "vmap_eager"]["median_s"])

    profiles = {p["label"]: p for p in report["step_profiles"]}
    assert set(profiles) == {"host only (static)", "heuristic, active bank", "heuristic, full bank"}
    for profile in profiles.values():
        parts = profile["parts_ms"]
        assert {"policy", "sample_batches", "apply_action", "train_epoch", "evaluate", "governor", "tick", "reward", "observation"} <= set(parts)
        assert all(value > 0 for value in parts.values())
        assert sum(parts.values()) <= profile["step_ms"] * 1.05  # the parts lie inside the step
        assert 0 < profile["controller_share"] < 1
    assert profiles["host only (static)"]["live_seeds_per_env"] == 0
    assert profiles["heuristic, active bank"]["live_seeds_per_env"] > 0


def test_collector_overhead_is_reported(tmp_path: Path, restore_threads: None) -> None:
    path = tmp_path / "bench.json"
    assert bench.main([*TINY, "--threads", "1", "--scenarios", "host", "--variants", "vmap_eager", "--collector", "--json", str(path)]) == 0
    overhead = json.loads(path.read_text())["collector_overhead"]
    assert overhead["n_envs"] == 2 and overhead["steps"] >= 1
    assert overhead["by_hand_s"] > 0 and overhead["collector_s"] > 0
    assert overhead["overhead_fraction"] == pytest.approx((overhead["collector_s"] - overhead["by_hand_s"]) / overhead["collector_s"])
