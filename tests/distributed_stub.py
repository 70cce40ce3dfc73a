"""A stub env and policy for the distributed tests: cheap to step, and the policy's action
is read straight off a buffer, so a batch shows which weights the worker used."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

ENVS = 2
STEPS = 4
ACTIONS = 4


class StubEnv(EnvBase):
    """`ENVS` envs whose observation is the step count; done after `STEPS` steps."""

    def __init__(self, step_seconds: float) -> None:
        super().__init__(batch_size=torch.Size([ENVS]))
        self.step_seconds = step_seconds
        self.observation_spec = Composite(observation=Unbounded((ENVS, 3)), shape=(ENVS,))
        self.action_spec = Categorical(ACTIONS, shape=(ENVS,))
        self.reward_spec = Unbounded((ENVS, 1))
        self.full_done_spec = Composite(
            {key: Categorical(2, (ENVS, 1), dtype=torch.bool) for key in ("done", "terminated", "truncated")},
            shape=(ENVS,),
        )
        self.count = torch.zeros(ENVS, dtype=torch.long)

    def _observation(self) -> TensorDict:
        done = (self.count >= STEPS).unsqueeze(-1)
        return TensorDict(
            observation=self.count.float().unsqueeze(-1).expand(ENVS, 3).clone(),
            done=done,
            terminated=done.clone(),
            truncated=torch.zeros_like(done),
            batch_size=[ENVS],
        )

    def _reset(self, tensordict: TensorDictBase | None, **kwargs: object) -> TensorDictBase:
        self.count.zero_()
        return self._observation()

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        time.sleep(self.step_seconds)
        self.count += 1
        out = self._observation()
        out["reward"] = torch.zeros(ENVS, 1)
        return out

    def _set_seed(self, seed: int | None) -> None:
        pass


@dataclass(frozen=True)
class StubEnvFactory:
    step_seconds: float = 0.0

    def __call__(self) -> StubEnv:
        return StubEnv(self.step_seconds)


class BufferPolicy(nn.Module):
    """Action = argmax of a buffer: the weights a worker holds, read off its actions."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("preference", torch.zeros(ACTIONS))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return (observation[..., :1] * 0 + self.preference).argmax(-1)


def make_policy(preferred: int) -> TensorDictModule:
    policy = TensorDictModule(BufferPolicy(), in_keys=["observation"], out_keys=["action"])
    prefer(policy, preferred)
    return policy


def prefer(policy: TensorDictModule, action: int) -> None:
    """Change the policy's weights in place, as an optimizer step does."""
    preference = policy.module.preference
    preference.zero_()
    preference[action] = 1.0
