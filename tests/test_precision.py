"""How the core executes: bf16 autocast (`CoreConfig.amp`: what stays fp32, how close bf16 is),
vmap chunking (the same results), and the validation of these settings."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from esper_func.core.blueprints import blueprint_index
from esper_func.core.config import CNNHostConfig, ConfigError, CoreConfig, HostConfig, TransformerHostConfig
from esper_func.core.host_evaluation import EvalStepCache, evaluate
from esper_func.core.host_training import TrainStepCache, train_epoch
from esper_func.core.model import build_model
from esper_func.core.stages import BlendMode, Stage
from esper_func.core.state import init_state


def seeded_state(config: CoreConfig, n_envs: int = 2) -> TensorDict:
    """Envs with seeds training, blending (env 1's gated) and fossilized, off the function-preserving start."""
    model = build_model(config)
    state = init_state(model, n_envs, torch.Generator().manual_seed(0))
    noise = torch.Generator().manual_seed(1)
    for name in state["params"].keys():
        state["params", name] += 0.05 * torch.randn(state["params", name].shape, generator=noise)
    slots = state["slots"]
    slots["stage"][:] = torch.tensor([[int(Stage.TRAINING), int(Stage.BLENDING), int(Stage.FOSSILIZED)]] * n_envs)
    kind = config.host.kind
    names = ("conv_light", "attention", "depthwise") if kind == "cnn" else ("lora", "mlp", "attention")
    slots["blueprint"][:] = torch.tensor([[blueprint_index(kind, name) for name in names]] * n_envs)
    slots["blend"][1, 1] = int(BlendMode.GATED)
    slots["alpha"][:, 1] = 0.4
    slots["alpha"][:, 2] = 1.0
    return state


def batches(host: HostConfig, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.Generator().manual_seed(2)
    if isinstance(host, CNNHostConfig):
        x = torch.randn(iters, 16, host.in_channels, host.image_size, host.image_size, generator=data)
        return x, torch.randint(0, host.num_classes, (iters, 16), generator=data)
    shape = (iters, 4, host.context)
    return torch.randint(0, host.vocab_size, shape, generator=data), torch.randint(
        0, host.vocab_size, shape, generator=data
    )


@pytest.mark.parametrize(
    "host", [CNNHostConfig.preset("tiny"), TransformerHostConfig.preset("tiny")], ids=["cnn", "transformer"]
)
def test_bf16_autocast_trains_close_to_fp32_and_keeps_the_state_fp32(host: HostConfig) -> None:
    fp32 = CoreConfig(host=host, compile=False)
    bf16 = CoreConfig(host=host, compile=False, amp=True)
    x, y = batches(host, iters=1)
    results = {}
    for config in (fp32, bf16):
        model = build_model(config)
        state, stats = train_epoch(model, seeded_state(config), x, y, TrainStepCache(model))
        metrics = evaluate(model, state, x, y, EvalStepCache(model))
        results[config.amp] = state, stats, metrics
    (state32, stats32, metrics32), (state16, stats16, metrics16) = results[False], results[True]
    for group in ("params", "momentum"):
        assert {value.dtype for value in state16[group].values()} == {torch.float32}, group
    buffer_dtypes = {value.dtype for value in state16["buffers"].values() if value.is_floating_point()}
    assert buffer_dtypes <= {torch.float32}  # BatchNorm statistics (a transformer host has no buffers)
    # The first iteration's loss is the forward before any update: bf16 keeps ~3 significant digits.
    torch.testing.assert_close(stats16["train_loss"], stats32["train_loss"], rtol=2e-2, atol=0.0)
    torch.testing.assert_close(metrics16["val_loss"], metrics32["val_loss"], rtol=2e-2, atol=0.0)
    for name in state32["params"].keys():  # one SGD step from the same start: updates agree to bf16 precision
        torch.testing.assert_close(state16["params", name], state32["params", name], rtol=0.0, atol=2e-2)
    bf16_changed = any(not torch.equal(state16["params", n], state32["params", n]) for n in state32["params"].keys())
    assert bf16_changed, "amp=True trained exactly as fp32: autocast was not applied"


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_vmap_trains_exactly_like_all_envs_at_once(chunk: int) -> None:
    host = CNNHostConfig.preset("tiny")
    x, y = batches(host, iters=2)
    states = []
    for chunk_size in (None, chunk):  # 3 envs: slices of 2 leave a remainder of 1
        config = CoreConfig(host=host, compile=False, vmap_chunk_size=chunk_size)
        model = build_model(config)
        state, stats = train_epoch(model, seeded_state(config, n_envs=3), x, y, TrainStepCache(model))
        states.append((state, stats, evaluate(model, state, x, y, EvalStepCache(model))))
    (whole, whole_stats, whole_metrics), (chunked, chunked_stats, chunked_metrics) = states
    for name in whole["params"].keys():
        torch.testing.assert_close(chunked["params", name], whole["params", name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_stats["grad_ratio"], whole_stats["grad_ratio"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_metrics["val_loss"], whole_metrics["val_loss"], rtol=1e-5, atol=1e-6)
    assert torch.equal(chunked_metrics["contribution"], whole_metrics["contribution"])


def test_compile_mode_and_chunk_size_are_validated() -> None:
    with pytest.raises(ConfigError, match="vmap_chunk_size must be None"):
        CoreConfig(vmap_chunk_size=0)
    with pytest.raises(ConfigError, match="compile_mode must be 'default' or 'reduce-overhead'"):
        CoreConfig(compile_mode="max-autotune")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs compile=True"):
        CoreConfig(compile=False, compile_mode="reduce-overhead")
