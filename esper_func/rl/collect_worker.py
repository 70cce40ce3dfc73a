"""`python -m esper_func.collect_worker --rank K --world-size W+1 --master-addr HOST --port P`

One rollout worker of a distributed PPO run (`--collector distributed`): it connects to
the trainer (rank 0) at HOST:P, receives its env shard and the policy through TorchRL's
delayed launch, then collects a batch each time the trainer asks, with the weights the
trainer sends before each. Start W of them, ranks 1 to W, by hand, with torchrun
(`--rank $RANK`), a Kubernetes job or SLURM; `--launcher mp` starts them on the trainer's
machine itself. Exit status: 0 after the trainer shut the run down, 1 when the worker
failed (its traceback is printed; a trainer gone during the rendezvous ends here too), 3
when the trainer went away while the worker served. docs/distributed.md has a two-machine walk-through.
"""

from __future__ import annotations

import argparse
import os
import traceback

import torch

from esper_func.rl.distributed import ENGINE_ERRORS, exit_now, serve


def resolve_rank(parser: argparse.ArgumentParser, rank: str) -> int:
    if rank == "env":
        launcher_rank = os.environ.get("RANK")
        if launcher_rank is None or not launcher_rank.isdigit():
            parser.error(
                f"--rank env reads the environment variable RANK, which is {launcher_rank!r} here; pass --rank K"
            )
        return int(launcher_rank) + 1
    if not rank.isdigit():
        parser.error(f"--rank must be an integer or 'env', got {rank!r}")
    return int(rank)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esper_func.collect_worker", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "--rank",
        required=True,
        help="this worker's rank, 1 to world size - 1 (the trainer is 0); 'env': $RANK + 1, for launchers that number "
             "workers from 0 (torchrun, Kubernetes)",
    )
    parser.add_argument("--world-size", type=int, required=True, help="workers + 1")
    parser.add_argument("--master-addr", required=True, help="the trainer's address as this machine reaches it")
    parser.add_argument(
        "--port", type=int, required=True, help="the trainer's collector.port (ports P to P+3 are used)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--connect-timeout", type=float, default=120.0, help="seconds to wait for the trainer")
    args = parser.parse_args(argv)
    args.rank = resolve_rank(parser, args.rank)
    if args.world_size < 2:
        parser.error(f"--world-size is workers + 1, at least 2; got {args.world_size}")
    if not 1 <= args.rank < args.world_size:
        parser.error(f"--rank must be in 1..{args.world_size - 1} (the trainer is rank 0); got {args.rank}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        serve(args.rank, args.world_size, args.master_addr, args.port, args.connect_timeout)
    except ENGINE_ERRORS:  # what stopped the worker, then status 1
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    exit_now(main())
