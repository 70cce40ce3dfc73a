"""Action masks: exact with respect to `action_legality` on reachable states.

Reachable states come from random walks: `apply_action` with actions drawn from the masks
(and some arbitrary, possibly illegal, ones), then `tick` on synthetic end-of-epoch metrics
drawn around the gate thresholds, on a small `LifecycleConfig` so that every stage is
reached within a few steps (as in `test_lifecycle_properties.py`). On every visited state:
each (op, slot, blueprint, blend) the masks allow is legal, and each legal (op, slot) is
allowed (masks are exact, not just safe).
"""

from __future__ import annotations

import itertools
import random
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from esper_func.core.config import CNNHostConfig, CoreConfig, LifecycleConfig, TransformerHostConfig
from esper_func.core.lifecycle import action_legality, apply_action, tick
from esper_func.core.masks import action_masks, check_masks
from esper_func.core.model import Model, build_model
from esper_func.core.stages import ACTION_HEADS, BlendMode, Op, Stage
from esper_func.core.state import init_state

CONTRIBUTIONS = (-3.0, -1e-3, 0.0, 1e-3, 0.5, 0.999, 1.0, 1.001, 1.5, 12.0)


pytestmark = pytest.mark.usefixtures("single_thread")


@lru_cache(maxsize=None)
def small_model(lifecycle: LifecycleConfig = LifecycleConfig(), topology: str = "cnn") -> Model:
    host = CNNHostConfig.preset("tiny") if topology == "cnn" else TransformerHostConfig.preset("tiny")
    return build_model(CoreConfig(host=host, lifecycle=lifecycle, compile=False))


lifecycle_configs = st.builds(
    LifecycleConfig,
    max_epochs=st.integers(1, 20),
    min_training_epochs=st.integers(1, 2),
    train_dwell_fraction=st.sampled_from([0.0, 0.1]),
    grad_ratio_threshold=st.sampled_from([0.0, 0.05]),
    blend_steps=st.integers(1, 3),
    fossilize_min_contribution=st.sampled_from([1.0, 0.5]),
    probation_min_epochs=st.integers(1, 4),
    probation_timeout_fraction=st.sampled_from([0.0, 0.2]),
    embargo_epochs=st.integers(1, 2),
    reset_epochs=st.integers(1, 2),
    min_cull_age=st.integers(0, 3),
)


def make_action(rows: list[tuple[int, int, int, int]]) -> TensorDict:
    columns = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).T
    return TensorDict(dict(zip(ACTION_HEADS, columns)), batch_size=[len(rows)])


def sample_from_masks(rng: random.Random, masks: TensorDict) -> list[tuple[int, int, int, int]]:
    """Op from the op mask, slot from row op, blueprint and blend from theirs."""
    rows = []
    for env in range(masks.batch_size[0]):
        op = rng.choice(masks["op"][env].nonzero().flatten().tolist())
        slot = rng.choice(masks["slot"][env, op].nonzero().flatten().tolist())
        blueprint = rng.choice(masks["blueprint"][env].nonzero().flatten().tolist())
        blend = rng.choice(masks["blend"][env].nonzero().flatten().tolist())
        rows.append((op, slot, blueprint, blend))
    return rows


def synthetic_metrics(rng: random.Random, model: Model, n_envs: int) -> TensorDict:
    n_slots = model.n_slots
    thr = model.config.lifecycle.grad_ratio_threshold
    ratios = (0.0, 0.5 * thr, thr, 2 * thr + 0.01, 1.0)
    return TensorDict(
        {
            "train_loss": torch.tensor([rng.choice((0.1, 1.0, 2.3)) for _ in range(n_envs)]),
            "val_loss": torch.tensor([rng.choice((0.1, 1.0, 2.3)) for _ in range(n_envs)]),
            "val_accuracy": torch.tensor([rng.choice((0.0, 12.5, 50.0, 99.0)) for _ in range(n_envs)]),
            "contribution": torch.tensor([[rng.choice(CONTRIBUTIONS) for _ in range(n_slots)] for _ in range(n_envs)]),
            "grad_ratio": torch.tensor([[rng.choice(ratios) for _ in range(n_slots)] for _ in range(n_envs)]),
        },
        batch_size=[n_envs],
    )


