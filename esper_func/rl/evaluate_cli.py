"""`python -m esper_func.evaluate RUN_DIR`: static, heuristic and the trained policy on the same fresh envs.

`--untrained` adds the policy the run started from, on the same envs and action noise:
the difference from the trained policy is what training changed, without the episodes'
draw or a `--frozen-policy` run.

Every controller plays the same number of episodes on envs built from the run's config
with each evaluation seed (fresh hosts, batches and bank draws identical across
controllers, which differ only by their actions). The table gives, per controller, the
mean +- std over seeds of the final validation accuracy (which the reward and the
controllers saw), the final accuracy on the held-out test split (which nothing saw),
parameters added and seeds germinated, fossilized and culled. Prints the table and saves
it as `RUN_DIR/evaluation-<k>.json` plus `evaluation-<k>.png` (accuracy per epoch, first
seed), never overwriting an earlier evaluation.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tensordict.nn import InteractionType, TensorDictModuleBase, set_interaction_type

from envs.morphogenetic import MorphogeneticEnv
from envs.sharded import ShardedEnv, build_env
from esper_func.core.config import ConfigError
from esper_func.data.errors import TaskDataError
from esper_func.rl.checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint
from esper_func.rl.episodes import EpisodeResult, play_episode
from esper_func.rl.plots import plot_accuracy
from esper_func.rl.run_config import TrainingConfig, load_training_config
from esper_func.rl.trainer import initial_nets, policy_env
from policies import HeuristicConfig, HeuristicPolicy, RandomPolicy, StaticPolicy
from policies.ppo import ActorCritic

EVAL_SEED_OFFSET = 10_000
"""Evaluation envs use `env.seed + EVAL_SEED_OFFSET`: fresh, never seen in training."""


def baseline_controller(name: str, env: MorphogeneticEnv | ShardedEnv, seed: int) -> TensorDictModuleBase:
    if name == "heuristic":
        config = HeuristicConfig(
            germinate_by_epoch=max(HeuristicConfig.min_epoch_to_germinate, int(0.4 * env.max_epochs))
        )
        return HeuristicPolicy(
            env.model.topology, env.config.n_envs, config, device=env.device, blueprint_names=env.model.blueprint_names
        )
    if name == "random":
        return RandomPolicy(torch.Generator(device=env.device).manual_seed(seed))
    if name == "static":
        return StaticPolicy()
    raise ValueError(f"unknown baseline controller {name!r}; choose static, heuristic or random")


def compare_controllers(
    config: TrainingConfig,
    nets: ActorCritic,
    episodes: int,
    seed: int,
    greedy: bool = False,
    progress: bool = False,
    controllers: tuple[str, ...] = ("static", "heuristic", "ppo"),
    untrained: ActorCritic | None = None,
) -> dict[str, list[EpisodeResult]]:
    """Play each of `controllers` (static, heuristic, random; ppo: the trained policy, its
    observation normalizer included; untrained: the policy the run started from, given
    as `untrained`) on envs with the same seed. The policies also share the envs' action
    noise, so ppo and untrained differ only by their weights."""
    if "untrained" in controllers and untrained is None:
        raise ValueError("the 'untrained' controller needs the run's first networks: pass untrained=initial_nets(...)")
    env_config = replace(config.env, seed=seed)
    policies = {"ppo": nets} if untrained is None else {"ppo": nets, "untrained": untrained}
    results: dict[str, list[EpisodeResult]] = {}
    for name in controllers:
        base = build_env(env_config, config.device, config.devices)
        if name in policies:
            env = policy_env(base, policies[name])
            controller: TensorDictModuleBase = policies[name].actor
        else:
            env = base
            controller = baseline_controller(name, base, seed)
        mode = InteractionType.DETERMINISTIC if greedy else InteractionType.RANDOM
        with set_interaction_type(mode):
            results[name] = []
            for episode in range(episodes):
                result = play_episode(
                    env,
                    controller,
                    name,
                    episode,
                    base.model.blueprint_names,
                    base.model.host_param_count,
                    progress=progress,
                )
                test = base.test_accuracy()
                result.test_accuracy = None if test is None else test.mean().item()
                results[name].append(result)
    return results


def summary_table(results: dict[str, list[EpisodeResult]]) -> list[dict[str, Any]]:
    rows = []
    for name, episodes in results.items():
        count = len(episodes)
        rows.append(
            {
                "controller": name,
                "final_accuracy": sum(e.final_accuracy for e in episodes) / count,
                "test_accuracy": None
                if any(e.test_accuracy is None for e in episodes)
                else sum(e.test_accuracy or 0.0 for e in episodes) / count,
                "params_added_pct": 100 * sum(e.param_growth for e in episodes) / count,
                "fossilized": sum(e.counts.fossilized for e in episodes) / count,
                "culled": sum(e.counts.culled for e in episodes) / count,
                "germinated": sum(e.counts.germinated for e in episodes) / count,
                "rollbacks": sum(e.rollbacks for e in episodes) / count,
                "return": sum(e.episode_return for e in episodes) / count,
                "episodes": count,
            }
        )
    return rows


SEED_METRICS: tuple[str, ...] = (
    "final_accuracy",
    "test_accuracy",
    "params_added",
    "germinated",
    "fossilized",
    "culled",
    "return",
)
"""What the comparison over seeds reports per controller, as mean and std over seeds
(`test_accuracy` where the task has a test split)."""


def evaluation_seeds(config: TrainingConfig) -> tuple[int, ...]:
    """The run's comparison seeds: `compare_seeds`, else its seed + `EVAL_SEED_OFFSET`."""
    return config.compare_seeds or (config.env.seed + EVAL_SEED_OFFSET,)


