"""Property tests of the lifecycle: random action sequences through `apply_action` and `tick`.

No training runs here. `tick` is fed synthetic end-of-epoch metrics (losses, accuracy,
per-slot contributions and gradient ratios) drawn around the gate thresholds, so that the
whole lifecycle (germination, training, blending, probation, fossilization, culls, embargo,
reset) is reached within short sequences on a small `LifecycleConfig`.

A walk keeps its own per-(env, slot) record of how many consecutive tick outputs showed the
current stage; every check below is phrased against that record and against the state
before each call, never against the core's own counters alone.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from esper_func.core.blending import alpha_schedule
from esper_func.core.config import CNNHostConfig, CoreConfig, LifecycleConfig
from esper_func.core.lifecycle import apply_action, tick
from esper_func.core.model import Model, build_model
from esper_func.core.stages import LEGAL_TRANSITION, Op, Stage
from esper_func.core.state import init_state

pytestmark = pytest.mark.usefixtures("single_thread")


N_BLENDS = 3
LIVE = {Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY}
ALPHA_ZERO = set(Stage) - {Stage.BLENDING, Stage.PROBATIONARY, Stage.FOSSILIZED}
CONTRIBUTIONS = (-3.0, -1e-3, -0.0, 0.0, 1e-3, 0.5, 0.999, 1.0, 1.0 + 1e-3, 2.5, 12.0)


@lru_cache(maxsize=None)
def small_model(lifecycle: LifecycleConfig) -> Model:
    return build_model(CoreConfig(host=CNNHostConfig.preset("tiny"), lifecycle=lifecycle, compile=False))


lifecycle_configs = st.builds(
    LifecycleConfig,
    max_epochs=st.integers(1, 30),
    min_training_epochs=st.integers(1, 3),
    train_dwell_fraction=st.sampled_from([0.0, 0.1, 0.3]),
    grad_ratio_threshold=st.sampled_from([0.0, 0.05, 0.3]),
    blend_steps=st.integers(1, 4),
    fossilize_min_contribution=st.sampled_from([1.0, 0.5]),
    training_grace_epochs=st.integers(0, 3),
    contribution_ema_decay=st.sampled_from([0.0, 0.5]),
    probation_judge_epochs=st.integers(0, 2),
    probation_min_epochs=st.integers(1, 3),
    probation_timeout_fraction=st.sampled_from([0.0, 0.1, 0.2]),
    embargo_epochs=st.integers(1, 3),
    reset_epochs=st.integers(1, 2),
    min_cull_age=st.integers(0, 3),
)


# --- drawing -------------------------------------------------------------------------------


class Chooser:
    """Draws from hypothesis (`data`) or from a seeded `random.Random` (coverage test)."""

    def __init__(self, data=None, rng: random.Random | None = None) -> None:
        self.data, self.rng = data, rng

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi)) if self.data is not None else self.rng.randint(lo, hi)

    def pick(self, options):
        options = list(options)
        return self.data.draw(st.sampled_from(options)) if self.data is not None else self.rng.choice(options)


def stage_rows(state: TensorDict) -> list[list[Stage]]:
    return [[Stage(v) for v in row] for row in state["slots", "stage"].tolist()]


def slot_table(state: TensorDict) -> dict[str, list]:
    """The `[N, S]` slot fields as nested Python lists (read once per state)."""
    return {key: value.tolist() for key, value in state["slots"].items()}


def oracle_legal(model: Model, table: dict, env: int, op: int, slot: int, bp: int, blend: int) -> bool:
    """Legality from the specification, written independently of `action_legality`."""
    if op == Op.WAIT:
        return True
    if not 0 <= slot < model.n_slots:
        return False
    stage = Stage(table["stage"][env][slot])
    if op == Op.GERMINATE:
        return stage == Stage.DORMANT and 0 <= bp < len(model.blueprint_names) and 0 <= blend < N_BLENDS
    if op == Op.CULL:
        return stage in LIVE and table["epochs_total"][env][slot] >= model.config.lifecycle.min_cull_age
    if op == Op.FOSSILIZE:
        contribution = table["contribution_ema"][env][slot]  # float32 value, exactly as stored
        return stage == Stage.PROBATIONARY and contribution >= model.config.lifecycle.fossilize_min_contribution
    return False


def legal_candidates(model: Model, table: dict, env: int) -> list[tuple[int, int, int, int]]:
    n_bp = len(model.blueprint_names)
    out = [(int(Op.WAIT), 0, 0, 0)]
    for slot in range(model.n_slots):
        for op in (Op.GERMINATE, Op.CULL, Op.FOSSILIZE):
            action = (int(op), slot, slot % n_bp, slot % N_BLENDS)
            if op == Op.GERMINATE:
                action = (int(op), slot, (env + 2 * slot + 1) % n_bp, (env + slot) % N_BLENDS)
            if oracle_legal(model, table, env, *action):
                out.append(action)
    return out


def illegal_candidates(model: Model, table: dict, env: int) -> list[tuple[int, int, int, int]]:
    """Every kind of illegal action that applies to this env's current state."""
    n_bp, n_slots = len(model.blueprint_names), model.n_slots
    out = [
        (4, 0, 0, 0),  # unknown op
        (-1, 1, 0, 0),
        (int(Op.GERMINATE), n_slots, 0, 0),  # slot out of range
        (int(Op.GERMINATE), -1, 0, 0),
        (int(Op.CULL), n_slots, 0, 0),
        (int(Op.FOSSILIZE), -1, 0, 0),
    ]
    for slot in range(n_slots):
        out += [
            (int(Op.GERMINATE), slot, n_bp, 0),  # blueprint out of range
            (int(Op.GERMINATE), slot, -1, 1),
            (int(Op.GERMINATE), slot, 0, N_BLENDS),  # blend out of range
            (int(Op.GERMINATE), slot, 1, -1),
        ]
        for op in (Op.GERMINATE, Op.CULL, Op.FOSSILIZE):
            action = (int(op), slot, 1, 0)
            if not oracle_legal(model, table, env, *action):
                out.append(action)  # occupied slot, DORMANT/FOSSILIZED/too young, not PROBATIONARY/G5
    return [a for a in out if not oracle_legal(model, table, env, *a)]


