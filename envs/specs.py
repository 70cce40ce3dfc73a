"""The TorchRL specs of `MorphogeneticEnv` (and `ShardedEnv`): actions, observations (keys
documented in `envs/morphogenetic.py`), reward and done, and the action masks the action
spec carries so that its random draws are legal."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.data import Binary, Bounded, Categorical, Composite, Unbounded

from esper_func.core.features import CRITIC_FEATURES, feature_names
from esper_func.core.governor import Panic
from esper_func.core.model import Model
from esper_func.core.reward_config import RewardConfig
from esper_func.core.rewards import component_names
from esper_func.core.seeding import ACTION_NOISE, ACTION_NOISE_SIZE
from esper_func.core.stages import BlendMode, Op
from esper_func.core.step import METRIC_KEYS

SPEC_MASKED_HEADS: tuple[str, ...] = ("op", "blueprint", "blend")
"""Heads whose mask the action spec carries; the slot's depends on the op."""


def make_specs(
    model: Model, rewards: RewardConfig, n: int, device: torch.device
) -> tuple[Composite, Composite, Composite, Composite]:
    """Action, observation, reward and done specs of `n` envs of `model` on `device`."""
    s = model.n_slots
    n_blueprints = len(model.blueprint_names)
    heads = {"op": len(Op), "slot": s, "blueprint": n_blueprints, "blend": len(BlendMode)}
    action = Composite(
        action=Composite(
            {head: Categorical(size, shape=(n,), dtype=torch.int64, device=device) for head, size in heads.items()},
            shape=(n,),
        ),
        shape=(n,),
    )
    per_slot = (n, s)
    mask_shapes = {
        "op": (n, len(Op)),
        "slot": (n, len(Op), s),
        "blueprint": (n, n_blueprints),
        "blend": (n, len(BlendMode)),
    }
    critic = (
        {"critic_observation": Bounded(-1.0, 1.0, shape=(n, len(CRITIC_FEATURES)), dtype=torch.float32, device=device)}
        if rewards.static_baseline
        else {}
    )
    observation = Composite(
        observation=Bounded(-1.0, 1.0, shape=(n, len(feature_names(model))), dtype=torch.float32, device=device),
        **critic,
        **{ACTION_NOISE: Bounded(0.0, 1.0, shape=(n, ACTION_NOISE_SIZE), dtype=torch.float32, device=device)},
        action_mask=Composite(
            {
                head: Binary(n=shape[-1], shape=shape, dtype=torch.bool, device=device)
                for head, shape in mask_shapes.items()
            },
            shape=(n,),
        ),
        seeds=Composite(
            {
                "stage": Unbounded(shape=per_slot, dtype=torch.int64, device=device),
                "alpha": Bounded(0.0, 1.0, shape=per_slot, dtype=torch.float32, device=device),
                "blueprint": Unbounded(shape=per_slot, dtype=torch.int64, device=device),
                "epochs_in_stage": Unbounded(shape=per_slot, dtype=torch.int64, device=device),
                "contribution": Unbounded(shape=per_slot, dtype=torch.float32, device=device),
                "contribution_ema": Unbounded(shape=per_slot, dtype=torch.float32, device=device),
                "improvement": Unbounded(shape=per_slot, dtype=torch.float32, device=device),
            },
            shape=(n,),
        ),
        metrics=Composite(
            {
                **{key: Unbounded(shape=(n,), dtype=torch.float32, device=device) for key in METRIC_KEYS},
                "epoch": Unbounded(shape=(n,), dtype=torch.int64, device=device),
                "action_executed": Categorical(2, shape=(n,), dtype=torch.bool, device=device),
                "illegal_actions": Unbounded(shape=(n,), dtype=torch.int64, device=device),
                "seed_params": Unbounded(shape=(n,), dtype=torch.int64, device=device),
                "rolled_back": Categorical(2, shape=(n,), dtype=torch.bool, device=device),
                "panic": Categorical(len(Panic), shape=(n,), dtype=torch.int64, device=device),
                "rollbacks": Unbounded(shape=(n,), dtype=torch.int64, device=device),
            },
            shape=(n,),
        ),
        signals=Composite(
            {
                "stabilized": Categorical(2, shape=(n,), dtype=torch.bool, device=device),
                "plateau_epochs": Unbounded(shape=(n,), dtype=torch.int64, device=device),
            },
            shape=(n,),
        ),
        reward_components=Composite(
            {name: Unbounded(shape=(n,), dtype=torch.float32, device=device) for name in component_names(rewards)},
            shape=(n,),
        ),
        shape=(n,),
    )
    reward = Composite(reward=Unbounded(shape=(n, 1), dtype=torch.float32, device=device), shape=(n,))
    done = Composite(
        {
            key: Categorical(2, shape=(n, 1), dtype=torch.bool, device=device)
            for key in ("done", "terminated", "truncated")
        },
        shape=(n,),
    )
    return action, observation, reward, done


def update_action_masks(action_spec: Composite, masks: TensorDictBase) -> None:
    """Put the `SPEC_MASKED_HEADS` rows of `masks` (`action_masks`) into `action_spec`,
    so that its random draws take only legal values of those heads."""
    for head in SPEC_MASKED_HEADS:
        action_spec["action", head].update_mask(masks[head])
