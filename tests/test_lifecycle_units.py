"""Hand-computed lifecycle transitions, step by step.

Default `LifecycleConfig` (max_epochs 25): training_epochs = max(1, int(0.1 * 25)) = 2
(a seed's age, its germination epoch included), training_timeout = 2 + 3 = 5, blend_steps
= 3, probation judged after 2 epochs on the contribution EMA (decay 0.5), probation_timeout
= max(5, int(0.1 * 25)) = 5, embargo 5, reset 1, G2 threshold 0.01, G5 threshold 1.0 pp on
the EMA, min cull age 1. Some tests set the reference's longer dwell and ramp (3 and 5)
explicitly. `tick` is fed hand-written metrics.
"""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from esper_func.core.blending import alpha_schedule
from esper_func.core.config import CNNHostConfig, ConfigError, CoreConfig, LifecycleConfig
from esper_func.core.initialization import init_rules
from esper_func.core.lifecycle import apply_action, tick
from esper_func.core.model import Model, build_model
from esper_func.core.stages import BlendMode, Op, Stage
from esper_func.core.state import init_state

S = 3
CONV_LIGHT = 4  # CNN catalogue: noop, norm, attention, depthwise, conv_light, conv_heavy


pytestmark = pytest.mark.usefixtures("single_thread")


def make(
    lifecycle: LifecycleConfig | None = None, n_envs: int = 2, seed: int = 0
) -> tuple[Model, TensorDict, torch.Generator]:
    config = CoreConfig(host=CNNHostConfig.preset("tiny"), lifecycle=lifecycle or LifecycleConfig(), compile=False)
    model = build_model(config)
    generator = torch.Generator().manual_seed(seed)
    return model, init_state(model, n_envs, generator), generator


def action(ops, slots, blueprints=None, blends=None) -> TensorDict:
    n = len(ops)
    blueprints = blueprints if blueprints is not None else [CONV_LIGHT] * n
    blends = blends if blends is not None else [int(BlendMode.LINEAR)] * n
    return TensorDict(
        {
            "op": torch.tensor([int(o) for o in ops]),
            "slot": torch.tensor(slots),
            "blueprint": torch.tensor(blueprints),
            "blend": torch.tensor([int(b) for b in blends]),
        },
        batch_size=[n],
    )


def metrics(n_envs: int, accuracy=0.0, contribution=0.5, grad_ratio=0.0) -> TensorDict:
    """Per-env accuracy (scalar or list); per-slot contribution and ratio (scalar, or [N][S])."""

    def per_env(value):
        return torch.tensor(value if isinstance(value, list) else [value] * n_envs, dtype=torch.float32)

    def per_slot(value):
        return (
            torch.tensor(value, dtype=torch.float32)
            if isinstance(value, list)
            else torch.full((n_envs, S), float(value))
        )

    return TensorDict(
        {
            "train_loss": torch.ones(n_envs),
            "val_loss": torch.ones(n_envs),
            "val_accuracy": per_env(accuracy),
            "contribution": per_slot(contribution),
            "grad_ratio": per_slot(grad_ratio),
        },
        batch_size=[n_envs],
    )


def field(state: TensorDict, name: str, env: int, slot: int):
    return state["slots", name][env, slot].item()


def stage(state: TensorDict, env: int, slot: int) -> Stage:
    return Stage(field(state, "stage", env, slot))


def put_in(
    state: TensorDict, env: int, slot: int, stage_: Stage, alpha: float, age: int = 10, contribution_ema: float = 0.0
) -> TensorDict:
    """A copy of `state` with one slot placed directly in `stage_` (fresh in that stage)."""
    state = state.clone()
    state["slots", "contribution_ema"][env, slot] = contribution_ema
    state["slots", "stage"][env, slot] = int(stage_)
    state["slots", "alpha"][env, slot] = alpha
    state["slots", "epochs_in_stage"][env, slot] = 0
    state["slots", "epochs_total"][env, slot] = age
    state["slots", "blueprint"][env, slot] = CONV_LIGHT
    state["slots", "blend_step"][env, slot] = 5 if stage_ == Stage.PROBATIONARY else 0
    return state