def draw_action(chooser: Chooser, model: Model, state: TensorDict, legal_bias: bool = True) -> TensorDict:
    n_envs = state.batch_size[0]
    n_bp = len(model.blueprint_names)
    table = slot_table(state)
    rows = []
    for env in range(n_envs):
        kind = chooser.integer(0, 9)
        if legal_bias and kind < 6:
            rows.append(chooser.pick(legal_candidates(model, table, env)))
        elif kind < 8:
            rows.append(chooser.pick(illegal_candidates(model, table, env)))
        else:
            rows.append(
                (
                    chooser.integer(-1, 4),
                    chooser.integer(-1, model.n_slots),
                    chooser.integer(-1, n_bp),
                    chooser.integer(-1, N_BLENDS),
                )
            )
    columns = torch.tensor(rows, dtype=torch.int64).T
    return TensorDict(dict(zip(("op", "slot", "blueprint", "blend"), columns)), batch_size=[n_envs])


def draw_metrics(chooser: Chooser, model: Model, n_envs: int) -> TensorDict:
    n_slots = model.n_slots
    thr = model.config.lifecycle.grad_ratio_threshold
    ratios = (0.0, 0.5 * thr, max(0.0, thr - 1e-4), thr, thr + 1e-4, 2 * thr + 0.01, 1.0, 1.0, 3.0)
    return TensorDict(
        {
            "train_loss": torch.tensor([chooser.pick((0.1, 1.0, 2.3)) for _ in range(n_envs)]),
            "val_loss": torch.tensor([chooser.pick((0.1, 1.0, 2.3)) for _ in range(n_envs)]),
            "val_accuracy": torch.tensor([chooser.pick((0.0, 12.5, 50.0, 99.0)) for _ in range(n_envs)]),
            "contribution": torch.tensor(
                [[chooser.pick(CONTRIBUTIONS) for _ in range(n_slots)] for _ in range(n_envs)]
            ),
            "grad_ratio": torch.tensor([[chooser.pick(ratios) for _ in range(n_slots)] for _ in range(n_envs)]),
        },
        batch_size=[n_envs],
    )


