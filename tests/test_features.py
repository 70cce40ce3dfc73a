"""The observation schema: shape, names, bounds for extreme inputs, zero blocks, one-hots."""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from esper_func.core.config import CNNHostConfig, CoreConfig, TransformerHostConfig
from esper_func.core.features import (
    CRITIC_FEATURES,
    FEATURE_SCHEMA_VERSION,
    HISTORY_FEATURES,
    SLOT_STAGES,
    feature_names,
    feature_spec,
    observe,
    observe_critic,
)
from esper_func.core.model import Model, build_model
from esper_func.core.signals import SignalConfig, init_signals, update_signals
from esper_func.core.stages import SLOT_NAMES, BlendMode, Stage
from esper_func.core.state import init_state, seed_param_count

DOC = Path(__file__).resolve().parents[1] / "docs" / "observation.md"
MAX_EPOCHS = 25


pytestmark = pytest.mark.usefixtures("single_thread")


@lru_cache(maxsize=None)
def model(topology: str = "cnn") -> Model:
    host = CNNHostConfig.preset("tiny") if topology == "cnn" else TransformerHostConfig.preset("tiny")
    return build_model(CoreConfig(host=host, compile=False))


def fresh(m: Model, n_envs: int = 2) -> tuple[TensorDict, TensorDict]:
    return init_state(m, n_envs, torch.Generator().manual_seed(0)), init_signals(SignalConfig(), n_envs, "cpu")


def column(m: Model, obs: torch.Tensor, name: str) -> torch.Tensor:
    return obs[:, feature_names(m).index(name)]


def slot_block(m: Model, obs: torch.Tensor, slot: int) -> torch.Tensor:
    names = feature_names(m)
    idx = [i for i, n in enumerate(names) if n.startswith(f"{SLOT_NAMES[slot]}.")]
    assert idx == list(range(idx[0], idx[0] + len(idx))), "a slot block is contiguous"
    return obs[:, idx]


