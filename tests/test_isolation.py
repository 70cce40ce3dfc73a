"""Seed isolation on the CNN `tiny` host, through the real forward (`functional_call`).

- GERMINATED and TRAINING: the network's output is exactly the host-only output, even when
  the seed is far from the identity; the seed still receives a non-zero gradient; no
  gradient from the seed path reaches the host (host gradients are bit-identical to those
  with the slot DORMANT, and to a host that has no seed at all).
- A seed that is not in the forward (CULLED, EMBARGOED, RESETTING, DORMANT) has no effect on
  the output and receives no gradient, whatever its parameters and alpha.
- The same holds through `train_epoch`: an env whose slot is TRAINING ends an epoch with the
  same host weights, BatchNorm statistics and momentum as a twin env whose slot is DORMANT,
  and its seed is not updated (the straight-through gradient is read by G2, not applied).
- BLENDING, PROBATIONARY, FOSSILIZED: the host layers upstream of the slot keep a
  non-zero gradient at every alpha, 1 included (v1's `lerp(h, s(h.detach()), alpha)` gave
  them none at alpha 1).
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torch.func import functional_call

from esper_func.core.config import CNNHostConfig, CoreConfig, OptimConfig
from esper_func.core.host_training import TrainStepCache, task_loss, train_epoch
from esper_func.core.model import Model, SlotPlan, build_model, full_plan, slot_controls
from esper_func.core.stages import BlendMode, Stage
from esper_func.core.state import empty_slots, init_state

pytestmark = pytest.mark.usefixtures("single_thread")


NOT_IN_FORWARD = (Stage.DORMANT, Stage.CULLED, Stage.EMBARGOED, Stage.RESETTING)
STRAIGHT_THROUGH = (Stage.GERMINATED, Stage.TRAINING)


def tiny_model(grad_clip_norm: float | None = 5.0) -> Model:
    return build_model(
        CoreConfig(host=CNNHostConfig.preset("tiny"), optim=OptimConfig(grad_clip_norm=grad_clip_norm), compile=False)
    )


MODEL = tiny_model()
N_BLUEPRINTS = len(MODEL.blueprint_names)
SEEDED_BLUEPRINTS = [b for b in range(N_BLUEPRINTS) if MODEL.blueprint_param_count[0, b] > 0]


def perturbed_params(model: Model, seed: int = 0) -> dict[str, torch.Tensor]:
    """One env's parameters, every seed-bank parameter pushed far from its birth value
    (zero-initialized outputs and layer scales become non-zero: seeds are not identities)."""
    generator = torch.Generator().manual_seed(seed)
    state = init_state(model, 1, generator)
    params = {name: value[0].clone() for name, value in state["params"].items()}
    for names in model.slot_param_names:
        for name in names:
            params[name] = params[name] + 0.5 * torch.randn(params[name].shape, generator=generator)
    return params


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    config = MODEL.config.host
    x = torch.randn(16, config.in_channels, config.image_size, config.image_size, generator=generator)
    y = torch.randint(0, config.num_classes, (16,), generator=generator)
    return x, y


def controls_for(model: Model, slot: int, stage: Stage, blueprint: int, blend: int = 0, alpha: float = 0.0) -> dict:
    """One env's `[S]` forward controls with `slot` in `stage` and the other slots DORMANT."""
    slots = empty_slots(1, model.n_slots, model.device)
    slots["stage"][0, slot] = int(stage)
    slots["blueprint"][0, slot] = blueprint
    slots["blend"][0, slot] = blend
    slots["alpha"][0, slot] = alpha
    return {key: value[0] for key, value in slot_controls(model, slots).items()}


def host_only_plan(model: Model) -> tuple[SlotPlan, ...]:
    return tuple(SlotPlan((), False) for _ in range(model.n_slots))


def forward(model: Model, params: dict, controls: dict, x: torch.Tensor, plan=None) -> torch.Tensor:
    buffers = {name: value.clone() for name, value in model.net_train.named_buffers()}
    plan = full_plan(model) if plan is None else plan
    args = (x, controls["mode"], controls["detach"], controls["blueprint"], controls["gated"], controls["alpha"], plan)
    return functional_call(model.net_train, (params, buffers), args)


def gradients(model: Model, params: dict, controls: dict, x: torch.Tensor, y: torch.Tensor, plan=None) -> dict:
    leaves = {name: value.detach().clone().requires_grad_(True) for name, value in params.items()}
    loss = task_loss(forward(model, leaves, controls, x, plan), y)
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)}


def host_names_before(model: Model, slot: int) -> list[str]:
    """Host parameters upstream of `slot` (its segments 0..slot)."""
    return [n for n in model.host_param_names if any(n.startswith(f"host.segments.{k}.") for k in range(slot + 1))]


