"""Controllers as TensorDict modules: heuristic, random, static (and, later, PPO)."""

from policies.controllers import HeuristicConfig, HeuristicPolicy, RandomPolicy, StaticPolicy

__all__ = ["HeuristicConfig", "HeuristicPolicy", "RandomPolicy", "StaticPolicy"]
