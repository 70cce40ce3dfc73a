"""Hot-path hygiene: env steps never synchronize with the device; no broad `except`."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchrl.envs.utils import step_mdp

from envs import MorphogeneticEnv
from esper_func.core import stages
from esper_func.core.reward_config import RewardConfig
from esper_func.core.rewards import reward_tables
from esper_func.data.images import draws_on
from esper_func.perf.sync_audit import HostSyncAudit, HostSyncError
from policies import HeuristicConfig, HeuristicPolicy
from tests.test_governor import FAULT_ENV, N_ENVS, lively_env

ROOT = Path(__file__).resolve().parents[1]


def audited_episode(bank_mode: str, device: str = "cpu") -> tuple[list[HostSyncAudit], torch.Tensor]:
    """A heuristic episode (germinations, blends, fossils, one NaN fault and its rollback)
    with every env step and every policy call audited."""
    env = lively_env()
    env = MorphogeneticEnv(replace(env.config, core=replace(env.config.core, bank_mode=bank_mode)), device)
    policy = HeuristicPolicy(
        env.model.topology,
        N_ENVS,
        HeuristicConfig(require_stabilization=False, min_epoch_to_germinate=0, plateau_epochs_to_germinate=0),
        device,
    )
    audits = []
    rolled_back = torch.zeros(N_ENVS, dtype=torch.bool, device=device)
    td = env.reset()
    for t in range(env.max_epochs):
        if t == 9:
            state = env.state.clone()
            state["params", env.model.host_param_names[-2]][FAULT_ENV] = float("nan")
            env.state = state
        with HostSyncAudit(device) as audit:
            step = env.step(policy(td))
        audits.append(audit)
        rolled_back |= step["next", "metrics", "rolled_back"]
        td = step_mdp(step)
    return audits, rolled_back


def test_env_steps_in_full_bank_mode_never_synchronize(single_thread: None) -> None:
    audits, rolled_back = audited_episode("full")
    assert rolled_back[FAULT_ENV], "the episode should include a rollback"
    for audit in audits:
        audit.raise_if_any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_env_steps_on_cuda_never_synchronize_under_the_driver_check() -> None:
    """The same episode with `torch.cuda.set_sync_debug_mode("error")` on: any sync raises."""
    audits, rolled_back = audited_episode("full", "cuda")
    assert rolled_back[FAULT_ENV]
    for audit in audits:
        audit.raise_if_any()


def test_active_bank_mode_reads_back_only_its_bank_plan(single_thread: None) -> None:
    audits, _ = audited_episode("active")
    assert all(audit.calls for audit in audits), "the active bank plan is read once per step"
    for audit in audits:
        audit.raise_if_any(allowed=("active_plan",))


def test_no_lookup_table_is_made_inside_a_step(single_thread: None) -> None:
    """Every table a step reads exists (and is preloaded onto the env's device) once the env
    is built: a table made at its first use would be copied to the device mid-step, which
    makes the host wait on CUDA."""
    rewards = replace(RewardConfig(), potential_training=1.234)  # a config no other test made
    env = MorphogeneticEnv(replace(lively_env().config, rewards=rewards))
    made_at_build = set(stages._TABLES)
    assert {id(table) for table in reward_tables(rewards)} <= made_at_build
    policy = HeuristicPolicy(
        env.model.topology,
        N_ENVS,
        HeuristicConfig(require_stabilization=False, min_epoch_to_germinate=0, plateau_epochs_to_germinate=0),
    )
    td = env.reset()
    for _ in range(env.max_epochs):
        td = step_mdp(env.step(policy(td)))
    assert td["seeds", "stage"].max() > 0, "the episode should germinate seeds"
    assert set(stages._TABLES) == made_at_build


def test_lookups_take_only_registered_tables() -> None:
    with pytest.raises(ValueError, match="register this \\(3,\\) table with esper_func.core.stages.lookup_table"):
        stages.on_device(torch.zeros(3), torch.device("cpu"))
    table = stages.lookup_table(torch.arange(3))
    assert stages.on_device(table, torch.device("meta")).device == torch.device("meta")


def test_the_audit_records_reads_shape_dependent_ops_and_device_moves() -> None:
    x = torch.arange(4.0)
    cases = {
        "item": lambda: x[0].item(),
        "__bool__": lambda: bool(x[0] > 1),
        "tolist": lambda: x.tolist(),
        "nonzero": lambda: torch.nonzero(x),
        "__getitem__": lambda: x[x > 1],
        "to": lambda: draws_on(x, torch.device("meta")),  # a move made by our code
    }
    for name, call in cases.items():
        with HostSyncAudit() as audit:
            call()
        assert [c.operation for c in audit.calls] == [name], name
        with pytest.raises(HostSyncError, match=name):
            audit.raise_if_any()
    with HostSyncAudit() as audit:
        torch.where(x > 1, x, 0.0).sum() * 2
    assert audit.calls == []


def test_no_broad_except_anywhere_in_the_package() -> None:
    broad = []
    for package in ("esper_func", "envs", "policies"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ExceptHandler):
                    names = [n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)] if node.type else []
                    if node.type is None or {"Exception", "BaseException"} & set(names):
                        broad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert broad == []