def set_slot(state: TensorDict, env: int, slot: int, **fields) -> TensorDict:
    state = state.clone()
    for key, value in fields.items():
        state["slots", key][env, slot] = value
    return state


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaN equal to NaN."""
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)


def test_schema_version_and_pinned_sizes() -> None:
    assert FEATURE_SCHEMA_VERSION == 2
    # Pinned: a change here is a schema change (bump the version, update docs/observation.md).
    assert len(feature_names(model("cnn"))) == 84
    assert len(feature_names(model("transformer"))) == 78
    for topology in ("cnn", "transformer"):
        names = feature_names(model(topology))
        assert len(set(names)) == len(names)
        assert all(feature.low < feature.high for feature in feature_spec(model(topology)))


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_shape_dtype_and_fresh_values(topology: str) -> None:
    m = model(topology)
    state, signals = fresh(m, 3)
    obs = observe(m, state, signals, MAX_EPOCHS)
    assert obs.shape == (3, len(feature_names(m))) and obs.dtype == torch.float32
    assert not bool(obs.any()), "a fresh env (no epoch, all slots DORMANT, zero metrics) reads all zeros"


def test_docs_table_matches_the_cnn_schema() -> None:
    rows = re.findall(
        r"^\| (\d+) \| `([^`]+)` \| (.+) \| \[(-?[\d.]+), (-?[\d.]+)\] \|$", DOC.read_text(), re.MULTILINE
    )
    spec = feature_spec(model("cnn"))
    assert [(int(i), name, formula, float(lo), float(hi)) for i, name, formula, lo, hi in rows] == [
        (i, f.name, f.formula, f.low, f.high) for i, f in enumerate(spec)
    ]
    assert f"FEATURE_SCHEMA_VERSION = {FEATURE_SCHEMA_VERSION}" in DOC.read_text()


def test_the_critic_reads_the_gap_to_the_static_twin_bounded_and_nan_free() -> None:
    m = model()
    state, _ = fresh(m, 4)
    state["static"] = state.select("metrics").clone()
    state["metrics", "val_accuracy"] = torch.tensor([50.0, 52.5, 40.0, float("nan")])
    state["static", "metrics", "val_accuracy"] = torch.tensor([50.0, 50.0, 90.0, 50.0])
    gap = observe_critic(state)
    assert gap.shape == (4, len(CRITIC_FEATURES)) and gap.dtype == torch.float32
    torch.testing.assert_close(gap[:, 0], torch.tensor([0.0, math.tanh(0.5), math.tanh(-10.0), 0.0]))
    rows = re.findall(r"^\| `([^`]+)` \| (.+) \| \[(-?[\d.]+), (-?[\d.]+)\] \|$", DOC.read_text(), re.MULTILINE)
    assert [(name, formula, float(lo), float(hi)) for name, formula, lo, hi in rows] == [
        (f.name, f.formula, f.low, f.high) for f in CRITIC_FEATURES
    ]


def test_global_features_by_name() -> None:
    m = model()
    config = SignalConfig()
    state, signals = fresh(m, 2)
    for loss, acc in ((2.0, 20.0), (1.5, 30.0), (1.5, 30.2)):
        signals = update_signals(
            config,
            signals,
            TensorDict({"val_loss": torch.tensor([loss, 15.0]), "val_accuracy": torch.tensor([acc, 50.0])}, [2]),
        )
    state["epoch"] = torch.tensor([5, 40])
    state["metrics", "val_accuracy"] = torch.tensor([30.2, 50.0])
    state["metrics", "val_loss"] = torch.tensor([1.5, 15.0])
    state["metrics", "train_loss"] = torch.tensor([0.0, 1e9])
    obs = observe(m, state, signals, MAX_EPOCHS)

    def close(name: str, want: list[float]) -> None:
        torch.testing.assert_close(column(m, obs, name), torch.tensor(want), msg=name)

    close("epoch_fraction", [0.2, 1.0])
    close("val_accuracy", [0.302, 0.5])
    close("val_loss", [math.log1p(1.5) / math.log(16), 1.0])
    close("train_loss", [0.0, 1.0])
    close("best_val_loss", [math.log1p(1.5) / math.log(16), 1.0])
    close("best_val_accuracy", [0.302, 0.5])
    close("loss_delta", [0.0, 0.0])
    close("acc_delta", [math.tanh(0.2 / 5), 0.0])
    close("plateau_epochs", [1 / MAX_EPOCHS, 2 / MAX_EPOCHS])
    close("stabilized", [0.0, 0.0])
    losses = [0.0, 0.0, math.log1p(2.0) / math.log(16), math.log1p(1.5) / math.log(16), math.log1p(1.5) / math.log(16)]
    for k in range(HISTORY_FEATURES):
        close(f"val_loss_history.{k}", [losses[k], 0.0 if k < 2 else 1.0])
        close(f"val_acc_history.{k}", [[0.0, 0.0, 0.2, 0.3, 0.302][k], [0.0, 0.0, 0.5, 0.5, 0.5][k]])
    # Relative loss change: (2.0 - 1.5) / 2.0 = 0.25 -> tanh(2.5) one epoch earlier.
    signals["loss_delta"] = torch.tensor([0.5, 0.0])
    signals["prev_val_loss"] = torch.tensor([2.0, 0.0])
    obs = observe(m, state, signals, MAX_EPOCHS)
    close("loss_delta", [math.tanh(2.5), 0.0])


def test_parameter_growth_and_share() -> None:
    m = model()
    state, signals = fresh(m, 2)
    # env 0: a conv_light seed (gated) in mid, a fossilized norm seed in late, a culled seed in early.
    bp = m.blueprint_names
    state = set_slot(
        state, 0, 1, stage=int(Stage.TRAINING), blueprint=bp.index("conv_light"), blend=int(BlendMode.GATED)
    )
    state = set_slot(state, 0, 2, stage=int(Stage.FOSSILIZED), blueprint=bp.index("norm"), alpha=1.0)
    state = set_slot(state, 0, 0, stage=int(Stage.CULLED), blueprint=bp.index("conv_heavy"))
    obs = observe(m, state, signals, MAX_EPOCHS)
    mid = int(m.blueprint_param_count[1, bp.index("conv_light")] + m.gate_param_count[1])
    late = int(m.blueprint_param_count[2, bp.index("norm")])
    assert mid == int(seed_param_count(m, state["slots"])[0, 1])
    growth = (mid + late) / m.host_param_count
    total = m.host_param_count + mid + late
    torch.testing.assert_close(column(m, obs, "param_growth"), torch.tensor([growth / (growth + 1), 0.0]))
    torch.testing.assert_close(column(m, obs, "mid.param_share"), torch.tensor([mid / total, 0.0]))
    torch.testing.assert_close(column(m, obs, "late.param_share"), torch.tensor([late / total, 0.0]))
    torch.testing.assert_close(column(m, obs, "early.param_share"), torch.tensor([0.0, 0.0]))
    assert float(column(m, obs, "early.blueprint.conv_heavy")[0]) == 1.0, "a culled slot still shows what it held"


def test_empty_slots_are_zero_blocks_whatever_their_stale_fields() -> None:
    m = model()
    state, signals = fresh(m, 2)
    stale = dict(
        alpha=0.7, contribution=-4.0, grad_ratio_ema=3.0, epochs_in_stage=9, blueprint=4, blend=2, epochs_total=12
    )
    state = set_slot(state, 0, 0, **stale)  # DORMANT with leftovers from an earlier seed
    state = set_slot(state, 0, 2, stage=int(Stage.BLENDING), **stale)
    obs = observe(m, state, signals, MAX_EPOCHS)
    for env in range(2):
        for slot in range(3):
            block = slot_block(m, obs, slot)[env]
            occupied = env == 0 and slot == 2
            assert bool(block.any()) == occupied, f"env {env} slot {slot}: {block.tolist()}"


def test_stage_and_blueprint_one_hots() -> None:
    m = model()
    n_bp = len(m.blueprint_names)
    stages = list(SLOT_STAGES)
    state, signals = fresh(m, len(stages))
    for env, stage in enumerate(stages):
        for slot in range(3):
            state = set_slot(state, env, slot, stage=int(stage), blueprint=(env + slot) % n_bp)
    obs = observe(m, state, signals, MAX_EPOCHS)
    for env, stage in enumerate(stages):
        for slot, name in enumerate(SLOT_NAMES):
            stage_bits = [float(column(m, obs, f"{name}.stage.{s.name.lower()}")[env]) for s in SLOT_STAGES]
            assert stage_bits == [1.0 if s == stage else 0.0 for s in SLOT_STAGES]
            bp_bits = [float(column(m, obs, f"{name}.blueprint.{b}")[env]) for b in m.blueprint_names]
            assert bp_bits == [1.0 if i == (env + slot) % n_bp else 0.0 for i in range(n_bp)]
    assert "early.stage.dormant" not in feature_names(m)


def test_slot_scalars_by_name() -> None:
    m = model()
    state, signals = fresh(m, 1)
    state = set_slot(
        state,
        0,
        1,
        stage=int(Stage.BLENDING),
        alpha=0.4,
        contribution=2.5,
        grad_ratio_ema=0.05,
        epochs_in_stage=3,
        blueprint=2,
    )
    obs = observe(m, state, signals, 10)
    torch.testing.assert_close(column(m, obs, "mid.alpha"), torch.tensor([0.4]))
    torch.testing.assert_close(column(m, obs, "mid.contribution"), torch.tensor([math.tanh(0.5)]))
    torch.testing.assert_close(column(m, obs, "mid.grad_ratio"), torch.tensor([0.05 / 0.15]))
    torch.testing.assert_close(column(m, obs, "mid.epochs_in_stage"), torch.tensor([0.3]))


EXTREME_FLOATS = st.sampled_from(
    [0.0, -0.0, 1e-12, 0.5, 1.0, 2.3, 99.9, 100.0, 150.0, -5.0, -1e30, 1e30, math.inf, -math.inf, math.nan]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    topology=st.sampled_from(["cnn", "transformer"]),
    n_envs=st.integers(1, 4),
    max_epochs=st.integers(1, 200),
    data=st.data(),
)
def test_every_feature_is_finite_and_within_its_documented_range(
    topology: str, n_envs: int, max_epochs: int, data
) -> None:
    m = model(topology)
    n_bp = len(m.blueprint_names)
    config = SignalConfig(history=data.draw(st.integers(1, 7)))
    state, signals = init_state(m, n_envs, torch.Generator().manual_seed(0)), init_signals(config, n_envs, "cpu")

    def floats(*shape: int) -> torch.Tensor:
        count = math.prod(shape)
        return torch.tensor(
            data.draw(st.lists(EXTREME_FLOATS, min_size=count, max_size=count)), dtype=torch.float32
        ).reshape(shape)

    for _ in range(data.draw(st.integers(0, 8))):
        step = TensorDict({"val_loss": floats(n_envs), "val_accuracy": floats(n_envs)}, [n_envs])
        signals = update_signals(config, signals, step)
    stage_values = [int(s) for s in Stage]
    slots = state["slots"]
    slots["stage"] = torch.tensor(
        data.draw(st.lists(st.sampled_from(stage_values), min_size=3 * n_envs, max_size=3 * n_envs))
    ).reshape(n_envs, 3)
    slots["blueprint"] = torch.tensor(
        data.draw(st.lists(st.integers(0, n_bp - 1), min_size=3 * n_envs, max_size=3 * n_envs))
    ).reshape(n_envs, 3)
    slots["blend"] = torch.tensor(
        data.draw(st.lists(st.integers(0, 2), min_size=3 * n_envs, max_size=3 * n_envs))
    ).reshape(n_envs, 3)
    for key in ("alpha", "contribution", "grad_ratio_ema"):
        slots[key] = floats(n_envs, 3)
    slots["epochs_in_stage"] = torch.tensor(
        data.draw(st.lists(st.integers(0, 10**9), min_size=3 * n_envs, max_size=3 * n_envs))
    ).reshape(n_envs, 3)
    for key in ("train_loss", "val_loss", "val_accuracy"):
        state["metrics", key] = floats(n_envs)
    state["epoch"] = torch.tensor(data.draw(st.lists(st.integers(0, 10**9), min_size=n_envs, max_size=n_envs)))
    for key in ("loss_delta", "prev_val_loss", "acc_delta", "best_val_loss", "best_val_accuracy"):
        if data.draw(st.booleans()):
            signals[key] = floats(n_envs)

    snapshot_state, snapshot_signals = state.clone(), signals.clone()
    obs = observe(m, state, signals, max_epochs)
    spec = feature_spec(m)
    assert obs.shape == (n_envs, len(spec))
    assert bool(torch.isfinite(obs).all()), (
        f"non-finite features: {[f.name for f, ok in zip(spec, torch.isfinite(obs).all(0)) if not ok]}"
    )
    low = torch.tensor([f.low for f in spec])
    high = torch.tensor([f.high for f in spec])
    outside = ((obs < low) | (obs > high)).any(0)
    assert not bool(outside.any()), (
        f"out of range: {[(f.name, obs[:, i].tolist()) for i, f in enumerate(spec) if outside[i]]}"
    )
    assert bool(((obs >= -1) & (obs <= 1)).all())
    for td, snapshot in ((state, snapshot_state), (signals, snapshot_signals)):
        for key, value in snapshot.items(include_nested=True, leaves_only=True):
            assert identical(td[key], value), f"observe modified {key}"


def test_observe_rejects_bad_arguments() -> None:
    m = model()
    state, signals = fresh(m, 2)
    with pytest.raises(ValueError, match="max_epochs"):
        observe(m, state, signals, 0)
    with pytest.raises(ValueError, match="batch"):
        observe(m, state, init_signals(SignalConfig(), 3, "cpu"), MAX_EPOCHS)