def bank_names(model: Model, slot: int, blueprint: int) -> list[str]:
    prefix = f"banks.{slot}.blueprints.{model.blueprint_names[blueprint]}."
    return [n for n in model.slot_param_names[slot] if n.startswith(prefix)]


@pytest.mark.parametrize("stage", STRAIGHT_THROUGH)
@pytest.mark.parametrize("slot", range(3))
@pytest.mark.parametrize("blueprint", range(N_BLUEPRINTS))
def test_training_output_equals_the_host_output_exactly(stage: Stage, slot: int, blueprint: int) -> None:
    params, (x, _) = perturbed_params(MODEL, seed=slot), batch()
    host = forward(MODEL, params, controls_for(MODEL, slot, Stage.DORMANT, blueprint), x, host_only_plan(MODEL))
    dormant = forward(MODEL, params, controls_for(MODEL, slot, Stage.DORMANT, blueprint), x)
    training = forward(MODEL, params, controls_for(MODEL, slot, stage, blueprint), x)
    # Sanity: the perturbed seed is not an identity, so blending it in would change the output.
    blended = forward(MODEL, params, controls_for(MODEL, slot, Stage.BLENDING, blueprint, alpha=1.0), x)
    assert torch.equal(dormant, host)
    assert torch.equal(training, host)
    if blueprint in SEEDED_BLUEPRINTS:
        assert not torch.allclose(blended, host), "the perturbed seed should change the output when blended"


@pytest.mark.parametrize("blend", list(BlendMode))
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_training_output_ignores_alpha_and_blend_mode(blend: BlendMode, alpha: float) -> None:
    params, (x, _) = perturbed_params(MODEL), batch()
    blueprint = SEEDED_BLUEPRINTS[-1]
    host = forward(MODEL, params, controls_for(MODEL, 1, Stage.DORMANT, blueprint), x, host_only_plan(MODEL))
    training = forward(MODEL, params, controls_for(MODEL, 1, Stage.TRAINING, blueprint, int(blend), alpha), x)
    assert torch.equal(training, host)


@pytest.mark.parametrize("stage", STRAIGHT_THROUGH)
@pytest.mark.parametrize("slot", range(3))
@pytest.mark.parametrize("blueprint", SEEDED_BLUEPRINTS)
def test_training_seed_gets_gradient_and_host_gradient_is_untouched(stage: Stage, slot: int, blueprint: int) -> None:
    params, (x, y) = perturbed_params(MODEL, seed=10 + slot), batch(2)
    dormant = gradients(MODEL, params, controls_for(MODEL, slot, Stage.DORMANT, blueprint), x, y)
    training = gradients(MODEL, params, controls_for(MODEL, slot, stage, blueprint), x, y)
    host_only = gradients(
        MODEL, params, controls_for(MODEL, slot, Stage.DORMANT, blueprint), x, y, host_only_plan(MODEL)
    )

    seed_grad = sum(training[n].abs().sum() for n in bank_names(MODEL, slot, blueprint))
    assert seed_grad > 0, "the TRAINING seed received no gradient"
    assert all(torch.isfinite(training[n]).all() for n in bank_names(MODEL, slot, blueprint))

    before = host_names_before(MODEL, slot)
    assert before, "the slot should have host layers upstream"
    for name in before:
        assert torch.equal(training[name], dormant[name]), f"seed gradient leaked into upstream host {name}"
        assert torch.equal(training[name], host_only[name]), f"seed gradient leaked into upstream host {name}"
    for name in MODEL.host_param_names:  # downstream layers see identical activations, too
        assert torch.equal(training[name], dormant[name]), f"host gradient {name} differs in TRAINING"

    # Nothing else in the bank trains: other blueprints (and the gate) get exactly zero.
    chosen = set(bank_names(MODEL, slot, blueprint))
    for s, names in enumerate(MODEL.slot_param_names):
        for name in names:
            if s != slot or name not in chosen:
                assert not training[name].any(), f"{name} got a gradient it should not have"


