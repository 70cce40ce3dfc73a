"""Reward components computed by hand for constructed transitions, and their invariants.

States come from `init_state` on the tiny CNN host with slot fields set directly; the
epoch's metrics are hand-written. Unless a test says otherwise the config is the default
("shaped", gamma 0.995) and every expected value below is worked out from the formulas in
the docstrings of `esper_func.core.reward_components`.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from esper_func.core.config import CNNHostConfig, ConfigError, CoreConfig
from esper_func.core.config_json import from_dict
from esper_func.core.model import Model, build_model
from esper_func.core.reward_config import RewardConfig
from esper_func.core.reward_transition import (
    INTERVENTION_COST,
    STAGE_POTENTIAL,
    Transition,
    intervention_cost_table,
    pbrs_shaping,
    potential,
)
from esper_func.core.rewards import FAMILY_COMPONENTS, component_names, compute_reward, register_reward_family, total
from esper_func.core.stages import BlendMode, Op, Stage
from esper_func.core.state import empty_slots, init_state
from esper_func.core.step import Batches, StepFunctions, env_step

S = 3
CONV_LIGHT = 4  # CNN catalogue: noop, norm, attention, depthwise, conv_light, conv_heavy
FAMILIES = tuple(FAMILY_COMPONENTS)
GAMMA = 0.995
FOSSILIZED = 7.5  # potential of a FOSSILIZED seed (above probation plus its progress cap)


pytestmark = pytest.mark.usefixtures("single_thread")


@lru_cache(maxsize=1)
def tiny_model() -> Model:
    return build_model(CoreConfig(host=CNNHostConfig.preset("tiny"), compile=False))


def states(n: int, acc: float = 52.0, loss: float = 1.0) -> tuple[TensorDict, TensorDict]:
    """A prev state (epoch 4, all DORMANT, evaluated at `acc`/`loss`) and a copy one epoch on."""
    prev = init_state(tiny_model(), n, torch.Generator().manual_seed(0))
    prev["epoch"] = torch.full((n,), 4)
    prev["metrics", "val_accuracy"] = torch.full((n,), acc)
    prev["metrics", "val_loss"] = torch.full((n,), loss)
    nxt = prev.clone()
    nxt["epoch"] = prev["epoch"] + 1
    return prev, nxt


def put(state: TensorDict, env: int, slot: int, **fields: float) -> None:
    """Set slot fields of one (env, slot) in place."""
    for name, value in fields.items():
        state["slots", name][env, slot] = value


def seed(state: TensorDict, env: int, slot: int, stage: Stage, epochs_in_stage: int, **fields: float) -> None:
    """A conv_light seed germinated at 50 % accuracy, 10 epochs old unless told."""
    values = {"blueprint": CONV_LIGHT, "acc_at_germination": 50.0, "epochs_total": 10, "alpha": 1.0, **fields}
    put(state, env, slot, stage=int(stage), epochs_in_stage=epochs_in_stage, **values)


def epoch_metrics(acc, contribution=None, loss=None) -> TensorDict:
    """The epoch's metrics: accuracy per env (list), contribution `[N][S]` (default 0)."""
    n = len(acc)
    return TensorDict(
        {
            "val_accuracy": torch.tensor(acc, dtype=torch.float32),
            "val_loss": torch.tensor(loss if loss is not None else [1.0] * n, dtype=torch.float32),
            "train_loss": torch.ones(n),
            "contribution": torch.zeros(n, S)
            if contribution is None
            else torch.tensor(contribution, dtype=torch.float32),
        },
        batch_size=[n],
    )


def actions(ops, slots=None, blueprint: int = CONV_LIGHT) -> TensorDict:
    n = len(ops)
    return TensorDict(
        {
            "op": torch.tensor([int(o) for o in ops]),
            "slot": torch.tensor(slots if slots is not None else [0] * n),
            "blueprint": torch.full((n,), blueprint),
            "blend": torch.zeros(n, dtype=torch.int64),
        },
        batch_size=[n],
    )


def reward(
    prev: TensorDict,
    nxt: TensorDict,
    metrics: TensorDict,
    action: TensorDict | None = None,
    config: RewardConfig = RewardConfig(),
    executed=None,
    is_last=False,
    rollback=None,
) -> TensorDict:
    n = prev.batch_size[0]
    action = action if action is not None else actions([Op.WAIT] * n)
    metrics = metrics.clone()
    metrics["executed"] = torch.ones(n, dtype=torch.bool) if executed is None else torch.tensor(executed)
    metrics["rolled_back"] = torch.zeros(n, dtype=torch.bool) if rollback is None else torch.as_tensor(rollback)
    last = torch.full((n,), is_last) if isinstance(is_last, bool) else torch.tensor(is_last)
    return compute_reward(config, tiny_model(), prev, nxt, action, metrics, last)