def assert_masks_exact(model: Model, state: TensorDict) -> TensorDict:
    """Every mask-allowed combination is legal; every legal (op, slot) is mask-allowed."""
    masks = action_masks(model, state)
    check_masks(masks)
    n_envs, n_slots, n_bp = state.batch_size[0], model.n_slots, len(model.blueprint_names)
    light = state.exclude("params", "momentum", "buffers")  # legality reads lifecycle fields only

    # All (op, slot, blueprint, blend) per env, in one batched legality call.
    combos = list(itertools.product(range(len(Op)), range(n_slots), range(n_bp), range(len(BlendMode))))
    env_index = torch.arange(n_envs).repeat_interleave(len(combos))
    action = make_action(combos * n_envs)
    legal = action_legality(model, light[env_index], action).reshape(n_envs, len(combos))
    c = torch.tensor(combos).T
    allowed = (
        masks["op"][:, c[0]]
        & masks["slot"][:, c[0], c[1]]
        & masks["blueprint"][:, c[2]]
        & masks["blend"][:, c[3]]
    )
    bad = allowed & ~legal
    assert not bool(bad.any()), (
        f"masks allow illegal actions: {[(e, combos[i]) for e, i in bad.nonzero().tolist()][:5]}"
    )

    # Exactness on (op, slot): with a mask-allowed blueprint and blend, legal <=> allowed.
    blueprint = int(masks["blueprint"][0].nonzero()[0])
    pairs = list(itertools.product(range(len(Op)), range(n_slots)))
    env_index = torch.arange(n_envs).repeat_interleave(len(pairs))
    action = make_action([(op, slot, blueprint, 0) for op, slot in pairs] * n_envs)
    legal_pairs = action_legality(model, light[env_index], action).reshape(n_envs, len(Op), n_slots)
    assert torch.equal(masks["slot"], legal_pairs), (
        f"slot mask {masks['slot'].tolist()} != legality {legal_pairs.tolist()}"
    )
    assert torch.equal(masks["op"], legal_pairs.any(-1))
    assert bool(masks["slot"][:, int(Op.WAIT)].all()) and bool(masks["op"][:, int(Op.WAIT)].all())
    return masks


def walk(model: Model, n_envs: int, n_steps: int, seed: int, seen_ops: set[str] | None = None) -> None:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    state = init_state(model, n_envs, generator)
    n_bp = len(model.blueprint_names)
    for _ in range(n_steps):
        masks = assert_masks_exact(model, state)
        if seen_ops is not None:
            seen_ops.update(op.name for op in Op if bool(masks["op"][:, int(op)].any()))
        sampled = sample_from_masks(rng, masks)
        from_masks = [rng.random() < 0.8 for _ in range(n_envs)]
        rows = [
            row
            if keep
            else (rng.randint(-1, 4), rng.randint(-1, model.n_slots), rng.randint(-1, n_bp), rng.randint(-1, 3))
            for row, keep in zip(sampled, from_masks)
        ]
        state, executed = apply_action(model, state, make_action(rows), generator)
        assert bool(executed[torch.tensor(from_masks)].all()), (
            f"a mask-sampled action did not execute: {rows}, {executed.tolist()}"
        )
        assert_masks_exact(model, state)
        state = tick(model, state, synthetic_metrics(rng, model, n_envs))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lifecycle=lifecycle_configs, n_envs=st.integers(1, 3), n_steps=st.integers(1, 25), seed=st.integers(0, 2**16))
def test_masks_are_exact_on_reachable_states(lifecycle: LifecycleConfig, n_envs: int, n_steps: int, seed: int) -> None:
    walk(small_model(lifecycle), n_envs, n_steps, seed)


