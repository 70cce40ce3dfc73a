"""Training signals against hand-computed values over constructed metric sequences.

Default `SignalConfig`: plateau threshold 0.5 pp, history 5, stabilization threshold 0.03,
3 stable epochs to latch. Two envs run side by side:

env 0  epoch: val_loss, val_acc -> loss_delta, rel, stable?, acc_delta, plateau
  1: 2.00, 20.0 -> first epoch: deltas 0, plateau 0, stable count untouched (0)
  2: 1.50, 30.0 -> 0.50, 0.25,   no  (0), +10.0, 0
  3: 1.47, 30.2 -> 0.03, 0.02,   yes (1), +0.2,  1
  4: 1.46, 30.4 -> 0.01, 0.0068, yes (2), +0.2,  2
  5: 1.50, 29.0 -> -0.04, -0.027, yes (3) -> stabilized, -1.4, 3
  6: 1.00, 35.0 -> 0.50, 0.33,   no  (0), still stabilized (latch), +6.0, 0
  7: 3.00, 10.0 -> -2.0, -2.0 but 3.0 > 1.5 * 1.0: no (0), -25.0, 1

env 1: losses 0.5, 2, 2, 2, 2, 2, 2 and accuracies 50, 10, 10, ...: the 0.5 leaves the
best-loss window after epoch 5, the all-time best accuracy stays 50, the plateau grows from
epoch 2 on, and stabilization latches at epoch 5 (epoch 2 is a blow-up, 3..5 are flat).
"""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from esper_func.core.config import ConfigError
from esper_func.core.config_json import from_dict
from esper_func.core.signals import SignalConfig, init_signals, update_signals

LOSSES = [[2.0, 1.5, 1.47, 1.46, 1.5, 1.0, 3.0], [0.5, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]]
ACCS = [[20.0, 30.0, 30.2, 30.4, 29.0, 35.0, 10.0], [50.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]]

