"""Benchmark parts around the train-step comparison (`esper_func.perf.bench`): peak memory, the
PPO update eager vs compiled, bf16 autocast's accuracy effect, where throughput saturates
over N and what bounds it there, and the plot of env-steps/s against N.

What bounds a step is read from a `torch.profiler` trace of one epoch: on CUDA, the GPU's
busy fraction (time with device work running, over wall time) and the device activities
per iteration; with FLOPs per env step counted by `FlopCounterMode` on the baseline's
identical model, the achieved FLOP/s of the timed epochs against the device's peak. A GPU
idle much of the epoch is launch- or host-bound (CUDA graphs move that); busy and far below
peak FLOP/s is memory-bound; busy near peak is compute-bound. Achieved GB/s needs a
hardware counter tool (Nsight Compute) and is not measured here.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from torchrl.collectors import Collector
from torchrl.envs.utils import step_mdp

from esper_func.perf.step_profile import synchronize, synthetic_env, timed
from esper_func.rl.run_config import TrainingConfig
from esper_func.rl.run_sections import TelemetryConfig
from esper_func.rl.trainer import PPOTrainer
from policies import StaticPolicy

SATURATION_GAIN = 0.10
"""Throughput has saturated at N when no larger N in the sweep is more than 10 % faster."""

# Dense peak throughput (FLOP/s) of the GPUs this project is lent, from NVIDIA's data
# sheets (SXM parts). fp32 convolutions run as TF32 on tensor cores
# under torch's default `torch.backends.cudnn.allow_tf32 = True`.
DEVICE_PEAKS: dict[str, dict[str, float]] = {
    "H100": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    "H200": {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
}


# --- Peak memory ------------------------------------------------------------------------------


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line: peak memory on a CPU needs Linux")


def reset_peak_memory(device: torch.device) -> float:
    """Start a new peak and return the memory in use now (MiB): CUDA tensors allocated, or
    (Linux) the process's resident set, whose peak `/proc/self/clear_refs` resets."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/clear_refs", "w") as clear_refs:  # "5" resets VmHWM to the current RSS
        clear_refs.write("5")
    return _proc_status_mib("VmRSS")


def peak_memory_mib(device: torch.device) -> float:
    """MiB at the peak since `reset_peak_memory`: CUDA tensors allocated, or the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_status_mib("VmHWM")


def peak_memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated; peak_added_mib = peak - allocated when the variant started"
    return (
        "process peak resident set (VmHWM); peak_added_mib = peak - resident set when the variant started "
        "(freed memory reused may hide some)"
    )


# --- The PPO update -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PPOUpdateTiming:
    """Seconds per PPO update on one collected batch (median of repeats), eager and compiled."""

    frames: int
    optimizer_steps: int
    eager_s: float
    compiled_s: float
    first_compiled_s: float
    """The first compiled update, compilation included (excluded from `compiled_s`)."""
    graph_breaks: int
    """Graph breaks dynamo reported while compiling ClipPPOLoss."""
    graphs: int
    """Distinct graphs dynamo compiled for it (frames inside TensorDict and TorchRL count too)."""
    speedup: float
    first_update_max_abs_difference: float
    """Largest difference of the first update's losses (objective, critic, entropy), compiled vs eager."""


def ppo_update_timing(device: torch.device, n_envs: int, repeats: int) -> PPOUpdateTiming:
    """Time `PPOTrainer.update` on one batch collected from the tiny preset with N envs.

    Both trainers start from the same weights and see the same batch; the KL stop is off so
    both make every optimizer step."""
    base = TrainingConfig.preset("tiny")
    config = replace(
        base,
        env=replace(base.env, n_envs=n_envs),
        ppo=replace(base.ppo, target_kl=0.0),
        telemetry=TelemetryConfig(level="off", plots=False, progress_bar=False),
        compare_episodes=0,
        device=str(device),
    )
    compiled_config = replace(config, ppo=replace(config.ppo, compile_loss=True))
    with tempfile.TemporaryDirectory() as run_dir:
        eager = PPOTrainer(config, Path(run_dir) / "eager")
        compiled = PPOTrainer(compiled_config, Path(run_dir) / "compiled")
        collector = Collector(
            eager.env, eager.nets.actor, frames_per_batch=eager.frames_per_batch, total_frames=eager.frames_per_batch,
            reset_at_each_iter=True, device=device, auto_register_policy_transforms=False,
        )
        batch = next(iter(collector))
        collector.shutdown()

        def update(trainer: PPOTrainer) -> tuple[float, dict[str, float]]:
            copy = batch.clone()  # outside the timing: the update writes into its batch
            return timed(lambda: trainer.update(copy), device)

        _, eager_first = update(eager)  # the first call warms caches; its statistics are the reference
        eager_s = statistics.median(update(eager)[0] for _ in range(repeats))
        torch._dynamo.utils.counters.clear()
        first_s, compiled_first = update(compiled)
        graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled_s = statistics.median(update(compiled)[0] for _ in range(repeats))
    difference = max(
        abs(compiled_first[key] - eager_first[key]) for key in ("loss_objective", "loss_critic", "loss_entropy")
    )
    steps = config.ppo.epochs * config.ppo.minibatches
    return PPOUpdateTiming(
        batch.numel(), steps, eager_s, compiled_s, first_s, graph_breaks, graphs, eager_s / compiled_s, difference
    )