def test_a_seeded_walk_offers_every_op() -> None:
    """Guards the property against vacuity: CULL and FOSSILIZE are offered along the way."""
    lifecycle = LifecycleConfig(max_epochs=10, min_training_epochs=1, blend_steps=1, probation_min_epochs=3)
    seen: set[str] = set()
    for seed in range(3):
        walk(small_model(lifecycle), 3, 20, seed, seen)
    assert seen == {op.name for op in Op}, seen


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_fresh_state_offers_only_wait_and_germinate(topology: str) -> None:
    model = small_model(topology=topology)
    state = init_state(model, 2, torch.Generator().manual_seed(0))
    masks = action_masks(model, state)
    assert masks.batch_size == torch.Size([2])
    assert {key: tuple(value.shape) for key, value in masks.items()} == {
        "op": (2, 4),
        "slot": (2, 4, 3),
        "blueprint": (2, len(model.blueprint_names)),
        "blend": (2, 3),
    }
    assert all(value.dtype == torch.bool for value in masks.values())
    assert masks["op"].tolist() == [[True, True, False, False]] * 2
    assert masks["slot"].tolist() == [[[True] * 3, [True] * 3, [False] * 3, [False] * 3]] * 2
    assert masks["blueprint"].tolist() == [[name != "noop" for name in model.blueprint_names]] * 2
    assert bool(masks["blend"].all())
    check_masks(masks)


def test_fossilize_only_where_the_gate_holds() -> None:
    model = small_model()
    state = init_state(model, 2, torch.Generator().manual_seed(0))
    slots = state["slots"]
    # env 0: mid is PROBATIONARY with smoothed contribution 1.5 (G5 holds), late at 0.5 (it does
    # not); this epoch's measurements say the opposite, and G5 does not read them.
    for slot, contribution in ((1, 1.5), (2, 0.5)):
        slots["stage"][0, slot] = int(Stage.PROBATIONARY)
        slots["contribution_ema"][0, slot] = contribution
        slots["contribution"][0, slot] = 2.0 - contribution
        slots["alpha"][0, slot] = 1.0
        slots["epochs_total"][0, slot] = 10
    masks = action_masks(model, state)
    assert masks["slot"][0, int(Op.FOSSILIZE)].tolist() == [False, True, False]
    assert masks["op"][0].tolist() == [True, True, True, True]
    assert masks["slot"][0, int(Op.CULL)].tolist() == [False, True, True]
    assert masks["slot"][0, int(Op.GERMINATE)].tolist() == [True, False, False]
    assert masks["op"][1].tolist() == [True, True, False, False]
    assert_masks_exact(model, state)


def test_a_young_seed_cannot_be_culled() -> None:
    model = small_model()
    generator = torch.Generator().manual_seed(0)
    state = init_state(model, 1, generator)
    state, executed = apply_action(
        model, state, make_action([(int(Op.GERMINATE), 0, 1, int(BlendMode.LINEAR))]), generator
    )
    assert bool(executed.all())
    masks = action_masks(model, state)
    assert not bool(masks["op"][0, int(Op.CULL)]) and not bool(masks["slot"][0, int(Op.CULL)].any())
    assert masks["slot"][0, int(Op.GERMINATE)].tolist() == [False, True, True]
    metrics = TensorDict(
        {
            "train_loss": torch.ones(1),
            "val_loss": torch.ones(1),
            "val_accuracy": torch.full((1,), 10.0),
            "contribution": torch.zeros(1, 3),
            "grad_ratio": torch.zeros(1, 3),
        },
        batch_size=[1],
    )
    state = tick(model, state, metrics)  # one epoch old: min_cull_age 1 reached
    masks = action_masks(model, state)
    assert masks["slot"][0, int(Op.CULL)].tolist() == [True, False, False]
    assert bool(masks["op"][0, int(Op.CULL)])


def test_check_masks_names_the_envs_without_a_legal_action() -> None:
    model = small_model()
    masks = action_masks(model, init_state(model, 4, torch.Generator().manual_seed(0)))
    broken = masks.clone()
    broken["op"][1] = False
    broken["slot"][3, int(Op.GERMINATE)] = False  # GERMINATE offered, but at no slot
    with pytest.raises(ValueError, match=r"envs \[1, 3\]") as error:
        check_masks(broken)
    assert "env 1: op" in str(error.value) and "env 3: slot" in str(error.value)
    broken = masks.clone()
    broken["blueprint"][2] = False
    with pytest.raises(ValueError, match=r"envs \[2\].*blueprint"):
        check_masks(broken)
