"""TorchRL environments over the functional core, and the transforms that go with them."""

from envs.morphogenetic import EnvConfig, MorphogeneticEnv, make_env
from envs.sharded import ShardedEnv, build_env
from envs.transforms import ActionMaskCheck

__all__ = ["ActionMaskCheck", "EnvConfig", "MorphogeneticEnv", "ShardedEnv", "build_env", "make_env"]
