"""Equivalence of the vectorized core with a plain per-env loop (tests/reference.py).

N envs whose slots sit in different stages, blueprints and blend modes are trained for a
few iterations by `train_epoch` (vmap + functional_call + functional SGD) and, separately,
by one ordinary `nn.Module` + `torch.optim.SGD` + `clip_grad_norm_` per env. Every trained
parameter, every SGD momentum buffer, the BatchNorm buffers and the per-env training loss
must agree to fp32 tolerance; every parameter the reference does not train must come out
of the core bit-identical. `evaluate` is checked the same way, counterfactuals included.

All parameters, momentum buffers and BN statistics are perturbed with random noise first
(fresh seeds are function-preserving: zero output layers would make seeds' outputs and
most of their gradients vanish and the comparison vacuous); each test also asserts that
the seeds moved, that their outputs differ from the host's, and that gradient clipping
was both active and inactive across the envs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tensordict import TensorDict

from esper_func.core.config import CNNHostConfig, CoreConfig, OptimConfig, TransformerHostConfig
from esper_func.core.host_evaluation import EvalStepCache, evaluate
from esper_func.core.host_training import TrainStepCache, train_epoch
from esper_func.core.model import Model, build_model
from esper_func.core.stages import BlendMode, Stage
from esper_func.core.state import init_state

try:
    from tests.reference import BLEND_STAGES, SEED_RUNS, RefEnv
except ImportError:  # tests/ on sys.path instead of the repository root
    from reference import BLEND_STAGES, SEED_RUNS, RefEnv

D, G, T, B, P = Stage.DORMANT, Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY
F, C, E, R = Stage.FOSSILIZED, Stage.CULLED, Stage.EMBARGOED, Stage.RESETTING
LIN, SIG, GAT = BlendMode.LINEAR, BlendMode.SIGMOID, BlendMode.GATED

# Per env, per slot (early, mid, late): (stage, blueprint, blend, alpha).
CNN_LAYOUT = [
    [(T, "norm", SIG, 0.0), (D, "noop", LIN, 0.0), (B, "conv_light", SIG, 0.4)],
    [(B, "attention", SIG, 0.4), (P, "depthwise", GAT, 1.0), (D, "noop", LIN, 0.0)],
    [(P, "conv_heavy", GAT, 1.0), (F, "norm", LIN, 1.0), (T, "depthwise", GAT, 0.0)],
    [(F, "conv_light", LIN, 1.0), (C, "attention", SIG, 0.7), (E, "conv_heavy", LIN, 0.3)],
    [(D, "noop", LIN, 0.0), (B, "noop", LIN, 0.6), (G, "conv_heavy", GAT, 0.0)],
    [(R, "norm", LIN, 0.0), (T, "conv_heavy", LIN, 0.0), (F, "attention", GAT, 1.0)],
    [(B, "conv_wide", LIN, 0.5), (G, "conv_wide", SIG, 0.0), (P, "conv_wide", SIG, 1.0)],
]
TRANSFORMER_LAYOUT = [
    [(T, "lora", LIN, 0.0), (B, "attention", SIG, 0.4), (P, "mlp", GAT, 1.0)],
    [(F, "norm", LIN, 1.0), (D, "noop", LIN, 0.0), (T, "mlp", SIG, 0.0)],
    [(B, "mlp", GAT, 0.5), (C, "lora", LIN, 0.5), (F, "attention", LIN, 1.0)],
    [(P, "norm", LIN, 1.0), (E, "attention", GAT, 0.0), (F, "lora", GAT, 1.0)],
    [(G, "lora", LIN, 0.0), (R, "mlp", LIN, 0.0), (B, "lora", LIN, 0.8)],
]

ITERATIONS = 3
PARAM_TOL = dict(atol=1e-5, rtol=1e-4)
MOMENTUM_TOL = dict(atol=2e-6, rtol=1e-4)  # momentum = accumulated clipped gradients
BANK_MODES = ("active", "full")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: one intra-op thread is faster, and far faster on a busy machine
    (OpenMP threads spin-wait when cores are oversubscribed). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CNN_BASE = CoreConfig(host=CNNHostConfig.preset("tiny"), compile=False)
TRANSFORMER_BASE = CoreConfig(host=TransformerHostConfig.preset("tiny"), compile=False)


ENV_BATCHINGS = ("vmap", "packed")
"""Both ways the core trains a CNN host's envs in one call (`CoreConfig.env_batching`)."""