def values(components: TensorDict, key: str) -> list[float]:
    return components[key].tolist()


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"family": "dense"}, "family"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.5}, "gamma"),
        ({"rent_cap": -1.0}, "rent_cap"),
        ({"pbrs_weight": math.nan}, "pbrs_weight"),
        ({"probation_grace_epochs": -1}, "probation_grace_epochs"),
        ({"loss_sigma": 0.0}, "loss_sigma"),
        ({"cull_young_age": 0}, "cull_young_age"),
        ({"ratio_penalty_min_discount": 1.5}, "ratio_penalty_min_discount"),
        ({"loss_baseline": 0.3, "loss_target": 0.3}, "loss_baseline"),
        ({"static_baseline": True}, "static_baseline"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"RewardConfig\.{field}"):
        RewardConfig(**overrides)


def test_config_from_dict_and_tasks():
    config = from_dict(RewardConfig, {"family": "loss", "gamma": 0.99, "pbrs": False, "rent_cap": 4})
    assert (config.family, config.gamma, config.pbrs, config.rent_cap) == ("loss", 0.99, False, 4.0)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(RewardConfig, {"pbrs_wieght": 0.3})
    with pytest.raises(ConfigError, match="pbrs"):
        from_dict(RewardConfig, {"pbrs": 1})
    with pytest.raises(ConfigError, match="family"):
        from_dict(RewardConfig, {"family": "dense"})
    stories = RewardConfig.for_task("tinystories", family="loss")
    assert (
        stories.family,
        stories.loss_sigma,
        stories.loss_baseline,
        stories.loss_target,
        stories.loss_rent_weight,
    ) == (
        "loss",
        0.15,
        5.545,
        1.5,
        0.01,
    )
    assert RewardConfig.for_task("cifar10") == RewardConfig.for_task("synthetic") == RewardConfig()
    with pytest.raises(ConfigError, match="mnist"):
        RewardConfig.for_task("mnist")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gamma = 0.9  # type: ignore[misc]


def test_component_keys_are_the_public_telemetry_keys():
    assert FAMILY_COMPONENTS == {
        "shaped": ("attribution", "blending_warning", "probation_indecision", "pbrs", "rent", "action_shaping",
                   "intervention_cost", "terminal", "governor"),
        "sparse": ("sparse", "governor"),
        "minimal": ("sparse", "action_shaping", "governor"),
        "simplified": ("pbrs", "intervention_cost", "terminal", "governor"),
        "loss": ("loss_progress", "pbrs", "rent", "terminal", "governor"),
        "accuracy": ("accuracy_progress", "rent", "governor"),
    }  # fmt: skip


def test_lookup_tables():
    expected = {Stage.DORMANT: 0.0, Stage.GERMINATED: 1.0, Stage.TRAINING: 2.0, Stage.BLENDING: 3.5,
                Stage.PROBATIONARY: 5.5, Stage.FOSSILIZED: FOSSILIZED, Stage.CULLED: 0.0, Stage.EMBARGOED: 0.0,
                Stage.RESETTING: 0.0}  # fmt: skip
    assert {stage: STAGE_POTENTIAL[int(stage)].item() for stage in Stage} == expected
    assert INTERVENTION_COST.tolist() == pytest.approx([0.0, -0.02, -0.005, -0.01])
    assert [Op(i) for i in range(4)] == [Op.WAIT, Op.GERMINATE, Op.CULL, Op.FOSSILIZE]
    simplified = intervention_cost_table(RewardConfig(family="simplified"))
    assert simplified.tolist() == pytest.approx([0.0, -0.01, -0.01, -0.01])


# -- shaped family, by hand ---------------------------------------------------------------------