# --- comparisons ---------------------------------------------------------------------------


def leaves(td: TensorDict) -> dict:
    """Leaves keyed by tuple keys (`("params", name)`, `("epoch",)`)."""
    return {
        (key if isinstance(key, tuple) else (key,)): value
        for key, value in td.items(include_nested=True, leaves_only=True)
    }


def assert_identical(a: TensorDict, b: TensorDict, what: str) -> None:
    """Same keys, dtypes, shapes and bit-identical values."""
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys(), f"{what}: keys differ"
    for key, value in la.items():
        other = lb[key]
        assert value.dtype == other.dtype and value.shape == other.shape, f"{what}: {key} changed dtype/shape"
        assert torch.equal(value, other), f"{what}: {key} changed"


def env_unchanged(a: TensorDict, b: TensorDict) -> torch.Tensor:
    """`[N]` bool: every leaf of env n is bit-identical in `a` and `b`."""
    same = torch.ones(a.batch_size[0], dtype=torch.bool)
    for key, value in leaves(a).items():
        same &= (value == b.get(key)).reshape(value.shape[0], -1).all(1)
    return same


def changed_leaves(a: TensorDict, b: TensorDict, env: int) -> set:
    return {key for key, value in leaves(a).items() if not torch.equal(value[env], b.get(key)[env])}


def assert_alpha_invariants(state: TensorDict, where: str) -> None:
    alpha = state["slots", "alpha"]
    stage = state["slots", "stage"]
    assert bool(((alpha >= 0) & (alpha <= 1)).all()), f"{where}: alpha outside [0, 1]: {alpha.tolist()}"
    for st_, a in zip(stage.flatten().tolist(), alpha.flatten().tolist()):
        if Stage(st_) in (Stage.FOSSILIZED, Stage.PROBATIONARY):
            assert a == 1.0, f"{where}: alpha {a} in {Stage(st_).name}"
        elif Stage(st_) in ALPHA_ZERO:
            assert a == 0.0, f"{where}: alpha {a} in {Stage(st_).name}"


def assert_legal_changes(before: TensorDict, after: TensorDict, where: str) -> None:
    for env, (row_b, row_a) in enumerate(zip(stage_rows(before), stage_rows(after))):
        for slot, (sb, sa) in enumerate(zip(row_b, row_a)):
            if sb != sa:
                assert bool(LEGAL_TRANSITION[sb, sa]), (
                    f"{where}: illegal {sb.name} -> {sa.name} at env {env} slot {slot}"
                )
            if sb == Stage.FOSSILIZED:
                assert sa == Stage.FOSSILIZED, f"{where}: a fossilized seed left FOSSILIZED for {sa.name}"


# --- the walk ------------------------------------------------------------------------------


@dataclass
class Run:
    stage: Stage
    ticks: int = 0  # consecutive tick outputs that showed `stage`
    alphas: list = field(default_factory=list)
    ema: float | None = None  # reference grad-ratio EMA (float64)
    cema: float | None = None  # reference contribution EMA since alpha reached 1 (float64)


@dataclass
class Coverage:
    stages: Counter = field(default_factory=Counter)
    executed: Counter = field(default_factory=Counter)
    refused: int = 0
    exits: Counter = field(default_factory=Counter)


