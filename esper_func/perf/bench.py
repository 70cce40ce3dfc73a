"""Host-training throughput: the vmapped train step against N separate eager models.

Run `python -m esper_func.bench --quick --json PATH`. One env step is one host epoch of
one environment: `--iters` training iterations on shared batches of `--batch` samples.
Variants, all on the same synthetic data (generated on the device once):

- `baseline`: the reference style (`esper_func/perf/bench_baseline.py`). N separate eager
  `nn.Module`s, each with its own `torch.optim.SGD` (hyperparameters and gradient clipping
  from `OptimConfig`), stepped in a Python loop over envs for every batch; on CUDA each env
  on its own stream.
- `vmap_eager`: `host_training.train_epoch` with `CoreConfig(compile=False)`.
- `vmap_compiled`: `host_training.train_epoch` with `CoreConfig(compile=True)`.
- `vmap_cudagraphs`: the same with `compile_mode="reduce-overhead"`, which captures CUDA
  graphs (CUDA only: on a CPU it would be `vmap_compiled` again).
- `packed`, `packed_compiled`: the N envs packed into one network's channels
  (`CoreConfig(env_batching="packed")`), eager and compiled.

`--amp` adds every vmapped variant under bf16 autocast, and measures autocast's accuracy
effect: the synthetic task's host trained `--amp-epochs` epochs from the same seeds in fp32
and bf16. `--sweep-n 1 2 4 8 16` repeats the comparison at each env count, reports where
each variant's throughput saturates, and `--plot PATH` draws env-steps/s against N.
The JSON and the plot are rewritten after each part (each N, each extra measurement),
marked `"complete": false` until the run ends, so a run stopped part-way (by a time limit
on a lent GPU, say) keeps what it measured.
`--bound` profiles one more epoch of every variant and says what bounds it (launches,
memory or compute: `esper_func/perf/bench_checks.py`). Every row reports its peak memory.
`--vmap-chunk-size all 2 4` runs each vmapped variant at each chunk size (envs per
vmapped slice). `--interleave` builds and warms every case first, then times them in turns,
so that drift in a shared machine's speed hits all alike.
`--ppo-update` times the PPO update eager and with ClipPPOLoss compiled. `--collector`
measures TorchRL's collector overhead over stepping the env by hand. `--profile-step`
profiles whole env steps (`esper_func/perf/step_profile.py`): the host alone (static policy,
`host`), an eager heuristic with the active bank plan (`heuristic-active`), and the same
with the full bank (every blueprint computed at every slot, `heuristic-full`), each part's
time per step and the controller's share; name some of them to profile only those.

Scenarios train the same architecture on both sides: `host` (every slot DORMANT; the
baseline is the bare host) and `seeded` (one `conv_light` seed BLENDING at alpha 0.5 at the `mid`
slot; the baseline adds that blueprint with the same blend and its own SGD).
Warm-up epochs (which include compilation) are timed separately and excluded; every
figure is the median over `--repeats` timed epochs. On a CPU shared with other work,
`--threads 1` keeps OpenMP threads from spinning against each other (it changes the
figures a lot on 2 busy cores); the JSON records threads and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import tensordict
import torch

from esper_func.core.allocator import reuse_freed_memory
from esper_func.core.config import CNNHostConfig
from esper_func.perf.bench_checks import (
    AmpEffect,
    PPOUpdateTiming,
    Scaling,
    amp_effect,
    peak_memory_kind,
    plot_scaling,
    ppo_update_timing,
)
from esper_func.perf.bench_report import (
    device_name,
    format_amp_effect,
    format_bounds,
    format_collector_overhead,
    format_param_check,
    format_ppo_update,
    format_scaling,
    format_table,
    load_average,
)
from esper_func.perf.bench_variants import (
    COMPILE_SETTINGS,
    CUDA_ONLY_VARIANTS,
    DTYPE,
    SCENARIOS,
    VARIANTS,
    ParamCheck,
    Settings,
    VariantResult,
    compile_mode_name,
    run_benchmark,
    scaling_curves,
)
from esper_func.perf.step_profile import (
    PROFILE_CONFIGS,
    CollectorOverhead,
    EpisodeTiming,
    StepProfile,
    collector_overhead,
    format_episodes,
    format_profiles,
    main_job_episodes,
    profile_env_steps,
)

QUICK_DEFAULTS = {"iters": 20, "repeats": 3, "amp_epochs": 3}
FULL_DEFAULTS = {"iters": 50, "repeats": 5, "amp_epochs": 8}


# --- The JSON report -------------------------------------------------------------------------


@dataclass
class Measurements:
    """What a run has measured so far; parts not asked for, or not reached yet, stay empty."""

    results: list[VariantResult] = field(default_factory=list)
    checks: list[ParamCheck] = field(default_factory=list)
    profiles: list[StepProfile] = field(default_factory=list)
    amp: AmpEffect | None = None
    ppo_update: PPOUpdateTiming | None = None
    collector: CollectorOverhead | None = None
    main_job: list[EpisodeTiming] = field(default_factory=list)


def report(
    settings: Settings, measured: Measurements, argv: Sequence[str], load_at_start: list[float] | None, complete: bool
) -> dict:
    """Everything the run measured, with the conditions it ran under, as plain JSON
    (`complete` false: written part-way, the run's remaining parts not measured yet)."""
    return {
        "benchmark": "esper_func.bench",
        "argv": list(argv),
        "complete": complete,
        "device": {"type": settings.device.type, "name": device_name(settings.device)},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": {"start": load_at_start, "end": load_average()},
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "tensordict_version": tensordict.__version__,
        "host_preset": settings.host_preset,
        "n_envs": settings.n_envs,
        "vmap_chunk_sizes": list(settings.vmap_chunk_sizes),
        "interleaved": settings.interleave,
        "batch": settings.batch,
        "iters": settings.iters,
        "repeats": settings.repeats,
        "warmup_epochs": settings.warmup,
        "dtype": str(DTYPE).removeprefix("torch.") + (", and bfloat16 autocast rows (--amp)" if settings.amp else ""),
        "compile_modes": {variant: compile_mode_name(variant) for variant in settings.variants},
        "peak_memory_kind": peak_memory_kind(settings.device),
        "unit": "env step = one host epoch of one env = `iters` training iterations of `batch` samples",
        "param_checks": [asdict(c) for c in measured.checks],
        "results": [asdict(r) for r in measured.results],
        "step_profiles": [asdict(p) for p in measured.profiles],
        "collector_overhead": asdict(measured.collector) if measured.collector is not None else None,
        "main_job_episodes": [asdict(t) for t in measured.main_job],
        "scaling": [asdict(c) for c in scaling_curves(measured.results)],
        "amp_effect": asdict(measured.amp) if measured.amp is not None else None,
        "ppo_update": asdict(measured.ppo_update) if measured.ppo_update is not None else None,
    }


def write_outputs(settings: Settings, figures: dict, curves: Sequence[Scaling], quiet: bool = False) -> None:
    """The JSON report (`--json`) and the scaling plot (`--plot`, once two env counts are measured)."""
    if settings.json_path is not None:
        settings.json_path.parent.mkdir(parents=True, exist_ok=True)
        settings.json_path.write_text(json.dumps(figures, indent=2) + "\n")
        if not quiet:
            print(f"[bench] wrote {settings.json_path}")
    if settings.plot_path is not None and curves:
        title = (
            f"{device_name(settings.device)}, {settings.host_preset} host, batch {settings.batch}, "
            f"{settings.iters} iterations per env step"
        )
        plot_scaling(curves, title, settings.plot_path)
        if not quiet:
            print(f"[bench] wrote {settings.plot_path}")


# --- Command line -----------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def chunk_size(text: str) -> int | None:
    """'all' (every env in one vmapped call) or a positive chunk size."""
    return None if text == "all" else positive_int(text)


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m esper_func.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations and repeats (20 and 3 unless given)")
    parser.add_argument("--json", type=Path, help="write every figure and the run's conditions to this file")
    parser.add_argument("--n-envs", type=positive_int, default=8, help="environments N (default 8)")
    parser.add_argument("--batch", type=positive_int, default=128, help="per-env batch size (default 128)")
    parser.add_argument(
        "--iters",
        type=positive_int,
        help=f"iterations per host epoch (default {FULL_DEFAULTS['iters']}, quick {QUICK_DEFAULTS['iters']})",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        help=f"timed epochs per variant (default {FULL_DEFAULTS['repeats']}, quick {QUICK_DEFAULTS['repeats']})",
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=1, help="untimed warm-up epochs per variant (default 1)"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument(
        "--host-preset", default="cifar", help="CNN host preset: cifar, cifar_deep, tiny (default cifar)"
    )
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: all (vmap_cudagraphs on CUDA only)")
    parser.add_argument(
        "--no-compile", action="store_true", help="drop the compiled variants (vmap_compiled, packed_compiled)"
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial state and the data")
    parser.add_argument(
        "--sweep-n", type=positive_int, nargs="+", help="run the comparison at each of these env counts"
    )
    parser.add_argument(
        "--profile-step", nargs="*", choices=list(PROFILE_CONFIGS),
        help="also profile whole env steps (parts and controller share) of these configurations (default: all)",
    )
    parser.add_argument(
        "--collector", action="store_true", help="also measure the TorchRL collector's overhead over stepping by hand"
    )
    parser.add_argument(
        "--main-job",
        action="store_true",
        help="also time whole episodes of the default main job's env (static and heuristic control), vmapped and "
             "packed in this process and packed over 2 worker processes, side by side",
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="also run the vmapped variants under bf16 autocast, and measure its accuracy effect",
    )
    parser.add_argument(
        "--amp-epochs",
        type=positive_int,
        help=f"epochs of the accuracy comparison (default {FULL_DEFAULTS['amp_epochs']}, quick "
             f"{QUICK_DEFAULTS['amp_epochs']})",
    )
    parser.add_argument("--bound", action="store_true", help="profile one more epoch of each variant: what bounds it")
    parser.add_argument(
        "--ppo-update", action="store_true", help="also time the PPO update, eager and with ClipPPOLoss compiled"
    )
    parser.add_argument(
        "--vmap-chunk-size",
        type=chunk_size,
        nargs="+",
        help="envs per vmapped slice, one row per value for each vmapped variant ('all': at once; default all)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time the cases in turns, one epoch each per round (for a noisy machine)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        help="with --sweep-n: write the plot of env-steps/s against N to this file (.png, .svg, .pdf)",
    )
    return parser


def parse_settings(argv: Sequence[str]) -> Settings:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    try:
        CNNHostConfig.preset(args.host_preset)
    except ValueError as error:
        parser.error(f"--host-preset: {error}")
    explicit = args.variants is not None
    chosen = (
        args.variants if explicit else [v for v in VARIANTS if device.type == "cuda" or v not in CUDA_ONLY_VARIANTS]
    )
    if device.type != "cuda" and explicit and any(v in CUDA_ONLY_VARIANTS for v in chosen):
        parser.error(
            "--variants vmap_cudagraphs needs --device cuda: CUDA graphs capture GPU kernels (on a CPU it is "
            "vmap_compiled)"
        )
    variants = tuple(
        dict.fromkeys(v for v in chosen if not (args.no_compile and COMPILE_SETTINGS[v][0]))
    )
    if not variants:
        parser.error("no variant left to run (--no-compile dropped the compiled variants)")
    if args.plot is not None and len(args.sweep_n or ()) < 2:
        parser.error("--plot draws env-steps/s against N: give --sweep-n with two or more env counts")
    if args.amp_epochs is not None and not args.amp:
        parser.error("--amp-epochs sets the length of the --amp accuracy comparison: add --amp")
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    return Settings(
        device=device,
        n_envs=args.n_envs,
        batch=args.batch,
        iters=args.iters if args.iters is not None else defaults["iters"],
        repeats=args.repeats if args.repeats is not None else defaults["repeats"],
        warmup=args.warmup,
        host_preset=args.host_preset,
        scenarios=tuple(dict.fromkeys(args.scenarios)),
        variants=variants,
        threads=args.threads,
        seed=args.seed,
        json_path=args.json,
        sweep_n=tuple(dict.fromkeys(args.sweep_n or ())),
        profile_step=() if args.profile_step is None else tuple(dict.fromkeys(args.profile_step or PROFILE_CONFIGS)),
        collector=args.collector,
        main_job=args.main_job,
        profile_steps=args.repeats if args.repeats is not None else defaults["repeats"] + 1,
        amp=args.amp,
        amp_epochs=args.amp_epochs if args.amp_epochs is not None else defaults["amp_epochs"],
        bound=args.bound,
        ppo_update=args.ppo_update,
        plot_path=args.plot,
        vmap_chunk_sizes=tuple(dict.fromkeys(args.vmap_chunk_size or [None])),
        interleave=args.interleave,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, and write the JSON report when asked."""
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_settings(argv)
    reuse_freed_memory()  # as every env on a CPU does: the variants are timed with the allocator the envs run with
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    load_at_start = load_average()
    print(
        f"[bench] device={device_name(settings.device)} ({settings.device}) N={settings.n_envs} batch={settings.batch} "
        f"iters={settings.iters} repeats={settings.repeats} warmup={settings.warmup} host={settings.host_preset} "
        f"torch={torch.__version__} threads={torch.get_num_threads()} "
        f"chunks={['all' if c is None else c for c in settings.vmap_chunk_sizes]} interleave={settings.interleave}"
    )
    measured = Measurements()

    def save(complete: bool = False) -> None:
        """Rewrite the outputs with what is measured so far, so that a run stopped part-way keeps it."""
        write_outputs(
            settings,
            report(settings, measured, argv, load_at_start, complete),
            scaling_curves(measured.results),
            quiet=not complete,
        )

    for n_envs in settings.sweep_n or (settings.n_envs,):
        results, checks = run_benchmark(replace(settings, n_envs=n_envs))
        measured.results += results
        measured.checks += checks
        save()
    for check in measured.checks:
        print(format_param_check(check))
    print(format_table(measured.results))
    curves = scaling_curves(measured.results)
    if curves:
        print(format_scaling(curves))
    if settings.bound:
        print(format_bounds(measured.results))
    if settings.profile_step:
        for label, policy, bank_mode in (PROFILE_CONFIGS[name] for name in settings.profile_step):
            print(f"[bench] profiling env steps: {label} ...")
            measured.profiles.append(
                profile_env_steps(
                    label, settings.device, settings.n_envs, settings.batch, settings.iters, settings.profile_steps,
                    max(1, settings.warmup), policy, bank_mode, compile=settings.device.type == "cuda",
                )
            )
            save()
        print(
            f"[bench] env step parts, ms per step of all {settings.n_envs} envs (synthetic task, batch "
            f"{settings.batch}, {settings.iters} iterations):"
        )
        print(format_profiles(measured.profiles))
    if settings.amp:
        print(
            f"[bench] bf16 autocast's accuracy effect: {settings.amp_epochs} epochs of the synthetic task, fp32 and "
            "bf16 ..."
        )
        measured.amp = amp_effect(
            settings.device, settings.n_envs, settings.batch, settings.iters, settings.amp_epochs, settings.seed
        )
        save()
        print(format_amp_effect(measured.amp))
    if settings.ppo_update:
        print("[bench] PPO update, eager and with ClipPPOLoss compiled ...")
        measured.ppo_update = ppo_update_timing(settings.device, settings.n_envs, settings.repeats)
        save()
        print(format_ppo_update(measured.ppo_update))
    if settings.collector:
        print("[bench] collector overhead ...")
        measured.collector = collector_overhead(
            settings.device, settings.n_envs, settings.batch, settings.iters, settings.profile_steps, settings.repeats,
            compile=settings.device.type == "cuda",
        )
        save()
        print(format_collector_overhead(measured.collector))
    if settings.main_job:
        print(
            f"[bench] default main job: whole episodes of {settings.n_envs} envs, vmapped and packed "
            f"({settings.repeats} each, interleaved) ..."
        )
        measured.main_job = main_job_episodes(settings.device, settings.n_envs, settings.repeats)
        save()
        print(format_episodes(measured.main_job))
    save(complete=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
