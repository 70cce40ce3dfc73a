"""The benchmark's printed report: one line or table per measurement (`esper_func.perf.bench`)."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from esper_func.perf.bench_checks import AmpEffect, PPOUpdateTiming, Scaling
from esper_func.perf.bench_variants import ParamCheck, VariantResult
from esper_func.perf.step_profile import CollectorOverhead


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def format_table(results: Sequence[VariantResult]) -> str:
    header = (
        f"{'N':>4} {'scenario':<8} {'variant':<15} {'chunk':>5} {'dtype':<5} {'epoch s':>8} {'env-steps/s':>11} "
        f"{'samples/s':>10} "
        f"{'iters/s':>8} {'env-iters/s':>11} {'peak +MiB':>9} {'vs baseline':>11}"
    )
    rows = [header, "-" * len(header)]
    for r in results:
        speedup = f"{r.speedup_vs_baseline:.2f}x" if r.speedup_vs_baseline is not None else "-"
        dtype = "fp32" if r.dtype == "float32" else "bf16"
        chunk = "-" if r.vmap_chunk_size is None else str(r.vmap_chunk_size)
        rows.append(
            f"{r.n_envs:>4} {r.scenario:<8} {r.variant:<15} {chunk:>5} {dtype:<5} {r.median_s:>8.3f} "
            f"{r.env_steps_per_s:>11.3f} "
            f"{r.samples_per_s:>10,.0f} {r.iterations_per_s:>8.2f} {r.env_iterations_per_s:>11.1f} "
            f"{r.peak_added_mib:>9,.0f} {speedup:>11}"
        )
    return "\n".join(rows)


def format_scaling(curves: Sequence[Scaling]) -> str:
    rows = []
    for c in curves:
        where = (
            f"saturates at N={c.saturates_at}" if c.saturates_at is not None else f"still rising at N={c.n_envs[-1]}"
        )
        figures = ", ".join(f"{n}: {v:.2f}" for n, v in zip(c.n_envs, c.env_steps_per_s))
        rows.append(f"[bench] {c.scenario} / {c.variant}: {where} (env-steps/s by N: {figures})")
    return "\n".join(rows)


def format_bounds(results: Sequence[VariantResult]) -> str:
    rows = []
    for r in results:
        if r.bound is None:
            continue
        b = r.bound
        top = ", ".join(f"{op['name']} {op['self_ms']:.0f} ms" for op in b.top_ops[:3])
        rows.append(
            f"[bench] bound N={r.n_envs} {r.scenario} / {b.variant}: {b.verdict}; "
            f"{b.flops_per_env_step / 1e9:,.2f} GFLOP per env step, top ops by self time: {top}"
        )
    return "\n".join(rows)


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (POSIX), to tell an idle machine from a busy one."""
    return list(os.getloadavg())


def format_param_check(check: ParamCheck) -> str:
    return (
        f"[bench] {check.scenario}: trained params per env baseline={check.baseline_params_per_env} "
        f"vmapped={check.vmapped_params_per_env}; max |param diff| after {check.check_iters} iters = "
        f"{check.max_abs_param_diff:.2e}"
    )


def format_amp_effect(amp: AmpEffect) -> str:
    return (
        f"[bench] bf16 vs fp32 after {amp.epochs} epochs, {amp.n_envs} envs from seed {amp.seed}: val accuracy "
        f"{statistics.fmean(amp.bf16_accuracy):.2f}% vs {statistics.fmean(amp.fp32_accuracy):.2f}% "
        f"(mean difference {amp.mean_accuracy_difference_pp:+.2f} pp, largest per env "
        f"{amp.max_abs_accuracy_difference_pp:.2f} pp)"
    )


def format_ppo_update(timing: PPOUpdateTiming) -> str:
    return (
        f"[bench] PPO update ({timing.frames} frames, {timing.optimizer_steps} optimizer steps): eager "
        f"{1000 * timing.eager_s:.1f} ms, "
        f"compiled {1000 * timing.compiled_s:.1f} ms ({timing.speedup:.2f}x; first call with compilation "
        f"{timing.first_compiled_s:.1f} s, {timing.graphs} graphs, {timing.graph_breaks} graph breaks; "
        f"first update's losses differ by {timing.first_update_max_abs_difference:.1e})"
    )


def format_collector_overhead(overhead: CollectorOverhead) -> str:
    return (
        f"[bench] {overhead.steps} steps of {overhead.n_envs} envs: by hand {overhead.by_hand_s:.3f} s, through a "
        "Collector "
        f"{overhead.collector_s:.3f} s: collector overhead {100 * overhead.overhead_fraction:.1f}% of its wall time"
    )
