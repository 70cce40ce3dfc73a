"""The benchmark's train-step comparison (`esper_func.perf.bench`): its variants and
scenarios, the fairness check that both sides train the same parameters identically, and
the timing of every case. The printed report (`bench_report`) and the command line
(`bench`) build on it."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tensordict import TensorDict

from esper_func.core.blueprints import blueprint_index
from esper_func.core.config import CNNHostConfig, CoreConfig
from esper_func.core.host_training import TrainStepCache, planned_param_names, train_epoch
from esper_func.core.model import Model, bank_plan, build_model
from esper_func.core.stages import Stage
from esper_func.core.state import init_state
from esper_func.perf.bench_baseline import (
    SEED_ALPHA,
    SEED_BLUEPRINT,
    SEED_SLOT,
    baseline_envs,
    baseline_epoch,
    build_baseline_net,
    state_key,
)
from esper_func.perf.bench_checks import (
    Bound,
    Scaling,
    model_flops,
    peak_memory_mib,
    profile_bound,
    reset_peak_memory,
    saturation_point,
)
from esper_func.perf.step_profile import (
    timed,
)

SCENARIOS: tuple[str, ...] = ("host", "seeded")
VARIANTS: tuple[str, ...] = ("baseline", "vmap_eager", "vmap_compiled", "vmap_cudagraphs", "packed", "packed_compiled")
CUDA_ONLY_VARIANTS: tuple[str, ...] = ("vmap_cudagraphs",)
COMPILE_SETTINGS: dict[str, tuple[bool, str]] = {
    "baseline": (False, "default"),
    "vmap_eager": (False, "default"),
    "vmap_compiled": (True, "default"),
    "vmap_cudagraphs": (True, "reduce-overhead"),
    "packed": (False, "default"),
    "packed_compiled": (True, "default"),
}
"""`CoreConfig.compile` and `compile_mode` of each variant."""


def env_batching(variant: str) -> str:
    """`CoreConfig.env_batching` of each variant: the vmapped ones run vmap, the packed ones pack."""
    return "packed" if variant.startswith("packed") else "vmap"


def compile_mode_name(variant: str) -> str:
    compile, mode = COMPILE_SETTINGS[variant]
    return f"torch.compile(dynamic=False, mode={mode!r})" if compile else "eager"


DTYPE = torch.float32


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures."""

    device: torch.device
    n_envs: int
    batch: int
    iters: int
    repeats: int
    warmup: int
    host_preset: str
    scenarios: tuple[str, ...]
    variants: tuple[str, ...]
    threads: int | None = None
    seed: int = 0
    json_path: Path | None = None
    sweep_n: tuple[int, ...] = ()
    """Env counts to run the train comparison at (empty: `n_envs` only)."""
    profile_step: tuple[str, ...] = ()
    """Env step configurations to profile (`step_profile.PROFILE_CONFIGS`; empty: none)."""
    profile_steps: int = 4
    collector: bool = False
    main_job: bool = False
    """Also time whole episodes of the default main job's env, vmapped and packed."""
    amp: bool = False
    """Also run every vmapped variant under bf16 autocast, and measure its accuracy effect."""
    amp_epochs: int = 3
    bound: bool = False
    """Profile one more epoch of each variant: what bounds it."""
    ppo_update: bool = False
    plot_path: Path | None = None
    vmap_chunk_sizes: tuple[int | None, ...] = (None,)
    """`CoreConfig.vmap_chunk_size` values each vmapped variant runs at (None: all envs at once)."""
    interleave: bool = False