@pytest.mark.parametrize("stage", NOT_IN_FORWARD)
@pytest.mark.parametrize("blend", list(BlendMode))
def test_seeds_outside_the_forward_have_no_effect(stage: Stage, blend: BlendMode) -> None:
    params, (x, y) = perturbed_params(MODEL, seed=3), batch(3)
    host = forward(MODEL, params, controls_for(MODEL, 0, Stage.DORMANT, 0), x, host_only_plan(MODEL))
    host_grads = gradients(MODEL, params, controls_for(MODEL, 0, Stage.DORMANT, 0), x, y, host_only_plan(MODEL))
    for slot in range(MODEL.n_slots):
        for blueprint in SEEDED_BLUEPRINTS:
            # alpha is 0 in these stages by construction; force 1 to show the stage alone decides.
            for alpha in (0.0, 1.0):
                controls = controls_for(MODEL, slot, stage, blueprint, int(blend), alpha)
                assert torch.equal(forward(MODEL, params, controls, x), host), (stage, slot, blueprint, alpha)
        controls = controls_for(MODEL, slot, stage, SEEDED_BLUEPRINTS[-1], int(blend), 1.0)
        grads = gradients(MODEL, params, controls, x, y)
        for name in MODEL.slot_param_names[slot]:
            assert not grads[name].any(), f"{stage.name} seed parameter {name} got a gradient"
        for name in MODEL.host_param_names:
            assert torch.equal(grads[name], host_grads[name]), name


def twin_envs(model: Model, slot: int, blueprint: int) -> TensorDict:
    """Two envs with identical parameters: env 0's `slot` TRAINING (perturbed seed), env 1 DORMANT."""
    state = init_state(model, 2, torch.Generator().manual_seed(7))
    params = perturbed_params(model, seed=4)
    state["params"] = TensorDict({n: v.expand(2, *v.shape).clone() for n, v in params.items()}, batch_size=[2])
    state["slots", "stage"][0, slot] = int(Stage.TRAINING)
    state["slots", "blueprint"][:, slot] = blueprint
    state["slots", "epochs_total"][0, slot] = 1
    return state


@pytest.mark.parametrize("slot", [0, 2])
def test_train_epoch_host_trajectory_is_independent_of_a_training_seed(slot: int) -> None:
    """With gradient clipping off, the host's epoch is bit-identical with and without the seed."""
    model = tiny_model(grad_clip_norm=None)
    blueprint = SEEDED_BLUEPRINTS[-1]
    state = twin_envs(model, slot, blueprint)
    generator = torch.Generator().manual_seed(5)
    config = model.config.host
    x = torch.randn(3, 16, config.in_channels, config.image_size, config.image_size, generator=generator)
    y = torch.randint(0, config.num_classes, (3, 16), generator=generator)
    new, stats = train_epoch(model, state, x, y, TrainStepCache(model))

    for name in model.host_param_names:
        assert torch.equal(new["params", name][0], new["params", name][1]), f"host param {name} diverged"
        assert torch.equal(new["momentum", name][0], new["momentum", name][1]), f"host momentum {name} diverged"
        assert not torch.equal(new["params", name][1], state["params", name][1]), f"host param {name} did not train"
    for name in model.buffer_names:
        assert torch.equal(new["buffers", name][0], new["buffers", name][1]), f"buffer {name} diverged"
    assert torch.equal(stats["train_loss"][0], stats["train_loss"][1])
    seed = bank_names(model, slot, blueprint)
    assert all(torch.equal(new["params", n][0], state["params", n][0]) for n in seed), "TRAINING seed was updated"
    assert all(torch.equal(new["params", n][1], state["params", n][1]) for n in seed), "DORMANT seed was updated"
    assert float(stats["grad_ratio"][0, slot]) > 0 and float(stats["grad_ratio"][1, slot]) == 0.0

    # The same seed blended in trains (from the real loss).
    blending = state.clone()
    blending["slots", "stage"][0, slot] = int(Stage.BLENDING)
    blending["slots", "alpha"][0, slot] = 0.5
    new, _ = train_epoch(model, blending, x, y, TrainStepCache(model))
    assert any(not torch.equal(new["params", n][0], state["params", n][0]) for n in seed), "BLENDING seed did not train"


BLENDED_STAGES = ((Stage.BLENDING, 0.5), (Stage.BLENDING, 1.0), (Stage.PROBATIONARY, 1.0), (Stage.FOSSILIZED, 1.0))


@pytest.mark.parametrize(("stage", "alpha"), BLENDED_STAGES)
@pytest.mark.parametrize("slot", range(3))
def test_upstream_host_layers_keep_their_gradient_in_every_stage(stage: Stage, alpha: float, slot: int) -> None:
    params, (x, y) = perturbed_params(MODEL, seed=20 + slot), batch(4)
    blueprint = SEEDED_BLUEPRINTS[-1]
    grads = gradients(MODEL, params, controls_for(MODEL, slot, stage, blueprint, alpha=alpha), x, y)
    before = host_names_before(MODEL, slot)
    assert before
    for name in before:
        if name.endswith("weight") and grads[name].dim() == 4:  # the convolutions before the slot
            assert grads[name].abs().sum() > 0, f"{stage.name} at alpha {alpha}: no gradient reaches upstream {name}"
    seed_grad = sum(grads[n].abs().sum() for n in bank_names(MODEL, slot, blueprint))
    assert seed_grad > 0
