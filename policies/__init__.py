"""Controllers as TensorDict modules: heuristic, scripted growth, random, static (and, later, PPO)."""

from policies.controllers import HeuristicConfig, HeuristicPolicy, RandomPolicy, ScriptedGrowthPolicy, StaticPolicy

__all__ = ["HeuristicConfig", "HeuristicPolicy", "RandomPolicy", "ScriptedGrowthPolicy", "StaticPolicy"]