def check_apply_action(
    model: Model, state: TensorDict, action: TensorDict, new: TensorDict, executed: torch.Tensor, cov: Coverage
) -> None:
    n_envs, n_slots = state["slots"].batch_size
    assert executed.dtype == torch.bool and executed.shape == (n_envs,)
    assert_legal_changes(state, new, "apply_action")
    assert_alpha_invariants(new, "after apply_action")
    unchanged = env_unchanged(state, new)
    table, new_table = slot_table(state), slot_table(new)
    rows = action.to_dict()
    for env in range(n_envs):
        op, slot, bp, blend = (int(rows[k][env]) for k in ("op", "slot", "blueprint", "blend"))
        legal = oracle_legal(model, table, env, op, slot, bp, blend)
        assert bool(executed[env]) == legal, (
            f"env {env}: action {(op, slot, bp, blend)} executed={bool(executed[env])}, spec says {legal}"
        )
        if not legal or op == Op.WAIT:
            cov.refused += not legal
            assert bool(unchanged[env]), (
                f"env {env}: non-executed/WAIT action {(op, slot, bp, blend)} changed "
                f"{sorted(map(str, changed_leaves(state, new, env)))}"
            )
            continue
        cov.executed[Op(op).name] += 1
        changed = changed_leaves(state, new, env)
        bank = f"banks.{slot}."
        # Only the acted-on slot's lifecycle fields, and for GERMINATE/CULL its bank, change.
        for key in changed:
            group, name = key[0], key[-1]
            if group == "slots":
                continue
            assert group in ("params", "momentum") and name.startswith(bank), f"env {env}: {op=} changed {key}"
            if group == "params":
                assert op == Op.GERMINATE, f"env {env}: {Op(op).name} changed parameter {name}"
        for other in range(n_slots):
            if other != slot:
                for key, value in new_table.items():
                    assert value[env][other] == table[key][env][other], (
                        f"env {env}: {Op(op).name} on slot {slot} changed slot {other}'s {key}"
                    )
        s_new = {k: v[env][slot] for k, v in new_table.items()}
        expected = {Op.GERMINATE: Stage.GERMINATED, Op.CULL: Stage.CULLED, Op.FOSSILIZE: Stage.FOSSILIZED}[Op(op)]
        assert s_new["stage"] == expected
        assert s_new["prev_stage"] == table["stage"][env][slot]
        assert s_new["epochs_in_stage"] == 0
        if op in (Op.GERMINATE, Op.CULL):
            for name in model.slot_param_names[slot]:
                assert not bool(new["momentum", name][env].any()), f"{Op(op).name}: momentum {name} not zeroed"
        if op == Op.GERMINATE:
            assert (s_new["blueprint"], s_new["blend"]) == (bp, blend)
            assert s_new["epochs_total"] == 0 and s_new["alpha"] == 0.0 and s_new["contribution"] == 0.0
            assert s_new["grad_ratio_seen"] is False and s_new["grad_ratio_ema"] == 0.0


def assert_others_unaffected(
    model: Model, state: TensorDict, action: TensorDict, new: TensorDict, executed: torch.Tensor,
    gen_state: torch.Tensor, env: int, replacement: tuple[int, int, int, int],
) -> None:
    """Replacing env `env`'s action (same generator state) changes no other env's result."""
    if state.batch_size[0] < 2:
        return
    altered = action.clone()
    for key, value in zip(("op", "slot", "blueprint", "blend"), replacement):
        altered[key][env] = value
    generator = torch.Generator()
    generator.set_state(gen_state)
    other, other_executed = apply_action(model, state, altered, generator)
    keep = torch.arange(state.batch_size[0]) != env
    assert torch.equal(executed[keep], other_executed[keep])
    assert bool(env_unchanged(new, other)[keep].all()), "an env's action changed another env's result"


