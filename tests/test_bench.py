"""The benchmark runs end to end at tiny sizes, reports sane figures, and compares like with like."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from esper_func.core import host_evaluation, host_training
from esper_func.core.blueprints import param_count
from esper_func.perf import bench, bench_variants, step_profile
from esper_func.perf.bench_checks import covered_us, saturation_point

TINY = ["--n-envs", "2", "--batch", "8", "--iters", "2", "--repeats", "1", "--no-compile", "--host-preset", "tiny"]
FIGURES = (
    "median_s",
    "env_steps_per_s",
    "samples_per_s",
    "iterations_per_s",
    "env_iterations_per_s",
    "speedup_vs_baseline",
)


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
    for key in (
        "device",
        "torch_version",
        "tensordict_version",
        "n_envs",
        "batch",
        "iters",
        "dtype",
        "compile_modes",
        "results",
        "param_checks",
    ):
        assert key in report, key
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert (report["n_envs"], report["batch"], report["iters"], report["dtype"]) == (2, 8, 2, "float32")
    assert report["compile_modes"] == {"baseline": "eager", "vmap_eager": "eager", "packed": "eager"}
    assert report["peak_memory_kind"].startswith("process peak resident set (VmHWM)")

    rows = {(r["scenario"], r["variant"]): r for r in report["results"]}
    assert set(rows) == {(s, v) for s in ("host", "seeded") for v in ("baseline", "vmap_eager", "packed")}
    for row in rows.values():
        for figure in FIGURES:
            assert math.isfinite(row[figure]) and row[figure] > 0, (row["scenario"], row["variant"], figure)
        assert len(row["times_s"]) == 1 and len(row["warmup_s"]) == 1
        assert row["dtype"] == "float32" and row["bound"] is None
        assert 50 < row["peak_memory_mib"] < 24 * 1024  # a Python process with torch loaded, on this machine's memory
        assert 0 <= row["peak_added_mib"] <= row["peak_memory_mib"]
        n_envs, samples = 2, 2 * 8 * 2
        assert row["env_steps_per_s"] == pytest.approx(n_envs / row["median_s"])
        assert row["samples_per_s"] == pytest.approx(samples / row["median_s"])
    for scenario in ("host", "seeded"):
        assert rows[scenario, "baseline"]["speedup_vs_baseline"] == pytest.approx(1.0)
        for variant in ("vmap_eager", "packed"):
            assert (
                rows[scenario, "baseline"]["trained_params_per_env"]
                == rows[scenario, variant]["trained_params_per_env"]
            )

    # Both sides trained the same parameters from the same state to the same values.
    for check in report["param_checks"]:
        assert check["baseline_params_per_env"] == check["vmapped_params_per_env"] > 0
        assert check["max_abs_param_diff"] < 1e-5, check


@pytest.mark.parametrize("scenario", bench.SCENARIOS)
def test_both_sides_train_the_same_architecture(scenario: str) -> None:
    baseline, vmapped = bench_variants.trained_param_counts("cifar", scenario)
    assert baseline == vmapped
    seed = param_count("cnn", bench_variants.SEED_BLUEPRINT, 16) if scenario == "seeded" else 0
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
        (["--variants", "vmap_cudagraphs"], "needs --device cuda"),
        (["--plot", "out.png"], "give --sweep-n with two or more"),
        (["--sweep-n", "2", "--plot", "out.png"], "give --sweep-n with two or more"),
        (["--amp-epochs", "2"], "add --amp"),
        (["--vmap-chunk-size", "0"], "must be >= 1"),
        (["--profile-step", "policy-only"], "invalid choice: 'policy-only'"),
    ],
)
def test_bad_flags_are_clear_errors(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_profile_step_takes_the_configurations_to_profile() -> None:
    assert bench.parse_settings([]).profile_step == ()
    assert bench.parse_settings(["--profile-step"]).profile_step == ("host", "heuristic-active", "heuristic-full")
    assert bench.parse_settings(["--profile-step", "heuristic-full", "host"]).profile_step == ("heuristic-full", "host")


def test_device_busy_time_counts_overlapping_kernels_once() -> None:
    assert covered_us([(20, 25), (0, 10), (5, 15), (21, 22)]) == 20  # [0, 15] and [20, 25]
    assert covered_us([(0, 4), (4, 6)]) == 6 and covered_us([]) == 0


def test_sweep_and_step_profile_report_every_n_and_every_part(tmp_path: Path, restore_threads: None) -> None:
    path, plot = tmp_path / "bench.json", tmp_path / "plots" / "scaling.png"
    argv = [
        *TINY,
        "--threads",
        "1",
        "--scenarios",
        "host",
        "--sweep-n",
        "1",
        "3",
        "--profile-step",  # two of the three: a profile is about 12 s here, the three alike
        "host",
        "heuristic-full",
        "--json",
        str(path),
        "--plot",
        str(plot),
    ]
    assert bench.main(argv) == 0
    report = json.loads(path.read_text())
    assert report["complete"] is True
    by_n = {(r["n_envs"], r["variant"]): r for r in report["results"]}
    assert set(by_n) == {(n, v) for n in (1, 3) for v in ("baseline", "vmap_eager", "packed")}
    assert by_n[3, "vmap_eager"]["env_steps_per_s"] == pytest.approx(3 / by_n[3, "vmap_eager"]["median_s"])
    curves = {(c["scenario"], c["variant"]): c for c in report["scaling"]}
    assert set(curves) == {("host", "baseline"), ("host", "vmap_eager"), ("host", "packed")}
    for (_, variant), curve in curves.items():
        assert curve["n_envs"] == [1, 3]
        assert curve["env_steps_per_s"] == [by_n[n, variant]["env_steps_per_s"] for n in (1, 3)]
    assert plot.read_bytes().startswith(b"\x89PNG")

    profiles = {p["label"]: p for p in report["step_profiles"]}
    assert list(profiles) == ["host only (static)", "heuristic, full bank"]
    for profile in profiles.values():
        parts = profile["parts_ms"]
        assert profile["parts_device_ms"] == {}  # device times are CUDA only
        assert {
            "policy",
            "sample_batches",
            "apply_action",
            "train_epoch",
            "evaluate",
            "governor",
            "tick",
            "reward",
            "observation",
        } <= set(parts)
        assert all(value > 0 for value in parts.values())
        assert sum(parts.values()) <= profile["step_ms"] * 1.05  # the parts lie inside the step
        assert 0 < profile["controller_share"] < 1
    assert profiles["host only (static)"]["live_seeds_per_env"] == 0
    assert profiles["heuristic, full bank"]["live_seeds_per_env"] > 0


def test_a_sweep_stopped_part_way_keeps_what_it_measured(
    tmp_path: Path, restore_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, plot = tmp_path / "bench.json", tmp_path / "scaling.png"
    measure = bench.run_benchmark

    def stopped_at_three_envs(settings: bench.Settings, log=print):  # type: ignore[no-untyped-def]
        if settings.n_envs == 3:
            raise KeyboardInterrupt  # as a time limit would stop the run
        return measure(settings, log)

    monkeypatch.setattr(bench, "run_benchmark", stopped_at_three_envs)
    argv = [
        *TINY,
        "--threads",
        "1",
        "--scenarios",
        "host",
        "--variants",
        "baseline",
        "--sweep-n",
        "1",
        "2",
        "3",
        "--json",
        str(path),
        "--plot",
        str(plot),
    ]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    report = json.loads(path.read_text())
    assert report["complete"] is False
    assert [r["n_envs"] for r in report["results"]] == [1, 2]
    assert [c["n_envs"] for c in report["scaling"]] == [[1, 2]]
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_chunk_sizes_and_interleaving_give_one_row_per_case(tmp_path: Path, restore_threads: None) -> None:
    path = tmp_path / "bench.json"
    argv = [
        *TINY,
        "--threads",
        "1",
        "--scenarios",
        "host",
        "--repeats",
        "2",
        "--vmap-chunk-size",
        "all",
        "1",
        "--interleave",
        "--json",
        str(path),
    ]
    assert bench.main(argv) == 0
    report = json.loads(path.read_text())
    assert report["interleaved"] is True and report["vmap_chunk_sizes"] == [None, 1]
    rows = {(r["variant"], r["vmap_chunk_size"]): r for r in report["results"]}
    assert set(rows) == {
        ("baseline", None),
        ("vmap_eager", None),
        ("vmap_eager", 1),
        ("packed", None),
    }  # packed has no vmap chunks
    assert all(len(r["times_s"]) == 2 and len(r["warmup_s"]) == 1 for r in rows.values())
    assert len({r["peak_memory_mib"] for r in rows.values()}) == 1  # built together: one peak
    assert [(c["variant"]) for c in report["scaling"]] == []  # one N: no curve


def test_collector_overhead_is_reported(tmp_path: Path, restore_threads: None) -> None:
    path = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                *TINY,
                "--threads",
                "1",
                "--scenarios",
                "host",
                "--variants",
                "vmap_eager",
                "--collector",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    overhead = json.loads(path.read_text())["collector_overhead"]
    assert overhead["n_envs"] == 2 and overhead["steps"] >= 1
    assert overhead["by_hand_s"] > 0 and overhead["collector_s"] > 0
    assert overhead["overhead_fraction"] == pytest.approx(
        (overhead["collector_s"] - overhead["by_hand_s"]) / overhead["collector_s"]
    )


@pytest.mark.parametrize(
    ("throughput", "saturates_at"),
    [
        ([1.0, 2.0, 4.0, 8.0], None),  # still rising at the largest N
        ([1.0, 2.0, 4.0, 4.2], 4),  # within 10 % from N = 4 on
        ([1.0, 2.0, 2.1, 2.15], 2),  # +5 % and +7.5 % over N = 2
        ([1.0, 3.0, 2.0, 1.5], 2),  # a peak, then slower
        ([1.0, 1.05, 1.0, 3.0], None),  # a late jump is still rising
        ([1.0, 1.05, 1.08, 1.09], 1),  # flat from the start
    ],
)
def test_saturation_is_the_first_n_no_larger_n_beats_by_ten_percent(
    throughput: list[float], saturates_at: int | None
) -> None:
    assert saturation_point([1, 2, 4, 8], throughput) == saturates_at


@pytest.mark.compile
def test_a_compiled_step_profile_compiles_before_the_profiler_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiling inside the profiled steps would count tens of seconds of compilation as step time.

    Dynamo alone (the `eager` backend) makes the graphs counted here; Inductor's code
    generation behind it is checked in test_compile.py, and would only slow this test."""
    def dynamo_only(function: Callable[..., Any], mode: str) -> Callable[..., Any]:
        return torch.compile(function, dynamic=False, backend="eager")

    monkeypatch.setattr(host_training, "compile_per_plan", dynamo_only)
    monkeypatch.setattr(host_evaluation, "compile_per_plan", dynamo_only)
    graphs_made_while_profiling = []
    unwatched = step_profile.profile

    @contextlib.contextmanager
    def watched(**kwargs):  # type: ignore[no-untyped-def]
        before = counters["stats"]["unique_graphs"]
        with unwatched(**kwargs) as prof:
            yield prof
        graphs_made_while_profiling.append(counters["stats"]["unique_graphs"] - before)

    monkeypatch.setattr(step_profile, "profile", watched)
    compiled_before = counters["stats"]["unique_graphs"]
    profile = step_profile.profile_env_steps(
        "host", torch.device("cpu"), 2, 8, 2, steps=2, warmup=0, policy_name="static", bank_mode="active", compile=True
    )
    assert counters["stats"]["unique_graphs"] > compiled_before, "the steps should have been compiled"
    assert graphs_made_while_profiling == [0]
    assert set(step_profile.PARTS) - {"policy"} <= set(profile.parts_ms)


