"""The governor: health checks against a plain per-env reference, rollbacks, fault injection."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torchrl.envs.utils import step_mdp

from envs import EnvConfig, MorphogeneticEnv
from esper_func.core.config import ConfigError, CoreConfig, GovernorConfig, LifecycleConfig
from esper_func.core.governor import Panic, check, init_governor, rollback, snapshot_due
from esper_func.core.stages import Stage
from esper_func.data.tasks import TaskConfig
from esper_func.rl.telemetry import lifecycle_events, rollback_events
from policies import HeuristicConfig, HeuristicPolicy

GUESS = math.log(10)
CONFIG = GovernorConfig()


class RefGovernor:
    """One env's governor as plain Python, written from the rules in docs/reliability.md."""

    def __init__(self, config: GovernorConfig, guess: float) -> None:
        self.config, self.guess = config, guess
        self.history: list[float] = []
        self.streak = 0

    def check(self, train_loss: float, val_loss: float) -> Panic:
        c = self.config
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            self.streak = 0
            return Panic.NON_FINITE if c.enabled else Panic.NONE
        if len(self.history) < c.min_samples:
            self.history = (self.history + [val_loss])[-c.window :]
            self.streak = 0
            return Panic.NONE
        mean = statistics.fmean(self.history)
        std = statistics.pstdev(self.history)
        anomalous = (
            val_loss > mean + c.spike_sigma * std
            and val_loss > c.spike_mean_factor * mean
            and val_loss > c.spike_min_loss_factor * self.guess
        )
        self.streak = self.streak + 1 if anomalous else 0
        collapse = (
            mean < c.collapse_history_fraction * self.guess
            and abs(val_loss - self.guess) < c.collapse_tolerance * self.guess
        )
        cause = Panic.LOSS_SPIKE if self.streak >= c.consecutive_spikes else Panic.COLLAPSE if collapse else Panic.NONE
        if not c.enabled:
            cause = Panic.NONE
        if cause != Panic.NONE:
            self.streak = 0
        elif not anomalous:
            self.history = (self.history + [val_loss])[-c.window :]
        return cause


