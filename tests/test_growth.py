"""Growth on real gradients: the gates let every learnable seed through, and growing pays.

- G2 and the TRAINING timeout on the default synthetic host, through real env steps: every
  CNN blueprint with parameters reaches BLENDING at every slot under the default gates
  (none is stuck in TRAINING), and `noop`, which has nothing that could learn, is culled
  when the timeout comes.
- A short growth run (`esper_func.rl.growth`): the scripted "grow early and keep" schedule
  ends above the static host on the same seeds, on held-out test images.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict

from esper_func.core.config import ConfigError, CoreConfig
from esper_func.core.hosts import build_host
from esper_func.core.model import build_model
from esper_func.core.stages import BlendMode, Op, Stage
from esper_func.core.state import init_state
from esper_func.core.step import StepFunctions, env_step
from esper_func.data.tasks import TaskConfig, build_task
from esper_func.rl.growth import base_env_config, controller_env, longest_training, main, run_controller
from policies import HeuristicConfig, ScriptedGrowthPolicy

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL_TASK = replace(
    TaskConfig.preset("synthetic"), n_train=1024, n_val=128, n_test=128, batch_size=32, train_iters=4, val_batches=4
)


@pytest.mark.parametrize("slot", range(3))
def test_every_blueprint_at_every_slot_leaves_training_under_the_default_gates(slot: int) -> None:
    task = build_task(SMALL_TASK)
    steps = StepFunctions(build_model(CoreConfig(host=task.host_config, compile=False)))
    model = steps.model
    lifecycle = model.config.lifecycle
    n = len(model.blueprint_names)
    generator = torch.Generator().manual_seed(slot)
    state = init_state(model, n, generator)
    wait = TensorDict(
        {head: torch.zeros(n, dtype=torch.int64) for head in ("op", "slot", "blueprint", "blend")}, batch_size=[n]
    )
    for _ in range(2):  # a host that has trained a little, as when a controller germinates
        state, _ = env_step(steps, state, wait, task.sample_batches(generator), generator)
    germinate = TensorDict(
        {
            "op": torch.full((n,), int(Op.GERMINATE)),
            "slot": torch.full((n,), slot),
            "blueprint": torch.arange(n),
            "blend": torch.full((n,), int(BlendMode.LINEAR)),
        },
        batch_size=[n],
    )
    state, metrics = env_step(steps, state, germinate, task.sample_batches(generator), generator)
    assert bool(metrics["executed"].all())
    left_at: dict[int, tuple[int, Stage]] = {}
    for age in range(1, lifecycle.training_timeout + 1):
        stages = state["slots", "stage"][:, slot].tolist()
        for env, stage in enumerate(stages):
            if env not in left_at and stage not in (Stage.GERMINATED, Stage.TRAINING):
                left_at[env] = (age, Stage(stage))
        state, _ = env_step(steps, state, wait, task.sample_batches(generator), generator)
    ratios = state["slots", "grad_ratio_ema"][:, slot]
    for env, name in enumerate(model.blueprint_names):
        learnable = int(model.blueprint_param_count[slot, env]) > 0
        if learnable:
            assert left_at.get(env) == (lifecycle.training_epochs, Stage.BLENDING), (
                f"{name} at slot {slot}: {left_at.get(env)}, G2 ratio EMA {float(ratios[env]):.4f}"
            )
        else:
            assert left_at.get(env) == (lifecycle.training_timeout, Stage.CULLED), f"{name}: {left_at.get(env)}"


def test_longest_training_counts_the_germination_epoch() -> None:
    D, G, T, B = int(Stage.DORMANT), int(Stage.GERMINATED), int(Stage.TRAINING), int(Stage.BLENDING)
    # After-tick stages of one env's three slots over 5 epochs: slot 0 trains 2 ticks, slot 2 four.
    stages = [[[T, D, T]], [[T, D, T]], [[B, D, T]], [[B, D, T]], [[B, G, B]]]
    assert longest_training(stages) == 5
    assert longest_training([[[D, D, D]]]) == 0


def test_scripted_growth_ends_above_static_on_the_same_seeds() -> None:
    """10 epochs of 48 iterations on 2 envs (about 20 s a seed): the shortest budget found on
    which the host runs short of capacity; at 12 x 16 iterations growth did not show (+0.3,
    -0.2 pp). One seed's gain is noisy: a cull or fossilize gate decided by a hair, or an
    argmax flipped by rounding, sends the episode elsewhere, so the gain is judged on the mean
    of 3 seeds. Measured (pp, seeds 0 to 7), packed: +2.6 +1.2 +2.7 +0.1 0.0 +2.2 +4.1 +1.6;
    vmapped (same values on the same states, another rounding): +4.2 +3.0 +3.8 +2.0 +2.2 +1.9
    +3.4 +1.6."""
    task = replace(SMALL_TASK, n_train=4000, n_val=512, n_test=1024, batch_size=64, train_iters=48, val_batches=8)
    host = build_task(task).host_config
    static_params = sum(p.numel() for p in build_host(host).parameters())
    base = base_env_config(n_envs=2, max_epochs=10, task=task)
    gains = []
    for seed in (0, 1, 2):
        static = run_controller(
            "static", controller_env(base, "static", seed, host, 2), "conv_wide", static_params, torch.device("cpu")
        )
        scripted = run_controller(
            "scripted", controller_env(base, "scripted", seed, host, 2), "conv_wide", static_params, torch.device("cpu")
        )
        assert static.params_added == 0 and scripted.params_added > 0
        assert scripted.germinated >= 3 and scripted.longest_training <= base.core.lifecycle.training_timeout
        gains.append(scripted.test_accuracy - static.test_accuracy)
    assert sum(gains) / len(gains) > 1.0 and min(gains) > -1.0, f"scripted growth over static, pp per seed: {gains}"


def test_growth_cli_writes_its_json_and_plots(tmp_path: Path) -> None:
    task_json = tmp_path / "task.json"
    task_json.write_text(
        '{"name": "synthetic", "n_train": 256, "n_val": 32, "n_test": 32, "batch_size": 16, "train_iters": 1, '
        '"val_batches": 2}'
    )
    out = tmp_path / "growth"
    assert (
        main(
            [
                "--seeds",
                "0",
                "--n-envs",
                "2",
                "--wide-envs",
                "1",
                "--max-epochs",
                "4",
                "--task-json",
                str(task_json),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads((out / "growth.json").read_text())
    assert set(record["summary"]) == {"static", "wide2", "wide4", "heuristic", "scripted"}
    assert record["summary"]["static"]["params_added_mean"] == 0
    assert record["summary"]["wide4"]["params_added_mean"] > record["summary"]["wide2"]["params_added_mean"] > 0
    assert (out / "growth_seed0.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="static"):
        main(["--controllers", "scripted", "--out", str(out)])


def test_germination_orders_must_name_each_slot_once() -> None:
    with pytest.raises(
        ConfigError, match=r"ScriptedGrowthPolicy.slot_order must list each slot index once, got \(0, 0, 2\)"
    ):
        ScriptedGrowthPolicy(blueprint=6, slot_order=(0, 0, 2))
    with pytest.raises(ConfigError, match="HeuristicConfig.slot_order"):
        HeuristicConfig(slot_order=(1, 2))
