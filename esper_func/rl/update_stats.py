"""What a PPO batch and update report: rollout statistics, the joint policy ratio and
its KL estimate, and the anomalies they reveal (read by hooks, logs and telemetry)."""

from __future__ import annotations

import math
from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.modules import set_recurrent_mode

from esper_func.core.stages import ACTION_HEADS, Op
from esper_func.rl.run_sections import TelemetryConfig
from policies.ppo import LOG_PROB_KEYS, ActorCritic


def rollout_statistics(batch: TensorDictBase, host_params: int) -> dict[str, Any]:
    """Per-batch summary of a `[N, T]` rollout, read back to the host in one transfer."""
    nxt = batch["next"]
    final = nxt["metrics"][:, -1]
    ops = batch["action", "op"]
    components = nxt["reward_components"]
    scalars = {
        "return": nxt["reward"].sum((1, 2)).mean(),
        "final_accuracy": final["val_accuracy"].mean(),
        "param_growth": (final["seed_params"].float() / host_params).mean(),
        "illegal_actions": final["illegal_actions"].sum().float(),
        "rollbacks": final["rollbacks"].sum().float(),
    }
    shares = [(ops == op).float().mean() for op in Op]
    values = torch.stack([*scalars.values(), *shares, *(value.mean() for value in components.values())]).tolist()
    summary: dict[str, Any] = dict(zip(scalars, values))
    summary["illegal_actions"], summary["rollbacks"] = int(summary["illegal_actions"]), int(summary["rollbacks"])
    summary["action_distribution"] = {op.name: value for op, value in zip(Op, values[len(scalars) :])}
    summary["reward_components"] = dict(zip(components.keys(), values[len(scalars) + len(Op) :]))
    return summary


def joint_log_ratio(nets: ActorCritic, batch: TensorDictBase) -> torch.Tensor:
    """log pi_new(a|s) - log pi_old(a|s) of the joint (causal) action, without gradients."""
    with torch.no_grad():
        data = batch.clone(False)
        log_prob = nets.actor.get_dist(data).log_prob(data)
        new = sum(log_prob.get(key) for key in LOG_PROB_KEYS)
        old = sum(batch.get(key) for key in LOG_PROB_KEYS)
        return new - old


def approx_kl(nets: ActorCritic, batch: TensorDictBase) -> torch.Tensor:
    """KL(old || new) estimated as E[(r - 1) - log r] (non-negative, low variance)."""
    log_ratio = joint_log_ratio(nets, batch)
    return ((log_ratio.exp() - 1) - log_ratio).mean()


def ratio_diagnostics(
    nets: ActorCritic, batch: TensorDictBase, recurrent: bool, explosion: float, collapse: float
) -> dict[str, Any]:
    """Joint ratio new/old policy over the whole batch after the update, with offending steps."""
    with set_recurrent_mode(recurrent):
        log_ratio = joint_log_ratio(nets, batch)
        ratio = log_ratio.exp()
        bad = (ratio > explosion) | (ratio < collapse)
        offenders = [
            {
                "env": env,
                "epoch": t,
                "ratio": ratio[env, t].item(),
                "action": {head: int(batch["action", head][env, t]) for head in ACTION_HEADS},
            }
            for env, t in bad.nonzero().tolist()[:20]
        ]
        return {
            "ratio_max": ratio.max().item(),
            "ratio_min": ratio.min().item(),
            "ratio_mean": ratio.mean().item(),
            "log_ratio_abs_max": log_ratio.abs().max().item(),
            "ratio_offenders": offenders,
        }


def detect_anomalies(stats: dict[str, Any], progress: float, telemetry: TelemetryConfig) -> list[str]:
    """Reference AnomalyDetector: ratio explosion/collapse, value collapse by phase, NaN/Inf."""
    anomalies = []
    if stats["ratio_max"] > telemetry.ratio_explosion:
        anomalies.append("ratio_explosion")
    if stats["ratio_min"] < telemetry.ratio_collapse:
        anomalies.append("ratio_collapse")
    threshold = -0.5 if progress < 0.1 else -0.2 if progress < 0.25 else 0.0 if progress < 0.75 else 0.1
    if "explained_variance" in stats and stats["explained_variance"] < threshold:
        anomalies.append("value_collapse")
    numbers = [value for value in stats.values() if isinstance(value, float)]
    if any(not math.isfinite(value) for value in numbers):
        anomalies.append("numerical_instability")
    return anomalies
