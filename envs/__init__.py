"""TorchRL environments over the functional core, and the transforms that go with them."""

from envs.morphogenetic import EnvConfig, MorphogeneticEnv, make_env
from envs.transforms import ActionMaskCheck

__all__ = ["ActionMaskCheck", "EnvConfig", "MorphogeneticEnv", "make_env"]
