"""The statistics behind PPO's observation normalization and reward scaling.

Observation moments are of raw observations, and the policy reads them from its
`ObservationNormalizer` buffers (so whatever runs the policy normalizes with exactly the
trainer's values); the reward scale is the std of discounted returns, which the trainer
divides the rewards by before GAE. Both are frozen during a rollout and refreshed after
the update.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from esper_func.rl.run_sections import PPOConfig
from policies.ppo import CRITIC_OBSERVATION, ObservationNormalizer

MIN_OBSERVATION_STD = 0.1
"""Floor of the normalizer's std: features live in [-1, 1], so a near-constant feature is
amplified at most 10x instead of saturating."""


class RunningMoments:
    """Mean and variance over everything observed so far (Chan et al. parallel update)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(shape, dtype=torch.float64, device=device)

    def update(self, values: torch.Tensor) -> None:
        values = values.reshape(-1, *self.mean.shape).to(torch.float64)
        n = values.shape[0]
        batch_mean = values.mean(0)
        batch_m2 = ((values - batch_mean) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / self.count.clamp_min(1.0)).sqrt()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["mean"].shape != self.mean.shape or state["m2"].shape != self.mean.shape:
            raise ValueError(
                f"running moments of shape {tuple(state['mean'].shape)} do not fit shape {tuple(self.mean.shape)}"
            )
        self.count, self.mean, self.m2 = (state[key].to(self.mean.device) for key in ("count", "mean", "m2"))


class Normalizers:
    """Statistics behind the policy's `ObservationNormalizer` and the reward scale.

    Observation moments are of raw observations; reward scale is the std of discounted
    returns accumulated per env along the batch (the usual PPO reward scaling). A setting
    that is off (`PPOConfig.normalize_observations`, `PPOConfig.scale_rewards`) gathers
    no statistics and leaves its normalizer the identity (loc 0, scale 1), even when loaded
    with statistics: the policy then reads the raw observation under `"observation_norm"`
    and GAE the raw reward under `reward_scaled`. Keys and checkpoint layout stay the same
    either way.
    """

    def __init__(
        self, observation_size: int, ppo: PPOConfig, device: torch.device, critic_observation_size: int = 0
    ) -> None:
        self.observations = RunningMoments((observation_size,), device)
        self.critic_observations = RunningMoments((critic_observation_size,), device)
        """Of the critic's own columns (`"critic_observation"`); empty when it reads none."""
        self.returns = RunningMoments((), device)
        self.gamma = ppo.gamma
        self.normalize_observations = ppo.normalize_observations
        self.scale_rewards = ppo.scale_rewards

    def update(self, batch: TensorDictBase) -> None:
        if self.normalize_observations:
            self.observations.update(batch["observation"])
            if self.critic_observations.mean.numel() > 0:
                self.critic_observations.update(batch[CRITIC_OBSERVATION])
        if self.scale_rewards:
            self._update_returns(batch["next", "reward"].squeeze(-1))

    def _update_returns(self, rewards: torch.Tensor) -> None:
        """Moments of the per-env discounted returns along a batch's rewards `[N, T]`."""
        running = torch.zeros(rewards.shape[0], dtype=torch.float64, device=rewards.device)
        discounted = []
        for t in range(rewards.shape[1]):
            running = running * self.gamma + rewards[:, t].to(torch.float64)
            discounted.append(running)
        self.returns.update(torch.stack(discounted, 1))

    def apply(self, normalizer: ObservationNormalizer, critic_normalizer: ObservationNormalizer | None = None) -> None:
        """Write the current observation statistics (when enabled) into the policy's
        normalizer, and the critic's own columns' into `critic_normalizer` (call between
        rollouts only)."""
        pairs = [(self.observations, normalizer)]
        if critic_normalizer is not None:
            pairs.append((self.critic_observations, critic_normalizer))
        for moments, target in pairs:
            if self.normalize_observations and moments.count > 0:
                target.loc.copy_(moments.mean.to(target.loc.dtype))
                target.scale.copy_(moments.std.clamp_min(MIN_OBSERVATION_STD).to(target.scale.dtype))

    def reward_scale(self) -> torch.Tensor:
        """The std the rewards are divided by before GAE (1 when off or not yet known)."""
        if self.scale_rewards and self.returns.count > 1:
            return self.returns.std.clamp_min(1e-3).float()
        return torch.ones((), device=self.returns.mean.device)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "observations": self.observations.state_dict(),
            "critic_observations": self.critic_observations.state_dict(),
            "returns": self.returns.state_dict(),
        }

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.observations.load_state_dict(state["observations"])
        self.critic_observations.load_state_dict(state["critic_observations"])
        self.returns.load_state_dict(state["returns"])