# --- bf16 autocast's accuracy effect ------------------------------------------------------------


@dataclass(frozen=True)
class AmpEffect:
    """Final validation accuracy and loss per env after `epochs` host epochs, fp32 and bf16."""

    n_envs: int
    epochs: int
    seed: int
    fp32_accuracy: list[float]
    bf16_accuracy: list[float]
    fp32_val_loss: list[float]
    bf16_val_loss: list[float]
    mean_accuracy_difference_pp: float
    """mean(bf16 - fp32) in percentage points: the cost (negative) or gain of bf16."""
    max_abs_accuracy_difference_pp: float


def final_metrics(
    device: torch.device, n_envs: int, batch: int, iters: int, epochs: int, amp: bool, seed: int
) -> tuple[list[float], list[float]]:
    """Train the synthetic task's host alone (static policy) for `epochs`: final val accuracy and loss per env."""
    env = synthetic_env(device, n_envs, batch, iters, epochs, "active", compile=False, amp=amp, seed=seed)
    policy = StaticPolicy()
    td = env.reset()
    for _ in range(epochs):
        td = env.step(policy(td))
        metrics = td["next", "metrics"]
        td = step_mdp(td)
    return metrics["val_accuracy"].tolist(), metrics["val_loss"].tolist()


def amp_effect(device: torch.device, n_envs: int, batch: int, iters: int, epochs: int, seed: int) -> AmpEffect:
    """The same seeds, data and epochs trained in fp32 and under bf16 autocast.

    Eager on every device: what bf16 changes is the arithmetic, which compilation does not
    change in kind, and compiling the train and evaluation graphs for both precisions would
    cost minutes of a GPU session (the bf16 rows of the timing table are compiled)."""
    fp32_acc, fp32_loss = final_metrics(device, n_envs, batch, iters, epochs, False, seed)
    bf16_acc, bf16_loss = final_metrics(device, n_envs, batch, iters, epochs, True, seed)
    differences = [b - f for b, f in zip(bf16_acc, fp32_acc)]
    return AmpEffect(
        n_envs, epochs, seed, fp32_acc, bf16_acc, fp32_loss, bf16_loss,
        statistics.fmean(differences), max(abs(d) for d in differences),
    )


# --- Scaling over N and what bounds it -----------------------------------------------------------


@dataclass(frozen=True)
class Scaling:
    """Env-steps/s of one variant over the sweep, and where it stops rising."""

    scenario: str
    variant: str
    n_envs: list[int]
    env_steps_per_s: list[float]
    saturates_at: int | None
    """Smallest N that no larger N beats by more than `SATURATION_GAIN`; None while it still rises at the largest N."""


def saturation_point(n_envs: Sequence[int], throughput: Sequence[float], gain: float = SATURATION_GAIN) -> int | None:
    """The smallest swept N after which throughput never rises by more than `gain`; None if it rises at the end."""
    pairs = sorted(zip(n_envs, throughput))
    if len(pairs) < 2 or pairs[-1][1] > (1.0 + gain) * pairs[-2][1]:
        return None
    for i, (n, value) in enumerate(pairs):
        if all(later <= (1.0 + gain) * value for _, later in pairs[i + 1 :]):
            return n
    return pairs[-1][0]