def run_check(config: GovernorConfig, train: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """Vectorized checks over `[N, T]` loss sequences; returns the panic causes `[N, T]`."""
    n = train.shape[0]
    state = TensorDict(
        {
            "epoch": torch.zeros(n, dtype=torch.int64),
            "params": {},
            "buffers": {},
            "momentum": {},
            "metrics": {},
            "slots": TensorDict({"stage": torch.ones(n, 3, dtype=torch.int64)}, [n, 3]),
        },
        [n],
    )
    governor = init_governor(config, state)
    causes = []
    for t in range(train.shape[1]):
        governor, cause = check(
            config, GUESS, governor, TensorDict({"train_loss": train[:, t], "val_loss": val[:, t]}, [n])
        )
        causes.append(cause)
    return torch.stack(causes, dim=1)


def test_spike_panics_on_the_third_anomaly_in_a_row_only() -> None:
    steady = [1.0, 1.1] * 6
    cases = {
        "three spikes": (steady + [5.0, 5.0, 5.0], [0] * 14 + [int(Panic.LOSS_SPIKE)]),
        "two spikes then calm": (steady + [5.0, 5.0, 1.0, 5.0], [0] * 16),
        "spikes below the task's absolute floor": ([0.1, 0.11] * 6 + [2.0, 2.0, 2.0], [0] * 15),
        "too little history": ([1.0] * 5 + [9.0] * 5, [0] * 10),
    }
    for name, (losses, expected) in cases.items():
        val = torch.tensor([losses])
        assert run_check(CONFIG, val, val)[0].tolist() == expected, name


def test_collapse_and_non_finite_losses_panic_at_once() -> None:
    low = [0.9, 1.0] * 5
    cases = {
        "collapse to ln(10)": (low + [GUESS], low + [GUESS], int(Panic.COLLAPSE)),
        "near the guess loss": (low + [GUESS * 1.05], low + [GUESS * 1.05], int(Panic.COLLAPSE)),
        "high but not back to guessing": (low + [1.9], low + [1.9], 0),
        "a spike far above the guess is not a collapse": (low + [9.0], low + [9.0], 0),
        "nan validation loss": ([1.0], [float("nan")], int(Panic.NON_FINITE)),
        "inf training loss": ([float("inf")], [1.0], int(Panic.NON_FINITE)),
    }
    for name, (train, val, expected) in cases.items():
        causes = run_check(CONFIG, torch.tensor([train]), torch.tensor([val]))
        assert causes[0, -1].item() == expected, name
        assert (causes[0, :-1] == 0).all(), name
    disabled = replace(CONFIG, enabled=False)
    assert (run_check(disabled, torch.tensor([[float("nan")]]), torch.tensor([[1.0]])) == 0).all()


# Calm losses, spikes far above every threshold, the guess loss, and non-finite values: no
# draw sits on a threshold, so float32 (ours) and float64 (the reference) agree exactly.
loss_value = st.sampled_from([0.5, 0.75, 1.0, 1.25, 1.5, 8.0, 16.0, 32.0, GUESS, float("nan"), float("inf")])


@settings(max_examples=60, deadline=None)
@given(
    sequences=st.lists(st.lists(st.tuples(loss_value, loss_value), min_size=30, max_size=30), min_size=1, max_size=4),
    window=st.integers(4, 12),
    enabled=st.booleans(),
)
def test_vectorized_checks_match_a_per_env_reference_loop(
    sequences: list[list[tuple[float, float]]], window: int, enabled: bool
) -> None:
    config = replace(CONFIG, window=window, min_samples=window // 2, enabled=enabled)
    train = torch.tensor([[a for a, _ in seq] for seq in sequences])
    val = torch.tensor([[b for _, b in seq] for seq in sequences])
    causes = run_check(config, train, val)
    for env, seq in enumerate(sequences):
        ref = RefGovernor(config, GUESS)
        expected = [int(ref.check(float(a), float(b))) for a, b in zip(train[env].tolist(), val[env].tolist())]
        assert causes[env].tolist() == expected


def test_snapshots_only_after_a_passed_check_on_schedule() -> None:
    n = 4
    state = TensorDict(
        {
            "epoch": torch.tensor([5, 5, 5, 4]),
            "governor": TensorDict({"spike_streak": torch.tensor([0, 0, 1, 0])}, [n]),
        },
        [n],
    )
    cause = torch.tensor([0, int(Panic.NON_FINITE), 0, 0])
    assert snapshot_due(CONFIG, state, cause).tolist() == [True, False, False, False]


def test_bad_governor_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match="min_samples"):
        GovernorConfig(window=5, min_samples=6)
    with pytest.raises(ConfigError, match="collapse_tolerance"):
        GovernorConfig(collapse_tolerance=1.5)


# --- rollbacks in the env --------------------------------------------------------------------

N_ENVS = 4
FAULT_ENV = 1


def lively_env(**optim: float) -> MorphogeneticEnv:
    """A short lifecycle where the heuristic germinates, blends and fossilizes within 14 epochs."""
    task = replace(TaskConfig.preset("synthetic"), batch_size=32, train_iters=4, val_batches=1)
    lifecycle = LifecycleConfig(
        max_epochs=14, min_training_epochs=1, blend_steps=2, probation_min_epochs=3, embargo_epochs=1,
        grad_ratio_threshold=0.0, fossilize_min_contribution=0.0,
    )
    core = CoreConfig(compile=False, lifecycle=lifecycle)
    core = replace(core, optim=replace(core.optim, **optim))
    return MorphogeneticEnv(EnvConfig(task=task, core=core, n_envs=N_ENVS, seed=0))


def play(env: MorphogeneticEnv, fault_at: int | None, fault: str = "nan") -> list[TensorDict]:
    """Heuristic episode; at step `fault_at`, corrupt env FAULT_ENV's classifier weights."""
    policy = HeuristicPolicy(
        env.model.topology,
        N_ENVS,
        HeuristicConfig(require_stabilization=False, min_epoch_to_germinate=0, plateau_epochs_to_germinate=0),
    )
    td = env.reset()
    steps = []
    for t in range(env.max_epochs):
        if t == fault_at:
            state = env.state.clone()
            name = env.model.host_param_names[-2]  # the head's weight: BatchNorm cannot absorb it
            state["params", name][FAULT_ENV] = float("nan") if fault == "nan" else float("inf")
            env.state = state
        step = env.step(policy(td))
        steps.append(step)
        td = step_mdp(step)
    return steps


@pytest.fixture(scope="module")
def clean_run(single_thread: None) -> tuple[MorphogeneticEnv, list[TensorDict]]:
    env = lively_env()
    return env, play(env, None)


@pytest.mark.parametrize("fault", ["nan", "inf"])
def test_a_corrupted_env_rolls_back_and_every_other_env_is_bit_identical(
    clean_run: tuple[MorphogeneticEnv, list[TensorDict]], fault: str
) -> None:
    clean_env, clean_steps = clean_run
    env = lively_env()
    fault_at = 9
    steps = play(env, fault_at, fault)
    others = [e for e in range(N_ENVS) if e != FAULT_ENV]
    for t, (a, b) in enumerate(zip(clean_steps, steps)):
        for key, value in a.items(include_nested=True, leaves_only=True):
            assert torch.equal(value[others], b[key][others]), (t, key)
    for key, value in clean_env.state.items(include_nested=True, leaves_only=True):
        assert torch.equal(value[others], env.state[key][others]), key

    hit = steps[fault_at]["next"]
    assert hit["metrics", "rolled_back"].tolist() == [e == FAULT_ENV for e in range(N_ENVS)]
    assert hit["metrics", "panic"][FAULT_ENV].item() == int(Panic.NON_FINITE)
    assert hit["reward_components", "governor"][FAULT_ENV].item() == -env.config.rewards.governor_penalty
    assert hit["reward"][FAULT_ENV, 0].item() == pytest.approx(
        sum(v[FAULT_ENV].item() for v in hit["reward_components"].values())
    )
    assert hit["metrics", "rollbacks"][FAULT_ENV].item() == 1
    # Nothing non-finite reaches the controller, and the env goes on training.
    for step in steps[fault_at:]:
        assert torch.isfinite(step["next", "observation"]).all()
        assert torch.isfinite(step["next", "reward"]).all()
    assert not steps[-1]["next", "metrics", "rolled_back"].any()
    assert all(torch.isfinite(v).all() for v in env.state["params"].values())

    # Restored: the metrics are the snapshot's (the epoch-5 evaluation of the clean run).
    snapshot_epoch = 5
    assert (
        hit["metrics", "val_loss"][FAULT_ENV].item()
        == clean_steps[snapshot_epoch - 1]["next", "metrics", "val_loss"][FAULT_ENV].item()
    )
    # Live seeds were culled; the seed fossilized at the snapshot stayed, and so did its events.
    prev_stage = steps[fault_at - 1]["next", "seeds", "stage"][FAULT_ENV]
    stage = hit["seeds", "stage"][FAULT_ENV]
    at_snapshot = steps[snapshot_epoch - 1]["next", "seeds", "stage"][FAULT_ENV]
    live = [
        s
        for s in range(3)
        if prev_stage[s] in (int(Stage.GERMINATED), int(Stage.TRAINING), int(Stage.BLENDING), int(Stage.PROBATIONARY))
    ]
    fossils = [
        s for s in range(3) if prev_stage[s] == int(Stage.FOSSILIZED) and at_snapshot[s] == int(Stage.FOSSILIZED)
    ]
    later_fossils = [
        s for s in range(3) if prev_stage[s] == int(Stage.FOSSILIZED) and at_snapshot[s] != int(Stage.FOSSILIZED)
    ]
    assert live and fossils, (
        "the scenario should hold a live seed and a fossil from before the snapshot when the fault hits"
    )
    assert all(stage[s] == int(Stage.EMBARGOED) for s in live + later_fossils), (
        "live seeds and fossils newer than the snapshot are culled"
    )
    assert all(stage[s] == int(Stage.FOSSILIZED) for s in fossils)
    events = lifecycle_events(steps[fault_at - 1]["next"], steps[fault_at], env.model.blueprint_names, episode=0)
    assert events and all(e.cause == "governor:NON_FINITE" for e in events if e.env == FAULT_ENV)
    (record,) = rollback_events(steps[fault_at], episode=0)
    assert record["env"] == FAULT_ENV and record["cause"] == "governor:NON_FINITE" and record["epoch"] == fault_at + 1


def test_rollback_restores_the_snapshot_and_culls_seeds_fossilized_since(
    clean_run: tuple[MorphogeneticEnv, list[TensorDict]],
) -> None:
    env, _ = clean_run
    model, state = env.model, env.state.clone()
    snapshot = state["governor", "snapshot"]
    # Pretend slot 0 was empty at the snapshot and slot 1 fossilized there; both fossilized now.
    state["slots", "stage"][:, :2] = int(Stage.FOSSILIZED)
    state["slots", "stage"][:, 2] = int(Stage.TRAINING)
    snapshot["fossilized"][:] = torch.tensor([False, True, False])
    state["params"].apply_(lambda p: p.fill_(float("nan")))
    state["momentum"].apply_(lambda m: m.fill_(7.0))
    metrics = TensorDict(
        {"val_accuracy": torch.full((N_ENVS,), float("nan")), "val_loss": torch.full((N_ENVS,), float("nan")),
         "train_loss": torch.full((N_ENVS,), float("nan")), "contribution": torch.full((N_ENVS, 3), float("nan")),
         "grad_ratio": torch.full((N_ENVS, 3), float("nan"))}, [N_ENVS])
    panic = torch.tensor([True, False, True, False])
    new_state, new_metrics = rollback(model, state, metrics, panic)

    assert (
        new_state["slots", "stage"][panic].tolist()
        == [[int(Stage.CULLED), int(Stage.FOSSILIZED), int(Stage.CULLED)]] * 2
    )
    assert (new_state["slots", "stage"][~panic] == state["slots", "stage"][~panic]).all()
    assert (new_state["slots", "alpha"][panic][:, [0, 2]] == 0).all()
    for name, value in new_state["params"].items():
        assert torch.equal(value[panic], snapshot["params", name][panic]), name
        assert value[~panic].isnan().all()
    for s, names in enumerate(model.slot_param_names):
        for name in names:
            restored = new_state["momentum", name][panic]
            assert torch.equal(restored, snapshot["momentum", name][panic]) if s == 1 else (restored == 0).all(), name
    for name in model.host_param_names:
        assert torch.equal(new_state["momentum", name][panic], snapshot["momentum", name][panic])
    for key in ("val_accuracy", "val_loss", "train_loss"):
        assert torch.equal(new_metrics[key][panic], snapshot["metrics", key][panic])
        assert new_metrics[key][~panic].isnan().all()
    assert (new_metrics["contribution"][panic] == 0).all()


def test_a_runaway_learning_rate_rolls_back_every_env_and_stays_finite(single_thread: None) -> None:
    env = lively_env(host_lr=1e6, seed_lr=1e6)
    steps = play(env, None)
    rolled = torch.stack([s["next", "metrics", "rolled_back"] for s in steps])
    assert rolled.any(dim=0).all(), "every env should have diverged and rolled back"
    for step in steps:
        assert torch.isfinite(step["next", "observation"]).all()
        assert torch.isfinite(step["next", "reward"]).all()
    assert steps[-1]["next", "metrics", "rollbacks"].sum().item() == rolled.sum().item()