@pytest.mark.compile
def test_amp_bound_and_ppo_update_are_reported(tmp_path: Path, restore_threads: None) -> None:
    """bf16 rows next to fp32 ones, the accuracy effect on the same seeds, a bound for every
    row, and the PPO update eager vs compiled (ClipPPOLoss compiles: tens of seconds)."""
    path = tmp_path / "bench.json"
    argv = [
        *TINY,
        "--threads",
        "1",
        "--scenarios",
        "host",
        "--variants",
        "vmap_eager",
        "--amp",
        "--amp-epochs",
        "2",
        "--bound",
        "--ppo-update",
        "--json",
        str(path),
    ]
    assert bench.main(argv) == 0
    report = json.loads(path.read_text())
    rows = {r["dtype"]: r for r in report["results"]}
    assert set(rows) == {"float32", "bfloat16 autocast"}
    flops = {row["bound"]["flops_per_env_step"] for row in rows.values()}
    assert len(flops) == 1 and flops.pop() > 0  # the same model and data on both sides
    for row in rows.values():
        bound = row["bound"]
        assert bound["verdict"].startswith("CPU") and bound["device_busy_fraction"] is None
        assert bound["achieved_flops_per_s"] > 0 and bound["top_ops"]

    amp = report["amp_effect"]
    assert amp["epochs"] == 2 and len(amp["fp32_accuracy"]) == len(amp["bf16_accuracy"]) == 2
    assert all(0.0 <= a <= 100.0 for a in amp["fp32_accuracy"] + amp["bf16_accuracy"])
    differences = [b - f for b, f in zip(amp["bf16_accuracy"], amp["fp32_accuracy"])]
    assert amp["mean_accuracy_difference_pp"] == pytest.approx(sum(differences) / 2)
    assert all(math.isfinite(loss) for loss in amp["fp32_val_loss"] + amp["bf16_val_loss"])

    update = report["ppo_update"]
    assert update["eager_s"] > 0 and update["compiled_s"] > 0 and update["first_compiled_s"] > update["compiled_s"]
    assert update["optimizer_steps"] > 0 and update["frames"] > 0
    assert update["first_update_max_abs_difference"] < 1e-4  # compiled ClipPPOLoss computes what eager does