def test_attribution_of_measured_seeds():
    """One BLENDING seed per env (mid slot), germinated at 50 %; T = acc - 50."""
    cases = [  # (acc, c, expected A)
        (53.0, 2.0, 2.0),  # c < T: A = c; c/T < 5: no ratio penalty
        (51.0, 9.0, 3.0 - 0.08),  # c >= T: sqrt(9); c/T = 9: q = -min(0.3, 0.1 * 4/5)
        (53.0, -1.5, -1.5),  # harm is paid in full
        (50.0625, 4.0, 0.5 - 0.12),  # T <= 0.1: sqrt(0.25), q = -0.3 * min(1, 4/10)
        (51.0, 30.0, math.sqrt(30.0) - 0.3),  # ratio 30: q capped at -0.3
        (49.875, 2.0, 0.0),  # T < 0: no progress; d = sigmoid(-1.25) < 0.5: no q
    ]
    n = len(cases)
    prev, nxt = states(n)
    for env in range(n):
        seed(prev, env, 1, Stage.BLENDING, 1, alpha=0.4)
        seed(nxt, env, 1, Stage.BLENDING, 2, alpha=0.6)
    contribution = [[0.0, c, 0.0] for _, c, _ in cases]
    metrics = epoch_metrics([acc for acc, _, _ in cases], contribution)
    got = reward(prev, nxt, metrics)
    assert values(got, "attribution") == pytest.approx([a for _, _, a in cases], rel=1e-5, abs=1e-6)
    # BLENDING with T < 0 (last env): -(0.1 + min(0.05 * 2, 0.3)), k = 2 counting this epoch.
    assert values(got, "blending_warning") == pytest.approx([0.0] * 5 + [-0.2])
    no_gaming = reward(prev, nxt, metrics, config=RewardConfig(anti_gaming=False))
    assert values(no_gaming, "attribution") == pytest.approx([2.0, 3.0, -1.5, 0.5, math.sqrt(30.0), 0.0], rel=1e-5)


def test_training_seeds_earn_no_attribution_by_default():
    """A TRAINING seed cannot change the host's output, so by default it earns nothing."""
    prev, nxt = states(1, acc=52.0)
    seed(prev, 0, 1, Stage.TRAINING, 1, alpha=0.0)
    seed(nxt, 0, 1, Stage.TRAINING, 2, alpha=0.0)
    got = reward(prev, nxt, epoch_metrics([60.0], [[0.0, 0.0, 0.0]]))
    assert RewardConfig().proxy_weight == 0.0
    assert values(got, "attribution") == [0.0]


def test_attribution_covers_every_seed_that_ran():
    """With the reference's proxy (0.3), GERMINATED and TRAINING seeds earn 0.3 * max(delta
    acc, 0), fossilized ones nothing; under the default proxy 0, nothing."""
    prev, nxt = states(2, acc=52.0)
    for env in range(2):
        seed(prev, env, 0, Stage.BLENDING, 1, alpha=0.4)
        seed(nxt, env, 0, Stage.BLENDING, 2, alpha=0.6)
        seed(prev, env, 1, Stage.TRAINING, 1, alpha=0.0)
        seed(nxt, env, 1, Stage.TRAINING, 2, alpha=0.0)
        seed(prev, env, 2, Stage.FOSSILIZED, 4)
        seed(nxt, env, 2, Stage.FOSSILIZED, 5)
    reference = RewardConfig(proxy_weight=0.3)
    got = reward(prev, nxt, epoch_metrics([54.0, 51.0], [[1.0, 7.0, 9.0]] * 2), config=reference)
    # env 0: BLENDING c=1 < T=4 -> 1, plus TRAINING proxy 0.3 * (54 - 52); the fossil's c=9 is ignored.
    # env 1: BLENDING c=1 >= T=1 -> sqrt(1); accuracy fell: no proxy.
    assert values(got, "attribution") == pytest.approx([1.0 + 0.6, 1.0])

    prev, nxt = states(1, acc=52.0)
    seed(nxt, 0, 0, Stage.TRAINING, 0, epochs_total=1, acc_at_germination=52.0, alpha=0.0)
    got = reward(prev, nxt, epoch_metrics([60.0]), actions([Op.GERMINATE], [0]), config=reference)
    # v2: a seed GERMINATED during the epoch ran straight-through, as in TRAINING: the same proxy.
    assert values(got, "attribution") == pytest.approx([0.3 * (60.0 - 52.0)])
    assert values(reward(prev, nxt, epoch_metrics([60.0]), actions([Op.GERMINATE], [0])), "attribution") == [0.0]


def test_probation_indecision_is_linear_and_capped():
    prev_epochs = [0, 1, 2, 3, 4, 5, 8, 3]
    n = len(prev_epochs)
    prev, nxt = states(n)
    for env, k in enumerate(prev_epochs):
        seed(prev, env, 2, Stage.PROBATIONARY, k)
        seed(nxt, env, 2, Stage.PROBATIONARY, k + 1)
    contribution = [[0.0, 0.0, 2.0]] * (n - 1) + [[0.0, 0.0, -1.0]]  # last env: A < 0
    got = reward(prev, nxt, epoch_metrics([53.0] * n, contribution))
    # k counts this epoch: 1, 2, 3, 4, 5, 6, 9 -> 0, -0.1, -0.15, -0.2, -0.25, -0.3, -0.3 (cap)
    assert values(got, "probation_indecision") == pytest.approx([0.0, -0.1, -0.15, -0.2, -0.25, -0.3, -0.3, 0.0])


