"""The synthetic task's calibration (`python -m esper_func.tasks`, docs/tasks.md): static
hosts of several widths trained through the core on a task, so that the figures are what
the core gives."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from esper_func.core.config import CNNHostConfig, CoreConfig, HostConfig, TransformerHostConfig
from esper_func.core.host_evaluation import evaluate
from esper_func.core.host_training import train_epoch
from esper_func.core.model import build_model
from esper_func.core.state import init_state
from esper_func.core.step import StepFunctions
from esper_func.data.tasks import Task, TaskConfig, build_task


@dataclass(frozen=True)
class StaticRun:
    """Validation accuracy (percent) of static hosts (every slot DORMANT) after each epoch."""

    host: CNNHostConfig | TransformerHostConfig
    seed: int
    accuracy: torch.Tensor
    """`[epochs, N]`: one column per env (independent initializations, shared batches)."""
    seconds: float
    """Wall time of training and evaluation (task building excluded)."""


def train_static_host(task: Task, host: HostConfig, epochs: int, n_envs: int, seed: int) -> StaticRun:
    """Train `n_envs` fresh hosts on `task` for `epochs` env steps with the core, no seeds.

    Uses `host_training.train_epoch` and `host_evaluation.evaluate` (eager; `OptimConfig` defaults,
    the learning-rate schedule spanning `epochs`), so the figures are what the core gives.
    Initialization draws from `seed`, batch sampling from `seed + 1`: two hosts run with
    the same seed see the same batches.
    """
    start = time.perf_counter()
    core = CoreConfig(host=host, compile=False)
    core = replace(core, lifecycle=replace(core.lifecycle, max_epochs=epochs))
    steps = StepFunctions(build_model(core, task.device))
    state = init_state(steps.model, n_envs, torch.Generator(task.device).manual_seed(seed))
    sampler = torch.Generator(task.device).manual_seed(seed + 1)
    accuracy = []
    for _ in range(epochs):
        batches = task.sample_batches(sampler)
        state, _ = train_epoch(steps.model, state, batches.train_x, batches.train_y, steps.train)
        metrics = evaluate(steps.model, state, batches.val_x, batches.val_y, steps.eval)
        accuracy.append(metrics["val_accuracy"])
    return StaticRun(host=host, seed=seed, accuracy=torch.stack(accuracy).cpu(), seconds=time.perf_counter() - start)


def calibrate(
    config: TaskConfig, widths: tuple[int, ...], epochs: int, n_envs: int, seeds: tuple[int, ...], device: torch.device
) -> list[dict[str, Any]]:
    """Final validation accuracy of static CNN hosts of each base width, per task seed.

    For every seed the task is generated from that seed and every width (the task's own
    host with `base_channels` set) trains on the same batches (a paired comparison); the
    figure is the mean over the `n_envs` envs.
    """
    rows = []
    for seed in seeds:
        task = build_task(replace(config, seed=seed), device)
        for width in widths:
            assert isinstance(task.host_config, CNNHostConfig)
            host = replace(task.host_config, base_channels=width)
            run = train_static_host(task, host, epochs, n_envs, seed)
            rows.append(
                {
                    "seed": seed,
                    "base_channels": width,
                    "final_accuracy": run.accuracy[-1].mean().item(),
                    "final_accuracy_per_env": run.accuracy[-1].tolist(),
                    "curve": run.accuracy.mean(1).tolist(),
                    "seconds": run.seconds,
                }
            )
            print(
                f"seed {seed} base_channels {width:3d}: final val accuracy {rows[-1]['final_accuracy']:5.1f} % "
                f"(envs {[round(a, 1) for a in rows[-1]['final_accuracy_per_env']]}), {run.seconds:.0f} s",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m esper_func.tasks`: measure the synthetic task's calibration (docs/tasks.md)."""
    parser = argparse.ArgumentParser(prog="python -m esper_func.tasks", description=main.__doc__)
    parser.add_argument("--task", default="synthetic", choices=["synthetic", "cifar10"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--envs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32], help="CNN base_channels to compare")
    parser.add_argument("--train-iters", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 on a busy 2-core CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {"data_dir": args.data_dir} if args.data_dir else {}
    if args.train_iters is not None:
        overrides["train_iters"] = args.train_iters
    config = TaskConfig.preset(args.task, **overrides)
    rows = calibrate(config, tuple(args.widths), args.epochs, args.envs, tuple(args.seeds), torch.device(args.device))
    for width in args.widths:
        finals = [row["final_accuracy"] for row in rows if row["base_channels"] == width]
        mean = sum(finals) / len(finals)
        print(f"base_channels {width:3d}: mean final val accuracy {mean:5.1f} % over seeds {args.seeds}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
