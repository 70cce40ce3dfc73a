"""Batches drawn ahead (`esper_func.data.prefetch`): the same draws, in the same order, as an env
that draws on demand, through steps, episode ends, partial resets, new seeds and
checkpointed generator states."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from envs import EnvConfig, MorphogeneticEnv, ShardedEnv
from esper_func.core.config import CoreConfig, LifecycleConfig
from esper_func.data.prefetch import BatchPrefetcher
from esper_func.data.tasks import TaskConfig, build_task
from policies import RandomPolicy
from tests.test_sharded import assert_equal

pytestmark = pytest.mark.usefixtures("single_thread")

TASK = replace(TaskConfig.preset("synthetic"), batch_size=16, train_iters=2, val_batches=1)
CONFIG = EnvConfig(task=TASK, core=CoreConfig(compile=False, lifecycle=LifecycleConfig(max_epochs=3)), n_envs=3, seed=4)


def assert_same_generator(a: dict, b: dict) -> None:
    """Equal generator states, nested per shard for a `ShardedEnv`."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_generator(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


def test_a_prefetching_env_equals_one_that_draws_on_demand() -> None:
    ahead = MorphogeneticEnv(CONFIG)
    on_demand = MorphogeneticEnv(replace(CONFIG, prefetch_batches=False))
    policies = [RandomPolicy(torch.Generator().manual_seed(0)) for _ in range(2)]
    observations = [ahead.reset(), on_demand.reset()]
    assert_equal(*observations)
    for step in range(9):
        assert (ahead.batches.pending is not None) == (step != 5)  # a new seed dropped the draw
        assert on_demand.batches.pending is None
        assert_same_generator(ahead.rng_state(), on_demand.rng_state())
        outputs = [env.step(policy(obs)) for env, policy, obs in zip((ahead, on_demand), policies, observations)]
        assert_equal(*outputs)
        observations = [out["next"].exclude("reward", "done", "terminated", "truncated") for out in outputs]
        if step == 1:  # a partial reset mid-episode
            for obs in observations:
                obs["_reset"] = torch.tensor([[True], [False], [True]])
            observations = [env.reset(obs) for env, obs in zip((ahead, on_demand), observations)]
        elif step == 4:  # a new seed mid-episode
            for env in (ahead, on_demand):
                env.set_seed(11)
        elif outputs[0]["next", "done"].all():
            observations = [env.reset() for env in (ahead, on_demand)]
        assert_equal(*observations)


def test_a_restored_generator_state_draws_the_prefetched_batches_again() -> None:
    env = MorphogeneticEnv(CONFIG)
    policy = RandomPolicy(torch.Generator().manual_seed(2))
    observation = env.step(policy(env.reset()))["next"].exclude("reward", "done", "terminated", "truncated")
    action = policy(observation)
    rng, state = env.rng_state(), env.state.clone()
    first = env.step(action.clone())
    env.set_rng_state(rng)
    env.state = state
    assert env.batches.pending is None
    assert_equal(env.step(action.clone()), first)


def test_sharded_rng_state_excludes_every_shards_pending_draw() -> None:
    sharded = ShardedEnv(CONFIG, ["cpu", "cpu"])
    on_demand = ShardedEnv(replace(CONFIG, prefetch_batches=False), ["cpu", "cpu"])
    for env in (sharded, on_demand):
        env.step(RandomPolicy(torch.Generator().manual_seed(5))(env.reset()))
    assert all(shard.batches.pending is not None for shard in sharded.shards)
    assert_same_generator(sharded.rng_state(), on_demand.rng_state())


def test_the_prefetcher_serves_the_draws_in_order_and_rewinds_a_dropped_one() -> None:
    task = build_task(TASK)
    reference = torch.Generator().manual_seed(9)
    expected = [task.sample_batches(reference) for _ in range(2)]

    generator = torch.Generator().manual_seed(9)
    prefetcher = BatchPrefetcher(task, generator, enabled=True)
    prefetcher.prefetch()
    prefetcher.prefetch()  # already drawn: no second draw
    assert torch.equal(prefetcher.take().train_x, expected[0].train_x)
    assert torch.equal(prefetcher.take().train_x, expected[1].train_x)  # nothing pending: drawn now

    before = generator.get_state()
    prefetcher.prefetch()
    assert not torch.equal(generator.get_state(), before)
    assert torch.equal(prefetcher.generator_state(), before)
    prefetcher.drop()
    assert prefetcher.pending is None and torch.equal(generator.get_state(), before)

    disabled = BatchPrefetcher(task, torch.Generator().manual_seed(9), enabled=False)
    disabled.prefetch()
    assert disabled.pending is None
    assert torch.equal(disabled.take().train_y, expected[0].train_y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_side_stream_prefetch_on_cuda_equals_drawing_on_demand() -> None:
    ahead = MorphogeneticEnv(CONFIG, "cuda")
    on_demand = MorphogeneticEnv(replace(CONFIG, prefetch_batches=False), "cuda")
    policies = [RandomPolicy(torch.Generator(device="cuda").manual_seed(0)) for _ in range(2)]
    observations = [ahead.reset(), on_demand.reset()]
    for _ in range(2):
        assert ahead.batches.pending is not None and ahead.batches.pending.ready is not None
        torch.cuda.synchronize()  # the test reads the pending batch on its own stream: let the side stream finish
        copy = torch.Generator(device="cuda")
        copy.set_state(on_demand.generator.get_state())  # what the on-demand env will draw next
        assert torch.equal(ahead.batches.pending.batches.train_x, on_demand.task.sample_batches(copy).train_x)
        outputs = [env.step(policy(obs)) for env, policy, obs in zip((ahead, on_demand), policies, observations)]
        for key in outputs[0].keys(True, True):  # cuDNN may pick nondeterministic kernels: floats to a tolerance
            torch.testing.assert_close(outputs[0][key], outputs[1][key], atol=1e-5, rtol=1e-4, msg=str(key))
        observations = [out["next"].exclude("reward", "done", "terminated", "truncated") for out in outputs]