def check_tick(
    model: Model, before: TensorDict, metrics: TensorDict, after: TensorDict, runs: list, cov: Coverage
) -> None:
    config = model.config.lifecycle
    n_envs, n_slots = before["slots"].batch_size
    assert_legal_changes(before, after, "tick")
    assert_alpha_invariants(after, "after tick")
    assert torch.equal(after["epoch"], before["epoch"] + 1)
    for key in ("val_accuracy", "val_loss", "train_loss"):
        assert torch.equal(after["metrics", key], metrics[key])
    for name in ("params", "momentum", "buffers"):
        assert_identical(before[name], after[name], f"tick {name}")
    rows_b, rows_a = stage_rows(before), stage_rows(after)
    slots_a = after["slots"]
    ema_after = slots_a["grad_ratio_ema"]
    thr = torch.tensor(config.grad_ratio_threshold, dtype=torch.float32)
    for env in range(n_envs):
        for slot in range(n_slots):
            sb, sa, run = rows_b[env][slot], rows_a[env][slot], runs[env][slot]
            assert run.stage == sb
            where = f"env {env} slot {slot} {sb.name}->{sa.name} after {run.ticks} ticks"
            ticks_before = run.ticks
            contribution = float(metrics["contribution"][env, slot])
            alpha = float(slots_a["alpha"][env, slot])
            cov.stages[sa.name] += 1
            # Reference EMA of the gradient ratio from germination through BLENDING.
            if sb in (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING):
                ratio = float(metrics["grad_ratio"][env, slot])
                run.ema = (
                    ratio
                    if run.ema is None
                    else config.grad_ratio_ema_decay * run.ema + (1 - config.grad_ratio_ema_decay) * ratio
                )
                assert abs(float(ema_after[env, slot]) - run.ema) <= 1e-6 + 1e-5 * abs(run.ema), where
            # Stage by stage: what the tick must do.
            if sb == Stage.DORMANT:
                assert sa == Stage.DORMANT, where
            elif sb == Stage.GERMINATED:
                assert sa == Stage.TRAINING, where
            elif sb == Stage.TRAINING:
                age = ticks_before + 1  # the germination epoch, then every TRAINING tick, this one included
                due = age >= config.training_epochs
                g2 = bool(ema_after[env, slot] >= thr)
                timeout = age >= config.training_timeout and not g2
                expected = Stage.BLENDING if due and g2 else (Stage.CULLED if timeout else Stage.TRAINING)
                assert sa == expected, f"{where}: due={due} g2={g2} age={age}"
                # The first TRAINING tick comes at age 2 (the germination tick is GERMINATED's),
                # so no seed is older than that or the timeout when it is judged.
                assert age <= max(2, config.training_timeout), where
                if timeout:
                    cov.exits["training_timeout"] += 1
            elif sb == Stage.BLENDING:
                assert sa == (Stage.PROBATIONARY if ticks_before >= config.blend_steps else Stage.BLENDING), where
            elif sb == Stage.PROBATIONARY:
                decay = config.contribution_ema_decay
                run.cema = decay * run.cema + (1 - decay) * contribution
                judged = (
                    ticks_before >= config.probation_judge_epochs and float(slots_a["contribution_ema"][env, slot]) <= 0
                )
                cull = judged or ticks_before >= config.probation_timeout
                assert sa == (Stage.CULLED if cull else Stage.PROBATIONARY), f"{where}: contribution EMA {run.cema}"
                assert ticks_before <= config.probation_timeout, where
                if cull:
                    cov.exits["probation_cull_contribution" if judged else "probation_timeout"] += 1
            elif sb == Stage.FOSSILIZED:
                assert sa == Stage.FOSSILIZED, where
                decay = config.contribution_ema_decay
                run.cema = decay * run.cema + (1 - decay) * contribution
            elif sb == Stage.CULLED:
                assert sa == Stage.EMBARGOED, where
            elif sb == Stage.EMBARGOED:
                assert sa == (Stage.RESETTING if ticks_before >= config.embargo_epochs else Stage.EMBARGOED), where
                assert int(slots_a["embargo_remaining"][env, slot]) == (
                    config.embargo_epochs - ticks_before if sa == Stage.EMBARGOED else 0
                )
            elif sb == Stage.RESETTING:
                assert sa == (Stage.DORMANT if ticks_before >= config.reset_epochs else Stage.RESETTING), where
            # Durations, measured in tick outputs.
            if sa != sb:
                if sb == Stage.EMBARGOED:
                    assert ticks_before == config.embargo_epochs, where
                    cov.exits["embargo"] += 1
                if sb == Stage.RESETTING:
                    assert ticks_before == config.reset_epochs, where
                    cov.exits["reset"] += 1
                if sb == Stage.BLENDING:
                    assert ticks_before == config.blend_steps, where
                    assert len(run.alphas) == config.blend_steps and run.alphas[-1] == 1.0, f"{where}: {run.alphas}"
                    cov.exits["blend"] += 1
                if sb == Stage.TRAINING and sa == Stage.BLENDING:
                    assert ticks_before + 1 >= config.training_epochs, where
                if sa == Stage.PROBATIONARY:
                    assert alpha == 1.0, where
                carried = run.ema if sa in (Stage.TRAINING, Stage.BLENDING) else None
                runs[env][slot] = Run(sa, ticks=1, ema=carried, cema=contribution if sa == Stage.PROBATIONARY else None)
                run = runs[env][slot]
            else:
                run.ticks += 1
            if sa == Stage.BLENDING:
                k = run.ticks
                assert int(slots_a["blend_step"][env, slot]) == k, where
                expected = alpha_schedule(
                    slots_a["blend"][env, slot], torch.tensor(k), config.blend_steps, config.sigmoid_steepness
                )
                assert abs(alpha - float(expected)) <= 1e-6, (
                    f"{where}: alpha {alpha} at blend step {k}, schedule {float(expected)}"
                )
                assert not run.alphas or alpha >= run.alphas[-1], f"{where}: alpha decreased {run.alphas} -> {alpha}"
                run.alphas.append(alpha)
            if sa in (Stage.PROBATIONARY, Stage.FOSSILIZED):
                cema = float(slots_a["contribution_ema"][env, slot])
                assert abs(cema - run.cema) <= 1e-5 + 1e-5 * abs(run.cema), (
                    f"{where}: contribution EMA {cema} vs {run.cema}"
                )
    assert torch.equal(slots_a["contribution"], metrics["contribution"])