@dataclass(frozen=True)
class Bound:
    """What bounds one variant at one N, from a profiled epoch."""

    scenario: str
    variant: str
    """The benchmark case: variant, chunk size and precision (e.g. 'vmap_compiled chunk 2 bf16')."""
    n_envs: int
    flops_per_env_step: float
    achieved_flops_per_s: float
    peak_flops_per_s: float | None
    """The device's dense peak at the run's precision (TF32 for fp32 on a GPU); None when unknown."""
    device_busy_fraction: float | None
    """Time the GPU ran device work (kernels, copies; overlapping streams counted once)
    over the profiled epoch's wall time, on CUDA; None on a CPU."""
    kernels_per_iteration: float | None
    """Device activities (kernels, copies) per training iteration, on CUDA."""
    verdict: str
    top_ops: list[dict[str, float | str]]
    """The profile's most expensive ops by self time: name, calls, ms (device time on CUDA, CPU otherwise)."""


def model_flops(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """FLOPs of one training iteration (cross-entropy forward and backward) of `net` on one
    batch, counted by `FlopCounterMode`."""
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def device_peak(device: torch.device, amp: bool) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for model, peaks in DEVICE_PEAKS.items():
        if model in name:
            return peaks["bf16" if amp else ("tf32" if torch.backends.cudnn.allow_tf32 else "fp32")]
    return None


def covered_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of `(start, end)` intervals: kernels on several streams overlap."""
    total, reached = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def profile_bound(
    scenario: str,
    variant: str,
    n_envs: int,
    iters: int,
    device: torch.device,
    run_epoch: Callable[[], None],
    epoch_s: float,
    flops_per_env_step: float,
    amp: bool,
) -> Bound:
    """Profile one epoch of `run_epoch` (already warm) and say what bounds it. Achieved
    FLOP/s come from `epoch_s`, the unprofiled timed epoch; the busy fraction from the
    profiled epoch, timed inside the profiler so that starting and stopping it is not."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run_epoch()
        synchronize(device)
        wall = time.perf_counter() - start
    cuda = device.type == "cuda"
    achieved = flops_per_env_step * n_envs / epoch_s
    peak = device_peak(device, amp)
    busy = kernels = None
    if cuda:  # device activities, not the GPU-side spans of record_function ranges
        device_ops = [
            e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
        ]
        busy = covered_us((e.time_range.start, e.time_range.end) for e in device_ops) / 1e6 / wall
        kernels = len(device_ops) / iters
    key = "self_device_time_total" if cuda else "self_cpu_time_total"  # self time: nested ranges are not counted twice
    events = [e for e in prof.key_averages() if not (cuda and e.is_user_annotation)]
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:10]
    top_ops = [{"name": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1000.0} for e in top]
    return Bound(
        scenario,
        variant,
        n_envs,
        flops_per_env_step,
        achieved,
        peak,
        busy,
        kernels,
        verdict(busy, achieved, peak, kernels),
        top_ops,
    )


def verdict(busy: float | None, achieved: float, peak: float | None, kernels_per_iteration: float | None) -> str:
    """A one-line reading of the profile (see the module docstring)."""
    if busy is None:
        return f"CPU: {achieved / 1e9:.1f} GFLOP/s achieved; no device trace to split launch from compute"
    if busy < 0.6:
        return (
            f"launch/host-bound: the GPU is idle {100 * (1 - busy):.0f}% of the epoch with "
            f"{kernels_per_iteration:.0f} kernels per iteration (CUDA graphs, larger N or larger batches move it)"
        )
    if peak is not None and achieved > 0.5 * peak:
        return f"compute-bound: {100 * achieved / peak:.0f}% of the device's peak FLOP/s"
    share = (
        f"{100 * achieved / peak:.1f}% of peak FLOP/s" if peak is not None else "peak FLOP/s unknown for this device"
    )
    return f"memory-bound (inferred): the GPU is busy {100 * busy:.0f}% of the epoch at {share}"


# --- The plot ---------------------------------------------------------------------------------


def plot_scaling(curves: Sequence[Scaling], title: str, path: Path) -> None:
    """Env-steps/s against N, one line per variant and scenario (log-log), written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for curve in curves:
        axis.plot(curve.n_envs, curve.env_steps_per_s, marker="o", label=f"{curve.variant} ({curve.scenario})")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(sorted({n for curve in curves for n in curve.n_envs}))
    for ticks in (axis.xaxis, axis.yaxis):
        ticks.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(ScalarFormatter())
    axis.set_xlabel("environments N")
    axis.set_ylabel("env-steps/s (host epochs of all envs per second)")
    axis.set_title(title, fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
