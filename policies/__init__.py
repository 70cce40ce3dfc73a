"""Controllers as TensorDictModules (arrive with the environment and PPO issues)."""