# --- the fastest path -------------------------------------------------------------------


def test_fastest_path_germinate_train_blend_probation_fossilize() -> None:
    model, state, generator = make()
    lifecycle = model.config.lifecycle
    assert (lifecycle.training_epochs, lifecycle.training_timeout, lifecycle.probation_timeout) == (2, 5, 5)
    # Env 0 passes G2 (ratio 0.02 >= 0.01), env 1 never does (0.005): the timeout culls it.
    ratios = [[0.0, 0.02, 0.0], [0.0, 0.005, 0.0]]
    state, executed = apply_action(model, state, action([Op.GERMINATE] * 2, [1, 1]), generator)
    assert executed.tolist() == [True, True]
    assert [stage(state, e, 1) for e in range(2)] == [Stage.GERMINATED] * 2

    seen0, alphas0, seen1 = [], [], []
    for _ in range(5):  # ticks 1..5
        state = tick(model, state, metrics(2, contribution=0.5, grad_ratio=ratios))
        seen0.append(stage(state, 0, 1))
        alphas0.append(field(state, "alpha", 0, 1))
        seen1.append(stage(state, 1, 1))
    assert seen0 == [Stage.TRAINING] + [Stage.BLENDING] * 3 + [Stage.PROBATIONARY]
    assert alphas0 == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0], abs=1e-6)
    assert alphas0[-2] == 1.0 and alphas0[-1] == 1.0  # end of the ramp and PROBATIONARY: exactly 1
    assert seen1 == [Stage.TRAINING] * 4 + [Stage.CULLED], "G2 never passed: culled at the seed's age 5"

    # Entering PROBATIONARY restarted the contribution EMA at this epoch's 0.5 < 1.0: G5 refuses.
    assert field(state, "contribution_ema", 0, 1) == pytest.approx(0.5)
    refused, executed = apply_action(model, state, action([Op.FOSSILIZE, Op.WAIT], [1, 1]), generator)
    assert executed.tolist() == [False, True]
    assert stage(refused, 0, 1) == Stage.PROBATIONARY
    # The EMA reaches the gate exactly (0.5 * 0.5 + 0.5 * 1.5 = 1.0), not just below it.
    below = tick(model, state, metrics(2, contribution=1.499, grad_ratio=ratios))
    _, executed = apply_action(model, below, action([Op.FOSSILIZE, Op.WAIT], [1, 1]), generator)
    assert executed.tolist() == [False, True]
    state = tick(model, state, metrics(2, contribution=1.5, grad_ratio=ratios))
    assert stage(state, 0, 1) == Stage.PROBATIONARY and field(state, "contribution_ema", 0, 1) == 1.0
    state, executed = apply_action(model, state, action([Op.FOSSILIZE, Op.WAIT], [1, 1]), generator)
    assert executed.tolist() == [True, True]
    assert stage(state, 0, 1) == Stage.FOSSILIZED and field(state, "alpha", 0, 1) == 1.0
    # Terminal: no tick moves it, whatever the metrics; CULL and FOSSILIZE are refused.
    for contribution in (-5.0, 0.0, 5.0):
        state = tick(model, state, metrics(2, contribution=contribution, grad_ratio=ratios))
        assert stage(state, 0, 1) == Stage.FOSSILIZED and field(state, "alpha", 0, 1) == 1.0
    for op in (Op.CULL, Op.FOSSILIZE, Op.GERMINATE):
        _, executed = apply_action(model, state, action([op, Op.WAIT], [1, 1]), generator)
        assert not executed[0]


