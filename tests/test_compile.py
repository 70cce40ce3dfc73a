"""Compiled train iteration and evaluation match eager (one compile of each: slow on CPU)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tensordict import TensorDict

from esper_func.core import host_evaluation, host_training
from esper_func.core.blueprints import blueprint_index
from esper_func.core.config import CNNHostConfig, CoreConfig
from esper_func.core.model import build_model
from esper_func.core.stages import BlendMode, Stage
from esper_func.core.state import init_state
from esper_func.core.step import Batches, StepFunctions, env_step


def compare_env_step_with_eager(config: CoreConfig) -> None:
    """One env step of a prepared 3-env state (training, blending and fossilized slots, a
    germinate and a fossilize) under `config` equals the same step eager."""
    compiled = StepFunctions(build_model(config))
    eager = StepFunctions(build_model(dataclasses.replace(config, compile=False, compile_mode="default")))
    state = init_state(compiled.model, 3, torch.Generator().manual_seed(0))
    for name in state["params"].keys():  # leave the function-preserving start
        state["params", name] += 0.05 * torch.randn(
            state["params", name].shape, generator=torch.Generator().manual_seed(1)
        )
    slots = state["slots"]
    slots["stage"][:] = torch.tensor(
        [[int(Stage.TRAINING), 1, 1], [1, int(Stage.BLENDING), 1], [1, 1, int(Stage.FOSSILIZED)]]
    )
    slots["blueprint"][:] = torch.tensor([[blueprint_index("cnn", "conv_light"), 0, 0], [0, 2, 0], [0, 0, 3]])
    slots["blend"][1, 1] = int(BlendMode.GATED)
    slots["alpha"][1, 1] = 0.4
    slots["alpha"][2, 2] = 1.0
    action = TensorDict(
        {
            "op": torch.tensor([0, 0, 1]),
            "slot": torch.tensor([0, 0, 0]),
            "blueprint": torch.tensor([0, 0, 5]),
            "blend": torch.tensor([0, 0, 1]),
        },
        batch_size=[3],
    )
    data = torch.Generator().manual_seed(2)
    batches = Batches(
        torch.randn(2, 16, 3, 8, 8, generator=data),
        torch.randint(0, 10, (2, 16), generator=data),
        torch.randn(1, 32, 3, 8, 8, generator=data),
        torch.randint(0, 10, (1, 32), generator=data),
    )
    got, got_metrics = env_step(compiled, state, action, batches, torch.Generator().manual_seed(3))
    want, want_metrics = env_step(eager, state, action, batches, torch.Generator().manual_seed(3))

    for name in want["params"].keys():
        torch.testing.assert_close(got["params", name], want["params", name], atol=1e-5, rtol=1e-4)
    for name in want["buffers"].keys():
        torch.testing.assert_close(got["buffers", name], want["buffers", name], atol=1e-5, rtol=1e-4)
    for key in ("train_loss", "val_loss", "grad_ratio"):
        torch.testing.assert_close(got_metrics[key], want_metrics[key], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_metrics["val_accuracy"], want_metrics["val_accuracy"])
    torch.testing.assert_close(got_metrics["contribution"], want_metrics["contribution"])
    assert (got["slots", "stage"] == want["slots", "stage"]).all()
    assert not torch.equal(got["params", "host.head.weight"], state["params", "host.head.weight"])


@pytest.mark.compile
def test_compiled_env_step_matches_eager() -> None:
    compare_env_step_with_eager(CoreConfig(host=CNNHostConfig.preset("tiny"), compile=True))


def test_cuda_graph_bookkeeping_leaves_the_step_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """`reduce-overhead`'s step marking and output copies, run on uncompiled steps: what
    they add to a step must not change it (the graphs themselves need CUDA, below; the
    compiler is the same as in `default` mode, tested above)."""
    calls: list[str] = []

    def uncompiled(function: Callable[..., Any], mode: str) -> Callable[..., Any]:
        calls.append(mode)
        return function

    monkeypatch.setattr(host_training, "compile_per_plan", uncompiled)
    monkeypatch.setattr(host_evaluation, "compile_per_plan", uncompiled)
    marks: list[bool] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(True))
    config = CoreConfig(host=CNNHostConfig.preset("tiny"), compile=True, compile_mode="reduce-overhead")
    compare_env_step_with_eager(config)
    assert calls and set(calls) == {"reduce-overhead"} and marks


@pytest.mark.compile
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_epochs_match_eager_and_keep_their_results() -> None:
    """Two epochs under `reduce-overhead`: each equals eager, and the first epoch's state is
    not overwritten by the second epoch's graph replays."""
    from esper_func.core.host_evaluation import EvalStepCache, evaluate
    from esper_func.core.host_training import TrainStepCache, train_epoch

    device = torch.device("cuda")
    config = CoreConfig(host=CNNHostConfig.preset("tiny"), compile=True, compile_mode="reduce-overhead")
    graphs, eager = (
        build_model(config, device),
        build_model(dataclasses.replace(config, compile=False, compile_mode="default"), device),
    )
    start = init_state(graphs, 3, torch.Generator(device).manual_seed(0))
    data = torch.Generator(device).manual_seed(1)
    x = torch.randn(2, 3, 16, 3, 8, 8, generator=data, device=device)
    y = torch.randint(0, 10, (2, 3, 16), generator=data, device=device)
    graph_steps, eager_steps = TrainStepCache(graphs), TrainStepCache(eager)
    first, _ = train_epoch(graphs, start, x[0], y[0], graph_steps)
    kept = first["params"].clone()
    second, _ = train_epoch(graphs, first, x[1], y[1], graph_steps)
    want_first, _ = train_epoch(eager, start, x[0], y[0], eager_steps)
    want_second, _ = train_epoch(eager, want_first, x[1], y[1], eager_steps)
    for name in want_second["params"].keys():
        assert torch.equal(first["params", name], kept[name]), name
        torch.testing.assert_close(first["params", name], want_first["params", name], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(second["params", name], want_second["params", name], atol=1e-4, rtol=1e-3)
    metrics = evaluate(graphs, second, x[1], y[1], EvalStepCache(graphs))
    want_metrics = evaluate(eager, want_second, x[1], y[1], EvalStepCache(eager))
    torch.testing.assert_close(metrics["val_loss"], want_metrics["val_loss"], atol=1e-4, rtol=1e-3)