def walk(
    model: Model, n_envs: int, chooser: Chooser, n_steps: int, seed: int, cov: Coverage | None = None
) -> TensorDict:
    """Run `n_steps` env steps (action, then tick on synthetic metrics), checking every property."""
    cov = cov if cov is not None else Coverage()
    generator = torch.Generator().manual_seed(seed)
    state = init_state(model, n_envs, generator)
    # Non-zero momentum, as after training, so that resets by GERMINATE and CULL are visible.
    noise = torch.Generator().manual_seed(seed + 1)
    state["momentum"] = state["momentum"].apply(lambda m: torch.rand(m.shape, generator=noise) + 0.5)
    runs = [[Run(Stage.DORMANT) for _ in range(model.n_slots)] for _ in range(n_envs)]
    for _ in range(n_steps):
        action = draw_action(chooser, model, state)
        snapshot, action_snapshot = state.clone(), action.clone()
        gen_state = generator.get_state()
        new, executed = apply_action(model, state, action, generator)
        assert_identical(state, snapshot, "apply_action modified its input state")
        assert_identical(action, action_snapshot, "apply_action modified its action")
        check_apply_action(model, state, action, new, executed, cov)
        if n_envs > 1 and chooser.integer(0, 2) == 0:
            env = chooser.integer(0, n_envs - 1)
            replacement = chooser.pick(illegal_candidates(model, slot_table(state), env) + [(int(Op.WAIT), 0, 0, 0)])
            assert_others_unaffected(model, state, action, new, executed, gen_state, env, replacement)
        for env, (row_b, row_a) in enumerate(zip(stage_rows(state), stage_rows(new))):
            for slot, (sb, sa) in enumerate(zip(row_b, row_a)):
                cov.stages[sa.name] += 1
                if sa != sb:  # a fossil keeps its contribution EMA
                    runs[env][slot] = Run(sa, cema=runs[env][slot].cema if sa == Stage.FOSSILIZED else None)

        metrics = draw_metrics(chooser, model, n_envs)
        new_snapshot, metrics_snapshot = new.clone(), metrics.clone()
        after = tick(model, new, metrics)
        assert_identical(new, new_snapshot, "tick modified its input state")
        assert_identical(metrics, metrics_snapshot, "tick modified its metrics")
        check_tick(model, new, metrics, after, runs, cov)
        # Stand-in for training between steps: momentum moves, so a CULL has some to reset.
        state = after.clone(recurse=False)
        state["momentum"] = after["momentum"].apply(lambda m: m + torch.rand(m.shape, generator=noise))
    return state