def cnn_config(bank_mode: str, clip: float | None = 5.0, env_batching: str = "vmap") -> CoreConfig:
    return dataclasses.replace(
        CNN_BASE, bank_mode=bank_mode, optim=OptimConfig(grad_clip_norm=clip), env_batching=env_batching
    )


def transformer_config(bank_mode: str, clip: float | None = 5.0) -> CoreConfig:
    return dataclasses.replace(TRANSFORMER_BASE, bank_mode=bank_mode, optim=OptimConfig(grad_clip_norm=clip))


def trained_names(model: Model, layout_env: list[tuple]) -> set[str]:
    """State names of the params that are updated: host, each blended-in seed's blueprint,
    and its gate when gated (a GERMINATED or TRAINING seed has a gradient that is not
    applied, so it never moves)."""
    names = set(model.host_param_names)
    for s, (stage, blueprint, blend, _alpha) in enumerate(layout_env):
        if stage in BLEND_STAGES:
            names |= {n for n in model.slot_param_names[s] if n.startswith(f"banks.{s}.blueprints.{blueprint}.")}
            if blend == GAT and stage in BLEND_STAGES:
                names |= {n for n in model.slot_param_names[s] if n.startswith(f"banks.{s}.gate.")}
    return names


def make_state(config: CoreConfig, layout: list[list[tuple]], seed: int, noise: float) -> tuple[Model, TensorDict]:
    """A state with `layout`'s slot fields and every parameter, momentum and BN statistic perturbed.

    Momentum is nonzero only where a live optimizer could have accumulated it (host, and
    the running seed's blueprint, plus its gate once the gate is in use); elsewhere it is
    zero, as germination and cull leave it.
    """
    model = build_model(config)
    generator = torch.Generator().manual_seed(seed)
    n_envs = len(layout)
    state = init_state(model, n_envs, generator)
    # Envs at different epochs: each runs at its own point of the cosine learning-rate schedule.
    state["epoch"] = torch.arange(n_envs) * (config.lifecycle.max_epochs // max(1, n_envs - 1))
    for n, env in enumerate(layout):
        for s, (stage, blueprint, blend, alpha) in enumerate(env):
            state["slots", "stage"][n, s] = stage
            state["slots", "blueprint"][n, s] = model.blueprint_names.index(blueprint)
            state["slots", "blend"][n, s] = blend
            state["slots", "alpha"][n, s] = alpha
    for name, value in state["params"].items():
        state["params", name] = value + noise * torch.randn(value.shape, generator=generator)
    trained = [trained_names(model, env) for env in layout]
    for name, value in state["momentum"].items():
        mask = torch.tensor([name in trained[n] for n in range(n_envs)]).view(-1, *[1] * (value.dim() - 1))
        state["momentum", name] = torch.where(mask, noise * torch.randn(value.shape, generator=generator), 0.0)
    for name, value in state["buffers"].items():
        if name.endswith("running_mean"):
            state["buffers", name] = value + noise * torch.randn(value.shape, generator=generator)
        elif name.endswith("running_var"):
            state["buffers", name] = value * torch.exp(noise * torch.randn(value.shape, generator=generator))
        elif name.endswith("num_batches_tracked"):
            state["buffers", name] = torch.full_like(value, 3)
    return model, state


def assert_training_equivalent(
    config: CoreConfig, layout: list[list[tuple]], x: torch.Tensor, y: torch.Tensor, seed: int, noise: float
) -> list[list[float]]:
    """Train core and reference; assert equivalence; return the reference's grad norms [N][k]."""
    model, state = make_state(config, layout, seed, noise)
    initial = state.clone()
    core, stats = train_epoch(model, state, x, y, TrainStepCache(model))
    assert (state == initial).all(), "train_epoch modified its input state"

    norms = []
    for n, env in enumerate(layout):
        ref = RefEnv(config, initial, n)
        steps = [ref.train_step(x[i], y[i]) for i in range(x.shape[0])]
        norms.append([norm for _, norm in steps])
        where = f"env {n} {env}"

        ref_loss = torch.tensor(sum(loss for loss, _ in steps) / len(steps))
        torch.testing.assert_close(stats["train_loss"][n], ref_loss, **PARAM_TOL, msg=lambda m: f"{where} loss: {m}")

        ref_params = ref.trained_params()
        trained = trained_names(model, env)
        assert trained <= set(ref_params)
        for name, p in ref_params.items():
            torch.testing.assert_close(
                core["params", name][n], p.detach(), **PARAM_TOL, msg=lambda m: f"{where} param {name}: {m}"
            )
        for name, buf in ref.momentum().items():
            torch.testing.assert_close(
                core["momentum", name][n], buf, **MOMENTUM_TOL, msg=lambda m: f"{where} momentum {name}: {m}"
            )
        ref_buffers = ref.buffers()
        assert set(ref_buffers) == set(core["buffers"].keys())
        for name, buf in ref_buffers.items():
            tol = dict(atol=0, rtol=0) if buf.dtype == torch.int64 else PARAM_TOL
            torch.testing.assert_close(
                core["buffers", name][n], buf, **tol, msg=lambda m: f"{where} buffer {name}: {m}"
            )

        # Everything without a gradient (other blueprints of the bank, the gate of an
        # ungated or straight-through seed, seeds that do not run) is left bit-identical.
        for name in model.param_names:
            if name not in trained:
                assert torch.equal(core["params", name][n], initial["params", name][n]), f"{where}: {name} moved"
                assert torch.equal(core["momentum", name][n], initial["momentum", name][n]), f"{where}: {name} momentum"

        # Non-vacuity: every blended-in seed trained, and every running seed's output is not
        # the host's.
        for s, (stage, blueprint, blend, _) in enumerate(env):
            if stage not in SEED_RUNS or blueprint == "noop":
                continue
            assert ref.seed_gap[s] > 1e-3, f"{where}: seed at slot {s} outputs the host's features"
            if stage not in BLEND_STAGES:
                continue
            moved = [
                (core["params", name][n] - initial["params", name][n]).abs().max()
                for name in trained
                if name.startswith(f"banks.{s}.")
            ]
            assert max(moved) > 1e-4, f"{where}: seed at slot {s} did not train"
    return norms


def assert_clipping_exercised(norms: list[list[float]], clip: float) -> None:
    flat = [v for env in norms for v in env]
    assert min(flat) < clip < max(flat), f"clip {clip} should split the grad norms {flat}"


# --- CNN -------------------------------------------------------------------------------

CNN_CLIP = 2.5


@pytest.mark.parametrize("env_batching", ENV_BATCHINGS)
@pytest.mark.parametrize("bank_mode", BANK_MODES)
def test_cnn_training_matches_per_env_reference(bank_mode: str, env_batching: str) -> None:
    """CNN host, 7 envs covering every stage, every blueprint and 3 blend modes: after 3
    iterations, params, momentum, BN buffers and train loss equal the plain per-env loop,
    vmapped or packed."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ITERATIONS, 16, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (ITERATIONS, 16), generator=g)
    norms = assert_training_equivalent(
        cnn_config(bank_mode, CNN_CLIP, env_batching), CNN_LAYOUT, x, y, seed=0, noise=0.1
    )
    assert_clipping_exercised(norms, CNN_CLIP)


@pytest.mark.parametrize("env_batching", ENV_BATCHINGS)
def test_cnn_training_matches_reference_without_clipping(env_batching: str) -> None:
    """With `grad_clip_norm=None` the core applies raw gradients, like the unclipped loop."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (2, 8), generator=g)
    assert_training_equivalent(cnn_config("active", None, env_batching), CNN_LAYOUT, x, y, seed=3, noise=0.1)


# --- Transformer -----------------------------------------------------------------------

TRANSFORMER_CLIP = 1.6


@pytest.mark.parametrize("bank_mode", BANK_MODES)
def test_transformer_training_matches_per_env_reference(bank_mode: str) -> None:
    """Transformer host (seeds not detached while blending), 4 envs with lora, attention,
    mlp and norm seeds in several stages: params, momentum and train loss match the loop."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (ITERATIONS, 4, 16), generator=g)
    y = torch.randint(0, 256, (ITERATIONS, 4, 16), generator=g)
    norms = assert_training_equivalent(
        transformer_config(bank_mode, TRANSFORMER_CLIP), TRANSFORMER_LAYOUT, x, y, seed=5, noise=0.05
    )
    assert_clipping_exercised(norms, TRANSFORMER_CLIP)


# --- Evaluation ------------------------------------------------------------------------


def calibrate_batchnorm(config: CoreConfig, state: TensorDict, x: torch.Tensor) -> None:
    """Set each env's BN running statistics to its own train-mode batch statistics on `x`.

    Untouched running stats (mean 0, var 1) leave post-ReLU features uncentered, so every
    sample gets the same eval-mode prediction and no counterfactual could change an
    accuracy; calibrated ones make predictions depend on the input. Setup only: the
    statistics are written into the state that both sides then read.
    """
    for n in range(state.batch_size[0]):
        ref = RefEnv(config, state, n)
        bns = [m for m in ref.host.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        ref.host.train()
        with torch.no_grad():
            for v in range(x.shape[0]):
                ref.forward(x[v])
        for name, value in ref.buffers().items():
            state["buffers", name][n] = value


def eval_case(topology: str, bank_mode: str, env_batching: str):
    g = torch.Generator().manual_seed(6)
    if topology == "cnn":
        config, layout, noise = cnn_config(bank_mode, env_batching=env_batching), CNN_LAYOUT, 0.3
        x = torch.randn(2, 64, 3, 8, 8, generator=g)
        y = torch.randint(0, 10, (2, 64), generator=g)
    else:
        # Targets = inputs: the tied head makes that learnable enough for accuracy to move.
        config, layout, noise = transformer_config(bank_mode), TRANSFORMER_LAYOUT, 0.1
        x = torch.randint(0, 256, (2, 8, 16), generator=g)
        y = x.clone()
    return config, layout, noise, x, y


@pytest.mark.parametrize("bank_mode", BANK_MODES)
@pytest.mark.parametrize(("topology", "env_batching"), [("cnn", "vmap"), ("cnn", "packed"), ("transformer", "vmap")])
def test_evaluation_matches_per_env_reference(topology: str, env_batching: str, bank_mode: str) -> None:
    """`evaluate`'s val_loss and val_accuracy equal the eval-mode reference forward, and
    contribution[:, s] = accuracy as is - accuracy with slot s forced to identity."""
    config, layout, noise, x, y = eval_case(topology, bank_mode, env_batching)
    model, state = make_state(config, layout, seed=7, noise=noise)
    calibrate_batchnorm(config, state, x)
    metrics = evaluate(model, state, x, y, EvalStepCache(model))
    count = y.numel()
    contributions = []
    for n in range(len(layout)):
        ref = RefEnv(config, state, n).evaluate(x, y)
        where = f"env {n} {layout[n]}"
        # An argmax whose top-2 margin is within rounding may flip: allow those, no more.
        slack = 100.0 * ref["near_ties"].float() / count + 1e-4
        torch.testing.assert_close(metrics["val_loss"][n], ref["loss"], **PARAM_TOL, msg=lambda m: f"{where}: {m}")
        assert abs(float(metrics["val_accuracy"][n] - ref["accuracy"][0])) <= slack[0], where
        ref_contribution = ref["accuracy"][0] - ref["accuracy"][1:]
        assert ((metrics["contribution"][n] - ref_contribution).abs() <= slack[0] + slack[1:]).all(), (
            f"{where}: contribution {metrics['contribution'][n].tolist()} != {ref_contribution.tolist()}"
        )
        for s, (stage, *_rest) in enumerate(layout[n]):
            if stage not in BLEND_STAGES:  # identity and straight-through slots change nothing
                assert metrics["contribution"][n, s] == 0, f"{where}: slot {s}"
        contributions.append(ref_contribution)
    # Non-vacuity: some slot's counterfactual actually changes accuracy.
    assert torch.stack(contributions).abs().max() > 0


def test_layouts_cover_every_stage_and_blend_mode() -> None:
    """The layouts above exercise every stage (5 is unused), every blend mode in a blending
    stage, and the blueprints named in the design (so a trimmed layout cannot go unnoticed)."""
    cnn = {(stage, blueprint, blend) for env in CNN_LAYOUT for stage, blueprint, blend, _ in env}
    assert {stage for stage, _, _ in cnn} == set(Stage)
    assert {blend for stage, _, blend in cnn if stage in BLEND_STAGES} == set(BlendMode)
    assert {b for _, b, _ in cnn} >= {"norm", "attention", "depthwise", "conv_light", "conv_heavy", "conv_wide"}
    transformer = {(stage, blueprint, blend) for env in TRANSFORMER_LAYOUT for stage, blueprint, blend, _ in env}
    assert {stage for stage, _, _ in transformer} >= set(SEED_RUNS)
    assert {blend for stage, _, blend in transformer if stage in BLEND_STAGES} == set(BlendMode)
    assert {b for _, b, _ in transformer} >= {"lora", "attention", "mlp", "norm"}