def test_pbrs_pays_stage_jumps_and_culls():
    prev, nxt = states(4)
    seed(prev, 0, 0, Stage.TRAINING, 3)
    seed(nxt, 0, 0, Stage.BLENDING, 0)
    seed(prev, 1, 1, Stage.PROBATIONARY, 2)
    seed(nxt, 1, 1, Stage.CULLED, 0)  # probation auto-cull: the potential is clawed back
    seed(nxt, 2, 0, Stage.TRAINING, 0)  # germinated (DORMANT -> GERMINATED -> TRAINING)
    seed(prev, 2, 2, Stage.FOSSILIZED, 10)
    seed(nxt, 2, 2, Stage.FOSSILIZED, 11)
    metrics = epoch_metrics([52.0] * 4)
    expected = [
        0.3 * (GAMMA * 3.5 - (2.0 + 0.9)),
        0.3 * (0.0 - (5.5 + 0.6)),
        0.3 * (GAMMA * (2.0 + FOSSILIZED + 2.0) - (FOSSILIZED + 2.0)),  # progress capped at 2.0 on both sides
        0.0,
    ]
    assert values(reward(prev, nxt, metrics), "pbrs") == pytest.approx(expected, rel=1e-5)
    assert values(reward(prev, nxt, metrics, config=RewardConfig(pbrs=False)), "pbrs") == [0.0] * 4
    loss = RewardConfig(family="loss")  # stage potentials only, weight 0.1
    expected_loss = [0.1 * (GAMMA * 3.5 - 2.0), 0.1 * (0.0 - 5.5), 0.1 * (GAMMA * (2.0 + FOSSILIZED) - FOSSILIZED), 0.0]
    assert values(reward(prev, nxt, metrics, config=loss), "pbrs") == pytest.approx(expected_loss, rel=1e-5)


def test_rent_counts_seeds_held_after_the_step():
    model = tiny_model()
    host = model.host_param_count
    light = model.blueprint_param_count[:, CONV_LIGHT].tolist()
    gate = model.gate_param_count.tolist()
    prev, nxt = states(3)
    seed(nxt, 0, 0, Stage.TRAINING, 1)
    seed(nxt, 0, 2, Stage.FOSSILIZED, 1, blend=int(BlendMode.GATED))
    seed(nxt, 1, 1, Stage.EMBARGOED, 1)  # culled: no rent
    metrics = epoch_metrics([52.0] * 3)
    growth = (light[0] + light[2] + gate[2]) / host
    assert values(reward(prev, nxt, metrics), "rent") == pytest.approx([-0.5 * math.log1p(growth), 0.0, 0.0], rel=1e-5)
    capped = reward(prev, nxt, metrics, config=RewardConfig(rent_weight=100.0))
    assert values(capped, "rent") == pytest.approx([-8.0, 0.0, 0.0])


def test_cull_shaping_and_inverted_attribution():
    """CULL of the mid slot. Decision-time values: prev accuracy 53, germinated at 50 (T' = 3)."""
    cases = [  # (stage, epochs_in_stage, epochs_total, c', shaping, attribution)
        (Stage.PROBATIONARY, 2, 10, -1.0, 0.3, 1.0),
        (Stage.PROBATIONARY, 2, 10, -0.2, 0.1, 0.2),
        (Stage.PROBATIONARY, 2, 10, 2.0, -0.4, -2.0),
        (Stage.PROBATIONARY, 2, 10, 20.0, -0.9, -(math.sqrt(60.0) - 0.1 * (20 / 3 - 5) / 5)),
        (Stage.TRAINING, 2, 3, 0.0, 0.0, 0.0),  # contribution not measured
        (Stage.BLENDING, 0, 4, 3.0, 0.0, 0.0),  # entered BLENDING at the last tick: evaluated as TRAINING
        (Stage.BLENDING, 0, 0, 3.0, -0.3, 0.0),  # age 0 (possible with min_cull_age 0): -0.3 * (1 - 0)
    ]
    n = len(cases)
    prev, nxt = states(n, acc=53.0)
    for env, (stage, k, age, c, _, _) in enumerate(cases):
        seed(prev, env, 1, stage, k, epochs_total=age, contribution=c, prev_stage=int(Stage.TRAINING))
        seed(nxt, env, 1, Stage.EMBARGOED, 0, prev_stage=int(Stage.CULLED))
    got = reward(prev, nxt, epoch_metrics([53.0] * n), actions([Op.CULL] * n, [1] * n))
    assert values(got, "action_shaping") == pytest.approx([case[4] for case in cases], rel=1e-5)
    assert values(got, "attribution") == pytest.approx([case[5] for case in cases], rel=1e-5)
    assert values(got, "intervention_cost") == pytest.approx([-0.005] * n)


