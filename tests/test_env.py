"""MorphogeneticEnv under TorchRL: specs, rollouts, transforms, collectors, masks, resets."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.envs import ObservationNorm, RewardSum, StepCounter, TransformedEnv
from torchrl.envs.utils import check_env_specs, step_mdp

from envs import EnvConfig, MorphogeneticEnv, make_env
from esper_func.core.config import CNNHostConfig, ConfigError, CoreConfig, LifecycleConfig
from esper_func.core.memory import check_fits, estimate_memory
from esper_func.core.reward_config import RewardConfig
from esper_func.core.reward_transition import potential
from esper_func.core.seeding import ACTION_NOISE, Stream, stream_seed
from esper_func.core.stages import Op, Stage
from esper_func.core.state import empty_slots
from esper_func.core.step import reset_observation, reset_state, step_env, step_static_twin
from esper_func.data.tasks import TaskConfig
from policies import HeuristicConfig, HeuristicPolicy, RandomPolicy, StaticPolicy

try:
    from tests.reference import RefEnv
except ImportError:  # tests/ on sys.path instead of the repository root
    from reference import RefEnv

N_ENVS = 3


def small_env(n_envs: int = N_ENVS, max_epochs: int = 6, seed: int = 0, **lifecycle: int) -> MorphogeneticEnv:
    """The synthetic task at a test-sized budget (few, small batches per epoch)."""
    task = replace(TaskConfig.preset("synthetic"), batch_size=16, train_iters=2, val_batches=1)
    core = CoreConfig(compile=False, lifecycle=LifecycleConfig(max_epochs=max_epochs, **lifecycle))
    return MorphogeneticEnv(EnvConfig(task=task, core=core, n_envs=n_envs, seed=seed))


@pytest.fixture(scope="module")
def env() -> MorphogeneticEnv:
    return small_env()


def test_specs_pass_torchrl_check(env: MorphogeneticEnv) -> None:
    check_env_specs(env)


def test_step_outputs_documented_keys_and_reward_is_the_sum(env: MorphogeneticEnv) -> None:
    td = env.reset()
    assert td["observation"].shape == (N_ENVS, env.full_observation_spec["observation"].shape[-1])
    assert td["action_mask", "slot"].shape == (N_ENVS, len(Op), 3)
    step = env.step(RandomPolicy(torch.Generator().manual_seed(0))(td))
    nxt = step["next"]
    for key in ("stage", "alpha", "blueprint", "epochs_in_stage", "contribution"):
        assert nxt["seeds", key].shape == (N_ENVS, 3)
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert nxt["metrics", key].shape == (N_ENVS,)
    components = torch.stack(list(nxt["reward_components"].values())).sum(0)
    torch.testing.assert_close(nxt["reward"].squeeze(-1), components)
    assert nxt["observation"].abs().max() <= 1.0
    assert (nxt["metrics", "epoch"] == 1).all()


def test_random_actions_under_masks_always_execute() -> None:
    env = small_env(max_epochs=8)
    policy = RandomPolicy(torch.Generator().manual_seed(3))
    rollout = env.rollout(8, policy)
    assert rollout["next", "metrics", "action_executed"].all()
    assert (rollout["next", "metrics", "illegal_actions"] == 0).all()
    assert (rollout["action", "op"] != int(Op.WAIT)).any(), "the random policy should act sometimes"


def assert_random_actions_respect_the_spec_masks(rollout: TensorDict) -> None:
    """Every drawn op, blueprint and blend was allowed by the mask observed at its step, and
    an action failed exactly when its random slot was illegal for its op."""
    for head in ("op", "blueprint", "blend"):
        drawn = rollout["action", head].unsqueeze(-1)
        assert rollout["action_mask", head].gather(-1, drawn).all(), head
    op, slot = rollout["action", "op"], rollout["action", "slot"]
    slot_mask = rollout["action_mask", "slot"]  # [N, T, 4, S]
    rows = slot_mask.gather(-2, op[..., None, None].expand(*op.shape, 1, slot_mask.shape[-1])).squeeze(-2)
    slot_legal = rows.gather(-1, slot.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(rollout["next", "metrics", "action_executed"], slot_legal)
    assert (op != int(Op.WAIT)).any(), "random actions should act sometimes"


def test_a_rollout_without_a_policy_draws_only_legal_ops_blueprints_and_blends() -> None:
    env = small_env(max_epochs=6, seed=2)
    torch.manual_seed(0)
    first_mask = env.reset()["action_mask", "op"]
    draws = torch.stack([env.rand_action()["action", "op"] for _ in range(50)], dim=-1)  # [N, 50]
    assert first_mask.gather(-1, draws).all() and not first_mask.all(), "fresh envs allow some ops only"
    assert_random_actions_respect_the_spec_masks(env.rollout(5))


def test_masked_out_action_is_executed_as_wait_and_counted(env: MorphogeneticEnv) -> None:
    td = env.reset()
    before = env.state["slots"].clone()
    params_before = env.state["params"].clone()
    # FOSSILIZE on a dormant slot and CULL with nothing to cull are both illegal.
    td["action"] = TensorDict(
        {
            "op": torch.tensor([Op.FOSSILIZE, Op.CULL, Op.WAIT]),
            "slot": torch.tensor([0, 2, 1]),
            "blueprint": torch.tensor([1, 1, 1]),
            "blend": torch.tensor([0, 0, 0]),
        },
        batch_size=[N_ENVS],
    )
    step = env.step(td)
    assert step["next", "metrics", "action_executed"].tolist() == [False, False, True]
    assert step["next", "metrics", "illegal_actions"].tolist() == [1, 1, 0]
    assert (env.state["slots", "stage"] == before["stage"]).all()
    wait = RewardConfig()
    assert wait.family == "shaped"
    assert not torch.equal(env.state["params", "host.head.weight"], params_before["host.head.weight"]), (
        "hosts still train"
    )


def test_partial_reset_only_resets_flagged_envs(env: MorphogeneticEnv) -> None:
    td = env.reset()
    carried = step_mdp(env.step(StaticPolicy()(td)))
    kept = env.state["params", "host.head.weight"][1].clone()
    carried["_reset"] = torch.tensor([[True], [False], [True]])
    out = env.reset(carried)
    assert out["metrics", "epoch"].tolist() == [0, 1, 0]
    assert env.state["epoch"].tolist() == [0, 1, 0]
    torch.testing.assert_close(env.state["params", "host.head.weight"][1], kept)


def test_episode_terminates_after_max_epochs_with_no_potential_left() -> None:
    """The fixed horizon is a true termination (the observation carries the epoch fraction):
    `terminated`, never `truncated`, and the last step's PBRS term pays back the whole
    potential of the state before it (Phi = 0 at the terminal state)."""
    env = small_env(max_epochs=3)
    rollout = env.rollout(
        3,
        HeuristicPolicy(
            "cnn", N_ENVS, HeuristicConfig(min_epoch_to_germinate=0, germinate_by_epoch=0, require_stabilization=False)
        ),
    )
    assert rollout["next", "terminated"][:, -1].all() and rollout["next", "done"][:, -1].all()
    assert not rollout["next", "done"][:, :-1].any()
    assert not rollout["next", "truncated"].any()
    before_last = rollout[:, -1]["seeds"].exclude("improvement")
    slots = empty_slots(N_ENVS, 3, torch.device("cpu"))
    slots["stage"] = before_last["stage"]
    slots["epochs_in_stage"] = before_last["epochs_in_stage"]
    config = env.config.rewards
    assert bool((slots["stage"] != int(Stage.DORMANT)).any()), "the heuristic should have germinated"
    expected = -config.pbrs_weight * potential(config, slots)
    torch.testing.assert_close(rollout["next", "reward_components", "pbrs"][:, -1], expected)


def test_runs_inside_transformed_env_with_standard_transforms() -> None:
    base = small_env(max_epochs=4)
    env = TransformedEnv(base, StepCounter())
    env.append_transform(RewardSum())
    env.append_transform(ObservationNorm(in_keys=["observation"], standard_normal=True))
    env.transform[-1].init_stats(num_iter=2, reduce_dim=(0, 1), cat_dim=0)
    rollout = env.rollout(4, RandomPolicy(torch.Generator().manual_seed(1)))
    assert rollout["next", "step_count"][:, -1].eq(4).all()
    torch.testing.assert_close(rollout["next", "episode_reward"][:, -1], rollout["next", "reward"].sum(1))
    assert torch.isfinite(rollout["next", "observation"]).all()


def test_collector_gathers_whole_episodes() -> None:
    env = small_env(max_epochs=3)
    collector = Collector(
        env, RandomPolicy(torch.Generator().manual_seed(2)), frames_per_batch=N_ENVS * 3, total_frames=N_ENVS * 3,
        auto_register_policy_transforms=False,
    )
    batches = list(collector)
    collector.shutdown()
    assert len(batches) == 1
    batch = batches[0]
    assert batch.batch_size == (N_ENVS, 3)
    assert batch["next", "terminated"][:, -1].all()


def test_heuristic_germinates_blends_and_fossilizes_on_a_tiny_setting() -> None:
    """A short lifecycle so one episode can take a seed all the way to FOSSILIZED."""
    env = small_env(
        n_envs=2,
        max_epochs=14,
        min_training_epochs=1,
        blend_steps=2,
        probation_min_epochs=3,
        embargo_epochs=1,
    )
    env = MorphogeneticEnv(
        replace(
            env.config,
            core=replace(
                env.config.core,
                lifecycle=replace(env.config.core.lifecycle, grad_ratio_threshold=0.0, fossilize_min_contribution=0.0),
            ),
            task=replace(env.config.task, train_iters=4, batch_size=32),
        )
    )
    eager = HeuristicConfig(require_stabilization=False, min_epoch_to_germinate=0, plateau_epochs_to_germinate=0)
    policy = HeuristicPolicy(env.model.topology, 2, eager)
    stages_seen: set[int] = set()
    td = env.reset()
    for _ in range(14):
        step = env.step(policy(td))
        stages_seen.update(step["next", "seeds", "stage"].flatten().tolist())
        td = step_mdp(step)
    assert {int(Stage.TRAINING), int(Stage.BLENDING), int(Stage.PROBATIONARY)} <= stages_seen
    assert int(Stage.FOSSILIZED) in stages_seen, f"stages seen: {sorted(stages_seen)}"


def growing_env(max_epochs: int, static_baseline: bool, seed: int = 0) -> MorphogeneticEnv:
    """A short lifecycle and a budget where one episode takes seeds through blending, under
    the `accuracy` reward."""
    env = small_env(
        n_envs=2, max_epochs=max_epochs, seed=seed, min_training_epochs=1, blend_steps=2, probation_min_epochs=3
    )
    lifecycle = replace(env.config.core.lifecycle, grad_ratio_threshold=0.0, fossilize_min_contribution=0.0)
    return MorphogeneticEnv(
        replace(
            env.config,
            core=replace(env.config.core, lifecycle=lifecycle),
            task=replace(env.config.task, train_iters=4, batch_size=32),
            rewards=RewardConfig.for_task("synthetic", family="accuracy", static_baseline=static_baseline),
        )
    )


def eager_heuristic(env: MorphogeneticEnv) -> HeuristicPolicy:
    eager = HeuristicConfig(require_stabilization=False, min_epoch_to_germinate=0, plateau_epochs_to_germinate=0)
    return HeuristicPolicy(env.model.topology, env.config.n_envs, eager)


def test_the_static_twin_is_the_same_episode_played_static_and_the_progress_is_paid_over_it() -> None:
    """`static_baseline`: the twin's accuracy at every epoch is that of a plain env of the
    same seed that only WAITs; the env itself plays exactly as without a twin (the twin
    draws nothing); accuracy_progress is the env's epoch gain minus the twin's, so the
    episode's sum is the final accuracy over the static host's."""
    epochs = 10
    paired_env = growing_env(epochs, static_baseline=True)
    paired = paired_env.rollout(epochs, eager_heuristic(paired_env))
    plain_env = growing_env(epochs, static_baseline=False)
    plain = plain_env.rollout(epochs, eager_heuristic(plain_env))
    static = growing_env(epochs, static_baseline=False).rollout(epochs, StaticPolicy())
    for key in ("observation", ("next", "observation"), ("next", "metrics", "val_accuracy"), ("action", "op")):
        torch.testing.assert_close(paired[key], plain[key], rtol=0, atol=0)
    accuracy = paired["next", "metrics", "val_accuracy"]
    twin = static["next", "metrics", "val_accuracy"]
    assert (paired["next", "seeds", "stage"] == int(Stage.BLENDING)).any(), "no seed blended: nothing to pay"
    assert not torch.equal(accuracy, twin), "the grown network never differed from the static one"
    first = paired["metrics", "val_accuracy"][:, :1]
    gains = torch.diff(torch.cat([first, accuracy], 1), dim=1) - torch.diff(torch.cat([first, twin], 1), dim=1)
    progress = paired["next", "reward_components", "accuracy_progress"]
    torch.testing.assert_close(progress, gains)
    torch.testing.assert_close(progress.sum(1), accuracy[:, -1] - twin[:, -1])
    assert plain["next", "reward_components", "accuracy_progress"].sum(1).tolist() == pytest.approx(
        (accuracy[:, -1] - first[:, 0]).tolist(), abs=1e-3
    )
    # The critic's column is the current gap to the twin (0 at the reset: the twin is a copy).
    torch.testing.assert_close(paired["critic_observation"][:, 0], torch.zeros(2, 1))
    torch.testing.assert_close(paired["next", "critic_observation"].squeeze(-1), torch.tanh((accuracy - twin) / 5.0))
    assert "critic_observation" not in plain.keys() and "critic_observation" not in plain_env.observation_spec.keys()


def test_a_static_twin_under_wait_pays_no_progress_and_restarts_with_its_env() -> None:
    """Nothing grown, nothing paid: under WAIT the twin is its env, step for step. A
    partial reset gives the reset envs a twin of their fresh hosts."""
    env = growing_env(4, static_baseline=True)
    rollout = env.rollout(4, StaticPolicy())
    assert rollout["next", "reward_components", "accuracy_progress"].abs().max().item() == 0.0
    torch.testing.assert_close(env.state["static", "params"], env.state["params"], rtol=0, atol=0)
    carried = step_mdp(rollout[:, -1])
    carried["_reset"] = torch.tensor([[True], [False]])
    env.reset(carried)
    assert env.state["static", "epoch"].tolist() == [0, 4]
    torch.testing.assert_close(env.state["static", "params"], env.state["params"], rtol=0, atol=0)


def test_a_diverging_static_twin_keeps_its_last_healthy_state_and_gains_nothing() -> None:
    """A twin epoch with a non-finite loss leaves that env's twin as it was (only the epoch
    advances), so its collapse pays the controller nothing; the other env's twin trains on."""
    env = growing_env(4, static_baseline=True)
    twin = env.state["static"].clone()
    twin["params", "host.head.weight"][0] = float("inf")  # env 0's twin diverges, env 1's is healthy
    batches = env.task.sample_batches(torch.Generator().manual_seed(3))
    stepped = step_static_twin(env.steps, twin, batches)
    assert stepped["epoch"].tolist() == [1, 1]
    torch.testing.assert_close(stepped[0].exclude("epoch"), twin[0].exclude("epoch"), rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(stepped["metrics", "val_loss"][1])
    assert not torch.equal(stepped["params", "host.head.weight"][1], twin["params", "host.head.weight"][1])


def test_test_accuracy_is_each_env_network_on_the_held_out_split_as_a_plain_module_scores_it() -> None:
    """Seeds germinated and training or blending: every env's accuracy on the test split,
    against the per-env reference network (ordinary modules) built from the same state."""
    env = small_env(n_envs=2, max_epochs=8, min_training_epochs=1, blend_steps=2)
    policy = HeuristicPolicy(
        env.model.topology,
        2,
        HeuristicConfig(require_stabilization=False, min_epoch_to_germinate=0, plateau_epochs_to_germinate=0),
    )
    td = env.reset()
    for _ in range(4):
        td = step_mdp(env.step(policy(td)))
    assert (env.state["slots", "stage"] != int(Stage.DORMANT)).any(), "a seed runs in the networks scored"
    test = env.test_accuracy()
    assert test is not None and test.shape == (2,)
    count = env.task.test_y.numel()
    for n in range(2):
        reference = RefEnv(env.config.core, env.state, n).evaluate(env.task.test_x, env.task.test_y)
        tolerance = 100.0 * int(reference["near_ties"][0]) / count + 1e-4  # argmaxes that rounding may flip
        assert abs(float(test[n]) - float(reference["accuracy"][0])) <= tolerance


def test_make_env_names_unknown_tasks_and_presets() -> None:
    with pytest.raises(ValueError, match="nonexistent"):
        make_env(task="nonexistent")
    with pytest.raises(ValueError, match="unknown CNN host preset 'huge'"):
        make_env(preset="huge")


def test_more_envs_than_memory_allows_is_refused_before_allocation() -> None:
    with pytest.raises(ConfigError, match=r"n_envs=1000000 needs about .* use n_envs <= \d+"):
        make_env(n_envs=1_000_000)  # allocating would take terabytes: the check comes first


def test_memory_estimate_scales_with_the_batch_and_names_the_largest_count_that_fits() -> None:
    small = estimate_memory(CoreConfig(compile=False), (16, 3, 32, 32), torch.float32, (16,))
    large = estimate_memory(CoreConfig(compile=False), (64, 3, 32, 32), torch.float32, (64,))
    assert large.per_env > 2 * small.per_env  # activations dominate and grow with the batch
    available = small.total(10) + small.per_env // 2
    check_fits(10, small, available, "cpu")
    with pytest.raises(ConfigError, match="n_envs=11 .* use n_envs <= 10,"):
        check_fits(11, small, available, "cpu")


def test_an_explicit_host_is_checked_against_the_task() -> None:
    task = replace(TaskConfig.preset("synthetic"), batch_size=16, train_iters=1, val_batches=1)
    deeper = CNNHostConfig(image_size=16, n_blocks=4, base_channels=4, slot_after=(1, 2, 4))
    env = MorphogeneticEnv(EnvConfig(task=task, core=CoreConfig(compile=False), host=deeper, n_envs=2))
    assert env.config.core.host == deeper
    with pytest.raises(ConfigError, match=r"EnvConfig.host.image_size=8 does not fit task 'synthetic', which needs 16"):
        MorphogeneticEnv(
            EnvConfig(task=task, core=CoreConfig(compile=False), host=CNNHostConfig.preset("tiny"), n_envs=2)
        )
    with pytest.raises(ConfigError, match="both host and host_preset"):
        EnvConfig(task=task, host=deeper, host_preset="cifar")


def test_reset_and_step_are_the_core_reset_state_and_step_env() -> None:
    """`_reset` and `_step` only adapt the core's pure `reset_state` and `step_env` to TorchRL:
    replayed from the same generator state, the core gives the same state, observation,
    reward and done."""
    env = small_env(max_epochs=2)
    generator = torch.Generator().manual_seed(stream_seed(env.config.seed, env.shard, 0, Stream.ENV))
    fresh = reset_state(env.steps, env.config.signals, N_ENVS, generator, env.task.sample_batches)
    assert (fresh == env.state).all()
    shown = env.reset().exclude(ACTION_NOISE, "done", "terminated", "truncated")
    assert (reset_observation(env.model, env.config.rewards, fresh) == shown).all()
    for op in (Op.GERMINATE, Op.WAIT):
        heads = {"op": int(op), "slot": 0, "blueprint": 0, "blend": 0}
        action = TensorDict({head: torch.full((N_ENVS,), value) for head, value in heads.items()}, batch_size=[N_ENVS])
        state, before = env.state.clone(), env.batches.generator_state()
        out = env.step(TensorDict({"action": action}, batch_size=[N_ENVS]))["next"]
        replay = torch.Generator().set_state(before)
        obs, next_state, reward, done = step_env(
            env.steps, env.config.rewards, env.config.signals, state, action, env.task.sample_batches(replay), replay
        )
        assert (next_state == env.state).all()
        assert (obs == out.exclude(ACTION_NOISE, "reward", "done", "terminated", "truncated")).all()
        assert torch.equal(reward, out["reward"].squeeze(-1)) and torch.equal(done, out["done"].squeeze(-1))
    assert bool(done.all())
