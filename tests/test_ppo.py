"""PPO: the factored distribution, learning on a known-optimum variant, exact resume, checkpoints, hooks."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs import Transform, TransformedEnv

from envs.morphogenetic import MorphogeneticEnv
from esper_func.core.config import ConfigError
from esper_func.core.config_json import to_dict
from esper_func.core.reward_config import RewardConfig
from esper_func.core.stages import Op
from esper_func.rl.checkpoints import (
    REQUIRED_KEYS,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from esper_func.rl.episodes import play_episode
from esper_func.rl.hooks import CheckpointHook, EarlyStopping
from esper_func.rl.loggers import LOGGER_PACKAGES, flat_hparams
from esper_func.rl.normalizers import Normalizers
from esper_func.rl.run_config import TrainingConfig, load_training_config
from esper_func.rl.run_sections import PPOConfig, TelemetryConfig
from esper_func.rl.trainer import HOOK_POINTS, SCALED_REWARD, PPOTrainer, TrainerState
from esper_func.rl.update_stats import detect_anomalies
from policies import RandomPolicy
from policies.ppo import NORMALIZED_OBSERVATION, FactoredActionDistribution, ObservationNormalizer, make_actor_critic

QUIET = TelemetryConfig(level="off", plots=False, progress_bar=False)


def tiny(**fields: object) -> TrainingConfig:
    base = TrainingConfig.preset("tiny")
    return replace(base, **{"telemetry": QUIET, "compare_episodes": 0, **fields})


# --- the distribution -----------------------------------------------------------------------


def random_masks(n: int, n_slots: int, n_blueprints: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    op = torch.rand(n, 4, generator=generator) < 0.6
    op[:, Op.WAIT] = True
    slot = torch.rand(n, 4, n_slots, generator=generator) < 0.5
    slot[:, Op.WAIT] = True
    # An allowed op always has a legal slot (the env's contract); others may have none.
    empty = ~slot.any(-1)
    slot[..., 0] |= empty & op
    blueprint = torch.rand(n, n_blueprints, generator=generator) < 0.6
    blueprint[:, 1] = True
    return {
        "op_mask": op,
        "slot_mask": slot,
        "blueprint_mask": blueprint,
        "blend_mask": torch.ones(n, 3, dtype=torch.bool),
    }


def make_distribution(
    n: int = 64, seed: int = 0, requires_grad: bool = False
) -> tuple[FactoredActionDistribution, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    masks = random_masks(n, 3, 5, generator)
    logits = {
        "op_logits": torch.randn(n, 4, generator=generator),
        "slot_logits": torch.randn(n, 3, generator=generator),
        "blueprint_logits": torch.randn(n, 5, generator=generator),
        "blend_logits": torch.randn(n, 3, generator=generator),
    }
    if requires_grad:
        for value in logits.values():
            value.requires_grad_(True)
    return FactoredActionDistribution(**logits, **masks), {**logits, **masks}


def test_samples_respect_the_op_conditioned_slot_mask() -> None:
    dist, inputs = make_distribution(n=256)
    for _ in range(20):
        sample = dist.sample()["action"]
        rows = torch.arange(256)
        assert inputs["op_mask"][rows, sample["op"]].all()
        assert inputs["slot_mask"][rows, sample["op"], sample["slot"]].all()
        assert inputs["blueprint_mask"][rows, sample["blueprint"]].all()


def test_causal_log_prob_counts_only_the_heads_the_op_uses() -> None:
    dist, inputs = make_distribution(n=256, seed=1)
    sample = dist.sample()
    log_prob = dist.log_prob(sample)["action"]
    op = sample["action", "op"]
    assert (log_prob["slot_log_prob"][op == Op.WAIT] == 0).all()
    assert (log_prob["slot_log_prob"][op != Op.WAIT] <= 0).all()
    not_germinate = op != Op.GERMINATE
    assert (log_prob["blueprint_log_prob"][not_germinate] == 0).all()
    assert (log_prob["blend_log_prob"][not_germinate] == 0).all()
    # The slot log-prob is that of the op's own masked row.
    rows = (op != Op.WAIT).nonzero().flatten()
    for row in rows[:10].tolist():
        o, s = int(op[row]), int(sample["action", "slot"][row])
        masked = inputs["slot_logits"][row].masked_fill(~inputs["slot_mask"][row, o], -math.inf)
        assert log_prob["slot_log_prob"][row].item() == pytest.approx(torch.log_softmax(masked, -1)[s].item(), abs=1e-5)


def test_entropy_is_the_chain_rule_entropy_of_the_executed_action() -> None:
    dist, inputs = make_distribution(n=8, seed=2)
    entropy = dist.entropy()["action"]
    for row in range(8):
        op_logits = inputs["op_logits"][row].masked_fill(~inputs["op_mask"][row], -math.inf)
        p_op = torch.softmax(op_logits, -1)

        def h(logits: torch.Tensor, mask: torch.Tensor) -> float:
            p = torch.softmax(logits.masked_fill(~mask, -math.inf), -1)
            return float(-(p[mask] * p[mask].log()).sum())

        expected_slot = sum(
            float(p_op[o]) * h(inputs["slot_logits"][row], inputs["slot_mask"][row, o])
            for o in range(4)
            if o != Op.WAIT and inputs["op_mask"][row, o]
        )
        assert entropy["op_entropy"][row].item() == pytest.approx(
            h(inputs["op_logits"][row], inputs["op_mask"][row]), abs=1e-5
        )
        assert entropy["slot_entropy"][row].item() == pytest.approx(expected_slot, abs=1e-5)
        germinate = float(p_op[Op.GERMINATE])
        assert entropy["blueprint_entropy"][row].item() == pytest.approx(
            germinate * h(inputs["blueprint_logits"][row], inputs["blueprint_mask"][row]), abs=1e-5
        )


def test_sampling_frequencies_match_the_conditional_probabilities() -> None:
    dist, inputs = make_distribution(n=1, seed=3)
    samples = dist.sample(torch.Size([20_000]))["action"]
    p_op = torch.softmax(inputs["op_logits"][0].masked_fill(~inputs["op_mask"][0], -math.inf), -1)
    frequencies = torch.bincount(samples["op"].flatten(), minlength=4).float() / 20_000
    assert torch.allclose(frequencies, p_op, atol=0.02)


def test_mode_is_the_most_likely_legal_action() -> None:
    dist, inputs = make_distribution(n=32, seed=4)
    mode = dist.mode["action"]
    expected_op = inputs["op_logits"].masked_fill(~inputs["op_mask"], -math.inf).argmax(-1)
    assert torch.equal(mode["op"], expected_op)
    rows = torch.arange(32)
    assert inputs["slot_mask"][rows, mode["op"], mode["slot"]].all()


# --- learning ---------------------------------------------------------------------------------


class GoodBlueprintReward(Transform):
    """Reward 1 for each executed GERMINATE of one blueprint, 0 otherwise: the best policy
    germinates that blueprint in every free slot (3 per episode here)."""

    def __init__(self, blueprint: int) -> None:
        super().__init__()
        self.blueprint = blueprint

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        hit = (
            (tensordict["action", "op"] == Op.GERMINATE)
            & (tensordict["action", "blueprint"] == self.blueprint)
            & next_tensordict["metrics", "action_executed"]
        )
        next_tensordict["reward"] = hit.to(torch.float32).unsqueeze(-1)
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset


class ForbidEverything(Transform):
    """A broken user transform: masks out every op of one env after the first step."""

    def __init__(self, env: int) -> None:
        super().__init__()
        self.env = env

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        op = next_tensordict["action_mask", "op"].clone()
        op[self.env] = False
        next_tensordict["action_mask", "op"] = op
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset


def test_a_transform_that_leaves_an_env_no_legal_action_is_an_error_naming_it(tmp_path: Path) -> None:
    trainer = PPOTrainer(tiny(episodes=1), tmp_path, transforms=[ForbidEverything(env=2)])
    with pytest.raises(ValueError, match=r"no legal action in envs \[2\] \(env 2: op"):
        trainer.train()


def test_ppo_learns_the_known_best_policy_far_better_than_random(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny()
    config = replace(
        base,
        env=replace(base.env, n_envs=8),
        episodes=12,
        ppo=replace(base.ppo, lr=1e-3, epochs=4, minibatches=4, entropy_coeff=0.01, entropy_coeff_end=0.01),
    )
    state = PPOTrainer(config, tmp_path, transforms=[GoodBlueprintReward(3)]).train()
    learned = sum(record["return"] for record in state.history[-3:]) / 3
    env = MorphogeneticEnv(replace(config.env, seed=99))
    random_policy = RandomPolicy(torch.Generator().manual_seed(1))
    transformed = TransformedEnv(env, GoodBlueprintReward(3))
    random_return = (
        sum(
            play_episode(
                transformed, random_policy, "random", e, env.model.blueprint_names, env.model.host_param_count
            ).episode_return
            for e in range(2)
        )
        / 2
    )
    first = state.history[0]["return"]
    assert learned >= 2.0, f"PPO reached {learned:.2f} of the optimum 3 (started at {first:.2f})"
    assert learned >= 3 * random_return, f"PPO {learned:.2f} vs random {random_return:.2f}"


class HelpfulSeedReward(Transform):
    """The env made to value its seeds: +1 for each executed FOSSILIZE, -1 for each executed
    CULL, 0 otherwise. The best policy keeps every seed it grows and fossilizes it on
    probation; a random one culls about as often as it fossilizes."""

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        executed = next_tensordict["metrics", "action_executed"]
        op = tensordict["action", "op"]
        value = (executed & (op == Op.FOSSILIZE)).float() - (executed & (op == Op.CULL)).float()
        next_tensordict["reward"] = value.unsqueeze(-1)
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset


def test_ppo_learns_to_fossilize_a_helpful_seed_instead_of_culling_it(tmp_path: Path) -> None:
    """A short lifecycle puts germinated seeds on probation mid-episode, where FOSSILIZE is
    legal (no contribution gate) and no automatic cull interferes; the env pays for
    fossils and charges for culls. In a few updates PPO's fossilize share of the
    seed-ending ops rises from about a half to most."""
    torch.manual_seed(0)
    base = tiny()
    lifecycle = replace(
        base.env.core.lifecycle,
        max_epochs=10,
        blend_steps=1,
        fossilize_min_contribution=-100.0,
        probation_judge_epochs=100,
    )
    config = replace(
        base,
        env=replace(base.env, n_envs=8, core=replace(base.env.core, lifecycle=lifecycle)),
        episodes=10,
        ppo=replace(base.ppo, lr=2e-3, epochs=4, minibatches=4, entropy_coeff=0.01, entropy_coeff_end=0.01),
    )
    trainer = PPOTrainer(config, tmp_path, transforms=[HelpfulSeedReward()])
    shares: list[tuple[float, float]] = []
    trainer.register_hook(
        "after_rollout",
        lambda state: shares.append(
            (state.rollout["action_distribution"]["FOSSILIZE"], state.rollout["action_distribution"]["CULL"])
        ),
    )
    trainer.train()

    def fossil_share(rollouts: list[tuple[float, float]]) -> float:
        fossils, culls = sum(f for f, _ in rollouts), sum(c for _, c in rollouts)
        return fossils / (fossils + culls)

    first, last = fossil_share(shares[:2]), fossil_share(shares[-2:])
    assert first < 0.65, (
        f"a near-uniform policy should cull about as often as it fossilizes, got a fossil share of {first:.2f}"
    )
    assert last > 0.85, (
        f"PPO should have learned to fossilize instead of culling: fossil share {first:.2f} -> {last:.2f}"
    )


# --- normalization settings ----------------------------------------------------------------------


@pytest.mark.parametrize(("normalize_observations", "scale_rewards"), [(True, False), (False, True)])
def test_each_normalization_setting_switches_what_the_policy_and_gae_read(
    tmp_path: Path, normalize_observations: bool, scale_rewards: bool
) -> None:
    """On: the batch after the first refresh holds normalized observations / scaled rewards.
    Off: the policy reads the raw observation and GAE the raw reward, after every update."""
    base = tiny(episodes=2)
    config = replace(
        base, ppo=replace(base.ppo, normalize_observations=normalize_observations, scale_rewards=scale_rewards)
    )
    trainer = PPOTrainer(config, tmp_path)
    batches: list[TensorDictBase] = []
    update = trainer.update

    def recording_update(batch: TensorDictBase) -> dict[str, object]:
        stats = update(batch)
        batches.append(batch.clone())
        return stats

    trainer.update = recording_update  # type: ignore[method-assign]
    trainer.train()
    first, second = batches  # as the update received them: SCALED_REWARD written by it
    assert torch.equal(first[NORMALIZED_OBSERVATION], first["observation"]), "no statistics before the first update"
    assert torch.equal(first["next", SCALED_REWARD], first["next", "reward"])
    assert torch.equal(second[NORMALIZED_OBSERVATION], second["observation"]) is not normalize_observations
    assert torch.equal(second["next", SCALED_REWARD], second["next", "reward"]) is not scale_rewards

    # The statistics live in the policy: its state dict carries them to an evaluation.
    loaded = make_actor_critic(
        second["observation"].shape[-1],
        trainer.base_env.model.n_slots,
        len(trainer.base_env.model.blueprint_names),
        config.policy,
    )
    loaded.actor.load_state_dict(trainer.nets.actor.state_dict())
    assert torch.equal(loaded.normalizer.loc, trainer.nets.normalizer.loc) and torch.equal(
        loaded.normalizer.scale, trainer.nets.normalizer.scale
    )
    assert torch.equal(loaded.normalizer.loc, torch.zeros_like(loaded.normalizer.loc)) is not normalize_observations


def test_with_a_static_twin_the_critic_alone_reads_the_gap_with_its_own_statistics(tmp_path: Path) -> None:
    """The twin's gap is privileged: the critic reads it (normalized by statistics of its
    own, refreshed like the observation's), the actor never does. The actor starts from
    the weights a run without the twin starts from, and its action distribution does not
    move with the gap; the value does."""
    base = tiny(episodes=1)
    quick = replace(  # seeds blend in early, so some env's network moves away from its twin
        base.env.core.lifecycle, max_epochs=8, blend_steps=1, grad_ratio_threshold=0.0, training_grace_epochs=1
    )
    rewards = RewardConfig.for_task("synthetic", family="accuracy")
    task = replace(base.env.task, train_iters=4, batch_size=32, n_val=64)
    core = replace(base.env.core, lifecycle=quick)
    without = replace(base, env=replace(base.env, task=task, core=core, rewards=rewards))
    config = replace(without, env=replace(without.env, rewards=replace(without.env.rewards, static_baseline=True)))
    trainer = PPOTrainer(config, tmp_path)
    plain = PPOTrainer(without, tmp_path)
    assert plain.nets.critic_normalizer is None and trainer.nets.critic_normalizer is not None
    for name, value in plain.nets.actor.state_dict().items():
        assert torch.equal(value, trainer.nets.actor.state_dict()[name]), name

    batches: list[TensorDictBase] = []
    update = trainer.update

    def recording_update(batch: TensorDictBase) -> dict[str, object]:
        batches.append(batch.clone())
        return update(batch)

    trainer.update = recording_update  # type: ignore[method-assign]
    trainer.train()
    (batch,) = batches
    gaps = batch["critic_observation"].reshape(-1, 1)
    assert gaps.abs().max() > 0, "no env moved away from its twin: nothing to read"
    torch.testing.assert_close(trainer.nets.critic_normalizer.loc, gaps.mean(0))
    torch.testing.assert_close(trainer.nets.critic_normalizer.scale, gaps.std(0, correction=0).clamp_min(0.1))

    step = batch[:, 0].clone()
    shifted = step.clone()
    shifted["critic_observation"] = step["critic_observation"] + 1.0
    nets = trainer.nets
    with torch.no_grad():
        assert not torch.allclose(nets.critic(step.clone())["state_value"], nets.critic(shifted.clone())["state_value"])
        for logits in ("op_logits", "blueprint_logits"):
            torch.testing.assert_close(
                nets.actor(step.clone())["params", logits], nets.actor(shifted.clone())["params", logits]
            )


def test_a_normalizer_turned_off_stays_the_identity_even_loaded_with_statistics() -> None:
    generator = torch.Generator().manual_seed(0)
    batch = TensorDict(
        {
            "observation": 1 + 4 * torch.randn(2, 5, 3, generator=generator),
            ("next", "reward"): 3 * torch.randn(2, 5, 1, generator=generator),
        },
        batch_size=[2, 5],
    )
    on = Normalizers(3, PPOConfig(), torch.device("cpu"))
    on.update(batch)
    off = Normalizers(3, PPOConfig(normalize_observations=False, scale_rewards=False), torch.device("cpu"))
    off.load_state_dict(on.state_dict())
    off.update(batch)
    normalizer = ObservationNormalizer(3)
    off.apply(normalizer)
    assert torch.equal(normalizer.loc, torch.zeros(3)) and torch.equal(normalizer.scale, torch.ones(3))
    assert off.reward_scale().item() == 1.0
    on.apply(normalizer)
    torch.testing.assert_close(normalizer.loc, batch["observation"].reshape(-1, 3).mean(0))
    assert on.reward_scale().item() != 1.0


# --- loggers ---------------------------------------------------------------------------------------


def test_the_csv_logger_records_the_resolved_config_once_as_hyperparameters(tmp_path: Path) -> None:
    config = tiny(telemetry=replace(QUIET, level="minimal", logger="csv"))
    PPOTrainer(config, tmp_path)
    (hparams,) = (tmp_path / "logger").rglob("hparams*.txt")
    logged = dict(line.split(": ", 1) for line in hparams.read_text().splitlines())
    assert logged.keys() == flat_hparams(config).keys()
    assert (
        logged["ppo.minibatches"] == "2"
        and logged["env.task.name"] == "synthetic"
        and logged["telemetry.logger"] == "csv"
    )
    assert logged["devices"] == "[]" and logged["env.host_preset"] == "null"
    assert all(isinstance(value, (bool, int, float, str)) for value in flat_hparams(config).values())
    assert len(flat_hparams(config)) > 50, "every field of every section"


@pytest.mark.parametrize("logger", ["tensorboard", "wandb", "mlflow"])
def test_a_logger_without_its_package_is_a_config_error_naming_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logger: str
) -> None:
    real = importlib.util.find_spec
    missing = LOGGER_PACKAGES[logger]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name in missing else real(name, *args))
    with pytest.raises(
        ConfigError,
        match=rf"telemetry.logger='{logger}' needs the package\(s\) {', '.join(missing)}.*pip install "
              rf"{' '.join(missing)}",
    ):
        PPOTrainer(tiny(telemetry=replace(QUIET, level="minimal", logger=logger)), tmp_path)
    assert not (tmp_path / "logger").exists()


def test_an_unknown_logger_is_a_config_error() -> None:
    with pytest.raises(
        ConfigError,
        match=r"TelemetryConfig.logger must be one of \['csv', 'tensorboard', 'wandb', 'mlflow', 'none'\], got "
              r"'neptune'",
    ):
        TelemetryConfig(logger="neptune")  # type: ignore[arg-type]
    data = to_dict(tiny())
    with pytest.raises(ConfigError, match=r"TrainingConfig.telemetry.logger: 'neptune' is not one of"):
        load_training_config({**data, "telemetry": {**data["telemetry"], "logger": "neptune"}})


# --- checkpoints and resume ---------------------------------------------------------------------


@pytest.mark.parametrize("lstm", [False, True])
def test_resume_continues_exactly(tmp_path: Path, lstm: bool) -> None:
    """Two updates straight equal one update, a checkpoint, a fresh process state and one more."""
    base = tiny()
    config = replace(base, policy=replace(base.policy, lstm=lstm), episodes=2)
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    straight_dir.mkdir(), split_dir.mkdir()
    straight = PPOTrainer(config, straight_dir)
    straight.train()

    first = PPOTrainer(replace(config, episodes=1), split_dir)
    first.register_hook("after_batch", CheckpointHook(first.state_dict, every=1))
    first.train()
    torch.manual_seed(12345)  # a resumed process starts from unrelated RNG state
    checkpoint = load_checkpoint(latest_checkpoint(split_dir))
    resumed = PPOTrainer(config, split_dir)
    resumed.load_weights(checkpoint)
    resumed.train()

    untrained = PPOTrainer(config, tmp_path / "untrained").nets.actor.state_dict()
    assert any(not torch.equal(value, untrained[name]) for name, value in straight.nets.actor.state_dict().items()), (
        "training moved nothing"
    )
    for name, value in straight.nets.actor.state_dict().items():
        assert torch.equal(value, resumed.nets.actor.state_dict()[name]), name
    for name, value in straight.nets.critic.state_dict().items():
        assert torch.equal(value, resumed.nets.critic.state_dict()[name]), name
    straight_moments = straight.optimizer.state_dict()["state"]
    resumed_moments = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(straight_moments[k]["exp_avg"], resumed_moments[k]["exp_avg"]) for k in straight_moments)
    assert torch.equal(straight.normalizers.observations.mean, resumed.normalizers.observations.mean)
    assert straight.state.history == resumed.state.history


def test_checkpoint_round_trip_holds_everything_and_loads_weights_only(tmp_path: Path) -> None:
    trainer = PPOTrainer(tiny(episodes=1), tmp_path)
    trainer.register_hook("after_batch", CheckpointHook(trainer.state_dict, every=1))
    state = trainer.train()
    assert state.checkpoint_path == tmp_path / "checkpoints" / "update_00001.pt"
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path))
    assert checkpoint["counters"] == {"update": 1, "frames": 24}
    assert set(checkpoint["rng"]) == {"minibatch"}
    assert checkpoint["config"]["episodes"] == 1
    clone = PPOTrainer(tiny(episodes=1), tmp_path / "other")
    clone.load_weights(checkpoint)
    for name, value in trainer.nets.actor.state_dict().items():
        assert torch.equal(value, clone.nets.actor.state_dict()[name])
    assert torch.equal(clone.nets.normalizer.loc, trainer.nets.normalizer.loc)
    assert torch.equal(clone.reward_scale, trainer.reward_scale)

    # A checkpoint of other networks is refused before anything of the trainer changes.
    wider = PPOTrainer(
        tiny(episodes=1, policy=replace(tiny().policy, hidden=2 * tiny().policy.hidden)), tmp_path / "wider"
    )
    before = {name: value.clone() for name, value in wider.nets.actor.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not fit this run's networks"):
        wider.load_weights(checkpoint, source="update_00001.pt")
    assert all(torch.equal(value, before[name]) for name, value in wider.nets.actor.state_dict().items())
    assert wider.state.update == 0


def test_missing_truncated_tampered_and_foreign_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    path = save_checkpoint(
        tmp_path, 1, {"episodes": 1}, {key: {"w": torch.arange(256.0)} for key in REQUIRED_KEYS if key != "config"}
    )
    assert load_checkpoint(path)["actor"]["w"].sum() == torch.arange(256.0).sum()
    good = path.read_bytes()

    tampered = tmp_path / "tampered.pt"
    data = bytearray(good)
    index = data.find(torch.arange(256.0)[200:201].numpy().tobytes())
    data[index] ^= 0x01  # the payload's stored tensor: torch.load alone would not notice
    tampered.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="was modified after it was written"):
        load_checkpoint(tampered)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or unreadable"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an esper_func checkpoint"):
        load_checkpoint(foreign)
    older = tmp_path / "older.pt"
    torch.save({"format": 1, "sha256": "", "payload": torch.zeros(1, dtype=torch.uint8)}, older)
    with pytest.raises(CheckpointError, match="has format 1"):
        load_checkpoint(older)
    # Writes are atomic: no temp file is left behind, and latest.pt equals the newest update.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.pt", "update_00001.pt"]
    assert latest_checkpoint(tmp_path).read_bytes() == good


# --- hooks and diagnostics -----------------------------------------------------------------------


def test_hooks_run_at_each_point_with_a_filled_state(tmp_path: Path) -> None:
    trainer = PPOTrainer(tiny(episodes=2), tmp_path)
    seen: list[tuple[str, int, bool, bool]] = []

    def recorder(point: str):
        def hook(state: TrainerState) -> None:
            seen.append((point, state.update, bool(state.rollout), bool(state.losses)))

        return hook

    for point in HOOK_POINTS:
        trainer.register_hook(point, recorder(point))
    trainer.train()
    assert seen == [
        ("after_rollout", 0, True, False),
        ("after_update", 0, True, True),
        ("after_batch", 1, True, True),
        ("after_rollout", 1, True, True),
        ("after_update", 1, True, True),
        ("after_batch", 2, True, True),
        ("end_of_run", 2, True, True),
    ]
    with pytest.raises(ValueError, match="unknown hook point"):
        trainer.register_hook("before_lunch", recorder("x"))


def test_early_stopping_hook_stops_the_loop(tmp_path: Path) -> None:
    trainer = PPOTrainer(tiny(episodes=5), tmp_path)
    trainer.register_hook("after_batch", EarlyStopping(patience=1, min_delta=1e9))
    state = trainer.train()
    assert state.update == 2  # the first sets the best, the second does not beat it by 1e9


def test_update_statistics_cover_every_head_and_ratio(tmp_path: Path) -> None:
    trainer = PPOTrainer(tiny(episodes=1), tmp_path)
    state = trainer.train()
    losses = state.losses
    for head in ("op", "slot", "blueprint", "blend"):
        assert losses[f"entropy_{head}"] >= 0
    assert 0 < losses["ratio_min"] <= losses["ratio_mean"] <= losses["ratio_max"]
    assert losses["kl_approx"] >= 0
    assert losses["optimizer_steps"] == trainer.config.ppo.epochs * trainer.config.ppo.minibatches
    assert set(state.rollout["action_distribution"]) == {op.name for op in Op}
    assert sum(state.rollout["action_distribution"].values()) == pytest.approx(1.0)


def test_anomaly_detector_flags_ratios_values_and_nans() -> None:
    telemetry = TelemetryConfig()
    healthy = {"ratio_max": 1.2, "ratio_min": 0.8, "explained_variance": 0.3, "kl_approx": 0.01}
    assert detect_anomalies(healthy, 0.5, telemetry) == []
    assert detect_anomalies({**healthy, "ratio_max": 9.0}, 0.5, telemetry) == ["ratio_explosion"]
    assert detect_anomalies({**healthy, "ratio_min": 0.01}, 0.5, telemetry) == ["ratio_collapse"]
    assert detect_anomalies({**healthy, "explained_variance": -0.3}, 0.05, telemetry) == []
    assert detect_anomalies({**healthy, "explained_variance": -0.3}, 0.5, telemetry) == ["value_collapse"]
    assert detect_anomalies({**healthy, "kl_approx": float("nan")}, 0.5, telemetry) == ["numerical_instability"]


def test_anomaly_raises_the_telemetry_level_for_a_few_updates(tmp_path: Path) -> None:
    config = tiny(
        episodes=3,
        telemetry=replace(
            QUIET, level="minimal", ratio_explosion=1.0 + 1e-9, ratio_collapse=1.0 - 1e-9, anomaly_debug_updates=2
        ),
    )
    trainer = PPOTrainer(config, tmp_path)
    levels: list[str] = []
    trainer.register_hook("after_update", lambda state: levels.append(state.telemetry_level))
    state = trainer.train()
    assert levels == ["debug", "debug", "debug"]
    assert "ratio_offenders" in state.losses and state.losses["ratio_offenders"]


def test_the_same_seed_builds_the_same_controller_whether_or_not_the_memory_estimate_is_cached(tmp_path: Path) -> None:
    """The first env of a process runs the (cached) meta-device memory estimate, whose
    initializers once drew from the global RNG and shifted the controller's seeded init."""
    from esper_func.core.memory import estimate_memory

    estimate_memory.cache_clear()
    first = PPOTrainer(tiny(), tmp_path / "first")  # runs the estimate
    second = PPOTrainer(tiny(), tmp_path / "second")  # finds it cached
    for (name, a), b in zip(first.loss.named_parameters(), second.loss.parameters()):
        assert torch.equal(a, b), name