def test_fossilize_and_germinate_shaping():
    cases = [  # (acc at germination, epochs_in_stage, c', shaping); decision accuracy 53
        (50.0, 3, 3.0, (0.5 + 0.3) * 0.6),  # legitimacy 3/5
        (50.0, 7, 3.0, 0.8),  # legitimacy capped at 1
        (54.0, 3, 1.5, -(0.5 + 0.2) - 0.3),  # T' = -1: declined, and the ransomware signature
        (53.125, 3, 1.5, -(0.5 + 0.025)),  # T' = -0.125: declined, no signature
        (50.0, 3, 0.5, -0.2),  # weak contribution
    ]
    n = len(cases)
    prev, nxt = states(n, acc=53.0)
    for env, (germ, k, c, _) in enumerate(cases):
        seed(prev, env, 2, Stage.PROBATIONARY, k, contribution=c, acc_at_germination=germ)
        seed(nxt, env, 2, Stage.FOSSILIZED, 1, contribution=c, acc_at_germination=germ, acc_at_stage_start=53.0)
    got = reward(prev, nxt, epoch_metrics([53.0] * n), actions([Op.FOSSILIZE] * n, [2] * n))
    assert values(got, "action_shaping") == pytest.approx([case[3] for case in cases], rel=1e-5)
    assert values(got, "attribution") == [0.0] * n  # fossilized seeds earn no attribution
    assert values(got, "intervention_cost") == pytest.approx([-0.01] * n)

    prev, nxt = states(1)
    seed(nxt, 0, 0, Stage.TRAINING, 0, epochs_total=1)
    got = reward(prev, nxt, epoch_metrics([52.0]), actions([Op.GERMINATE], [0]))
    assert values(got, "action_shaping") == [0.0]
    assert values(got, "intervention_cost") == pytest.approx([-0.02])
    assert values(got, "pbrs") == pytest.approx([0.3 * GAMMA * 2.0])  # germination is paid by PBRS


def test_terminal_and_governor():
    """The fossil bonus rests on each fossil's own smoothed contribution, never on the host's
    drift since germination: slot 2's fossil rode a 20 pp host gain but contributes 0.5 pp."""
    prev, nxt = states(2)
    for env in range(2):
        seed(nxt, env, 0, Stage.FOSSILIZED, 4, contribution_ema=1.0, acc_at_stage_start=50.0)  # own 1 pp: contributing
        seed(nxt, env, 1, Stage.FOSSILIZED, 4, contribution_ema=0.99, acc_at_stage_start=55.0)  # just under: not
        seed(nxt, env, 2, Stage.FOSSILIZED, 4, contribution_ema=0.5, acc_at_stage_start=70.0)  # host drift only: not
    metrics = epoch_metrics([60.0, 60.0])
    got = reward(prev, nxt, metrics, is_last=[True, False], rollback=torch.tensor([True, False]))
    assert values(got, "terminal") == pytest.approx([0.05 * 60 + 3.0, 0.0])
    assert values(got, "governor") == [-10.0, 0.0]
    assert values(reward(prev, nxt, metrics), "governor") == [0.0, 0.0]
    off = reward(prev, nxt, metrics, config=RewardConfig(terminal=False), is_last=True)
    assert values(off, "terminal") == [0.0, 0.0]
    simplified = reward(prev, nxt, metrics, config=RewardConfig(family="simplified"), is_last=True)
    assert values(simplified, "terminal") == pytest.approx([3 * 0.6 + 2.0] * 2)


# -- other families ----------------------------------------------------------------------------


def test_sparse_and_minimal():
    model = tiny_model()
    light_mid = model.blueprint_param_count[1, CONV_LIGHT].item()
    prev, nxt = states(3)
    seed(prev, 0, 1, Stage.TRAINING, 2, epochs_total=3)
    seed(nxt, 0, 1, Stage.EMBARGOED, 0)
    seed(prev, 1, 1, Stage.TRAINING, 2, epochs_total=5)
    seed(nxt, 1, 1, Stage.EMBARGOED, 0)
    seed(nxt, 2, 2, Stage.FOSSILIZED, 3)
    seed(nxt, 2, 1, Stage.TRAINING, 3)
    metrics = epoch_metrics([60.0, 60.0, 100.0])
    extra = (light_mid + model.blueprint_param_count[2, CONV_LIGHT].item()) / 500_000
    sparse = RewardConfig(family="sparse")
    assert values(reward(prev, nxt, metrics, config=sparse), "sparse") == [0.0] * 3
    got = reward(prev, nxt, metrics, config=sparse, is_last=True)
    assert values(got, "sparse") == pytest.approx([0.6, 0.6, 1.0 - 0.1 * extra], rel=1e-5)
    doubled = dataclasses.replace(sparse, sparse_scale=2.0)
    scaled = reward(prev, nxt, epoch_metrics([100.0] * 3), config=doubled, is_last=True)
    assert values(scaled, "sparse")[:2] == pytest.approx([2.0, 2.0])  # clamped before scaling
    minimal = reward(
        prev, nxt, metrics, actions([Op.CULL, Op.CULL, Op.WAIT], [1, 1, 1]), RewardConfig(family="minimal")
    )
    assert values(minimal, "action_shaping") == pytest.approx([-0.1, 0.0, 0.0])  # ages 3, 5