def test_a_late_g2_pass_before_the_timeout_still_blends() -> None:
    model, state, generator = make(n_envs=1)
    state, _ = apply_action(model, state, action([Op.GERMINATE], [1]), generator)
    for _ in range(3):  # ages 1..3 at a ratio under the gate
        state = tick(model, state, metrics(1, grad_ratio=[[0.0, 0.005, 0.0]]))
        assert stage(state, 0, 1) == Stage.TRAINING
    state = tick(model, state, metrics(1, grad_ratio=[[0.0, 1.0, 0.0]]))  # age 4: the EMA crosses
    assert field(state, "grad_ratio_ema", 0, 1) == pytest.approx(0.9 * 0.005 + 0.1 * 1.0, abs=1e-6)
    assert stage(state, 0, 1) == Stage.BLENDING


def test_g2_is_not_checked_before_the_training_dwell() -> None:
    model, state, generator = make(LifecycleConfig(min_training_epochs=3), n_envs=1)
    state, _ = apply_action(model, state, action([Op.GERMINATE], [0]), generator)
    state = tick(model, state, metrics(1, grad_ratio=100.0))  # -> TRAINING; the germination epoch is measured
    assert stage(state, 0, 0) == Stage.TRAINING
    assert field(state, "grad_ratio_seen", 0, 0) is True and field(state, "grad_ratio_ema", 0, 0) == 100.0
    state = tick(model, state, metrics(1, grad_ratio=100.0))
    assert stage(state, 0, 0) == Stage.TRAINING, "BLENDING at age 2 with a dwell of 3"
    state = tick(model, state, metrics(1, grad_ratio=100.0))
    assert stage(state, 0, 0) == Stage.BLENDING


@pytest.mark.parametrize("blend", [BlendMode.LINEAR, BlendMode.SIGMOID, BlendMode.GATED])
def test_blending_alpha_per_tick_follows_the_schedule(blend: BlendMode) -> None:
    model, state, generator = make(LifecycleConfig(min_training_epochs=3, blend_steps=5), n_envs=1)
    state, _ = apply_action(model, state, action([Op.GERMINATE], [2], blends=[blend]), generator)
    for _ in range(3):  # GERMINATED -> TRAINING, then BLENDING once the seed is 3 epochs old
        state = tick(model, state, metrics(1, grad_ratio=1.0))
    alphas = [field(state, "alpha", 0, 2)]
    for _ in range(5):
        state = tick(model, state, metrics(1, grad_ratio=1.0))
        alphas.append(field(state, "alpha", 0, 2))
    expected = SIGMOID_5 if blend == BlendMode.SIGMOID else LINEAR_5
    assert alphas[:5] == pytest.approx(expected, abs=1e-6)
    assert alphas[4] == 1.0 and alphas[5] == 1.0
    assert stage(state, 0, 2) == Stage.PROBATIONARY


# --- alpha schedules --------------------------------------------------------------------


