"""`python -m esper_func.curves RUN_DIR [RUN_DIR ...]`: did these PPO runs learn?

A run's return per update moves with the episode it plays (its envs and action noise,
`esper_func.core.seeding`): by about 1 under the raw accuracy reward, less when the
reward is paid over a static twin (`RewardConfig.static_baseline`), which takes the
hosts' and batches' draw out but not the consequences of the policy's own sampled
actions. A short run's rise can hide in that variation (`docs/training.md`). This reads
each run's `updates.jsonl` and prints, per run, the mean return of its first and last
`--window` updates and their difference (the rise); then, over the runs, the mean rise,
its standard deviation and standard error, and how many runs rose. `--reference REF_DIR
...` first subtracts, update by update, the return of a `--frozen-policy` run with the
same seed and shards: the untrained policy on the same episodes, which takes most of the
episodes' own variation out. `--plot PATH` draws every run's curve and their mean per
update.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from esper_func.core.config import ConfigError
from esper_func.rl.plots import plot_return_curves
from esper_func.rl.run_config import TrainingConfig, read_training_config


class CurveError(ValueError):
    """A run directory without a usable `updates.jsonl`, or a window the runs cannot fill."""


@dataclass(frozen=True)
class RunCurve:
    """The rollout return of each update of one run, in update order."""

    name: str
    returns: list[float]

    def rise(self, window: int) -> tuple[float, float, float]:
        """(mean of the first `window` returns, mean of the last `window`, last minus first)."""
        first = statistics.fmean(self.returns[:window])
        last = statistics.fmean(self.returns[-window:])
        return first, last, last - first


def read_curve(run_dir: Path) -> RunCurve:
    """The run's returns; a resumed run's log may repeat an update, whose last record counts."""
    path = run_dir / "updates.jsonl"
    if not path.is_file():
        raise CurveError(
            f"{path} does not exist: give the directory of a PPO run (python -m esper_func.train writes it)"
        )
    by_update: dict[int, float] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_update[int(record["update"])] = float(record["rollout"]["return"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise CurveError(
                f"{path}, line {number}: not an update record ({type(error).__name__}: {error})"
            ) from error
    if not by_update:
        raise CurveError(f"{path} holds no update yet: let the run finish an update first")
    return RunCurve(str(run_dir), [by_update[update] for update in sorted(by_update)])


def run_config(run_dir: Path) -> TrainingConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise CurveError(
            f"{path} does not exist: give the directory of a PPO run (python -m esper_func.train writes it)"
        )
    return read_training_config(path)


def episode_draws(run_dir: Path) -> tuple[int, int, int]:
    """(seed, envs, shards): runs that agree on these play the same episode at each update."""
    config = run_config(run_dir)
    shards = config.collector.workers if config.collector.kind != "local" else max(1, len(config.devices))
    return config.env.seed, config.env.n_envs, shards


def against_references(curves: list[RunCurve], run_dirs: list[Path], reference_dirs: list[Path]) -> list[RunCurve]:
    """Each curve minus the frozen-policy run that played its episodes, over the updates both have."""
    references: dict[tuple[int, int, int], Path] = {}
    for reference_dir in reference_dirs:
        if not run_config(reference_dir).frozen_policy:
            raise CurveError(f"{reference_dir} learned: a reference is a run trained with --frozen-policy")
        references[episode_draws(reference_dir)] = reference_dir
    relative = []
    for curve, run_dir in zip(curves, run_dirs):
        draws = episode_draws(run_dir)
        if draws not in references:
            seed, envs, shards = draws
            raise CurveError(
                f"no reference plays the episodes of {run_dir} (seed {seed}, {envs} envs in {shards} shard(s)): run "
                f"its command again with --frozen-policy and give that run directory to --reference"
            )
        reference_dir = references[draws]
        mine, theirs = run_config(run_dir).env, run_config(reference_dir).env
        differing = [f.name for f in dataclasses.fields(mine) if getattr(mine, f.name) != getattr(theirs, f.name)]
        if differing:
            raise CurveError(
                f"{reference_dir} plays the episodes of {run_dir} in other envs (env.{', env.'.join(differing)} "
                f"differ{'s' if len(differing) == 1 else ''}), so their returns do not compare: run the frozen "
                "reference with the run's own config (its config.json) and --frozen-policy"
            )
        reference = read_curve(reference_dir).returns
        updates = min(len(curve.returns), len(reference))
        relative.append(RunCurve(curve.name, [curve.returns[u] - reference[u] for u in range(updates)]))
    return relative


def summary(curves: list[RunCurve], window: int) -> dict[str, float | int]:
    """Mean, std and standard error of the runs' rises, and the number of runs that rose."""
    rises = [curve.rise(window)[2] for curve in curves]
    std = statistics.stdev(rises) if len(rises) > 1 else math.nan
    return {
        "runs": len(rises),
        "mean_rise": statistics.fmean(rises),
        "std_rise": std,
        "standard_error": std / math.sqrt(len(rises)),
        "runs_that_rose": sum(rise > 0 for rise in rises),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esper_func.curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", help="PPO run directories")
    parser.add_argument("--window", type=int, default=5, help="updates averaged at each end (default 5)")
    parser.add_argument(
        "--reference",
        type=Path,
        nargs="+",
        default=[],
        help="--frozen-policy runs: each run's curve becomes its return minus the reference's with its seed and shards",
    )
    parser.add_argument("--plot", type=Path, help="write the return curves and their mean to this PNG")
    args = parser.parse_args(argv)
    try:
        if args.window < 1:
            raise CurveError(f"--window must be >= 1, got {args.window}")
        curves = [read_curve(run_dir) for run_dir in args.run_dirs]
        if args.reference:
            curves = against_references(curves, args.run_dirs, args.reference)
        shortest = min(curves, key=lambda curve: len(curve.returns))
        if 2 * args.window > len(shortest.returns):
            raise CurveError(
                f"{shortest.name} has {len(shortest.returns)} updates, too few for two windows of {args.window}: "
                f"give --window {len(shortest.returns) // 2} or less"
            )
    except (CurveError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    what = "return minus the frozen policy's on the same episodes" if args.reference else "return"
    print(f"{what}, first and last {args.window} updates")
    print(f"{'run':50s} {'updates':>7s} {'first':>7s} {'last':>7s} {'rise':>7s}")
    for curve in curves:
        first, last, rise = curve.rise(args.window)
        print(f"{curve.name[-50:]:50s} {len(curve.returns):7d} {first:7.2f} {last:7.2f} {rise:+7.2f}")
    totals = summary(curves, args.window)
    print(
        f"rise over {totals['runs']} runs: {totals['mean_rise']:+.2f} mean, {totals['std_rise']:.2f} std, "
        f"{totals['standard_error']:.2f} standard error; {totals['runs_that_rose']} of {totals['runs']} rose"
    )
    if args.plot is not None:
        plot_return_curves({curve.name: curve.returns for curve in curves}, args.plot, relative=bool(args.reference))
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