def test_loss_family_rewards_a_decrease():
    prev_loss = [2.0, 1.0, 1.0, 1.0, 2.3]
    now_loss = [1.9, 1.05, 3.0, 0.0, 2.2]
    n = len(prev_loss)
    prev, nxt = states(n)
    prev["metrics", "val_loss"] = torch.tensor(prev_loss)
    prev["epoch"][-1] = 0  # first step: the previous loss is the reset evaluation, finite
    config = RewardConfig(family="loss")
    got = reward(prev, nxt, epoch_metrics([50.0] * n, loss=now_loss), config=config, is_last=True)
    # n = clamp(delta / 0.05, -5, 5), halved when positive (regression); reward -5 n.
    assert values(got, "loss_progress") == pytest.approx([10.0, -2.5, -12.5, 25.0, 10.0], rel=1e-4)
    # terminal clamp((2.3 - loss) / (2.3 - 0.3), 0, 1)
    assert values(got, "terminal") == pytest.approx([0.2, 0.625, 0.0, 1.0, 0.05], rel=1e-5)
    stories = RewardConfig.for_task("tinystories", family="loss")
    got = reward(
        prev, nxt, epoch_metrics([50.0] * n, loss=[3.5225] * n), config=stories, is_last=True
    )  # midway between 5.545 and 1.5
    assert values(got, "terminal") == pytest.approx([0.5] * n, rel=1e-5)


def test_accuracy_family_pays_accuracy_as_it_is_earned_and_rents_every_held_seed():
    """accuracy_progress = w (acc - acc_prev); rent = -r * held seed params / host params,
    fossils included, culled seeds free; the progress telescopes to the final accuracy."""
    model = tiny_model()
    host = model.host_param_count
    light = model.blueprint_param_count[:, CONV_LIGHT].tolist()
    prev, nxt = states(3, acc=52.0)
    seed(nxt, 0, 0, Stage.TRAINING, 1)
    seed(nxt, 0, 2, Stage.FOSSILIZED, 1)
    seed(nxt, 1, 1, Stage.EMBARGOED, 1)  # culled: no rent
    config = RewardConfig(family="accuracy", accuracy_progress_weight=2.0, accuracy_rent_weight=0.1)
    got = reward(prev, nxt, epoch_metrics([55.0, 50.0, 52.0]), config=config)
    assert values(got, "accuracy_progress") == pytest.approx([6.0, -4.0, 0.0])
    assert values(got, "rent") == pytest.approx([-0.1 * (light[0] + light[2]) / host, 0.0, 0.0], rel=1e-5)
    assert tuple(got.keys()) == ("accuracy_progress", "rent", "governor")
    # Summed over an episode, the progress is w * (final accuracy - first reading).
    readings = [10.0, 35.0, 30.0, 61.0]
    total = 0.0
    for before, after in zip(readings, readings[1:]):
        step_prev, step_next = states(1, acc=before)
        total += values(reward(step_prev, step_next, epoch_metrics([after]), config=config), "accuracy_progress")[0]
    assert total == pytest.approx(2.0 * (readings[-1] - readings[0]))


def test_static_baseline_pays_progress_relative_to_the_twin():
    """With `static_baseline`, accuracy_progress = w ((acc - acc_prev) - (twin - twin_prev)),
    read from both states' `static` twin; rent and the governor term are unchanged."""
    prev, nxt = states(3, acc=52.0)
    prev["static"] = prev.select("metrics").clone()
    nxt["static"] = nxt.select("metrics").clone()
    nxt["static", "metrics", "val_accuracy"] = torch.tensor([53.0, 50.0, 57.0])
    config = RewardConfig(family="accuracy", accuracy_progress_weight=2.0, static_baseline=True)
    got = reward(prev, nxt, epoch_metrics([55.0, 50.0, 52.0]), config=config)
    assert values(got, "accuracy_progress") == pytest.approx([2.0 * (3 - 1), 2.0 * (-2 + 2), 2.0 * (0 - 5)])
    without = dataclasses.replace(config, static_baseline=False)
    plain = reward(prev, nxt, epoch_metrics([55.0, 50.0, 52.0]), config=without)
    assert values(got, "rent") == values(plain, "rent")
    assert values(plain, "accuracy_progress") == pytest.approx([6.0, -4.0, 0.0])