def host_param_count(config: TrainingConfig) -> int:
    """Parameters of the run's host (the env fits the host to its task)."""
    return MorphogeneticEnv(replace(config.env, n_envs=1), "cpu").model.host_param_count


def compare_over_seeds(
    config: TrainingConfig,
    nets: ActorCritic,
    episodes: int,
    seeds: tuple[int, ...],
    greedy: bool = False,
    progress: bool = False,
    untrained: ActorCritic | None = None,
) -> dict[int, dict[str, list[EpisodeResult]]]:
    """`compare_controllers` on fresh envs of each seed."""
    controllers = ("static", "heuristic", "ppo", *(("untrained",) if untrained is not None else ()))
    return {
        seed: compare_controllers(config, nets, episodes, seed, greedy, progress, controllers, untrained)
        for seed in seeds
    }


def seeds_table(by_seed: dict[int, dict[str, list[EpisodeResult]]], host_params: int) -> list[dict[str, Any]]:
    """Per controller: each metric's mean over a seed's envs and episodes, then mean and
    (sample) std over seeds; `params_added` in parameters."""
    rows = []
    for name in next(iter(by_seed.values())):
        per_seed = []
        for results in by_seed.values():
            row = next(r for r in summary_table({name: results[name]}))
            per_seed.append({**row, "params_added": row["params_added_pct"] * host_params / 100})
        stats: dict[str, Any] = {"controller": name, "seeds": list(by_seed)}
        for metric in SEED_METRICS:
            if any(row[metric] is None for row in per_seed):
                stats[metric] = stats[f"{metric}_std"] = None
                continue
            series = torch.tensor([row[metric] for row in per_seed], dtype=torch.float64)
            stats[metric] = series.mean().item()
            stats[f"{metric}_std"] = series.std().item() if len(series) > 1 else 0.0
        rows.append(stats)
    return rows


def format_seeds_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: mean +- std over seeds of each `SEED_METRICS` column (test accuracy only
    where measured); one seed's values alone."""
    seeds = rows[0]["seeds"]
    with_test = all(row["test_accuracy"] is not None for row in rows)
    columns = [
        "final val acc (%)",
        *(["test acc (%)"] if with_test else []),
        "params added",
        "germinated",
        "fossilized",
        "culled",
        "return",
    ]
    title = f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    lines = [f"| controller ({title}) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]

    def cell(row: dict[str, Any], metric: str, spec: str) -> str:
        value = format(row[metric], spec)
        return f"{value} ± {format(row[f'{metric}_std'], spec)}" if len(seeds) > 1 else value

    for row in rows:
        cells = [
            cell(row, "final_accuracy", ".2f"),
            *([cell(row, "test_accuracy", ".2f")] if with_test else []),
            cell(row, "params_added", ",.0f"),
            *(cell(row, metric, ".1f") for metric in ("germinated", "fossilized", "culled")),
            cell(row, "return", ".2f"),
        ]
        lines.append(f"| {row['controller']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_curves(results: dict[str, list[EpisodeResult]]) -> dict[str, list[float]]:
    curves = {}
    for name, episodes in results.items():
        length = len(episodes[0].accuracy_curve)
        curves[name] = [sum(e.accuracy_curve[t] for e in episodes) / len(episodes) for t in range(length)]
    return curves


def next_free(run_dir: Path, stem: str, suffix: str) -> Path:
    k = 1
    while (run_dir / f"{stem}-{k}{suffix}").exists():
        k += 1
    return run_dir / f"{stem}-{k}{suffix}"


def load_policy(checkpoint: dict[str, Any], config: TrainingConfig) -> tuple[ActorCritic, ActorCritic]:
    """The checkpoint's networks, and the ones its run started from (`trainer.initial_nets`)."""
    probe = MorphogeneticEnv(replace(config.env, n_envs=1), "cpu")
    sizes = (probe.observation_spec["observation"].shape[-1], probe.model.n_slots, len(probe.model.blueprint_names))
    untrained = initial_nets(config, *sizes)
    nets = copy.deepcopy(untrained)
    nets.actor.load_state_dict(checkpoint["actor"])
    nets.critic.load_state_dict(checkpoint["critic"])
    return nets, untrained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esper_func.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a PPO run directory (or a checkpoint .pt file inside one)")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per controller")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="evaluation seeds, each a fresh set of envs; mean +- std over them (default: the run's compare_seeds, "
             f"else its seed + {EVAL_SEED_OFFSET})",
    )
    parser.add_argument(
        "--greedy", action="store_true", help="play the policy's most likely action instead of sampling"
    )
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="also play the policy the run started from, on the same envs and action noise: how far training moved it",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    try:
        path = resolve_checkpoint(args.run_dir)
        checkpoint = load_checkpoint(path)
        config = load_training_config(checkpoint["config"])
        nets, untrained = load_policy(checkpoint, config)
        seeds = tuple(args.seeds) if args.seeds is not None else evaluation_seeds(config)
        by_seed = compare_over_seeds(
            config, nets, args.episodes, seeds, args.greedy, not args.no_progress, untrained if args.untrained else None
        )
    except (CheckpointError, ConfigError, TaskDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = seeds_table(by_seed, host_param_count(config))
    print(format_seeds_table(rows))
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out = next_free(run_dir, "evaluation", ".json")
    record = {"checkpoint": str(path), "seeds": list(seeds), "greedy": args.greedy, "table": rows}
    out.write_text(json.dumps(record, indent=2) + "\n")
    plot_accuracy(mean_curves(by_seed[seeds[0]]), out.with_suffix(".png"))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
