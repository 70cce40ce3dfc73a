"""Hosts and the blueprint catalogue: sizes, shapes, function-preserving births, errors."""

from __future__ import annotations

import pytest
import torch

from esper_func.core.blueprints import (
    CATALOGUE,
    Blueprint,
    blueprint_index,
    blueprint_names,
    param_count,
    register_blueprint,
)
from esper_func.core.config import CNNHostConfig, ConfigError, CoreConfig, TransformerHostConfig
from esper_func.core.hosts import build_host
from esper_func.core.initialization import ZERO, draw_parameters
from esper_func.core.model import build_model
from esper_func.core.state import init_state
from policies import HeuristicPolicy


def test_cifar_host_matches_the_reference_size() -> None:
    host = build_host(CNNHostConfig.preset("cifar"))
    assert sum(p.numel() for p in host.parameters()) == 6418
    assert CNNHostConfig.preset("cifar").slot_channels() == (8, 16, 32)


def test_deep_cnn_spreads_slots_over_five_blocks() -> None:
    config = CNNHostConfig.preset("cifar_deep")
    assert config.slot_after == (2, 3, 5)
    assert config.slot_channels() == (16, 32, 128)
    host = build_host(config)
    h = torch.randn(2, 3, 32, 32)
    for k in range(3):
        h = host.segment(k, h)
        assert h.shape[1] == config.slot_channels()[k]
    assert host.tail(h).shape == (2, 10)


@pytest.mark.parametrize("preset", ["tiny", "tinystories"])
def test_transformer_presets_segment_and_tie_the_head(preset: str) -> None:
    config = TransformerHostConfig.preset(preset)
    host = build_host(config)
    tokens = torch.randint(0, config.vocab_size, (2, min(config.context, 16)))
    h = tokens
    for k in range(3):
        h = host.segment(k, h)
        assert h.shape == (2, tokens.shape[1], config.dim)
    assert host.tail(h).shape == (2, tokens.shape[1], config.vocab_size)
    names = [n for n, _ in host.named_parameters()]
    assert not any("head" in n for n in names), "the output head must reuse the token embedding"


def test_transformer_rejects_sequences_longer_than_its_context() -> None:
    config = TransformerHostConfig.preset("tiny")
    host = build_host(config)
    with pytest.raises(ValueError, match="exceeds the host context 16"):
        host.segment(0, torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    ("topology", "channels", "shape"),
    [("cnn", 8, (2, 8, 6, 6)), ("cnn", 48, (2, 48, 4, 4)), ("transformer", 32, (2, 5, 32))],
)
def test_every_blueprint_preserves_shape_and_starts_as_identity(
    topology: str, channels: int, shape: tuple[int, ...]
) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape)
    for cls in CATALOGUE[topology]:
        module = cls(channels)
        names = tuple(n for n, _ in module.named_parameters())
        fresh = draw_parameters(module, names, 1, generator, torch.device("cpu"))
        out = torch.func.functional_call(module, {n: v[0] for n, v in fresh.items()}, (x,))
        assert out.shape == x.shape, cls.name
        torch.testing.assert_close(out, x, msg=f"{topology} blueprint {cls.name} is not identity at birth")


def test_blueprint_parameter_counts() -> None:
    # Closed forms at C channels: norm 2C+1, conv_light 9C^2 + 3C (GN affine + layer scale).
    assert param_count("cnn", "noop", 16) == 0
    assert param_count("cnn", "norm", 16) == 2 * 16 + 1
    assert param_count("cnn", "conv_light", 16) == 9 * 16**2 + 3 * 16
    assert param_count("cnn", "conv_heavy", 16) == 2 * (9 * 16**2 + 2 * 16) + 16
    assert param_count("transformer", "lora", 384) == 2 * 384 * 8
    assert param_count("transformer", "mlp", 384) == 8 * 384**2 + 5 * 384
    assert param_count("transformer", "attention", 384) == 4 * 384**2 + 4 * 384


def test_blueprint_catalogues_are_topology_specific() -> None:
    assert blueprint_names("cnn") == ("noop", "norm", "attention", "depthwise", "conv_light", "conv_heavy", "conv_wide")
    assert blueprint_names("transformer") == ("noop", "norm", "lora", "attention", "mlp")
    with pytest.raises(KeyError, match="unknown transformer blueprint 'conv_light'"):
        blueprint_index("transformer", "conv_light")


def test_invalid_shapes_raise_with_the_numbers() -> None:
    with pytest.raises(ConfigError, match="dim=30 is not divisible by n_heads=4"):
        TransformerHostConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="divisible by its 4 heads, got dim=30"):
        CATALOGUE["transformer"][blueprint_index("transformer", "attention")](30)
    with pytest.raises(ConfigError, match="image_size=30 must be divisible by 2\\*\\*n_blocks=8"):
        CNNHostConfig(image_size=30)


def test_state_has_one_stacked_copy_per_env_and_distinct_draws() -> None:
    model = build_model(CoreConfig(host=CNNHostConfig.preset("tiny"), compile=False))
    state = init_state(model, 3, torch.Generator().manual_seed(0))
    weight = state["params", "host.segments.0.0.0.weight"]
    assert weight.shape[0] == 3
    assert not torch.equal(weight[0], weight[1])
    assert state["slots"].batch_size == torch.Size([3, 3])
    assert state["buffers", "host.segments.0.0.1.running_var"].eq(1).all()


# --- extension points -----------------------------------------------------------------------


class _Scale(Blueprint):
    name = "test_scale"
    description = "x * (1 + w)"

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.w = torch.nn.Parameter(torch.zeros(channels))

    def init_overrides(self) -> dict:
        return {"w": ZERO}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.w).view(1, -1, 1, 1)


def test_registered_blueprints_join_only_the_models_that_list_them() -> None:
    register_blueprint("cnn", _Scale)
    register_blueprint("cnn", _Scale)  # the same class again: a no-op
    default = build_model(CoreConfig(host=CNNHostConfig.preset("tiny"), compile=False))
    custom = build_model(
        CoreConfig(host=CNNHostConfig.preset("tiny"), compile=False, blueprints=("noop", "test_scale", "norm"))
    )
    assert "test_scale" not in default.blueprint_names
    assert custom.blueprint_names == ("noop", "test_scale", "norm")
    assert custom.blueprint_param_count[0].tolist() == [
        0,
        CNNHostConfig.preset("tiny").slot_channels()[0],
        default.blueprint_param_count[0, 1].item(),
    ]
    heuristic = HeuristicPolicy("cnn", 2, blueprint_names=custom.blueprint_names)
    assert heuristic.rotation.tolist() == [2, 1]  # built-in order first (norm), then the new one


def test_blueprint_registration_and_selection_errors_name_the_problem() -> None:
    class Unnamed(Blueprint):
        pass

    class Impostor(_Scale):
        name = "conv_light"

    with pytest.raises(TypeError, match="not a subclass"):
        register_blueprint("cnn", torch.nn.Linear)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a class attribute `name`"):
        register_blueprint("cnn", Unnamed)
    with pytest.raises(ValueError, match="'conv_light' is taken"):
        register_blueprint("cnn", Impostor)
    with pytest.raises(ValueError, match="unknown topology"):
        register_blueprint("rnn", _Scale)  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match=r"CoreConfig.blueprints: unknown cnn blueprint\(s\) \['nope'\].*register_blueprint"
    ):
        CoreConfig(blueprints=("noop", "nope"))
    with pytest.raises(ConfigError, match="unique"):
        CoreConfig(blueprints=("norm", "norm"))
