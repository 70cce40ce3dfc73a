"""TorchRL environments over the functional core."""

from envs.morphogenetic import EnvConfig, MorphogeneticEnv, make_env

__all__ = ["EnvConfig", "MorphogeneticEnv", "make_env"]
