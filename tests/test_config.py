"""Configuration: validation errors that name the field, and strict dict loading."""

from __future__ import annotations

import json

import pytest

from esper_func.core.config import (
    CNNHostConfig,
    ConfigError,
    CoreConfig,
    LifecycleConfig,
    OptimConfig,
    TransformerHostConfig,
)
from esper_func.core.config_json import from_dict, to_dict

# --- validation -------------------------------------------------------------------------


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_transformer_dim_not_divisible_by_heads_names_both_values() -> None:
    with pytest.raises(ConfigError) as error:
        TransformerHostConfig(dim=30, n_heads=4)
    message = str(error.value)
    assert "30" in message and "4" in message
    assert "dim" in message and "n_heads" in message


def test_cnn_image_size_must_survive_every_pooling() -> None:
    with pytest.raises(ConfigError) as error:
        CNNHostConfig(image_size=12, n_blocks=3)
    message = str(error.value)
    assert "image_size" in message and "12" in message and "8" in message
    CNNHostConfig(image_size=16, n_blocks=3)  # a multiple of 2**3 is fine


@pytest.mark.parametrize("cls", [CNNHostConfig, TransformerHostConfig])
def test_unknown_preset_lists_the_choices(cls) -> None:
    with pytest.raises(ConfigError) as error:
        cls.preset("huge")
    message = str(error.value)
    assert "'huge'" in message and "tiny" in message


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (lambda: CNNHostConfig(base_channels=0), ["base_channels", "0"]),
        (lambda: CNNHostConfig(num_classes=1), ["num_classes", "1"]),
        (lambda: CNNHostConfig(slot_after=(1, 2)), ["slot_after"]),
        (lambda: CNNHostConfig(slot_after=(2, 1, 3)), ["slot_after", "increasing"]),
        (lambda: CNNHostConfig(slot_after=(1, 2, 4)), ["slot_after", "n_blocks"]),
        (lambda: CNNHostConfig(kind="transformer"), ["kind"]),
        (lambda: TransformerHostConfig(n_layers=2, slot_after=(1, 2, 3)), ["slot_after", "n_layers"]),
        (lambda: TransformerHostConfig(context=0), ["context", "0"]),
        (lambda: LifecycleConfig(max_epochs=0), ["max_epochs", "0"]),
        (lambda: LifecycleConfig(blend_steps=0), ["blend_steps"]),
        (lambda: LifecycleConfig(embargo_epochs=-1), ["embargo_epochs", "-1"]),
        (lambda: LifecycleConfig(reset_epochs=0), ["reset_epochs", "0"]),
        (lambda: LifecycleConfig(min_cull_age=-1), ["min_cull_age", "-1"]),
        (lambda: LifecycleConfig(grad_ratio_ema_decay=1.0), ["grad_ratio_ema_decay"]),
        (lambda: LifecycleConfig(sigmoid_steepness=0.0), ["sigmoid_steepness"]),
        (lambda: LifecycleConfig(grad_ratio_threshold=-0.1), ["grad_ratio_threshold"]),
        (lambda: LifecycleConfig(train_dwell_fraction=1.5), ["train_dwell_fraction", "1.5"]),
        (lambda: OptimConfig(host_lr=0.0), ["host_lr"]),
        (lambda: OptimConfig(seed_momentum=1.0), ["seed_momentum"]),
        (lambda: OptimConfig(grad_clip_norm=0.0), ["grad_clip_norm"]),
        (lambda: CoreConfig(bank_mode="some"), ["bank_mode", "'some'"]),
    ],
)
def test_validation_errors_name_the_field_and_value(build, names) -> None:
    with pytest.raises(ConfigError) as error:
        build()
    for name in names:
        assert name in str(error.value), f"{name!r} missing from: {error.value}"


def test_lifecycle_derived_timings() -> None:
    assert LifecycleConfig().training_epochs == 2  # max(1, int(0.1 * 25))
    assert LifecycleConfig(min_training_epochs=3).training_epochs == 3  # the reference's dwell
    assert LifecycleConfig(max_epochs=100).training_epochs == 10
    assert LifecycleConfig().training_timeout == 5  # 2 + 3 grace epochs
    assert LifecycleConfig().probation_timeout == 5  # max(5, int(0.1 * 25))
    assert LifecycleConfig(max_epochs=200).probation_timeout == 20


# --- from_dict ----------------------------------------------------------------------------


def test_from_dict_empty_gives_the_defaults() -> None:
    assert from_dict(CoreConfig, {}) == CoreConfig()


def test_from_dict_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError) as error:
        from_dict(CoreConfig, {"compile": False, "learning_rate": 0.1})
    assert "learning_rate" in str(error.value)
    assert "bank_mode" in str(error.value)  # the valid keys are listed


