"""The packed path's choice and its limits: which env batching a config resolves to, the
errors for hosts and blueprints it cannot run, and a user blueprint joining it.

Its values are checked against the plain per-env loop in tests/test_equivalence.py
(training and evaluation, every stage, blueprint and blend mode, both env batchings)."""

from __future__ import annotations

import pytest
import torch

from esper_func.core.blueprints import Blueprint, register_blueprint
from esper_func.core.config import CNNHostConfig, ConfigError, CoreConfig, TransformerHostConfig
from esper_func.core.host_training import TrainStepCache, train_epoch
from esper_func.core.initialization import ZERO
from esper_func.core.model import build_model
from esper_func.core.packed_modules import Packed
from esper_func.core.stages import Stage
from esper_func.core.state import init_state

CPU, META = torch.device("cpu"), torch.device("meta")


class _Unpacked(Blueprint):
    """A user blueprint with only the per-env forward."""

    name = "test_unpacked"
    description = "x * (1 + w)"

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.w = torch.nn.Parameter(torch.zeros(channels))

    def init_overrides(self) -> dict:
        return {"w": ZERO}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.w).view(-1, 1, 1)


class _Packs(_Unpacked):
    """The same blueprint with its packed forward: per-env channel scales are per-channel."""

    name = "test_packs"

    def packed_forward(self, packed: Packed, prefix: str, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + packed.param(prefix + "w")).flatten()[:, None, None]


def test_auto_packs_cnn_hosts_on_a_cpu_only() -> None:
    cnn = CoreConfig(host=CNNHostConfig.preset("tiny"))
    assert cnn.packs_envs(CPU)
    assert not cnn.packs_envs(META)  # any other device keeps vmap until packed is measured there
    assert not CoreConfig(host=TransformerHostConfig.preset("tiny")).packs_envs(CPU)
    assert not CoreConfig(host=CNNHostConfig.preset("tiny"), env_batching="vmap").packs_envs(CPU)
    assert CoreConfig(host=CNNHostConfig.preset("tiny"), env_batching="packed").packs_envs(META)


def test_packed_needs_a_cnn_host_and_says_what_to_use_instead() -> None:
    with pytest.raises(ConfigError, match="needs a CNN host.*env_batching='vmap'"):
        CoreConfig(host=TransformerHostConfig.preset("tiny"), env_batching="packed")
    with pytest.raises(ConfigError, match="env_batching must be"):
        CoreConfig(env_batching="grouped")  # type: ignore[arg-type]


def test_a_blueprint_without_packed_forward_falls_back_to_vmap_or_is_named() -> None:
    register_blueprint("cnn", _Unpacked)
    names = ("noop", "test_unpacked")
    assert not CoreConfig(host=CNNHostConfig.preset("tiny"), blueprints=names).packs_envs(CPU)
    with pytest.raises(ConfigError, match=r"without it: \['test_unpacked'\]"):
        CoreConfig(host=CNNHostConfig.preset("tiny"), blueprints=names, env_batching="packed")


def test_a_user_blueprint_with_packed_forward_trains_as_under_vmap() -> None:
    register_blueprint("cnn", _Packs)
    configs = {
        batching: CoreConfig(
            host=CNNHostConfig.preset("tiny"), blueprints=("noop", "test_packs"), compile=False, env_batching=batching
        )
        for batching in ("vmap", "packed")
    }
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 8, 3, 8, 8, generator=g), torch.randint(0, 10, (2, 8), generator=g)
    out = {}
    for batching, config in configs.items():
        model = build_model(config)
        state = init_state(model, 3, torch.Generator().manual_seed(1))
        state["slots", "stage"][:, 1] = torch.tensor([int(Stage.BLENDING), int(Stage.TRAINING), int(Stage.DORMANT)])
        state["slots", "blueprint"][:, 1] = 1
        state["slots", "alpha"][:, 1] = 0.5
        w = torch.randn(3, model.config.host.slot_channels()[1], generator=torch.Generator().manual_seed(2))
        state["params", "banks.1.blueprints.test_packs.w"] = w
        out[batching], _ = train_epoch(model, state, x, y, TrainStepCache(model))
    assert model.packed
    for name in out["vmap"]["params"].keys():
        torch.testing.assert_close(out["packed"]["params", name], out["vmap"]["params", name], atol=1e-6, rtol=1e-5)
    assert not torch.equal(
        out["packed"]["params", "banks.1.blueprints.test_packs.w"][0],
        out["packed"]["params", "banks.1.blueprints.test_packs.w"][1],
    )


@pytest.mark.parametrize("env_batching", ["vmap", "packed"])
def test_training_under_no_grad_is_training_as_usual(env_batching: str) -> None:
    """TorchRL collectors step envs under `torch.no_grad()`: the env's host must train there
    exactly as with grad mode on (a packed step once left its parameters untouched there)."""
    model = build_model(CoreConfig(host=CNNHostConfig.preset("tiny"), compile=False, env_batching=env_batching))
    state = init_state(model, 3, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 8, 3, 8, 8, generator=g), torch.randint(0, 10, (2, 8), generator=g)
    trained, _ = train_epoch(model, state, x, y, TrainStepCache(model))
    with torch.no_grad():
        trained_no_grad, _ = train_epoch(model, state, x, y, TrainStepCache(model))
    name = model.host_param_names[0]
    assert not torch.equal(trained["params", name], state["params", name])
    for name in model.host_param_names:
        torch.testing.assert_close(trained_no_grad["params", name], trained["params", name], rtol=0, atol=0)