# --- tests ---------------------------------------------------------------------------------


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    lifecycle=lifecycle_configs,
    n_envs=st.integers(1, 3),
    n_steps=st.integers(1, 30),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_random_walks_respect_every_lifecycle_invariant(
    lifecycle: LifecycleConfig, n_envs: int, n_steps: int, seed: int, data
) -> None:
    """Legal transitions only; alpha bounds; fossils are terminal; exact durations; legal vs
    refused actions match the spec; refused actions are bit-identical no-ops; one env's
    action never changes another env's result; inputs are never modified."""
    walk(small_model(lifecycle), n_envs, Chooser(data=data), n_steps, seed)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lifecycle=lifecycle_configs, n_steps=st.integers(0, 20), seed=st.integers(0, 2**16), data=st.data())
def test_illegal_actions_are_exact_noops_and_leave_other_envs_alone(
    lifecycle: LifecycleConfig, n_steps: int, seed: int, data
) -> None:
    """From a reached state, a batch mixing illegal and legal actions: illegal rows report
    `executed == False` and keep slots, params, momentum and buffers bit-identical; legal rows
    get exactly what they would get if the illegal rows had been WAIT."""
    model = small_model(lifecycle)
    n_envs = 3
    chooser = Chooser(data=data)
    state = walk(model, n_envs, chooser, n_steps, seed)
    illegal_rows = data.draw(st.lists(st.booleans(), min_size=n_envs, max_size=n_envs).filter(any))
    table = slot_table(state)
    rows = [
        chooser.pick(illegal_candidates(model, table, env) if bad else legal_candidates(model, table, env))
        for env, bad in enumerate(illegal_rows)
    ]
    columns = torch.tensor(rows, dtype=torch.int64).T
    action = TensorDict(dict(zip(("op", "slot", "blueprint", "blend"), columns)), batch_size=[n_envs])
    waited = action.clone()
    for env, bad in enumerate(illegal_rows):
        if bad:
            waited["op"][env] = int(Op.WAIT)
    snapshot = state.clone()
    generator = torch.Generator().manual_seed(seed + 1)
    new, executed = apply_action(model, state, action, generator)
    assert_identical(state, snapshot, "apply_action modified its input state")
    generator = torch.Generator().manual_seed(seed + 1)
    reference, _ = apply_action(model, state, waited, generator)
    bad = torch.tensor(illegal_rows)
    assert not bool(executed[bad].any()) and bool(executed[~bad].all())
    assert bool(env_unchanged(state, new)[bad].all()), "a refused action changed its env"
    assert bool(env_unchanged(reference, new)[~bad].all()), "an illegal action in one env changed another env"


def test_a_seeded_walk_reaches_every_stage_and_exit() -> None:
    """Guards the properties against vacuity: a fixed random walk visits the whole lifecycle."""
    lifecycle = LifecycleConfig(
        max_epochs=10, min_training_epochs=1, training_grace_epochs=1, blend_steps=2, probation_min_epochs=2,
        embargo_epochs=2, reset_epochs=1,
    )
    model = small_model(lifecycle)
    cov = Coverage()
    for seed in range(4):
        walk(model, 3, Chooser(rng=random.Random(seed)), 30, seed, cov)
    assert set(cov.stages) == {s.name for s in Stage}, cov.stages
    assert set(cov.executed) == {"GERMINATE", "CULL", "FOSSILIZE"}, cov.executed
    assert cov.refused > 0
    for exit_ in ("embargo", "reset", "blend", "training_timeout", "probation_cull_contribution", "probation_timeout"):
        assert cov.exits[exit_] > 0, cov.exits
