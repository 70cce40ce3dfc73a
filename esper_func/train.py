"""`python -m esper_func.train`: run a controller on N morphogenetic environments.

Subcommands `heuristic` (the default until the PPO controller lands), `static` and
`random` play whole episodes on the embedded default task (no download), print a summary
per episode and write a run directory: `config.json` (resolved configuration),
`metrics.jsonl` (every env step) and `lifecycle.jsonl` (every seed stage change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.envs.utils import step_mdp
from tqdm import tqdm

from envs import MorphogeneticEnv, make_env
from esper_func.config import ConfigError, to_dict
from esper_func.telemetry import JsonlWriter, RunDirError, create_run_dir, lifecycle_events, step_record
from esper_func.tasks import TaskDataError
from policies import HeuristicConfig, HeuristicPolicy, RandomPolicy, StaticPolicy

CONTROLLERS = ("heuristic", "static", "random")


@dataclass(frozen=True)
class EpisodeSummary:
    episode: int
    controller: str
    final_accuracy: float
    """Mean over envs of the last epoch's validation accuracy, percent."""
    germinated: int
    fossilized: int
    culled: int
    param_growth: float
    """Mean over envs of live seed parameters / host parameters at the end."""
    env_steps_per_s: float

    def line(self) -> str:
        return (
            f"episode {self.episode} [{self.controller}] final acc {self.final_accuracy:.2f}% | "
            f"germinated {self.germinated} fossilized {self.fossilized} culled {self.culled} | "
            f"param growth {100 * self.param_growth:.1f}% | {self.env_steps_per_s:.2f} env-steps/s"
        )


def build_controller(name: str, env: MorphogeneticEnv, seed: int) -> TensorDictModuleBase:
    if name == "heuristic":
        config = HeuristicConfig(germinate_by_epoch=max(HeuristicConfig.min_epoch_to_germinate, int(0.4 * env.max_epochs)))
        return HeuristicPolicy(env.model.topology, env.config.n_envs, config, device=env.device)
    if name == "random":
        return RandomPolicy(torch.Generator(device=env.device).manual_seed(seed))
    return StaticPolicy()


def run_episode(
    env: MorphogeneticEnv,
    controller: TensorDictModuleBase,
    name: str,
    episode: int,
    metrics_log: JsonlWriter,
    lifecycle_log: JsonlWriter,
    progress: bool,
) -> EpisodeSummary:
    """Play one episode in every env; log each step and each stage change."""
    counts = {"GERMINATED": 0, "FOSSILIZED": 0, "CULLED": 0}
    observation: TensorDictBase = env.reset()
    start = time.perf_counter()
    steps = tqdm(range(env.max_epochs), desc=f"{name} episode {episode}", disable=not progress, leave=False)
    for _ in steps:
        step = env.step(controller(observation))
        metrics_log.write(step_record(step, episode))
        for event in lifecycle_events(observation, step, env.model.blueprint_names, episode):
            lifecycle_log.write(event.record())
            counts["GERMINATED"] += event.from_stage == "DORMANT"
            counts["FOSSILIZED"] += event.to_stage == "FOSSILIZED"
            # A probation cull is seen as -> CULLED; a CULL action as -> EMBARGOED (same tick).
            counts["CULLED"] += event.to_stage == "CULLED" or (event.to_stage == "EMBARGOED" and event.from_stage != "CULLED")
        steps.set_postfix(acc=f"{step['next', 'metrics', 'val_accuracy'].mean().item():.1f}")
        observation = step_mdp(step)
    elapsed = time.perf_counter() - start
    final = observation["metrics"]
    return EpisodeSummary(
        episode=episode,
        controller=name,
        final_accuracy=final["val_accuracy"].mean().item(),
        germinated=counts["GERMINATED"],
        fossilized=counts["FOSSILIZED"],
        culled=counts["CULLED"],
        param_growth=(final["seed_params"].float() / env.model.host_param_count).mean().item(),
        env_steps_per_s=env.config.n_envs * env.max_epochs / elapsed,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m esper_func.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("controller", nargs="?", default="heuristic", choices=CONTROLLERS)
    parser.add_argument("--task", default="synthetic", help="synthetic (default, embedded), cifar10, tinystories")
    parser.add_argument("--preset", default=None, help="host preset of the task's topology (default: the task's host)")
    parser.add_argument("--data-dir", default=None, help="directory (or file) of a real dataset")
    parser.add_argument("--n-envs", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=1)
    parser.add_argument("--max-epochs", type=int, default=None, help="episode length in host epochs (default 25)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per training iteration (task default)")
    parser.add_argument("--train-iters", type=int, default=None, help="training iterations per epoch (task default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/<time>-<controller>")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA, off for CPU")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.n_envs < 1:
        parser.error(f"--n-envs must be >= 1, got {args.n_envs}")
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        env = make_env(
            task=args.task,
            preset=args.preset,
            n_envs=args.n_envs,
            device=args.device,
            seed=args.seed,
            data_dir=args.data_dir,
            compile=args.compile,
            max_epochs=args.max_epochs,
            batch_size=args.batch_size,
            train_iters=args.train_iters,
        )
        run_dir = create_run_dir(args.run_dir or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.controller}")
    except (ConfigError, TaskDataError, FileNotFoundError, RunDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    controller = build_controller(args.controller, env, args.seed)
    resolved = {"controller": args.controller, "env": to_dict(env.config), "device": str(env.device)}
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    print(f"run directory: {run_dir}")
    summaries = []
    with JsonlWriter(run_dir / "metrics.jsonl") as metrics_log, JsonlWriter(run_dir / "lifecycle.jsonl") as lifecycle_log:
        for episode in range(args.episodes):
            summary = run_episode(env, controller, args.controller, episode, metrics_log, lifecycle_log, not args.no_progress)
            summaries.append(summary)
            print(summary.line())
    (run_dir / "summary.json").write_text(json.dumps([asdict(s) for s in summaries], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
