"""Run directories, JSONL logs and lifecycle events, all outside the hot path.

A run directory holds `config.json` (the resolved configuration), `metrics.jsonl` (one
record per env step) and `lifecycle.jsonl` (one record per seed stage change, `"event":
"stage"`, and one per governor rollback, `"event": "rollback"`). Nothing
is ever overwritten: a new run refuses a non-empty directory, and logs are append-only
and flushed after every record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from tensordict import TensorDictBase

from esper_func.core.governor import Panic
from esper_func.core.stages import ACTION_HEADS, Op, Stage

SLOT_NAMES_BY_INDEX = ("early", "mid", "late")


class RunDirError(FileExistsError):
    """The run directory cannot be used as asked; the message says why and what to do."""


def create_run_dir(path: Path) -> Path:
    """Create a fresh run directory; refuse one that already holds files."""
    if path.exists() and any(path.iterdir()):
        raise RunDirError(
            f"run directory {path} already exists and is not empty; choose another --run-dir or remove it"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


class JsonlWriter:
    """Append-only JSON-lines file, flushed after every record so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class LifecycleEvent:
    episode: int
    env: int
    epoch: int
    slot: str
    from_stage: str
    to_stage: str
    blueprint: str
    cause: str
    """`action:<OP>` when the controller's op caused it, `governor:<PANIC>` when a rollback
    culled the seed, else `tick` (automatic)."""

    def record(self) -> dict[str, Any]:
        return {
            "event": "stage",
            "episode": self.episode,
            "env": self.env,
            "epoch": self.epoch,
            "slot": self.slot,
            "from": self.from_stage,
            "to": self.to_stage,
            "blueprint": self.blueprint,
            "cause": self.cause,
        }


def lifecycle_events(
    prev: TensorDictBase, step: TensorDictBase, blueprint_names: tuple[str, ...], episode: int
) -> list[LifecycleEvent]:
    """Stage changes between the observation `prev` and the env's `step` output ("next").

    One read-back of small `[N, S]` tensors; a slot can change twice in one step (e.g. a
    CULL action, then the tick's CULLED -> EMBARGOED), which is reported as one event from
    the old stage to the new one, caused by the governor when it rolled the env back, else
    by the action when an op targeted that slot.
    """
    before = prev["seeds", "stage"].cpu()
    after = step["next", "seeds", "stage"].cpu()
    blueprint = step["next", "seeds", "blueprint"].cpu()
    epoch = step["next", "metrics", "epoch"].cpu()
    op = step["action", "op"].cpu()
    slot = step["action", "slot"].cpu()
    executed = step["next", "metrics", "action_executed"].cpu()
    panic = step["next", "metrics", "panic"].cpu()
    events = []
    for env, s in torch.nonzero(before != after).tolist():
        acted = bool(executed[env]) and int(op[env]) != int(Op.WAIT) and int(slot[env]) == s
        if int(panic[env]) != int(Panic.NONE):
            cause = f"governor:{Panic(int(panic[env])).name}"
        else:
            cause = f"action:{Op(int(op[env])).name}" if acted else "tick"
        events.append(
            LifecycleEvent(
                episode=episode,
                env=env,
                epoch=int(epoch[env]),
                slot=SLOT_NAMES_BY_INDEX[s],
                from_stage=Stage(int(before[env, s])).name,
                to_stage=Stage(int(after[env, s])).name,
                blueprint=blueprint_names[int(blueprint[env, s])],
                cause=cause,
            )
        )
    return events


def rollback_events(step: TensorDictBase, episode: int) -> list[dict[str, Any]]:
    """One `"event": "rollback"` record per env the governor rolled back in `step`."""
    nxt = step["next", "metrics"]
    panic = nxt["panic"].cpu()
    epoch = nxt["epoch"].cpu()
    rollbacks = nxt["rollbacks"].cpu()
    return [
        {
            "event": "rollback",
            "episode": episode,
            "env": env,
            "epoch": int(epoch[env]),
            "cause": f"governor:{Panic(int(panic[env])).name}",
            "rollbacks_this_episode": int(rollbacks[env]),
        }
        for env in torch.nonzero(panic != int(Panic.NONE)).flatten().tolist()
    ]


def step_record(step: TensorDictBase, episode: int) -> dict[str, Any]:
    """Per-step metrics of every env as plain lists (one read-back)."""
    nxt = step["next"]
    record: dict[str, Any] = {"episode": episode, "epoch": int(nxt["metrics", "epoch"][0])}
    for key in ("train_loss", "val_loss", "val_accuracy", "seed_params", "action_executed", "rolled_back"):
        record[key] = nxt["metrics", key].tolist()
    record["reward"] = nxt["reward"].squeeze(-1).tolist()
    record["reward_components"] = {name: value.tolist() for name, value in nxt["reward_components"].items()}
    record["action"] = {head: step["action", head].tolist() for head in ACTION_HEADS}
    return record
