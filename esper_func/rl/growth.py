"""`python -m esper_func.growth`: does growing pay? The growth benchmark.

On one task and budget, over several seeds, it plays one episode of N envs under each of:

- `static`: the host alone (always WAIT);
- `wide2`, `wide4`: the same host with 2x and 4x the channels, alone: what simply
  training a wider network buys, and at what parameter cost;
- `heuristic`: the rule-based controller (`policies.HeuristicPolicy`);
- `scripted`: "grow early and keep" (`policies.ScriptedGrowthPolicy`): the best blueprint in
  every slot as soon as legal, fossilized when the gate allows, never culled.

Every controller of a seed runs on envs built with that seed (same host initialization
where the architecture matches, same batches), so the comparison is paired. Final accuracy
is measured on the task's held-out test images, which no training step and no gate ever
sees. For each controller it reports, as mean +- std over seeds: final test accuracy,
parameters added (over the static host), accuracy gained per 1,000 added parameters, and
seeds germinated / fossilized / culled / live at the end, plus the longest stay of any seed
in TRAINING (which the lifecycle's timeout bounds). It writes `growth.json` and one plot of
validation accuracy per epoch for every controller per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tensordict.nn import TensorDictModuleBase  # noqa: E402

from envs.morphogenetic import EnvConfig, MorphogeneticEnv  # noqa: E402
from esper_func.core.blueprints import blueprint_index  # noqa: E402
from esper_func.core.config import CNNHostConfig, CoreConfig  # noqa: E402
from esper_func.core.config_json import from_dict, to_dict  # noqa: E402
from esper_func.core.hosts import build_host  # noqa: E402
from esper_func.core.stages import HOLDS_SEED, LIVE, Stage, stage_lookup  # noqa: E402
from esper_func.core.state import seed_param_count  # noqa: E402
from esper_func.data.tasks import TaskConfig, build_task  # noqa: E402
from esper_func.rl.episodes import play_episode  # noqa: E402
from policies import HeuristicPolicy, ScriptedGrowthPolicy, StaticPolicy  # noqa: E402

CONTROLLERS: tuple[str, ...] = ("static", "wide2", "wide4", "heuristic", "scripted")
WIDTH_FACTORS: dict[str, int] = {"wide2": 2, "wide4": 4}


@dataclass(frozen=True)
class GrowthRun:
    """One controller on one seed's N envs."""

    controller: str
    seed: int
    test_accuracy: float
    """Mean over envs of the final held-out test accuracy, percent."""
    test_accuracy_per_env: list[float]
    val_curve: list[float]
    """Mean over envs of the validation accuracy after each epoch."""
    host_params: int
    params_added: float
    """Mean over envs of the parameters beyond the static host at the end: live and
    fossilized seeds, or the extra channels of a wider host."""
    germinated: int
    fossilized: int
    culled: int
    live: int
    """Seeds alive (not fossilized) at the end, summed over envs."""
    longest_training: int
    """Longest stay of any seed in GERMINATED + TRAINING, in epochs (0: none germinated)."""
    seconds: float


def base_env_config(n_envs: int, max_epochs: int | None, task: TaskConfig) -> EnvConfig:
    core = CoreConfig(compile=False)
    if max_epochs is not None:
        core = replace(core, lifecycle=replace(core.lifecycle, max_epochs=max_epochs))
    return EnvConfig(task=task, core=core, n_envs=n_envs)


def controller_env(base: EnvConfig, controller: str, seed: int, host: CNNHostConfig, wide_envs: int) -> EnvConfig:
    """The env config of `controller` for `seed`: a wider host on `wide_envs` envs for
    wide*, else `host` on the base config's envs."""
    factor = WIDTH_FACTORS.get(controller, 1)
    n_envs = wide_envs if controller in WIDTH_FACTORS else base.n_envs
    return replace(base, seed=seed, n_envs=n_envs, host=replace(host, base_channels=host.base_channels * factor))