def gpu_suite_phases() -> dict[str, tuple[int, list[str]]]:
    """`.ci/gpu-suite`'s phases: name -> (default time limit in s, command after the interpreter)."""
    text = (Path(__file__).resolve().parents[1] / ".ci" / "gpu-suite").read_text().replace("\\\n", " ")
    phases = {}
    for line in text.splitlines():
        if line.startswith("phase "):
            _, name, limit, _python, *command = shlex.split(line)
            phases[name] = (int(re.fullmatch(r"\$\{\w+:-(\d+)\}", limit).group(1)), command)
    return phases


def test_the_gpu_suite_names_existing_tests_and_valid_bench_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU run is one short session: a typo in it would cost the session, so check it here."""
    phases = gpu_suite_phases()
    assert list(phases) == ["tests", "sweep", "profile", "amp_ppo"]
    assert sum(limit for limit, _ in phases.values()) <= 560  # one 10-minute command, with the install
    root = Path(__file__).resolve().parents[1]
    assert "addopts=" in phases["tests"][1]  # the GPU image has no pytest-xdist for our `-n 2`
    node_ids = [arg for arg in phases["tests"][1] if "::" in arg]
    assert len(node_ids) == 4
    for node_id in node_ids:
        path, name = node_id.split("::")
        assert f"def {name}(" in (root / path).read_text(), node_id

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    settings = {}
    for name in ("sweep", "profile", "amp_ppo"):
        command = phases[name][1]
        assert command[:2] == ["-m", "esper_func.bench"], name
        settings[name] = bench.parse_settings(command[2:])
        assert settings[name].device.type == "cuda" and settings[name].json_path is not None
    assert settings["sweep"].sweep_n[0] == 32 and max(settings["sweep"].sweep_n) == 256
    assert settings["sweep"].variants == bench.VARIANTS and settings["sweep"].bound and settings["sweep"].plot_path
    assert settings["profile"].profile_step and settings["profile"].n_envs == 32
    assert settings["amp_ppo"].amp and settings["amp_ppo"].ppo_update
