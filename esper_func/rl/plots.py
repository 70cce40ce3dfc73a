"""PNG plots of a run (matplotlib, no display needed).

- `accuracy_by_controller.png`: mean validation accuracy per epoch for each controller;
- `return_per_update.png`: mean episode return of each PPO rollout;
- `lifecycle_timeline.png`: the seed stage of every slot over one episode, per env.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from esper_func.core.stages import Stage  # noqa: E402

STAGE_COLOURS = {
    Stage.DORMANT: "#f0f0f0",
    Stage.GERMINATED: "#c6dbef",
    Stage.TRAINING: "#6baed6",
    Stage.BLENDING: "#fd8d3c",
    Stage.PROBATIONARY: "#fdd0a2",
    Stage.FOSSILIZED: "#31a354",
    Stage.CULLED: "#de2d26",
    Stage.EMBARGOED: "#969696",
    Stage.RESETTING: "#d9d9d9",
}


def plot_accuracy(curves: dict[str, list[float]], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        axis.plot(range(1, len(curve) + 1), curve, label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation accuracy (%)")
    axis.set_title("Accuracy per epoch by controller (mean over envs)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_returns(history: list[dict[str, float]], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([record["update"] for record in history], [record["return"] for record in history], marker="o")
    axis.set_xlabel("update")
    axis.set_ylabel("mean episode return")
    axis.set_title("PPO: return per update")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_return_curves(curves: dict[str, list[float]], path: Path, relative: bool = False) -> Path:
    """Each run's return per update (thin), and their mean over the runs that reached each
    update (bold); `relative`: the curves are returns minus a frozen policy's."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, returns in curves.items():
        axis.plot(range(1, len(returns) + 1), returns, linewidth=1, alpha=0.45, label=Path(name).name)
    longest = max(len(returns) for returns in curves.values())
    means = [
        sum(returns[u] for returns in curves.values() if len(returns) > u)
        / sum(len(returns) > u for returns in curves.values())
        for u in range(longest)
    ]
    axis.plot(range(1, longest + 1), means, color="black", linewidth=2.5, label=f"mean of {len(curves)} runs")
    if relative:
        axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xlabel("update")
    axis.set_ylabel("return minus the frozen policy's, same episodes" if relative else "mean episode return")
    axis.set_title("PPO: return per update")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_lifecycle(stages: list[list[list[int]]], slot_names: tuple[str, ...], path: Path, max_envs: int = 4) -> Path:
    """`stages` is `[T][N][S]` stage values; one row per (env, slot), time on the x axis."""
    n_envs = min(max_envs, len(stages[0]))
    rows = [
        [stages[t][env][slot] for t in range(len(stages))] for env in range(n_envs) for slot in range(len(slot_names))
    ]
    order = list(STAGE_COLOURS)
    index = {int(stage): i for i, stage in enumerate(order)}
    figure, axis = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    axis.imshow(
        [[index[value] for value in row] for row in rows],
        aspect="auto",
        cmap=ListedColormap([STAGE_COLOURS[stage] for stage in order]),
        vmin=0,
        vmax=len(order) - 1,
        interpolation="nearest",
    )
    axis.set_yticks(range(len(rows)), [f"env {env} {slot}" for env in range(n_envs) for slot in slot_names])
    epochs = len(stages)
    ticks = list(range(0, epochs, max(1, epochs // 10)))
    axis.set_xticks(ticks, [str(t + 1) for t in ticks])
    axis.set_xlabel("epoch (stage after the epoch)")
    axis.set_title("Seed lifecycle per slot")
    handles = [plt.Rectangle((0, 0), 1, 1, color=STAGE_COLOURS[stage]) for stage in order]
    axis.legend(
        handles, [stage.name for stage in order], loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=5, fontsize=7
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