@dataclass(frozen=True)
class VariantResult:
    """Timings and throughput of one variant in one scenario (times are per epoch of all N envs)."""

    n_envs: int
    scenario: str
    variant: str
    dtype: str
    """'float32', or 'bfloat16 autocast' (parameters and optimizer state stay fp32)."""
    vmap_chunk_size: int | None
    """Envs per vmapped slice (None: all at once; the baseline has none)."""
    compile_mode: str
    trained_params_per_env: int
    warmup_s: list[float]
    times_s: list[float]
    median_s: float
    env_steps_per_s: float
    samples_per_s: float
    iterations_per_s: float
    """Training iterations of all N envs together per second (iters / time)."""
    env_iterations_per_s: float
    """Training iterations summed over envs per second (N * iters / time)."""
    peak_memory_mib: float
    """From building the variant to its last timed epoch (`peak_memory_kind` in the report)."""
    peak_added_mib: float
    """Peak minus the memory in use when the variant started: what the variant itself needs."""
    speedup_vs_baseline: float | None = None
    """Against the (fp32, eager) baseline at the same N and scenario."""
    bound: Bound | None = None


@dataclass(frozen=True)
class ParamCheck:
    """Fairness check of one scenario: both sides train the same parameters, identically."""

    scenario: str
    baseline_params_per_env: int
    vmapped_params_per_env: int
    max_abs_param_diff: float
    """Largest parameter difference after training both sides from the same state on the same batches."""
    check_iters: int


# --- The workload: configuration, state, data --------------------------------------------


def core_config(
    host_preset: str,
    compile: bool,
    compile_mode: str = "default",
    amp: bool = False,
    vmap_chunk_size: int | None = None,
    batching: str = "vmap",
) -> CoreConfig:
    host = CNNHostConfig.preset(host_preset)
    return CoreConfig(
        host=host,
        compile=compile,
        compile_mode=compile_mode,
        amp=amp,
        vmap_chunk_size=vmap_chunk_size,
        env_batching=batching,
    )  # type: ignore[arg-type]


def scenario_state(model: Model, scenario: str, n_envs: int, seed: int) -> TensorDict:
    """Fresh state for `n_envs` envs; in `seeded`, every env has a BLENDING seed at the mid slot."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    state = init_state(model, n_envs, generator)
    if scenario == "seeded":
        state["slots", "stage"][:, SEED_SLOT] = int(Stage.BLENDING)
        state["slots", "alpha"][:, SEED_SLOT] = SEED_ALPHA
        state["slots", "blueprint"][:, SEED_SLOT] = blueprint_index("cnn", SEED_BLUEPRINT)
    return state


def synthetic_batches(
    host: CNNHostConfig, iters: int, batch: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images `[iters, batch, C, H, W]` and labels `[iters, batch]`, made on `device`."""
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    shape = (iters, batch, host.in_channels, host.image_size, host.image_size)
    x = torch.randn(shape, generator=generator, device=device, dtype=DTYPE)
    y = torch.randint(0, host.num_classes, (iters, batch), generator=generator, device=device)
    return x, y


# --- Fairness checks --------------------------------------------------------------------------


def trained_param_counts(host_preset: str, scenario: str) -> tuple[int, int]:
    """Parameters one env trains: (baseline, vmapped). Equal when both sides train the same architecture."""
    config = core_config(host_preset, compile=False)
    baseline = sum(p.numel() for p in build_baseline_net(config, scenario).parameters())
    model = build_model(config)
    plan = bank_plan(model, scenario_state(model, scenario, 1, seed=0)["slots"])
    names = model.host_param_names + tuple(n for s, p in enumerate(plan) for n in planned_param_names(model, s, p))
    vmapped = sum(model.net_train.get_parameter(name).numel() for name in names)
    return baseline, vmapped


def max_param_difference(
    model: Model, scenario: str, n_envs: int, x: torch.Tensor, y: torch.Tensor, seed: int
) -> float:
    """Train both sides from the same state on batches `x`, `y`; the largest parameter difference."""
    state = scenario_state(model, scenario, n_envs, seed)
    envs = baseline_envs(model, state, scenario)
    new_state, _ = train_epoch(model, state, x, y, TrainStepCache(model))
    baseline_epoch(envs, [None] * n_envs, x, y)
    diff = 0.0
    for k, env in enumerate(envs):
        for name, param in env.net.named_parameters():
            diff = max(diff, (param.detach() - new_state["params", state_key(name)][k]).abs().max().item())
    return diff


