"""`python -m esper_func.train`: learn a controller with PPO, or run a rule-based one.

`python -m esper_func.train` (no arguments) trains PPO on the embedded synthetic task with
the `default` preset (about 10 minutes on 2 CPU cores) and ends with a table of the trained
policy against static and heuristic control on fresh envs. Subcommands: `ppo` (default),
`heuristic`, `static`, `random`. Every run writes a run directory: `config.json` (the
resolved TrainingConfig), `metrics.jsonl` (every env step), `lifecycle.jsonl` (every
seed stage change), and for PPO `updates.jsonl`, `logger/` (a TorchRL logger, `--logger`),
`checkpoints/`, `comparison.json` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType

import torch

from envs.morphogenetic import MorphogeneticEnv, fit_context
from envs.sharded import ShardedEnv, build_env
from esper_func.core.config import ConfigError
from esper_func.core.reward_config import RewardConfig
from esper_func.core.stages import SLOT_NAMES
from esper_func.data.errors import TaskDataError
from esper_func.data.tasks import TaskConfig
from esper_func.rl.checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint
from esper_func.rl.distributed import DistributedError, engine_left_running, exit_now, require_launcher_packages
from esper_func.rl.episodes import play_episode
from esper_func.rl.evaluate_cli import (
    baseline_controller,
    compare_over_seeds,
    evaluation_seeds,
    format_seeds_table,
    mean_curves,
    next_free,
    seeds_table,
    summary_table,
)
from esper_func.rl.hooks import CheckpointHook, EarlyStopping, UpdateLogHook
from esper_func.rl.loggers import require_logger_packages
from esper_func.rl.plots import plot_accuracy, plot_lifecycle, plot_returns
from esper_func.rl.run_config import (
    PRESETS,
    TrainingConfig,
    load_training_config,
    read_training_config,
    write_training_config,
)
from esper_func.rl.run_sections import COLLECTORS, LAUNCHERS, LOGGERS, TELEMETRY_LEVELS
from esper_func.rl.telemetry import JsonlWriter, RunDirError, create_run_dir
from esper_func.rl.trainer import PPOTrainer, TrainerState, build_trainer_env

CONTROLLERS = ("ppo", "heuristic", "static", "random")
COLLECTOR_FLAGS = {
    "kind": "collector",
    "workers": "workers",
    "launcher": "launcher",
    "master_addr": "master_addr",
    "port": "port",
    "connect_timeout_s": "connect_timeout",
}
"""`CollectorConfig` field -> CLI flag; a resumed run may change them (the batches stay the same)."""
OVERRIDE_FLAGS = (
    "task",
    "data_dir",
    "host",
    "n_envs",
    "max_epochs",
    "batch_size",
    "train_iters",
    "device",
    "devices",
    "compile",
    "compile_mode",
    "vmap_chunk_size",
    "amp",
    "seed",
    "frozen_policy",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m esper_func.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("controller", nargs="?", default="ppo", choices=CONTROLLERS)
    parser.add_argument("--preset", default=None, help=f"training preset: {', '.join(PRESETS)} (default: default)")
    parser.add_argument(
        "--config-json", type=Path, default=None, help="a TrainingConfig JSON file (replaces the preset)"
    )
    parser.add_argument("--task", default=None, help="synthetic (embedded), cifar10, tinystories")
    parser.add_argument("--data-dir", default=None, help="directory (or file) of a real dataset")
    parser.add_argument(
        "--host",
        default=None,
        help="host preset of the task's topology (default: the task's host); text windows fit its context",
    )
    parser.add_argument("--n-envs", type=int, default=None)
    parser.add_argument(
        "--episodes",
        type=int,
        default=None,
        help="episode batches (PPO updates; default: the preset's), or episodes of a rule-based controller (default 1)",
    )
    parser.add_argument("--max-epochs", type=int, default=None, help="episode length in host epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per training iteration")
    parser.add_argument("--train-iters", type=int, default=None, help="training iterations per epoch")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--devices", nargs="+", default=None, help="devices to shard the envs over")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the env steps"
    )
    parser.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead"),
        default=None,
        help="reduce-overhead: also capture CUDA graphs (needs --compile)",
    )
    parser.add_argument(
        "--vmap-chunk-size",
        type=int,
        default=None,
        help="envs per vmapped slice of a train iteration (default: all at once)",
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast of the host forward (the state stays fp32)",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/<time>-<controller>-<task>")
    parser.add_argument(
        "--resume", type=Path, default=None, help="continue a PPO run from RUN_DIR (or a checkpoint file)"
    )
    parser.add_argument("--telemetry-level", choices=TELEMETRY_LEVELS, default=None)
    parser.add_argument(
        "--logger", choices=LOGGERS, default=None, help="TorchRL logger of a PPO run (default: the preset's, csv)"
    )
    parser.add_argument(
        "--collector",
        choices=COLLECTORS,
        default=None,
        help="where PPO's rollouts run: local (this process), multiprocess (worker processes here; the default and "
             "learn presets' choice) or distributed",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="multiprocess and distributed: worker processes, one env shard each (distributed: n_envs must be a "
             "multiple)",
    )
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default=None,
        help="distributed: mp (on this machine), submitit (SLURM), delayed (started by hand)",
    )
    parser.add_argument(
        "--master-addr",
        default=None,
        help="distributed: this trainer's address as the workers reach it (default 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="distributed: rendezvous port; ports P..P+3 are used (default: a free one, mp only)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=None,
        help="distributed: seconds to wait for every worker to connect (default 120)",
    )
    parser.add_argument(
        "--early-stop", type=int, default=0, help="stop PPO after this many updates without a better return (0: off)"
    )
    parser.add_argument(
        "--frozen-policy",
        action="store_true",
        default=None,
        help="PPO without updates: the untrained policy plays the episodes a learning run with this seed plays (the "
        "reference of python -m esper_func.curves --reference)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("n_envs", "episodes", "max_epochs", "batch_size", "train_iters", "vmap_chunk_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.preset is not None and args.config_json is not None:
        parser.error("--preset and --config-json both choose the whole config; pass one of them")
    if args.resume is not None:
        given = [f"--{name.replace('_', '-')}" for name in OVERRIDE_FLAGS if getattr(args, name) is not None]
        if given or args.preset is not None or args.config_json is not None:
            parser.error(
                f"--resume continues the run with its saved config; drop {given or ['--preset/--config-json']} (only "
                "--episodes may grow)"
            )
        if args.controller != "ppo":
            parser.error("--resume applies to PPO runs only")
    return args


def resolve_config(args: argparse.Namespace, base: TrainingConfig | None = None) -> TrainingConfig:
    """Preset (or JSON file), then each given flag overrides its field; validated on construction."""
    if base is None:
        base = (
            read_training_config(args.config_json)
            if args.config_json is not None
            else TrainingConfig.preset(args.preset or "default")
        )
    env = base.env
    task_overrides = {
        key: getattr(args, key) for key in ("data_dir", "batch_size", "train_iters") if getattr(args, key) is not None
    }
    if args.task is not None:
        task = TaskConfig.preset(args.task, **task_overrides)
        env = replace(env, task=task, rewards=RewardConfig.for_task(args.task, gamma=base.ppo.gamma), host_preset=None)
    elif task_overrides:
        env = replace(env, task=replace(env.task, **task_overrides))
    if args.host is not None:
        env = replace(env, task=fit_context(env.task, args.host), host_preset=args.host)
    if args.max_epochs is not None:
        env = replace(env, core=replace(env.core, lifecycle=replace(env.core.lifecycle, max_epochs=args.max_epochs)))
    core_overrides = {
        key: getattr(args, key)
        for key in ("compile", "compile_mode", "vmap_chunk_size", "amp")
        if getattr(args, key) is not None
    }
    if core_overrides:
        env = replace(env, core=replace(env.core, **core_overrides))
    if args.n_envs is not None:
        env = replace(env, n_envs=args.n_envs)
    if args.seed is not None:
        env = replace(env, seed=args.seed)
    fields: dict[str, object] = {"env": env, "controller": args.controller}
    if args.episodes is not None:
        fields["episodes"] = args.episodes
    elif args.controller != "ppo" and base.controller == "ppo":
        fields["episodes"] = 1  # a preset's episode count is PPO's budget; a rule-based run plays one
    if args.frozen_policy:
        fields["frozen_policy"] = True
    if args.device is not None:
        fields["device"] = args.device
    if args.devices is not None:
        fields["devices"] = tuple(args.devices)
        fields.setdefault("device", args.devices[0])
    telemetry = base.telemetry
    if args.telemetry_level is not None:
        telemetry = replace(telemetry, level=args.telemetry_level)
    if args.logger is not None:
        telemetry = replace(telemetry, logger=args.logger)
    if args.no_progress:
        telemetry = replace(telemetry, progress_bar=False)
    collector_overrides = {
        key: getattr(args, flag) for key, flag in COLLECTOR_FLAGS.items() if getattr(args, flag) is not None
    }
    collector = replace(base.collector, **collector_overrides)
    placed = args.devices is not None or (args.device is not None and torch.device(args.device).type != "cpu")
    if placed and args.collector is None and collector.kind == "multiprocess":
        collector = replace(collector, kind="local")  # the preset's CPU worker processes give way to the chosen devices
    return replace(base, **fields, telemetry=telemetry, collector=collector)


def run_baseline(config: TrainingConfig, env: MorphogeneticEnv | ShardedEnv, run_dir: Path) -> list[dict[str, object]]:
    """Play `config.episodes` episodes with a rule-based controller."""
    controller = baseline_controller(config.controller, env, config.env.seed)
    records = []
    with (
        JsonlWriter(run_dir / "metrics.jsonl") as metrics_log,
        JsonlWriter(run_dir / "lifecycle.jsonl") as lifecycle_log,
    ):
        for episode in range(config.episodes):
            result = play_episode(
                env, controller, config.controller, episode, env.model.blueprint_names, env.model.host_param_count,
                metrics_log, lifecycle_log, config.telemetry.progress_bar,
            )
            print(result.line())
            records.append(result.record())
    return records


class GracefulStop:
    """First SIGINT/SIGTERM: finish the current batch, checkpoint, flush and stop; a second aborts."""

    def __init__(self, state: TrainerState) -> None:
        self.state = state
        self.received: int | None = None

    def __enter__(self) -> GracefulStop:
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        self.state.stop = True
        print(
            f"\n{signal.Signals(signum).name}: finishing this batch, then checkpointing (signal again to abort)",
            file=sys.stderr,
        )

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run_ppo(
    config: TrainingConfig,
    env: MorphogeneticEnv | ShardedEnv,
    run_dir: Path,
    resume: tuple[Path, dict[str, object]] | None,
    early_stop: int,
) -> int:
    """Train, checkpoint, compare against static and heuristic control, plot; the exit code."""
    trainer = PPOTrainer(config, run_dir, env=env)
    if resume is not None:
        checkpoint_path, checkpoint = resume
        try:
            trainer.load_weights(checkpoint, source=f"checkpoint {checkpoint_path}")
        except CheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    checkpoints = CheckpointHook(trainer.state_dict, config.checkpoint_every)
    update_log = UpdateLogHook(run_dir / "updates.jsonl")
    trainer.register_hook("after_batch", update_log)
    trainer.register_hook("after_batch", checkpoints)
    if early_stop > 0:
        trainer.register_hook("after_batch", EarlyStopping(early_stop))
    trainer.register_hook("end_of_run", checkpoints.final)
    trainer.register_hook("end_of_run", update_log.close)
    with GracefulStop(trainer.state) as stop:
        try:
            state = trainer.train()
        except DistributedError as error:
            update_log.close(trainer.state)
            saved = trainer.state.checkpoint_path
            print(f"error: {error}", file=sys.stderr)
            print(
                f"the last checkpoint is {saved}; continue with: python -m esper_func.train --resume {run_dir}"
                if saved is not None else "no update finished, so no checkpoint was written",
                file=sys.stderr,
            )
            return 1
    if config.telemetry.plots and state.history:
        plot_returns(state.history, run_dir / "return_per_update.png")
    if stop.received is not None:
        print(
            f"stopped by {signal.Signals(stop.received).name} after update {state.update}; checkpoint "
            f"{state.checkpoint_path}; "
            f"continue with: python -m esper_func.train --resume {run_dir}",
            file=sys.stderr,
        )
        return 128 + stop.received
    if config.compare_episodes > 0:
        seeds = evaluation_seeds(config)
        print(f"comparing static, heuristic and the trained policy on fresh envs (seeds {list(seeds)}) ...")
        by_seed = compare_over_seeds(
            config, trainer.nets, config.compare_episodes, seeds, progress=config.telemetry.progress_bar
        )
        rows = seeds_table(by_seed, trainer.base_env.model.host_param_count)
        state.evaluation = {
            "seeds": list(seeds),
            "table": rows,
            "per_seed": {seed: summary_table(results) for seed, results in by_seed.items()},
        }
        out = run_dir / "comparison.json"
        out = next_free(run_dir, "comparison", ".json") if out.exists() else out  # a resumed run keeps the first
        out.write_text(json.dumps(state.evaluation, indent=2) + "\n")
        print(format_seeds_table(rows))
        if config.telemetry.plots:
            first = by_seed[seeds[0]]
            plot_accuracy(mean_curves(first), run_dir / "accuracy_by_controller.png")
            plot_lifecycle(
                first["ppo"][0].stages, SLOT_NAMES[: trainer.base_env.model.n_slots], run_dir / "lifecycle_timeline.png"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.resume is not None:
            checkpoint_path = resolve_checkpoint(args.resume)
            checkpoint = load_checkpoint(checkpoint_path)
            config = resolve_config(args, load_training_config(checkpoint["config"]))
            run_dir = checkpoint_path.parent.parent
        else:
            checkpoint = None
            config = resolve_config(args)
        if config.controller == "ppo":
            require_logger_packages(config.telemetry)
            require_launcher_packages(config.collector)
        # Data and host are checked before anything is written.
        env = (
            build_trainer_env(config)
            if config.controller == "ppo"
            else build_env(config.env, config.device, config.devices)
        )
        if checkpoint is None:
            run_dir = create_run_dir(
                args.run_dir or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.run_name}"
            )
            write_training_config(config, run_dir / "config.json")
    except (ConfigError, TaskDataError, FileNotFoundError, RunDirError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}")
    if config.controller == "ppo":
        resume = None if checkpoint is None else (checkpoint_path, checkpoint)
        return run_ppo(config, env, run_dir, resume, args.early_stop)
    records = run_baseline(config, env, run_dir)
    (run_dir / "summary.json").write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    status = main()
    if engine_left_running():  # a lost worker's run: see exit_now
        exit_now(status)
    raise SystemExit(status)
