"""`ShardedEnv`: N environments split over several devices, seen as one `[N]` batch.

Shard k is a `MorphogeneticEnv` of `sizes[k]` envs on `devices[k]` with shard index k, so
its random streams are keyed by (seed, k, episode) and the sharded batch is exactly the
concatenation of K independent env batches (each shard draws its own batches and seeds),
the same K batches `esper_func.rl.distributed` collects on K workers. Outputs are gathered on the first device, and the
action spec carries the gathered op, blueprint and blend masks, as `MorphogeneticEnv`'s does.

On CUDA each shard steps on its own stream, entered outside the shard's (compiled) step:
the host enqueues shard 0's work, then shard 1's, without waiting, so devices run
concurrently; each result is copied to the first device on its shard's stream, and the
first device's current stream waits for those streams (an event wait on the device, not
a host synchronization). On CPU the shards simply run one after the other, which is what
the tests use to check the splitting and gathering (`devices=("cpu", "cpu")`). The CUDA
path has not run on two GPUs yet (none was available); `tests/test_sharded.py` has the
test that will.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs import EnvBase

from envs.morphogenetic import EnvConfig, MorphogeneticEnv, canonical_device
from envs.specs import make_specs, update_action_masks
from esper_func.core.config import ConfigError
from esper_func.core.masks import action_masks


def shard_sizes(n_envs: int, n_shards: int) -> tuple[int, ...]:
    """As even as possible, the first shards taking the remainder."""
    if n_envs < n_shards:
        raise ConfigError(
            f"n_envs={n_envs} cannot be sharded over {n_shards} devices; use n_envs >= {n_shards} or fewer devices"
        )
    base, extra = divmod(n_envs, n_shards)
    return tuple(base + (k < extra) for k in range(n_shards))


class ShardedEnv(EnvBase):
    """`config.n_envs` envs over `devices` (`batch_size=[N]`, outputs on `devices[0]`)."""

    def __init__(self, config: EnvConfig, devices: Sequence[torch.device | str]) -> None:
        devices = [canonical_device(d) for d in devices]
        if len(devices) < 2:
            raise ConfigError(f"ShardedEnv needs at least 2 devices, got {devices}; use MorphogeneticEnv for one")
        self.sizes = shard_sizes(config.n_envs, len(devices))
        super().__init__(device=devices[0], batch_size=torch.Size([config.n_envs]))
        self.shards = [
            MorphogeneticEnv(replace(config, n_envs=size), device, shard=k)
            for k, (size, device) in enumerate(zip(self.sizes, devices))
        ]
        first = self.shards[0]
        self.config = replace(first.config, n_envs=config.n_envs, seed=config.seed)
        self.model = first.model
        self.max_epochs = first.max_epochs
        self.streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for device in devices]
        for stream, device in zip(self.streams, devices):
            if (
                stream is not None
            ):  # each shard was built on its device's current stream: its stream comes after that once
                stream.wait_stream(torch.cuda.current_stream(device))
        self.full_action_spec, self.full_observation_spec, self.full_reward_spec, self.full_done_spec = make_specs(
            self.model, self.config.rewards, config.n_envs, self.device
        )
        initial = torch.cat([action_masks(shard.model, shard.state).to(self.device) for shard in self.shards])
        update_action_masks(self.full_action_spec, initial)

    # -- RNG (checkpointed by the trainer) ----------------------------------------------------

    def rng_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {f"shard{k}": shard.rng_state() for k, shard in enumerate(self.shards)}

    def set_rng_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for k, shard in enumerate(self.shards):
            shard.set_rng_state(state[f"shard{k}"])

    @property
    def episode(self) -> int:
        return self.shards[0].episode

    def seek_episode(self, episode: int) -> None:
        for shard in self.shards:
            shard.seek_episode(episode)

    # -- split and gather -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _on_stream(self, k: int) -> Iterator[None]:
        """Shard k's stream as the current stream of its device, after the first device's
        current stream (which produced the inputs), so inputs are ready and allocations made
        here belong to the shard's stream."""
        stream = self.streams[k]
        if stream is None:
            yield
            return
        if self.device.type == "cuda":
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield

    def _gather(self, outputs: list[TensorDictBase]) -> TensorDictBase:
        """Copy each shard's output to the first device on the shard's stream; the first
        device's stream then waits for every shard stream (device-side, no host sync)."""
        gathered = []
        for k, out in enumerate(outputs):
            with self._on_stream(k):
                gathered.append(out.to(self.device, non_blocking=True))
        if self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            for k, stream in enumerate(self.streams):
                if stream is not None:
                    current.wait_stream(stream)
                    if self.shards[k].device == self.device:
                        gathered[k].record_stream(current)  # used on this stream from now on
        return torch.cat(gathered, dim=0)

    def _run(self, tensordict: TensorDictBase | None, method: str) -> TensorDictBase:
        parts = [None] * len(self.shards) if tensordict is None else tensordict.split(list(self.sizes), dim=0)
        outputs = []
        for k, (shard, part) in enumerate(zip(self.shards, parts)):
            with self._on_stream(k):
                local = None if part is None else part.to(shard.device, non_blocking=True)
                outputs.append(getattr(shard, method)(local))
        return self._gather(outputs)

    # -- EnvBase ----------------------------------------------------------------------------------

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        out = self._run(TensorDict({"action": tensordict["action"]}, batch_size=self.batch_size), "_step")
        update_action_masks(self.full_action_spec, out["action_mask"])
        return out

    def _reset(self, tensordict: TensorDictBase | None, **kwargs: object) -> TensorDictBase:
        if tensordict is not None and "_reset" in tensordict.keys():
            out = self._run(TensorDict({"_reset": tensordict["_reset"]}, batch_size=self.batch_size), "_reset")
        else:
            out = self._run(None, "_reset")
        update_action_masks(self.full_action_spec, out["action_mask"])
        return out

    def _set_seed(self, seed: int | None) -> None:
        self.config = replace(self.config, seed=0 if seed is None else seed)
        for shard in self.shards:
            shard._set_seed(seed)

    def test_accuracy(self) -> torch.Tensor | None:
        """`MorphogeneticEnv.test_accuracy` of every shard, on the first device."""
        parts = [shard.test_accuracy() for shard in self.shards]
        return None if parts[0] is None else torch.cat([part.to(self.device) for part in parts if part is not None])


def build_env(
    config: EnvConfig, device: torch.device | str, devices: Sequence[str] = ()
) -> MorphogeneticEnv | ShardedEnv:
    """One env batch on `device`, or sharded over `devices` when they name more than one."""
    if len(devices) > 1:
        return ShardedEnv(config, devices)
    return MorphogeneticEnv(config, device)