def make_controller(name: str, env: MorphogeneticEnv, blueprint: str) -> TensorDictModuleBase:
    model = env.model
    if name == "heuristic":
        return HeuristicPolicy(
            model.topology, env.config.n_envs, device=env.device, blueprint_names=model.blueprint_names
        )
    if name == "scripted":
        return ScriptedGrowthPolicy(model.blueprint_names.index(blueprint)).to(env.device)
    return StaticPolicy()


def longest_training(stages: list[list[list[int]]]) -> int:
    """Longest run of GERMINATED/TRAINING epochs of any (env, slot) in `[T][N][S]` stages
    observed after each epoch, plus the germination epoch the first tick ends."""
    history = torch.tensor(stages)
    growing = (history == int(Stage.TRAINING)) | (history == int(Stage.GERMINATED))
    run = torch.zeros_like(growing[0], dtype=torch.int64)
    longest = 0
    for step in growing:
        run = torch.where(step, run + 1, 0)
        longest = max(longest, int(run.max()))
    return longest + 1 if longest else 0


def run_controller(name: str, config: EnvConfig, blueprint: str, static_params: int, device: torch.device) -> GrowthRun:
    start = time.perf_counter()
    env = MorphogeneticEnv(config, device)
    model = env.model
    result = play_episode(
        env, make_controller(name, env, blueprint), name, 0, model.blueprint_names, model.host_param_count
    )
    test = env.test_accuracy()
    assert test is not None, "the growth benchmark runs image tasks, which have a test split"
    test = test.cpu()
    slots = env.state["slots"]
    live = int(stage_lookup(LIVE, slots["stage"]).sum())
    held = torch.where(stage_lookup(HOLDS_SEED, slots["stage"]), seed_param_count(model, slots), 0)
    seed_params = held.sum(-1).double().mean().item()
    return GrowthRun(
        controller=name,
        seed=config.seed,
        test_accuracy=test.mean().item(),
        test_accuracy_per_env=test.tolist(),
        val_curve=result.accuracy_curve,
        host_params=model.host_param_count,
        params_added=seed_params + model.host_param_count - static_params,
        germinated=result.counts.germinated,
        fossilized=result.counts.fossilized,
        culled=result.counts.culled,
        live=live,
        longest_training=longest_training(result.stages),
        seconds=time.perf_counter() - start,
    )


def summarize(runs: list[GrowthRun], controllers: tuple[str, ...], static_params: int) -> dict[str, dict[str, Any]]:
    """Per controller: mean and std over seeds, and gains against static on the same seed."""
    static = {run.seed: run.test_accuracy for run in runs if run.controller == "static"}
    summary: dict[str, dict[str, Any]] = {}
    for name in controllers:
        mine = [run for run in runs if run.controller == name]
        accuracy = [run.test_accuracy for run in mine]
        gains = [run.test_accuracy - static[run.seed] for run in mine if run.seed in static]
        per_k = [
            (run.test_accuracy - static[run.seed]) / (run.params_added / 1000)
            for run in mine
            if run.seed in static and run.params_added > 0
        ]
        summary[name] = {
            "test_accuracy_mean": statistics.fmean(accuracy),
            "test_accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
            "gain_over_static_mean": statistics.fmean(gains) if gains else None,
            "gain_over_static_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "params_added_mean": statistics.fmean(run.params_added for run in mine),
            "params_added_percent": 100 * statistics.fmean(run.params_added for run in mine) / static_params,
            "gain_per_1k_params": statistics.fmean(per_k) if per_k else None,
            "germinated": sum(run.germinated for run in mine),
            "fossilized": sum(run.fossilized for run in mine),
            "culled": sum(run.culled for run in mine),
            "live": sum(run.live for run in mine),
            "longest_training": max(run.longest_training for run in mine),
            "seconds": sum(run.seconds for run in mine),
        }
    return summary


