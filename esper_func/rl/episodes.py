"""Play whole episodes with any controller and summarize them (outside the hot path).

Used by the baseline subcommands of `python -m esper_func.train`, by the comparison at the
end of a PPO run and by `python -m esper_func.evaluate`. A controller is any TensorDict
module that writes `("action", head)`; the env may be a `TransformedEnv` (the PPO policy
reads its normalized observation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.envs import EnvBase
from torchrl.envs.utils import step_mdp
from tqdm import tqdm

from esper_func.rl.telemetry import JsonlWriter, lifecycle_events, rollback_events, step_record


@dataclass
class LifecycleCounts:
    germinated: int = 0
    fossilized: int = 0
    culled: int = 0

    def add(self, from_stage: str, to_stage: str) -> None:
        self.germinated += from_stage == "DORMANT"
        self.fossilized += to_stage == "FOSSILIZED"
        # A probation cull is seen as -> CULLED; a CULL action as -> EMBARGOED (same tick).
        self.culled += to_stage == "CULLED" or (to_stage == "EMBARGOED" and from_stage != "CULLED")


@dataclass
class EpisodeResult:
    """One episode of every env under one controller."""

    episode: int
    controller: str
    final_accuracy: float
    """Mean over envs of the last epoch's validation accuracy, percent."""
    param_growth: float
    """Mean over envs of live seed parameters / host parameters at the end."""
    episode_return: float
    """Mean over envs of the summed (unscaled) reward."""
    counts: LifecycleCounts
    illegal_actions: int
    rollbacks: int
    """Governor rollbacks, summed over envs."""
    env_steps_per_s: float
    accuracy_curve: list[float] = field(default_factory=list)
    """Mean validation accuracy after each epoch."""
    param_growth_curve: list[float] = field(default_factory=list)
    """Mean live seed parameters / host parameters after each epoch."""
    reward_components: dict[str, float] = field(default_factory=dict)
    """Each reward component summed over the episode, mean over envs."""
    stages: list[list[list[int]]] = field(default_factory=list)
    """Seed stage per epoch, env and slot `[T][N][S]` (after each epoch)."""
    test_accuracy: float | None = None
    """Mean over envs of the final networks' accuracy on the held-out test split (percent),
    where the caller measured it (`MorphogeneticEnv.test_accuracy`); None otherwise."""

    def line(self) -> str:
        return (
            f"episode {self.episode} [{self.controller}] final acc {self.final_accuracy:.2f}% | return "
            f"{self.episode_return:.2f} | "
            f"germinated {self.counts.germinated} fossilized {self.counts.fossilized} culled {self.counts.culled} | "
            f"param growth {100 * self.param_growth:.1f}% | rollbacks {self.rollbacks} | {self.env_steps_per_s:.2f} "
            "env-steps/s"
        )

    def record(self) -> dict[str, object]:
        return {
            "episode": self.episode,
            "controller": self.controller,
            "final_accuracy": self.final_accuracy,
            "test_accuracy": self.test_accuracy,
            "param_growth": self.param_growth,
            "episode_return": self.episode_return,
            "germinated": self.counts.germinated,
            "fossilized": self.counts.fossilized,
            "culled": self.counts.culled,
            "illegal_actions": self.illegal_actions,
            "rollbacks": self.rollbacks,
            "env_steps_per_s": self.env_steps_per_s,
            "accuracy_curve": self.accuracy_curve,
            "param_growth_curve": self.param_growth_curve,
            "reward_components": self.reward_components,
        }


def play_episode(
    env: EnvBase,
    controller: TensorDictModuleBase,
    name: str,
    episode: int,
    blueprint_names: tuple[str, ...],
    host_params: int,
    metrics_log: JsonlWriter | None = None,
    lifecycle_log: JsonlWriter | None = None,
    progress: bool = False,
) -> EpisodeResult:
    """Reset, then step every env to the end of its episode; log each step and stage change.

    Per step it reads back only what it must (the stage changes for the lifecycle log and
    the done flag; the mean accuracy for the progress bar when shown); the curves, returns
    and reward components stay on the device and are read once at the end."""
    counts = LifecycleCounts()
    observation: TensorDictBase = env.reset()
    start = time.perf_counter()
    n_envs = observation.batch_size[0]
    trace: list[TensorDictBase] = []  # per step: reward [N], components, accuracy, seed params, stages
    steps = tqdm(desc=f"{name} episode {episode}", disable=not progress, leave=False)
    with torch.no_grad():
        while True:
            step = env.step(controller(observation))
            nxt = step["next"]
            if metrics_log is not None:
                metrics_log.write(step_record(step, episode))
            for event in lifecycle_events(observation, step, blueprint_names, episode):
                if lifecycle_log is not None:
                    lifecycle_log.write({"controller": name, **event.record()})
                counts.add(event.from_stage, event.to_stage)
            if lifecycle_log is not None:
                for record in rollback_events(step, episode):
                    lifecycle_log.write({"controller": name, **record})
            trace.append(
                nxt.select(
                    "reward_components", ("metrics", "val_accuracy"), ("metrics", "seed_params"), ("seeds", "stage")
                ).set("reward", nxt["reward"].squeeze(-1))
            )
            steps.update(1)
            if progress:
                steps.set_postfix(acc=f"{nxt['metrics', 'val_accuracy'].mean().item():.1f}")
            if bool(nxt["done"].all()):
                break
            observation = step_mdp(step)
    steps.close()
    elapsed = time.perf_counter() - start
    history = torch.stack(trace).cpu()  # [T, N]: the one read-back of the episode's figures
    final = nxt["metrics"]
    growth = history["metrics", "seed_params"].float() / host_params
    return EpisodeResult(
        episode=episode,
        controller=name,
        final_accuracy=history["metrics", "val_accuracy"][-1].mean().item(),
        param_growth=growth[-1].mean().item(),
        episode_return=history["reward"].sum(0).mean().item(),
        counts=counts,
        illegal_actions=int(final["illegal_actions"].sum()),
        rollbacks=int(final["rollbacks"].sum()),
        env_steps_per_s=n_envs * len(trace) / elapsed,
        accuracy_curve=history["metrics", "val_accuracy"].mean(-1).tolist(),
        param_growth_curve=growth.mean(-1).tolist(),
        reward_components={key: value.sum(0).mean().item() for key, value in history["reward_components"].items()},
        stages=history["seeds", "stage"].tolist(),
    )