def rescaled_logistic(k: int, steps: int = 5, steepness: float = 12.0) -> float:
    def sig(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    low, high = sig(-steepness / 2), sig(steepness / 2)
    return (sig(steepness * (k / steps - 0.5)) - low) / (high - low)


SIGMOID_5 = [0.024244, 0.230141, 0.769859, 0.975756, 1.0]  # ~ 0.024, 0.230, 0.770, 0.976, 1
LINEAR_5 = [0.2, 0.4, 0.6, 0.8, 1.0]


def test_sigmoid_schedule_values() -> None:
    assert [rescaled_logistic(k) for k in range(1, 6)] == pytest.approx(SIGMOID_5, abs=1e-5)
    steps = torch.arange(0, 6)
    alpha = alpha_schedule(torch.full((6,), int(BlendMode.SIGMOID)), steps, 5, 12.0)
    assert alpha.tolist() == pytest.approx([0.0] + SIGMOID_5, abs=1e-5)
    assert alpha[0].item() == 0.0 and alpha[5].item() == 1.0  # exact endpoints
    assert alpha.tolist() == pytest.approx([rescaled_logistic(k) for k in range(6)], abs=1e-6)
    assert (alpha[1:] + alpha[:-1].flip(0)).tolist() == pytest.approx([1.0] * 5, abs=1e-6)  # symmetric


@pytest.mark.parametrize("blend", [BlendMode.LINEAR, BlendMode.GATED])
def test_linear_and_gated_schedules_ramp_linearly(blend: BlendMode) -> None:
    alpha = alpha_schedule(torch.full((6,), int(blend)), torch.arange(0, 6), 5, 12.0)
    assert alpha.tolist() == pytest.approx([0.0] + LINEAR_5, abs=1e-7)
    assert alpha[5].item() == 1.0


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
@pytest.mark.parametrize("steepness", [1.0, 12.0, 40.0])
def test_every_schedule_ends_at_exactly_one(steps: int, steepness: float) -> None:
    for blend in BlendMode:
        alpha = alpha_schedule(torch.tensor(int(blend)), torch.tensor(steps), steps, steepness)
        assert alpha.item() == 1.0
        ramp = alpha_schedule(torch.full((steps + 1,), int(blend)), torch.arange(steps + 1), steps, steepness)
        assert bool((ramp.diff() > 0).all()), ramp.tolist()


# --- probation, cull, embargo, reset ------------------------------------------------------


@pytest.mark.parametrize("second", [-1.0, -2.0])
def test_probation_culls_on_the_smoothed_contribution_after_the_judging_epochs(second: float) -> None:
    """EMA from 1.0 at decay 0.5: env 0 sees -1 then `second` (EMA 0 then <= -0.5): culled at
    the second epoch, not the first; env 1 sees one noisy -5 then +3 (EMA -2, then 0.5): kept."""
    model, state, _ = make(n_envs=2)
    state = put_in(state, 0, 1, Stage.PROBATIONARY, 1.0, contribution_ema=1.0)
    state = put_in(state, 1, 1, Stage.PROBATIONARY, 1.0, contribution_ema=1.0)
    state = tick(model, state, metrics(2, contribution=[[1.0, -1.0, 1.0], [1.0, -5.0, 1.0]]))
    assert stage(state, 0, 1) == Stage.PROBATIONARY and stage(state, 1, 1) == Stage.PROBATIONARY
    state = tick(model, state, metrics(2, contribution=[[1.0, second, 1.0], [1.0, 3.0, 1.0]]))
    assert stage(state, 0, 1) == Stage.CULLED
    assert field(state, "alpha", 0, 1) == 0.0 and field(state, "blend_step", 0, 1) == 0
    assert stage(state, 1, 1) == Stage.PROBATIONARY and field(state, "alpha", 1, 1) == 1.0
    assert field(state, "contribution_ema", 1, 1) == pytest.approx(0.5)


def test_probation_times_out_then_embargo_and_reset_run_their_course() -> None:
    model, state, _ = make(n_envs=1)
    state = put_in(state, 0, 0, Stage.PROBATIONARY, 1.0)
    history = []
    for _ in range(5 + 1 + 5 + 1 + 1):
        state = tick(model, state, metrics(1, contribution=0.7))
        history.append((stage(state, 0, 0), field(state, "embargo_remaining", 0, 0), field(state, "alpha", 0, 0)))
    stages = [h[0] for h in history]
    assert stages == (
        [Stage.PROBATIONARY] * 4 + [Stage.CULLED] + [Stage.EMBARGOED] * 5 + [Stage.RESETTING] + [Stage.DORMANT] * 2
    )
    assert [h[1] for h in history[5:10]] == [5, 4, 3, 2, 1]
    assert [h[2] for h in history] == [1.0] * 4 + [0.0] * 9
    assert field(state, "epochs_total", 0, 0) == 0
    # The slot can be germinated again.
    _, executed = apply_action(model, state, action([Op.GERMINATE], [0]), torch.Generator().manual_seed(1))
    assert executed.tolist() == [True]


def test_cull_action_goes_to_embargo_in_the_same_env_step() -> None:
    model, state, generator = make(n_envs=1)
    state = put_in(state, 0, 2, Stage.BLENDING, 0.4)
    state["slots", "epochs_in_stage"][0, 2] = 2
    state, executed = apply_action(model, state, action([Op.CULL], [2]), generator)
    assert executed.tolist() == [True]
    assert stage(state, 0, 2) == Stage.CULLED and field(state, "alpha", 0, 2) == 0.0
    assert field(state, "prev_stage", 0, 2) == int(Stage.BLENDING) and field(state, "prev_epochs_in_stage", 0, 2) == 2
    state = tick(model, state, metrics(1))
    assert stage(state, 0, 2) == Stage.EMBARGOED and field(state, "embargo_remaining", 0, 2) == 5


@pytest.mark.parametrize("live", [Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY])
def test_cull_needs_a_live_seed_of_minimum_age(live: Stage) -> None:
    model, state, generator = make(n_envs=2)
    alpha = 1.0 if live == Stage.PROBATIONARY else (0.2 if live == Stage.BLENDING else 0.0)
    state = put_in(put_in(state, 0, 0, live, alpha, age=1), 1, 0, live, alpha, age=0)
    state["momentum"] = state["momentum"].apply(lambda m: m + 1.0)
    new, executed = apply_action(model, state, action([Op.CULL, Op.CULL], [0, 0]), generator)
    assert executed.tolist() == [True, False]  # age 0 < min_cull_age 1
    assert stage(new, 0, 0) == Stage.CULLED and stage(new, 1, 0) == live
    for name in model.slot_param_names[0]:
        assert not new["momentum", name][0].any(), f"cull left momentum in {name}"
        assert torch.equal(new["params", name], state["params", name])
    for name in model.slot_param_names[1] + model.host_param_names:
        assert torch.equal(new["momentum", name], state["momentum", name])


@pytest.mark.parametrize("dead", [Stage.DORMANT, Stage.FOSSILIZED, Stage.CULLED, Stage.EMBARGOED, Stage.RESETTING])
def test_cull_and_fossilize_are_refused_outside_their_stages(dead: Stage) -> None:
    model, state, generator = make(n_envs=1)
    state = put_in(state, 0, 1, dead, 1.0 if dead == Stage.FOSSILIZED else 0.0)
    state["slots", "contribution"][0, 1] = 50.0
    for op in (Op.CULL, Op.FOSSILIZE):
        _, executed = apply_action(model, state, action([op], [1]), generator)
        assert executed.tolist() == [False], (op, dead)
    for not_probation in (Stage.TRAINING, Stage.BLENDING):
        placed = put_in(state, 0, 1, not_probation, 0.0)
        _, executed = apply_action(model, placed, action([Op.FOSSILIZE], [1]), generator)
        assert executed.tolist() == [False]


@pytest.mark.parametrize("name", ["embargo_epochs", "reset_epochs"])
def test_zero_length_embargo_or_reset_is_rejected(name: str) -> None:
    """Each tick moves a slot by at most one stage, and CULLED -> RESETTING / EMBARGOED ->
    DORMANT are not legal transitions, so a zero-length cooldown cannot be honoured: the
    config must refuse it rather than silently run it for one epoch."""
    with pytest.raises(ConfigError, match=name):
        LifecycleConfig(**{name: 0})


@pytest.mark.parametrize(("embargo", "reset"), [(1, 1), (3, 2)])
def test_embargo_and_reset_last_their_configured_epochs(embargo: int, reset: int) -> None:
    model, state, _ = make(LifecycleConfig(embargo_epochs=embargo, reset_epochs=reset), n_envs=1)
    state = put_in(state, 0, 0, Stage.CULLED, 0.0)
    stages = []
    for _ in range(1 + embargo + reset + 1):
        state = tick(model, state, metrics(1))
        stages.append(stage(state, 0, 0))
    assert stages == [Stage.EMBARGOED] * embargo + [Stage.RESETTING] * reset + [Stage.DORMANT] * 2


# --- bookkeeping ------------------------------------------------------------------------


def test_stage_bookkeeping_prev_stage_epochs_and_accuracy_baselines() -> None:
    model, state, generator = make(LifecycleConfig(min_training_epochs=4), n_envs=1)
    state["metrics", "val_accuracy"] = torch.tensor([40.0])
    state, _ = apply_action(model, state, action([Op.GERMINATE], [1]), generator)
    assert field(state, "prev_stage", 0, 1) == int(Stage.DORMANT)
    assert field(state, "prev_epochs_in_stage", 0, 1) == 0
    assert field(state, "acc_at_germination", 0, 1) == 40.0 and field(state, "acc_at_stage_start", 0, 1) == 40.0
    assert field(state, "epochs_in_stage", 0, 1) == 0 and field(state, "epochs_total", 0, 1) == 0

    state = tick(model, state, metrics(1, accuracy=42.0, grad_ratio=1.0))
    assert stage(state, 0, 1) == Stage.TRAINING
    assert field(state, "prev_stage", 0, 1) == int(Stage.GERMINATED) and field(state, "prev_epochs_in_stage", 0, 1) == 1
    assert field(state, "acc_at_stage_start", 0, 1) == 42.0 and field(state, "acc_at_germination", 0, 1) == 40.0
    assert (field(state, "epochs_in_stage", 0, 1), field(state, "epochs_total", 0, 1)) == (0, 1)

    for k, accuracy in enumerate((43.0, 44.0), start=1):  # no transition: baselines stay
        state = tick(model, state, metrics(1, accuracy=accuracy, grad_ratio=1.0))
        assert stage(state, 0, 1) == Stage.TRAINING
        assert field(state, "acc_at_stage_start", 0, 1) == 42.0
        assert (field(state, "epochs_in_stage", 0, 1), field(state, "epochs_total", 0, 1)) == (k, k + 1)
        assert field(state, "prev_stage", 0, 1) == int(Stage.GERMINATED)

    state = tick(model, state, metrics(1, accuracy=50.0, grad_ratio=1.0))
    assert stage(state, 0, 1) == Stage.BLENDING
    assert field(state, "prev_stage", 0, 1) == int(Stage.TRAINING) and field(state, "prev_epochs_in_stage", 0, 1) == 3
    assert field(state, "acc_at_stage_start", 0, 1) == 50.0 and field(state, "acc_at_germination", 0, 1) == 40.0
    assert (field(state, "epochs_in_stage", 0, 1), field(state, "epochs_total", 0, 1)) == (0, 4)

    state = tick(model, state, metrics(1, accuracy=51.0, grad_ratio=1.0))
    state = tick(model, state, metrics(1, accuracy=52.0, grad_ratio=1.0))
    state["metrics", "val_accuracy"] = torch.tensor([53.0])
    state, _ = apply_action(model, state, action([Op.CULL], [1]), generator)
    assert field(state, "prev_stage", 0, 1) == int(Stage.BLENDING) and field(state, "prev_epochs_in_stage", 0, 1) == 2
    assert field(state, "acc_at_stage_start", 0, 1) == 53.0
    # Untouched slots keep their initial bookkeeping.
    for slot in (0, 2):
        assert stage(state, 0, slot) == Stage.DORMANT and field(state, "epochs_total", 0, slot) == 0


def test_grad_ratio_ema_initializes_then_decays() -> None:
    model, state, generator = make(n_envs=1)
    state, _ = apply_action(model, state, action([Op.GERMINATE], [0]), generator)
    state = tick(model, state, metrics(1, grad_ratio=[[7.0, 7.0, 7.0]]))  # GERMINATED: the first measurement
    assert field(state, "grad_ratio_seen", 0, 0) is True and field(state, "grad_ratio_ema", 0, 0) == 7.0
    ema = 7.0
    for ratio in (0.03, 0.2, 0.0, 0.5):
        state = tick(model, state, metrics(1, grad_ratio=[[ratio, 9.0, 9.0]]))
        ema = ratio if ema is None else 0.9 * ema + 0.1 * ratio
        assert field(state, "grad_ratio_seen", 0, 0) is True
        assert field(state, "grad_ratio_ema", 0, 0) == pytest.approx(ema, rel=1e-6)
    # DORMANT slots never track the ratio.
    assert field(state, "grad_ratio_seen", 0, 1) is False and field(state, "grad_ratio_ema", 0, 1) == 0.0
    # Re-germination (after a cull and the cooldown) starts a fresh EMA.
    state, executed = apply_action(model, state, action([Op.CULL], [0]), generator)
    assert executed.tolist() == [True]
    for _ in range(1 + 5 + 1):
        state = tick(model, state, metrics(1))
    assert stage(state, 0, 0) == Stage.DORMANT
    state, _ = apply_action(model, state, action([Op.GERMINATE], [0]), generator)
    assert field(state, "grad_ratio_seen", 0, 0) is False and field(state, "grad_ratio_ema", 0, 0) == 0.0
    state = tick(model, state, metrics(1, grad_ratio=0.25))
    assert field(state, "grad_ratio_ema", 0, 0) == pytest.approx(0.25, abs=1e-7)


# --- germination --------------------------------------------------------------------------


def test_germination_reinitializes_only_that_slots_bank_and_momentum() -> None:
    model, state, generator = make(n_envs=3, seed=3)
    noise = torch.Generator().manual_seed(9)
    state["params"] = state["params"].apply(lambda p: p + torch.randn(p.shape, generator=noise))
    state["momentum"] = state["momentum"].apply(lambda m: m + 1.0)
    rules = init_rules(model.net_train)

    new, executed = apply_action(
        model, state, action([Op.GERMINATE, Op.WAIT, Op.GERMINATE], [1, 1, 1], blends=[0, 0, 2]), generator
    )
    assert executed.tolist() == [True, True, True]
    for s, names in enumerate(model.slot_param_names):
        for name in names:
            for env in range(3):
                before, after = state["params", name][env], new["params", name][env]
                if env in (0, 2) and s == 1:
                    assert not torch.equal(after, before), f"env {env}: {name} was not re-initialized"
                    if rules[name].kind == "const":  # zero layer scales and outputs, norm weights
                        assert bool((after == rules[name].scale).all()), f"env {env}: {name} not at its birth value"
                    assert not new["momentum", name][env].any(), f"env {env}: momentum {name} not zeroed"
                else:
                    assert torch.equal(after, before), f"env {env} slot {s}: {name} changed"
                    assert torch.equal(new["momentum", name][env], state["momentum", name][env])
    # Two envs germinating the same slot draw different random weights.
    name = next(n for n in model.slot_param_names[1] if n.endswith("conv_light.block.0.weight"))
    assert not torch.equal(new["params", name][0], new["params", name][2])
    for name in model.host_param_names:
        assert torch.equal(new["params", name], state["params", name])
        assert torch.equal(new["momentum", name], state["momentum", name])
    assert (field(new, "blend", 0, 1), field(new, "blend", 2, 1)) == (0, 2)
    assert stage(new, 1, 1) == Stage.DORMANT


def test_germination_is_refused_on_occupied_slots_and_bad_heads() -> None:
    model, state, generator = make(n_envs=1)
    n_bp = len(model.blueprint_names)
    for occupied in set(Stage) - {Stage.DORMANT}:
        placed = put_in(state, 0, 0, occupied, 1.0 if occupied in (Stage.PROBATIONARY, Stage.FOSSILIZED) else 0.0)
        _, executed = apply_action(model, placed, action([Op.GERMINATE], [0]), generator)
        assert executed.tolist() == [False], occupied
    for slot, bp, blend in ((-1, 0, 0), (S, 0, 0), (0, -1, 0), (0, n_bp, 0), (0, 0, -1), (0, 0, 3)):
        new, executed = apply_action(model, state, action([Op.GERMINATE], [slot], [bp], [blend]), generator)
        assert executed.tolist() == [False], (slot, bp, blend)
        assert torch.equal(new["slots", "stage"], state["slots", "stage"])
