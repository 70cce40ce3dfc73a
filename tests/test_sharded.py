"""Sharding envs over devices: the splitting and gathering, checked on repeated CPU devices."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tensordict import TensorDict

from envs import EnvConfig, MorphogeneticEnv, ShardedEnv, build_env
from esper_func.core.config import ConfigError, CoreConfig, LifecycleConfig
from esper_func.data.tasks import TaskConfig
from policies import RandomPolicy
from tests.test_env import assert_random_actions_respect_the_spec_masks

pytestmark = pytest.mark.usefixtures("single_thread")

TASK = replace(TaskConfig.preset("synthetic"), batch_size=16, train_iters=1, val_batches=1)
CONFIG = EnvConfig(task=TASK, core=CoreConfig(compile=False, lifecycle=LifecycleConfig(max_epochs=4)), n_envs=5, seed=7)


def assert_equal(a: TensorDict, b: TensorDict) -> None:
    assert set(a.keys(True, True)) == set(b.keys(True, True))
    for key in a.keys(True, True):
        assert torch.equal(a[key], b[key]), key


def test_a_sharded_batch_is_the_concatenation_of_independent_env_batches() -> None:
    sharded = ShardedEnv(CONFIG, ["cpu", "cpu"])
    assert sharded.sizes == (3, 2) and sharded.batch_size == (5,)
    sharded.check_env_specs()
    separate = [
        MorphogeneticEnv(replace(CONFIG, n_envs=3), shard=0),
        MorphogeneticEnv(replace(CONFIG, n_envs=2), shard=1),
    ]
    sharded = ShardedEnv(CONFIG, ["cpu", "cpu"])

    observation = sharded.reset()
    assert_equal(observation, torch.cat([env.reset() for env in separate]))
    policy = RandomPolicy(torch.Generator().manual_seed(0))
    for _ in range(3):
        observation = policy(observation)
        step = sharded.step(observation)
        parts = observation.split([3, 2])
        expected = torch.cat([env.step(part.clone()) for env, part in zip(separate, parts)])
        assert_equal(step, expected)
        observation = step["next"].exclude("reward", "done", "terminated", "truncated")
    sharded_test = sharded.test_accuracy()
    assert sharded_test is not None
    assert torch.equal(sharded_test, torch.cat([env.test_accuracy() for env in separate]))

    # A partial reset resets exactly the flagged envs, in whichever shard they live.
    observation["_reset"] = torch.tensor([False, True, False, False, True]).unsqueeze(-1)
    reset = sharded.reset(observation)
    assert (reset["metrics", "epoch"] == torch.tensor([3, 0, 3, 3, 0])).all()


def test_a_partial_reset_leaves_shards_with_no_flagged_env_untouched() -> None:
    sharded = ShardedEnv(CONFIG, ["cpu", "cpu"])
    twin = MorphogeneticEnv(replace(CONFIG, n_envs=2), shard=1)  # never reset
    policy = RandomPolicy(torch.Generator().manual_seed(0))
    observation = policy(sharded.reset())
    twin.reset()
    step = sharded.step(observation)
    twin.step(observation[3:].clone())
    observation = step["next"].exclude("reward", "done", "terminated", "truncated")
    observation["_reset"] = torch.tensor([True, False, False, False, False]).unsqueeze(-1)
    reset = sharded.reset(observation)
    assert (reset["metrics", "epoch"] == torch.tensor([0, 1, 1, 1, 1])).all()
    for stream in ("env", "noise"):
        assert torch.equal(sharded.rng_state()["shard1"][stream], twin.rng_state()[stream])
    action = policy(reset)
    assert_equal(sharded.step(action)["next"][3:], twin.step(action[3:].clone())["next"])


def test_a_sharded_rollout_without_a_policy_draws_only_legal_ops_blueprints_and_blends() -> None:
    torch.manual_seed(0)
    assert_random_actions_respect_the_spec_masks(ShardedEnv(CONFIG, ["cpu", "cpu"]).rollout(4))


def test_rng_state_round_trips_through_every_shard() -> None:
    env = ShardedEnv(CONFIG, ["cpu", "cpu", "cpu"])
    state = env.rng_state()
    env.rollout(2, RandomPolicy(torch.Generator().manual_seed(1)))
    moved = env.rng_state()
    env.set_rng_state(state)
    restored = env.rng_state()
    for k in range(3):
        for stream in ("env", "noise"):
            assert not torch.equal(moved[f"shard{k}"][stream], state[f"shard{k}"][stream])
            assert torch.equal(restored[f"shard{k}"][stream], state[f"shard{k}"][stream])


def test_sharding_errors_and_the_single_device_case() -> None:
    with pytest.raises(ConfigError, match="n_envs=5 cannot be sharded over 6 devices"):
        ShardedEnv(CONFIG, ["cpu"] * 6)
    assert isinstance(build_env(CONFIG, "cpu", ("cpu",)), MorphogeneticEnv)
    assert isinstance(build_env(CONFIG, "cpu", ("cpu", "cpu")), ShardedEnv)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_shards_match_their_separate_envs() -> None:
    sharded = ShardedEnv(CONFIG, ["cuda:0", "cuda:1"])
    separate = [
        MorphogeneticEnv(replace(CONFIG, n_envs=3), "cuda:0", shard=0),
        MorphogeneticEnv(replace(CONFIG, n_envs=2), "cuda:1", shard=1),
    ]
    observation = sharded.reset()
    expected = torch.cat([env.reset().to("cuda:0") for env in separate])
    assert torch.equal(observation["observation"], expected["observation"])
    step = sharded.step(RandomPolicy(torch.Generator(device="cuda:0").manual_seed(0))(observation))
    assert step["next", "observation"].device == torch.device("cuda:0")
