"""Counterfactual contributions from `evaluate`, checked against explicit evaluations.

A slot's contribution is accuracy(as is) - accuracy(that slot off). "Off" for a seed in
the forward is the same network with that slot's alpha forced to 0 (lerp with weight 0
gives the host's features exactly), so the contribution must equal the accuracy difference
between two ordinary `evaluate` calls: the state as it is, and the state with that one
alpha set to 0. It is checked a second time against a plain per-env `functional_call` loop
that shares no code with the vmapped evaluation.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch.func import functional_call

from esper_func.core.config import CNNHostConfig, CoreConfig
from esper_func.core.host_evaluation import EvalStepCache, evaluate
from esper_func.core.model import Model, SlotMode, build_model, full_plan, slot_controls
from esper_func.core.stages import BlendMode, Stage
from esper_func.core.state import init_state

# Per env, per slot (early, mid, late): stage, blueprint name, blend mode, alpha.
LAYOUT = [
    [
        (Stage.BLENDING, "conv_light", BlendMode.LINEAR, 0.6),
        (Stage.PROBATIONARY, "attention", BlendMode.GATED, 1.0),
        (Stage.FOSSILIZED, "conv_heavy", BlendMode.SIGMOID, 1.0),
    ],
    [
        (Stage.FOSSILIZED, "depthwise", BlendMode.LINEAR, 1.0),
        (Stage.TRAINING, "conv_heavy", BlendMode.LINEAR, 0.0),
        (Stage.BLENDING, "conv_light", BlendMode.SIGMOID, 0.77),
    ],
    [
        (Stage.DORMANT, "noop", BlendMode.LINEAR, 0.0),
        (Stage.PROBATIONARY, "conv_heavy", BlendMode.LINEAR, 1.0),
        (Stage.CULLED, "conv_light", BlendMode.LINEAR, 0.0),
    ],
]
SEED_IN_BLEND = (Stage.BLENDING, Stage.PROBATIONARY, Stage.FOSSILIZED)


pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(bank_mode: str) -> Model:
    return build_model(CoreConfig(host=CNNHostConfig.preset("tiny"), bank_mode=bank_mode, compile=False))


def noisy_state(model: Model) -> TensorDict:
    """The LAYOUT state, all parameters (host and seed banks) perturbed with noise."""
    generator = torch.Generator().manual_seed(0)
    state = init_state(model, len(LAYOUT), generator)
    for name, value in state["params"].items():
        state["params", name] = value + 0.3 * torch.randn(value.shape, generator=generator)
    for env, row in enumerate(LAYOUT):
        for slot, (stage, blueprint, blend, alpha) in enumerate(row):
            state["slots", "stage"][env, slot] = int(stage)
            state["slots", "blueprint"][env, slot] = model.blueprint_names.index(blueprint)
            state["slots", "blend"][env, slot] = int(blend)
            state["slots", "alpha"][env, slot] = alpha
    return state


def validation_data(model: Model, state: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images labelled by env 0's own predictions (so its seeds matter for accuracy)."""
    generator = torch.Generator().manual_seed(1)
    config = model.config.host
    x = torch.randn(3, 32, config.in_channels, config.image_size, config.image_size, generator=generator)
    controls = {k: v[0] for k, v in slot_controls(model, state["slots"]).items()}
    y = torch.stack([explicit_logits(model, state, 0, controls, xb).argmax(-1) for xb in x])
    noise = torch.randint(0, config.num_classes, y.shape, generator=generator)
    return x, torch.where(torch.rand(y.shape, generator=generator) < 0.3, noise, y)


def explicit_logits(model: Model, state: TensorDict, env: int, controls: dict, x: torch.Tensor) -> torch.Tensor:
    params = {name: value[env] for name, value in state["params"].items()}
    buffers = {name: value[env] for name, value in state["buffers"].items()}
    args = (
        x,
        controls["mode"],
        controls["detach"],
        controls["blueprint"],
        controls["gated"],
        controls["alpha"],
        full_plan(model),
    )
    with torch.no_grad():
        return functional_call(model.net_eval, (params, buffers), args)


def explicit_correct(
    model: Model, state: TensorDict, env: int, off: int | None, x: torch.Tensor, y: torch.Tensor
) -> int:
    """Correct predictions of env `env` over all batches, slot `off` forced to identity."""
    controls = {k: v[env].clone() for k, v in slot_controls(model, state["slots"]).items()}
    if off is not None:
        controls["mode"][off] = int(SlotMode.IDENTITY)
    return sum(int((explicit_logits(model, state, env, controls, xb).argmax(-1) == yb).sum()) for xb, yb in zip(x, y))


@pytest.mark.parametrize("bank_mode", ["active", "full"])
def test_counterfactual_equals_evaluation_with_that_alpha_at_zero(bank_mode: str) -> None:
    model = make_model(bank_mode)
    state = noisy_state(model)
    x, y = validation_data(model, state)
    steps = EvalStepCache(model)
    metrics = evaluate(model, state, x, y, steps)
    contribution = metrics["contribution"]
    assert contribution.shape == (len(LAYOUT), model.n_slots)
    assert bool((contribution != 0).any()), f"no seed changed any prediction: {contribution.tolist()}"

    for env, row in enumerate(LAYOUT):
        for slot, (stage, *_rest) in enumerate(row):
            off = state.clone()
            off["slots", "alpha"][env, slot] = 0.0
            off_metrics = evaluate(model, off, x, y, steps)
            expected = metrics["val_accuracy"][env] - off_metrics["val_accuracy"][env]
            where = f"env {env} slot {slot} ({stage.name})"
            assert float(contribution[env, slot]) == pytest.approx(float(expected), abs=1e-4), where
            if stage not in SEED_IN_BLEND:
                assert float(contribution[env, slot]) == 0.0, f"{where}: a seed outside the blend contributes"
            # Other envs' accuracies do not move when this env's alpha changes.
            others = torch.arange(len(LAYOUT)) != env
            assert torch.equal(off_metrics["val_accuracy"][others], metrics["val_accuracy"][others]), where


def test_counterfactual_matches_a_plain_per_env_evaluation() -> None:
    model = make_model("active")
    state = noisy_state(model)
    x, y = validation_data(model, state)
    metrics = evaluate(model, state, x, y, EvalStepCache(model))
    count = y.numel()
    for env in range(len(LAYOUT)):
        correct = explicit_correct(model, state, env, None, x, y)
        assert float(metrics["val_accuracy"][env]) == pytest.approx(100.0 * correct / count, abs=1e-4)
        for slot in range(model.n_slots):
            correct_off = explicit_correct(model, state, env, slot, x, y)
            expected = 100.0 * (correct - correct_off) / count
            assert float(metrics["contribution"][env, slot]) == pytest.approx(expected, abs=1e-4), (env, slot)
    # Env 0's labels are (mostly) its own predictions: every one of its seeds matters.
    assert bool((metrics["contribution"][0] > 0).all()), metrics["contribution"][0].tolist()


def test_counterfactual_does_not_modify_the_state() -> None:
    model = make_model("active")
    state = noisy_state(model)
    x, y = validation_data(model, state)
    snapshot = state.clone()
    evaluate(model, state, x, y, EvalStepCache(model))
    for key, value in snapshot.items(include_nested=True, leaves_only=True):
        assert torch.equal(state.get(key), value), key