def plot_seed(runs: list[GrowthRun], seed: int, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for run in runs:
        if run.seed == seed:
            label = f"{run.controller} (test {run.test_accuracy:.1f} %)"
            axis.plot(range(1, len(run.val_curve) + 1), run.val_curve, label=label)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation accuracy (%), mean over envs")
    axis.set_title(f"Growth benchmark, seed {seed}")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def format_table(summary: dict[str, dict[str, Any]], n_seeds: int) -> str:
    lines = [
        f"{'controller':<10} | {'test acc (mean +- std, ' + str(n_seeds) + ' seeds)':<32} | {'gain vs static':>15} | "
        f"{'params added':>16} | {'pp / 1k params':>14} | germ / foss / culled / live | longest TRAINING",
    ]
    for name, row in summary.items():
        gain = (
            ""
            if row["gain_over_static_mean"] is None
            else f"{row['gain_over_static_mean']:+6.2f} +- {row['gain_over_static_std']:4.2f}"
        )
        per_k = "-" if row["gain_per_1k_params"] is None else f"{row['gain_per_1k_params']:+.2f}"
        accuracy = f"{row['test_accuracy_mean']:6.2f} +- {row['test_accuracy_std']:4.2f} %"
        counts = f"{row['germinated']} / {row['fossilized']} / {row['culled']} / {row['live']}"
        lines.append(
            f"{name:<10} | {accuracy:<32} | {gain:>15} | {row['params_added_mean']:8.0f} "
            f"({row['params_added_percent']:5.1f}%) | "
            f"{per_k:>14} | {counts:<28} | {row['longest_training']}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m esper_func.growth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument(
        "--wide-envs",
        type=int,
        default=4,
        help="envs of the wide hosts: references for accuracy and parameter cost, 2-6x the step time",
    )
    parser.add_argument("--controllers", nargs="+", default=list(CONTROLLERS), choices=CONTROLLERS)
    parser.add_argument("--blueprint", default="conv_wide", help="what the scripted schedule grows")
    parser.add_argument("--max-epochs", type=int, default=None, help="episode length (default: the lifecycle's)")
    parser.add_argument("--task-json", default=None, help="a TaskConfig JSON file (default: the synthetic preset)")
    parser.add_argument(
        "--out", default="growth", help="folder for growth.json and the plots (created; files are replaced)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if "static" not in args.controllers:
        raise SystemExit("--controllers must include static: every gain is measured against it")
    device = torch.device(args.device)
    task = TaskConfig.preset("synthetic")
    if args.task_json is not None:
        task = from_dict(TaskConfig, json.loads(Path(args.task_json).read_text()))
    base = base_env_config(args.n_envs, args.max_epochs, task)
    blueprint_index("cnn", args.blueprint)  # a clear error for an unknown name, before any run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    controllers = tuple(name for name in CONTROLLERS if name in args.controllers)
    host = build_task(task).host_config
    if not isinstance(host, CNNHostConfig):
        raise SystemExit(f"the growth benchmark compares CNN host widths; task {task.name!r} has a {host.kind} host")
    static_params = sum(p.numel() for p in build_host(host).parameters())
    runs: list[GrowthRun] = []
    for seed in args.seeds:
        for name in controllers:
            config = controller_env(base, name, seed, host, args.wide_envs)
            run = run_controller(name, config, args.blueprint, static_params, device)
            runs.append(run)
            print(
                f"seed {seed} {name:<9}: test {run.test_accuracy:6.2f} % | val {run.val_curve[-1]:6.2f} % | "
                f"added {run.params_added:7.0f} | germ {run.germinated} foss {run.fossilized} culled {run.culled} "
                f"live {run.live} | longest TRAINING {run.longest_training} | {run.seconds:.0f} s",
                flush=True,
            )
        plot_seed(runs, seed, out / f"growth_seed{seed}.png")
    summary = summarize(runs, controllers, static_params)
    print(format_table(summary, len(args.seeds)))
    record = {
        "command": "python -m esper_func.growth " + " ".join(sys.argv[1:] if argv is None else argv),
        "task": to_dict(task),
        "core": to_dict(base.core),
        "n_envs": args.n_envs,
        "wide_envs": args.wide_envs,
        "seeds": args.seeds,
        "blueprint": args.blueprint,
        "summary": summary,
        "runs": [asdict(run) for run in runs],
    }
    (out / "growth.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
