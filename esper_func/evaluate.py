"""`python -m esper_func.evaluate RUN_DIR`: static, heuristic and the trained policy on the same fresh envs.

Every controller plays the same number of episodes on envs built from the run's config
with the same evaluation seed (fresh hosts, batches and bank draws identical across
controllers, which differ only by their actions). Prints a table and saves it as
`RUN_DIR/evaluation-<k>.json` plus `evaluation-<k>.png` (accuracy per epoch), never
overwriting an earlier evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tensordict.nn import InteractionType, TensorDictModuleBase, set_interaction_type

from envs.morphogenetic import MorphogeneticEnv
from envs.sharded import ShardedEnv, build_env
from esper_func.checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint
from esper_func.config import ConfigError
from esper_func.episodes import EpisodeResult, play_episode
from esper_func.plots import plot_accuracy
from esper_func.ppo import Normalizers, norm_transforms, policy_env
from esper_func.tasks import TaskDataError
from esper_func.training_config import TrainingConfig, load_training_config
from policies import HeuristicConfig, HeuristicPolicy, RandomPolicy, StaticPolicy
from policies.ppo import ActorCritic, make_actor_critic

EVAL_SEED_OFFSET = 10_000
"""Evaluation envs use `env.seed + EVAL_SEED_OFFSET`: fresh, never seen in training."""


def baseline_controller(name: str, env: MorphogeneticEnv | ShardedEnv, seed: int) -> TensorDictModuleBase:
    if name == "heuristic":
        config = HeuristicConfig(germinate_by_epoch=max(HeuristicConfig.min_epoch_to_germinate, int(0.4 * env.max_epochs)))
        return HeuristicPolicy(env.model.topology, env.config.n_envs, config, device=env.device, blueprint_names=env.model.blueprint_names)
    if name == "random":
        return RandomPolicy(torch.Generator(device=env.device).manual_seed(seed))
    if name == "static":
        return StaticPolicy()
    raise ValueError(f"unknown baseline controller {name!r}; choose static, heuristic or random")


def compare_controllers(
    config: TrainingConfig,
    nets: ActorCritic,
    normalizer_state: dict[str, Any],
    episodes: int,
    seed: int,
    greedy: bool = False,
    progress: bool = False,
    controllers: tuple[str, ...] = ("static", "heuristic", "ppo"),
) -> dict[str, list[EpisodeResult]]:
    """Play each of `controllers` (static, heuristic, random, ppo: the trained policy) on
    envs with the same seed."""
    env_config = replace(config.env, seed=seed)
    results: dict[str, list[EpisodeResult]] = {}
    for name in controllers:
        base = build_env(env_config, config.device, config.devices)
        if name == "ppo":
            env = policy_env(base, nets)
            normalizers = Normalizers(base.observation_spec["observation"].shape[-1], config.ppo, base.device)
            normalizers.load_state_dict(normalizer_state)
            normalizers.apply(*norm_transforms(env))
            controller: TensorDictModuleBase = nets.actor
        else:
            env = base
            controller = baseline_controller(name, base, seed)
        mode = InteractionType.DETERMINISTIC if greedy else InteractionType.RANDOM
        with set_interaction_type(mode):
            results[name] = [
                play_episode(env, controller, name, episode, base.model.blueprint_names, base.model.host_param_count, progress=progress)
                for episode in range(episodes)
            ]
    return results


def summary_table(results: dict[str, list[EpisodeResult]]) -> list[dict[str, Any]]:
    rows = []
    for name, episodes in results.items():
        count = len(episodes)
        rows.append(
            {
                "controller": name,
                "final_accuracy": sum(e.final_accuracy for e in episodes) / count,
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


def format_table(rows: list[dict[str, Any]]) -> str:
    header = "| controller | final acc (%) | params added (%) | germinated | fossilized | culled | rollbacks | return |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['controller']} | {row['final_accuracy']:.2f} | {row['params_added_pct']:.1f} | {row['germinated']:.1f} | "
            f"{row['fossilized']:.1f} | {row['culled']:.1f} | {row['rollbacks']:.1f} | {row['return']:.2f} |"
        )
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


def load_policy(checkpoint: dict[str, Any], config: TrainingConfig) -> ActorCritic:
    probe = MorphogeneticEnv(replace(config.env, n_envs=1), "cpu")
    size = probe.observation_spec["observation"].shape[-1]
    nets = make_actor_critic(size, probe.model.n_slots, len(probe.model.blueprint_names), config.policy, config.device)
    nets.actor.load_state_dict(checkpoint["actor"])
    nets.critic.load_state_dict(checkpoint["critic"])
    return nets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esper_func.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a PPO run directory (or a checkpoint .pt file inside one)")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per controller")
    parser.add_argument("--seed", type=int, default=None, help=f"evaluation seed (default: the run's seed + {EVAL_SEED_OFFSET})")
    parser.add_argument("--greedy", action="store_true", help="play the policy's most likely action instead of sampling")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    try:
        path = resolve_checkpoint(args.run_dir)
        checkpoint = load_checkpoint(path)
        config = load_training_config(checkpoint["config"])
        nets = load_policy(checkpoint, config)
        seed = config.env.seed + EVAL_SEED_OFFSET if args.seed is None else args.seed
        results = compare_controllers(config, nets, checkpoint["normalizers"], args.episodes, seed, args.greedy, not args.no_progress)
    except (CheckpointError, ConfigError, TaskDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = summary_table(results)
    print(format_table(rows))
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    out = next_free(run_dir, "evaluation", ".json")
    out.write_text(json.dumps({"checkpoint": str(path), "seed": seed, "greedy": args.greedy, "table": rows}, indent=2) + "\n")
    plot_accuracy(mean_curves(results), out.with_suffix(".png"))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