EXPECTED = {
    # per epoch (1-indexed position = list index + 1), [env 0, env 1]
    "plateau_epochs": [[0, 0], [0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [1, 6]],
    "stable_epochs": [[0, 0], [0, 0], [1, 1], [2, 2], [3, 3], [0, 4], [0, 5]],
    "stabilized": [
        [False, False],
        [False, False],
        [False, False],
        [False, False],
        [True, True],
        [True, True],
        [True, True],
    ],
    "best_val_accuracy": [
        [20.0, 50.0],
        [30.0, 50.0],
        [30.2, 50.0],
        [30.4, 50.0],
        [30.4, 50.0],
        [35.0, 50.0],
        [35.0, 50.0],
    ],
    "best_val_loss": [[2.0, 0.5], [1.5, 0.5], [1.47, 0.5], [1.46, 0.5], [1.46, 0.5], [1.0, 2.0], [1.0, 2.0]],
}


def metrics(loss: list[float], acc: list[float]) -> TensorDict:
    return TensorDict(
        {"val_loss": torch.tensor(loss), "val_accuracy": torch.tensor(acc), "train_loss": torch.zeros(len(loss))},
        batch_size=[len(loss)],
    )


def run(config: SignalConfig = SignalConfig()) -> list[TensorDict]:
    signals = init_signals(config, 2, "cpu")
    out = []
    for epoch in range(len(LOSSES[0])):
        signals = update_signals(
            config, signals, metrics([LOSSES[0][epoch], LOSSES[1][epoch]], [ACCS[0][epoch], ACCS[1][epoch]])
        )
        out.append(signals)
    return out


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_fresh_signals_schema() -> None:
    signals = init_signals(SignalConfig(history=4), 3, "cpu")
    assert signals.batch_size == torch.Size([3])
    assert signals["val_loss_history"].shape == (3, 4) and signals["val_acc_history"].shape == (3, 4)
    for key in ("epochs_seen", "plateau_epochs", "stable_epochs"):
        assert signals[key].dtype == torch.int64
    for key in ("has_prev", "stabilized"):
        assert signals[key].dtype == torch.bool
    assert not bool(signals["has_prev"].any()) and not bool(signals["stabilized"].any())
    with pytest.raises(ValueError):
        init_signals(SignalConfig(), 0, "cpu")


def test_hand_computed_plateau_stabilization_and_best_values() -> None:
    history = run()
    for key, rows in EXPECTED.items():
        for epoch, (signals, row) in enumerate(zip(history, rows), start=1):
            got = signals[key]
            want = torch.tensor(row, dtype=got.dtype)
            assert torch.equal(got, want) if got.dtype != torch.float32 else torch.allclose(got, want), (
                f"{key} after epoch {epoch}: {got.tolist()} != {row}"
            )


def test_deltas_previous_values_and_first_epoch_flag() -> None:
    history = run()
    first, second, last = history[0], history[1], history[-1]
    assert not bool(first["has_prev"].any())
    assert torch.equal(first["loss_delta"], f32([0.0, 0.0])) and torch.equal(first["acc_delta"], f32([0.0, 0.0]))
    assert torch.equal(first["prev_val_loss"], f32([0.0, 0.0]))
    assert bool(second["has_prev"].all())
    assert torch.allclose(second["loss_delta"], f32([0.5, -1.5]))  # prev - current: positive = better
    assert torch.allclose(second["acc_delta"], f32([10.0, -40.0]))
    assert torch.allclose(second["prev_val_loss"], f32([2.0, 0.5]))
    assert torch.allclose(second["prev_val_accuracy"], f32([20.0, 50.0]))
    assert torch.allclose(last["loss_delta"], f32([-2.0, 0.0]))
    assert torch.allclose(last["val_loss"], f32([3.0, 2.0])) and torch.allclose(last["val_accuracy"], f32([10.0, 10.0]))
    assert torch.equal(last["epochs_seen"], torch.tensor([7, 7]))


def test_histories_are_oldest_first_and_zero_padded() -> None:
    history = run()
    third = history[2]
    assert torch.allclose(third["val_loss_history"], f32([[0.0, 0.0, 2.0, 1.5, 1.47], [0.0, 0.0, 0.5, 2.0, 2.0]]))
    assert torch.allclose(third["val_acc_history"], f32([[0.0, 0.0, 20.0, 30.0, 30.2], [0.0, 0.0, 50.0, 10.0, 10.0]]))
    last = history[-1]
    assert torch.allclose(last["val_loss_history"], f32([[1.47, 1.46, 1.5, 1.0, 3.0], [2.0] * 5]))
    assert torch.allclose(last["val_acc_history"], f32([[30.2, 30.4, 29.0, 35.0, 10.0], [10.0] * 5]))


def test_history_window_follows_the_config() -> None:
    history = run(SignalConfig(history=2))
    assert history[-1]["val_loss_history"].shape == (2, 2)
    # env 1 losses 0.5, 2, 2, ...: with a window of 2 the 0.5 is gone after epoch 2.
    assert [float(s["best_val_loss"][1]) for s in history[:3]] == [0.5, 0.5, 2.0]


def test_plateau_threshold_and_stabilization_epochs_are_used() -> None:
    history = run(SignalConfig(plateau_threshold=0.1, stabilization_epochs=2))
    # env 0 acc gains +0.2 at epochs 3 and 4 are no longer plateaus.
    assert [int(s["plateau_epochs"][0]) for s in history] == [0, 0, 0, 0, 1, 0, 1]
    assert [bool(s["stabilized"][0]) for s in history] == [False, False, False, True, True, True, True]


def test_a_tiny_previous_loss_is_not_compared() -> None:
    """Below 1e-8 the relative change is not computed: flat near-zero losses never latch."""
    config = SignalConfig()
    signals = init_signals(config, 1, "cpu")
    for _ in range(6):
        signals = update_signals(config, signals, metrics([1e-9], [10.0]))
    assert int(signals["stable_epochs"][0]) == 0 and not bool(signals["stabilized"][0])
    assert torch.equal(signals["loss_delta"], f32([0.0]))


def test_nan_epochs_do_not_poison_the_best_values() -> None:
    config = SignalConfig()
    signals = init_signals(config, 1, "cpu")
    for loss, acc in ((1.0, 40.0), (math.nan, math.nan), (2.0, 30.0)):
        signals = update_signals(config, signals, metrics([loss], [acc]))
    assert float(signals["best_val_accuracy"][0]) == 40.0
    assert float(signals["best_val_loss"][0]) == 1.0
    assert int(signals["plateau_epochs"][0]) == 0  # a NaN accuracy gain is not a plateau
    signals = init_signals(config, 1, "cpu")
    signals = update_signals(config, signals, metrics([math.nan], [0.0]))
    assert float(signals["best_val_loss"][0]) == math.inf


def test_update_is_pure() -> None:
    config = SignalConfig()
    signals = run()[2]
    step = metrics([1.2, 0.7], [31.0, 12.0])
    before, step_before = signals.clone(), step.clone()
    new = update_signals(config, signals, step)
    for td, snapshot in ((signals, before), (step, step_before)):
        for key, value in snapshot.items(include_nested=True, leaves_only=True):
            assert torch.equal(td[key], value), f"update_signals modified input {key}"
    for value in new.values():
        if value.dtype == torch.bool:
            value.logical_not_()
        else:
            value.add_(1)
    for key, value in before.items():
        assert torch.equal(signals[key], value), f"output {key} aliases the input"


def test_config_validation_and_loading() -> None:
    for bad in (
        {"plateau_threshold": -0.1},
        {"plateau_threshold": math.inf},
        {"history": 0},
        {"stabilization_threshold": 0.0},
        {"stabilization_epochs": 0},
    ):
        with pytest.raises(ConfigError):
            SignalConfig(**bad)
    assert from_dict(SignalConfig, {"history": 8, "plateau_threshold": 1}) == SignalConfig(
        history=8, plateau_threshold=1.0
    )
    with pytest.raises(ConfigError, match="plateau"):
        from_dict(SignalConfig, {"plateau": 1.0})
