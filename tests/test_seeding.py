"""Random streams keyed by (seed, shard, episode): what an env draws in an episode
depends on those three only."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tensordict import TensorDict

from envs import EnvConfig, MorphogeneticEnv, ShardedEnv
from esper_func.core.config import ConfigError, CoreConfig, LifecycleConfig
from esper_func.core.seeding import ACTION_NOISE, Stream, stream_seed
from esper_func.data.tasks import TaskConfig
from policies import RandomPolicy
from policies.ppo import PolicyConfig, inverse_cdf_sample, make_actor_critic

pytestmark = pytest.mark.usefixtures("single_thread")

TASK = replace(TaskConfig.preset("synthetic"), batch_size=16, train_iters=1, val_batches=1)
CONFIG = EnvConfig(task=TASK, core=CoreConfig(compile=False, lifecycle=LifecycleConfig(max_epochs=3)), n_envs=2, seed=5)


def rollout_values(env: MorphogeneticEnv | ShardedEnv, steps: int) -> TensorDict:
    rollout = env.rollout(steps, RandomPolicy(torch.Generator().manual_seed(1)), break_when_any_done=False)
    return rollout.select("observation", ACTION_NOISE, ("next", "metrics", "val_loss"), ("next", "reward"))


def assert_equal(a: TensorDict, b: TensorDict) -> None:
    for key in a.keys(True, True):
        assert torch.equal(a[key], b[key]), key


def test_stream_seeds_differ_across_every_argument_and_reject_negatives() -> None:
    seeds = {
        stream_seed(seed, shard, episode, stream)
        for seed in range(3)
        for shard in range(3)
        for episode in range(3)
        for stream in Stream
    }
    assert len(seeds) == 3 * 3 * 3 * len(Stream)
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert stream_seed(1, 0, 0, Stream.ENV) != stream_seed(0, 1, 0, Stream.ENV)
    with pytest.raises(ValueError, match="non-negative"):
        stream_seed(0, -1, 0, Stream.ENV)
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        replace(CONFIG, seed=-1)


def test_an_episode_depends_only_on_seed_shard_and_episode() -> None:
    env = MorphogeneticEnv(CONFIG)
    first = rollout_values(env, 3)
    # Resets before any step of an episode draw nothing.
    assert_equal(env.reset().select("observation", ACTION_NOISE), env.reset().select("observation", ACTION_NOISE))
    second = rollout_values(env, 3)  # the rollout's reset after steps starts episode 1
    assert env.episode == 1
    assert not torch.equal(first["observation"], second["observation"]) or not torch.equal(
        first[ACTION_NOISE], second[ACTION_NOISE]
    )
    # A new env started at episode 1 replays it; seek_episode replays episode 0.
    assert_equal(rollout_values(MorphogeneticEnv(CONFIG, first_episode=1), 3), second)
    env.seek_episode(0)
    assert_equal(rollout_values(env, 3), first)
    # Another shard index gives other streams.
    other = rollout_values(MorphogeneticEnv(CONFIG, shard=1), 3)
    assert not torch.equal(other[ACTION_NOISE], first[ACTION_NOISE])
    with pytest.raises(ConfigError, match="shard and first_episode must be >= 0"):
        MorphogeneticEnv(CONFIG, shard=-1)


def test_set_seed_restarts_episode_zero_of_the_new_seed() -> None:
    env = MorphogeneticEnv(CONFIG)
    rollout_values(env, 2)
    env.set_seed(9)
    assert_equal(rollout_values(env, 2), rollout_values(MorphogeneticEnv(replace(CONFIG, seed=9)), 2))
    sharded = ShardedEnv(replace(CONFIG, n_envs=4), ["cpu", "cpu"])
    rollout_values(sharded, 1)
    sharded.set_seed(9)
    assert_equal(
        rollout_values(sharded, 2), rollout_values(ShardedEnv(replace(CONFIG, n_envs=4, seed=9), ["cpu", "cpu"]), 2)
    )


def test_inverse_cdf_sampling_follows_the_probabilities_and_never_draws_a_masked_index() -> None:
    probs = torch.tensor([0.0, 0.2, 0.0, 0.8, 0.0])
    uniform = 1.0 - torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    drawn = inverse_cdf_sample(probs.expand(len(uniform), -1), uniform)
    counts = torch.bincount(drawn, minlength=5).float() / len(uniform)
    assert counts[[0, 2, 4]].sum() == 0
    assert torch.allclose(counts, probs, atol=0.01)
    edges = inverse_cdf_sample(probs.expand(3, -1), torch.tensor([1e-12, 0.2, 1.0]))
    assert edges.tolist() == [1, 1, 3]


def test_the_actor_samples_with_the_env_noise_and_its_log_prob_matches() -> None:
    env = MorphogeneticEnv(CONFIG)
    nets = make_actor_critic(
        env.observation_spec["observation"].shape[-1],
        env.model.n_slots,
        len(env.model.blueprint_names),
        PolicyConfig(hidden=16, head_hidden=8),
    )
    observation = env.reset()
    observation["observation_norm"] = observation["observation"]
    with torch.no_grad():
        torch.manual_seed(0)
        a = nets.actor(observation.clone())
        torch.manual_seed(1)  # the default generator plays no part
        b = nets.actor(observation.clone())
        assert_equal(a.select("action"), b.select("action"))
        shifted = observation.clone()
        shifted[ACTION_NOISE] = 1.0 - shifted[ACTION_NOISE] + 1e-6
        assert any(
            not torch.equal(a["action", h], nets.actor(shifted)["action", h])
            for h in ("op", "slot", "blueprint", "blend")
        )
        log_prob = nets.actor.get_dist(a.clone()).log_prob(a.clone())
        for head in ("op", "slot", "blueprint", "blend"):
            assert torch.allclose(log_prob["action", f"{head}_log_prob"], a["action", f"{head}_log_prob"])
