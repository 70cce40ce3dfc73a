"""Random streams as pure functions of (seed, shard, episode).

An env shard draws everything random in an episode (its hosts' initialization, batches,
germination draws) from one generator, and the policy's sampling noise from a second
one; both are seeded at the episode's first reset from `stream_seed`. So what a shard
does in episode e depends on nothing but the run's seed, the shard's index and e: not
on which process runs the shard, not on how many episodes that process ran before, not
on RNG state a checkpoint would have to read back from another machine. A resumed run,
a run whose shards are spread over workers (`esper_func.rl.distributed`) and a local
`ShardedEnv` run therefore draw the same numbers.
"""

from __future__ import annotations

from enum import IntEnum

from esper_func.core.stages import ACTION_HEADS

_MASK64 = (1 << 64) - 1

ACTION_NOISE = "action_noise"
"""The env's key for the policy's sampling noise, `[N, ACTION_NOISE_SIZE]` in (0, 1]."""
ACTION_NOISE_SIZE = len(ACTION_HEADS)
"""One uniform per action head (`stages.ACTION_HEADS`)."""


class Stream(IntEnum):
    """The independent random streams of one env shard in one episode."""

    ENV = 0
    """Host initialization, batches, germination draws."""
    POLICY_NOISE = 1
    """The uniforms the policy samples its actions with (`"action_noise"`)."""


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def stream_seed(seed: int, shard: int, episode: int, stream: Stream) -> int:
    """A 63-bit generator seed for `stream` of env shard `shard` in episode `episode` of a
    run seeded `seed`. Each argument is mixed in by SplitMix64, so neighbouring values
    (seed 1 shard 0 against seed 0 shard 1) give unrelated streams."""
    for value in (seed, shard, episode, int(stream)):
        if value < 0:
            raise ValueError(f"stream_seed takes non-negative integers, got {(seed, shard, episode, int(stream))}")
    mixed = 0
    for value in (seed, shard, episode, int(stream)):
        mixed = _splitmix64(mixed ^ value)
    return mixed >> 1