def test_loss_rent_skips_young_seeds():
    model = tiny_model()
    prev, nxt = states(2)
    seed(nxt, 0, 1, Stage.TRAINING, 1, epochs_total=2)
    seed(nxt, 1, 1, Stage.TRAINING, 1, epochs_total=3)
    got = reward(prev, nxt, epoch_metrics([50.0] * 2), config=RewardConfig(family="loss"))
    growth = model.blueprint_param_count[1, CONV_LIGHT].item() / model.host_param_count
    assert values(got, "rent") == pytest.approx([0.0, -0.05 * math.log1p(growth)], rel=1e-5)


# -- invariants ----------------------------------------------------------------------------------

STAGES = tuple(int(s) for s in Stage)


@st.composite
def transitions(draw):
    """A random (prev, next, metrics) of 3 envs: any stages, ages, accuracies, contributions."""
    n = 3
    prev, nxt = states(n, acc=draw(st.floats(20, 80)), loss=draw(st.floats(0.5, 2.5)))
    floats = st.floats(-5, 5, allow_nan=False)
    for state in (prev, nxt):
        for env in range(n):
            for slot in range(S):
                put(
                    state,
                    env,
                    slot,
                    stage=draw(st.sampled_from(STAGES)),
                    prev_stage=draw(st.sampled_from(STAGES)),
                    epochs_in_stage=draw(st.integers(0, 8)),
                    epochs_total=draw(st.integers(0, 12)),
                    blueprint=draw(st.integers(0, 5)),
                    acc_at_germination=50.0 + draw(floats),
                    acc_at_stage_start=50.0 + draw(floats),
                    contribution=draw(floats),
                    alpha=draw(st.floats(0, 1)),
                )
    acc = [50.0 + draw(floats) for _ in range(n)]
    contribution = [[draw(floats) for _ in range(S)] for _ in range(n)]
    loss = [draw(st.floats(0.5, 2.5)) for _ in range(n)]
    return prev, nxt, epoch_metrics(acc, contribution, loss)


@settings(max_examples=40, deadline=None)
@given(
    transitions(),
    st.sampled_from(FAMILIES),
    st.lists(st.sampled_from(list(Op)), min_size=3, max_size=3),
    st.lists(st.integers(-1, 4), min_size=3, max_size=3),
    st.booleans(),
)
def test_wait_ignores_heads_and_failed_actions_are_waits(transition, family, ops, slots, is_last):
    prev, nxt, metrics = transition
    config = RewardConfig(family=family)
    rollback = torch.tensor([True, False, False])
    wait = reward(prev, nxt, metrics, actions([Op.WAIT] * 3, [0] * 3), config, is_last=is_last, rollback=rollback)
    assert tuple(wait.keys()) == component_names(config) == FAMILY_COMPONENTS[family]
    for key, value in wait.items():
        assert value.dtype == torch.float32 and value.shape == (3,) and torch.isfinite(value).all(), key
    assert torch.equal(total(wait), sum(wait.values()))

    waits = actions([Op.WAIT] * 3, slots, blueprint=1)
    other_slots = reward(prev, nxt, metrics, waits, config, is_last=is_last, rollback=rollback)
    failed = reward(prev, nxt, metrics, actions(ops, slots), config, [False] * 3, is_last=is_last, rollback=rollback)
    for key in wait.keys():
        assert torch.equal(other_slots[key], wait[key]), key
        assert torch.equal(failed[key], wait[key]), key