# --- Timing -----------------------------------------------------------------------------------


def time_epochs(
    run_epoch: Callable[[], None], device: torch.device, warmup: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds of each warm-up epoch and of each timed epoch (synchronized at both ends on CUDA)."""
    warmup_s, times_s = [], []
    for record in [warmup_s] * warmup + [times_s] * repeats:
        record.append(timed(run_epoch, device)[0])
    return warmup_s, times_s


@dataclass(frozen=True)
class Case:
    """One row of the table: a variant, its precision, and its vmap chunk size."""

    variant: str
    amp: bool = False
    vmap_chunk_size: int | None = None

    @property
    def label(self) -> str:
        chunk = f" chunk {self.vmap_chunk_size}" if self.vmap_chunk_size is not None else ""
        return self.variant + chunk + (" bf16" if self.amp else "")


def cases(settings: Settings) -> list[Case]:
    """The baseline once; every vmapped variant at every chunk size, in fp32 and (--amp) bf16."""
    out = []
    for variant in settings.variants:
        if variant == "baseline":
            out.append(Case(variant))
            continue
        if env_batching(variant) == "packed":  # no vmap, so no chunks
            out += [Case(variant, amp) for amp in ((False, True) if settings.amp else (False,))]
            continue
        for chunk in settings.vmap_chunk_sizes:
            out += [Case(variant, amp, chunk) for amp in ((False, True) if settings.amp else (False,))]
    return out


def epoch_runner(
    settings: Settings, scenario: str, case: Case, x: torch.Tensor, y: torch.Tensor
) -> tuple[Callable[[], None], int]:
    """A closure that trains all N envs for one epoch (state carried across calls), and params per env."""
    compile, compile_mode = COMPILE_SETTINGS[case.variant]
    config = core_config(
        settings.host_preset, compile, compile_mode, case.amp, case.vmap_chunk_size, env_batching(case.variant)
    )
    model = build_model(config, settings.device)
    state = scenario_state(model, scenario, settings.n_envs, settings.seed)
    baseline_count, vmapped_count = trained_param_counts(settings.host_preset, scenario)
    if case.variant == "baseline":
        envs = baseline_envs(model, state, scenario)
        cuda = settings.device.type == "cuda"
        streams = [torch.cuda.Stream(settings.device) if cuda else None for _ in envs]
        return (lambda: baseline_epoch(envs, streams, x, y)), baseline_count

    steps = TrainStepCache(model)
    carried = {"state": state}

    def run() -> None:
        carried["state"], _ = train_epoch(model, carried["state"], x, y, steps)

    return run, vmapped_count


def variant_result(
    settings: Settings,
    scenario: str,
    case: Case,
    params: int,
    warmup_s: list[float],
    times_s: list[float],
    peak: float,
    at_start: float,
    bound: Bound | None,
) -> VariantResult:
    median = statistics.median(times_s)
    n, iters = settings.n_envs, settings.iters
    return VariantResult(
        n_envs=n,
        scenario=scenario,
        variant=case.variant,
        dtype="bfloat16 autocast" if case.amp else "float32",
        vmap_chunk_size=case.vmap_chunk_size,
        compile_mode=compile_mode_name(case.variant),
        trained_params_per_env=params,
        warmup_s=warmup_s,
        times_s=times_s,
        median_s=median,
        env_steps_per_s=n / median,
        samples_per_s=n * settings.batch * iters / median,
        iterations_per_s=iters / median,
        env_iterations_per_s=n * iters / median,
        peak_memory_mib=peak,
        peak_added_mib=peak - at_start,
        bound=bound,
    )


def bench_cases(
    settings: Settings,
    scenario: str,
    chosen: Sequence[Case],
    x: torch.Tensor,
    y: torch.Tensor,
    flops_per_env_step: float,
    log: Callable[[str], None],
) -> list[VariantResult]:
    """Each case built, warmed and timed on its own; with `interleave`, all built and warmed
    first, then timed in turns (one epoch of each per round), so that drift in the machine's
    speed affects every case alike (their peak memory is then that of all together)."""
    device, n = settings.device, settings.n_envs
    groups = [list(chosen)] if settings.interleave else [[case] for case in chosen]
    results = []
    for group in groups:
        turns = " in turns" if len(group) > 1 else ""
        log(f"[bench] N={n} {scenario} / {', '.join(case.label for case in group)}{turns} ...")
        at_start = reset_peak_memory(device)
        runners = [epoch_runner(settings, scenario, case, x, y) for case in group]
        warmups = [time_epochs(run, device, settings.warmup, 0)[0] for run, _ in runners]
        times: list[list[float]] = [[] for _ in group]
        for _ in range(settings.repeats):
            for (run, _), record in zip(runners, times):
                record += time_epochs(run, device, 0, 1)[1]
        peak = peak_memory_mib(device)
        for case, (run, params), warmup_s, times_s in zip(group, runners, warmups, times):
            bound = (
                profile_bound(
                    scenario,
                    case.label,
                    n,
                    settings.iters,
                    device,
                    run,
                    statistics.median(times_s),
                    flops_per_env_step,
                    case.amp,
                )
                if settings.bound
                else None
            )
            results.append(variant_result(settings, scenario, case, params, warmup_s, times_s, peak, at_start, bound))
        del runners, run  # the next group's peak memory is its own
    return results


def with_speedups(results: list[VariantResult]) -> list[VariantResult]:
    """Each result with its speedup over the baseline of its scenario (None without a baseline)."""
    baselines = {(r.n_envs, r.scenario): r.median_s for r in results if r.variant == "baseline"}
    return [
        replace(
            r,
            speedup_vs_baseline=baselines[r.n_envs, r.scenario] / r.median_s
            if (r.n_envs, r.scenario) in baselines
            else None,
        )
        for r in results
    ]


def run_benchmark(
    settings: Settings, log: Callable[[str], None] = print
) -> tuple[list[VariantResult], list[ParamCheck]]:
    """Every scenario x variant, plus the fairness check of every scenario."""
    host = CNNHostConfig.preset(settings.host_preset)
    x, y = synthetic_batches(host, settings.iters, settings.batch, settings.device, settings.seed)
    checks, results = [], []
    for scenario in settings.scenarios:
        baseline_count, vmapped_count = trained_param_counts(settings.host_preset, scenario)
        check_model = build_model(core_config(settings.host_preset, compile=False), settings.device)
        check_iters = min(2, settings.iters)
        diff = max_param_difference(
            check_model, scenario, settings.n_envs, x[:check_iters], y[:check_iters], settings.seed
        )
        checks.append(ParamCheck(scenario, baseline_count, vmapped_count, diff, check_iters))
        baseline_net = build_baseline_net(check_model.config, scenario).to(settings.device)
        flops_per_env_step = settings.iters * model_flops(baseline_net, x[0], y[0])
        results += bench_cases(settings, scenario, cases(settings), x, y, flops_per_env_step, log)
    return with_speedups(results), checks


def scaling_curves(results: Sequence[VariantResult]) -> list[Scaling]:
    """Env-steps/s of each (scenario, case) over the swept N, and where it saturates."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in results:
        name = Case(r.variant, r.dtype != "float32", r.vmap_chunk_size).label
        series.setdefault((r.scenario, name), []).append((r.n_envs, r.env_steps_per_s))
    curves = []
    for (scenario, name), points in series.items():
        if len(points) > 1:
            points.sort()
            ns, values = [n for n, _ in points], [v for _, v in points]
            curves.append(Scaling(scenario, name, ns, values, saturation_point(ns, values)))
    return curves