def test_from_dict_unknown_nested_key_names_its_path() -> None:
    with pytest.raises(ConfigError) as error:
        from_dict(CoreConfig, {"optim": {"lr": 0.1}})
    message = str(error.value)
    assert "lr" in message and "optim" in message and "host_lr" in message
    with pytest.raises(ConfigError) as error:
        from_dict(CoreConfig, {"host": {"kind": "cnn", "depth": 4}})
    assert "depth" in str(error.value) and "host" in str(error.value)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"compile": "yes"}, "CoreConfig.compile"),
        ({"compile": 1}, "CoreConfig.compile"),
        ({"lifecycle": {"max_epochs": "25"}}, "CoreConfig.lifecycle.max_epochs"),
        ({"lifecycle": {"max_epochs": 25.0}}, "CoreConfig.lifecycle.max_epochs"),
        ({"lifecycle": {"blend_steps": True}}, "CoreConfig.lifecycle.blend_steps"),
        ({"lifecycle": {"grad_ratio_threshold": "0.05"}}, "CoreConfig.lifecycle.grad_ratio_threshold"),
        ({"lifecycle": {"sigmoid_steepness": False}}, "CoreConfig.lifecycle.sigmoid_steepness"),
        ({"optim": {"grad_clip_norm": "off"}}, "CoreConfig.optim.grad_clip_norm"),
        ({"host": {"kind": "cnn", "slot_after": 3}}, "CoreConfig.host.slot_after"),
        ({"host": {"kind": "cnn", "slot_after": [1, "2", 3]}}, "CoreConfig.host.slot_after[1]"),
        ({"host": {"kind": "rnn"}}, "CoreConfig.host.kind"),
        ({"host": {"dim": 32}}, "CoreConfig.host.kind"),
        ({"host": "cnn"}, "CoreConfig.host"),
        ({"lifecycle": [1, 2]}, "CoreConfig.lifecycle"),
        ({"bank_mode": "partial"}, "CoreConfig.bank_mode"),
    ],
)
def test_from_dict_wrong_type_names_the_field(data, path) -> None:
    with pytest.raises(ConfigError) as error:
        from_dict(CoreConfig, data)
    assert path in str(error.value), f"{path!r} missing from: {error.value}"


def test_from_dict_runs_the_validation_of_each_class() -> None:
    with pytest.raises(ConfigError) as error:
        from_dict(CoreConfig, {"host": {"kind": "transformer", "dim": 30, "n_heads": 4}})
    assert "30" in str(error.value) and "4" in str(error.value)


def test_from_dict_loads_nested_dataclasses_and_the_tagged_host_union() -> None:
    data = {
        "host": {"kind": "transformer", "dim": 32, "n_heads": 2, "n_layers": 3, "context": 16, "slot_after": [1, 2, 3]},
        "lifecycle": {"max_epochs": 10, "blend_steps": 3, "grad_ratio_threshold": 0},
        "optim": {"host_lr": 1, "grad_clip_norm": None},
        "compile": False,
        "bank_mode": "full",
    }
    config = from_dict(CoreConfig, data)
    assert config.host == TransformerHostConfig.preset("tiny")
    assert isinstance(config.host, TransformerHostConfig)
    assert config.host.slot_after == (1, 2, 3) and isinstance(config.host.slot_after, tuple)
    assert config.lifecycle == LifecycleConfig(max_epochs=10, blend_steps=3, grad_ratio_threshold=0.0)
    assert isinstance(config.lifecycle.grad_ratio_threshold, float)  # ints are accepted for floats
    assert config.optim.host_lr == 1.0 and isinstance(config.optim.host_lr, float)
    assert config.optim.grad_clip_norm is None
    assert (config.compile, config.bank_mode) == (False, "full")

    cnn = from_dict(CoreConfig, {"host": {"kind": "cnn", "image_size": 8, "base_channels": 4}})
    assert cnn.host == CNNHostConfig.preset("tiny") and isinstance(cnn.host, CNNHostConfig)


CONFIGS = [
    CoreConfig(),
    CoreConfig(host=CNNHostConfig.preset("tiny"), compile=False),
    CoreConfig(host=CNNHostConfig.preset("cifar_deep"), lifecycle=LifecycleConfig(max_epochs=50, embargo_epochs=2)),
    CoreConfig(host=TransformerHostConfig.preset("tiny"), optim=OptimConfig(grad_clip_norm=None), bank_mode="full"),
    CoreConfig(
        host=TransformerHostConfig.preset("tinystories"), optim=OptimConfig(seed_lr=0.003, host_weight_decay=0.0)
    ),
]


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_round_trip_through_a_dict(config: CoreConfig) -> None:
    assert from_dict(CoreConfig, to_dict(config)) == config


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_round_trip_through_json_turns_lists_back_into_tuples(config: CoreConfig) -> None:
    loaded = from_dict(CoreConfig, json.loads(json.dumps(to_dict(config))))
    assert loaded == config
    assert isinstance(loaded.host.slot_after, tuple)
    assert hash(loaded) == hash(config)  # frozen and hashable, as model caches key on it


def test_to_dict_is_plain_json() -> None:
    """`to_dict` documents a plain-JSON form in which tuples become lists."""
    data = to_dict(CoreConfig())
    assert data == json.loads(json.dumps(data)), "to_dict keeps tuples (slot_after), not lists"
    assert data["host"]["kind"] == "cnn"