def test_total_is_the_sum_and_an_env_step_rewards():
    """A real env step (tiny host, random data) feeds every family; the reward is the sum."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(1)
    prev = init_state(model, 3, generator)
    prev["metrics", "val_accuracy"] = torch.full((3,), 10.0)
    prev["metrics", "val_loss"] = torch.full((3,), 2.3)
    x = torch.randn(2, 8, 3, 8, 8, generator=generator)
    y = torch.randint(0, 10, (2, 8), generator=generator)
    action = actions([Op.GERMINATE, Op.WAIT, Op.CULL], [0, 1, 2])
    nxt, metrics = env_step(StepFunctions(model), prev, action, Batches(x, y, x, y), generator)
    assert metrics["executed"].tolist() == [True, True, False]
    for family in FAMILIES:
        config = RewardConfig(family=family)
        got = compute_reward(config, model, prev, nxt, action, metrics, torch.ones(3, dtype=torch.bool))
        assert tuple(got.keys()) == component_names(config)
        assert torch.isfinite(total(got)).all()
        assert torch.equal(total(got), sum(got.values()))
        assert total(got).tolist() == pytest.approx(torch.stack(list(got.values())).sum(0).tolist(), abs=1e-5)


# -- PBRS telescopes -----------------------------------------------------------------------------

_P = {int(Stage.GERMINATED): 1.0, int(Stage.TRAINING): 2.0, int(Stage.BLENDING): 3.5,
      int(Stage.PROBATIONARY): 5.5, int(Stage.FOSSILIZED): FOSSILIZED}  # fmt: skip


def phi_by_hand(stages: list[list[int]], epochs: list[list[int]], progress: bool) -> list[float]:
    """Phi per env from the reference formula: P[stage] + min(0.3 k, 2) for seeded stages."""
    return [
        sum(_P[s] + (min(0.3 * k, 2.0) if progress else 0.0) if s in _P else 0.0 for s, k in zip(row_s, row_k))
        for row_s, row_k in zip(stages, epochs)
    ]


def test_potential_by_hand():
    slots = empty_slots(1, S, torch.device("cpu"))
    slots["stage"] = torch.tensor([[int(Stage.BLENDING), int(Stage.EMBARGOED), int(Stage.FOSSILIZED)]])
    slots["epochs_in_stage"] = torch.tensor([[2, 3, 9]])
    assert potential(RewardConfig(), slots).tolist() == pytest.approx([3.5 + 0.6 + FOSSILIZED + 2.0])
    assert potential(RewardConfig(family="loss"), slots).tolist() == pytest.approx([3.5 + FOSSILIZED])


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3).flatmap(
        lambda n: st.lists(
            st.tuples(
                st.lists(st.lists(st.sampled_from(STAGES), min_size=S, max_size=S), min_size=n, max_size=n),
                st.lists(st.lists(st.integers(0, 12), min_size=S, max_size=S), min_size=n, max_size=n),
            ),
            min_size=2,
            max_size=12,
        )
    ),
    st.floats(0.8, 1.0),
    st.floats(0.05, 1.0),
    st.sampled_from(("shaped", "loss")),
)
def test_pbrs_telescopes_over_an_episode(episode, gamma, weight, family):
    """sum_t gamma^t F_t = w (gamma^T Phi(s_T) - Phi(s_0)) for any sequence of slot states
    that does not end the episode, and exactly -w Phi(s_0) for one that does: the terminal
    state's potential is 0, so nothing of it is left in the return."""
    config = RewardConfig(family=family, gamma=gamma, pbrs_weight=weight, loss_pbrs_weight=weight)
    n = len(episode[0][0])

    def slots_of(step):
        slots = empty_slots(n, S, torch.device("cpu"))
        slots["stage"] = torch.tensor(step[0])
        slots["epochs_in_stage"] = torch.tensor(step[1])
        return slots

    horizon = len(episode) - 1
    progress = family != "loss"
    first = phi_by_hand(*episode[0], progress)
    last = phi_by_hand(*episode[-1], progress)
    for terminal in (False, True):
        discounted = torch.zeros(n, dtype=torch.float64)
        for t in range(horizon):
            is_last = torch.full((n,), terminal and t == horizon - 1)
            shaping = pbrs_shaping(config, slots_of(episode[t]), slots_of(episode[t + 1]), is_last)
            discounted += gamma**t * shaping.double()
        expected = [weight * ((0.0 if terminal else gamma**horizon * b) - a) for a, b in zip(first, last)]
        assert discounted.tolist() == pytest.approx(expected, abs=1e-4)


def test_registered_reward_families_get_the_governor_term_and_are_strict() -> None:
    def gain(config: RewardConfig, t: Transition) -> torch.Tensor:
        return (t.accuracy - t.prev_accuracy) / 100

    register_reward_family("test_gain", {"gain": gain})
    register_reward_family("test_gain", {"gain": gain})  # the same family again: a no-op
    assert component_names(RewardConfig(family="test_gain")) == ("gain", "governor")
    with pytest.raises(ValueError, match="built-in reward family"):
        register_reward_family("shaped", {"gain": gain})
    with pytest.raises(ValueError, match="already registered with other components"):
        register_reward_family("test_gain", {"other": gain})
    with pytest.raises(ValueError, match="must be one of .*register_reward_family"):
        RewardConfig(family="unregistered")
