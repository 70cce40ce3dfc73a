"""The PPO actor-critic: feature MLP, optional LSTM, factored masked heads, value head.

The action is factored into four heads (`("action", head)` for op, slot, blueprint,
blend). `FactoredActionDistribution` samples the op first, then the slot from the op's
row of the op-conditioned slot mask, so every sampled action is legal. Causal credit:
a head the op does not use contributes nothing. Its log-prob is zero (the slot unless
the op is WAIT; the blueprint and blend only on GERMINATE), so the joint PPO ratio only
moves the heads that acted, and its entropy is weighted by the probability that the op
uses it. That weighted sum is the chain-rule entropy of the action actually executed.

Keys read: `"observation"` (normalized inside the networks by `ObservationNormalizer`,
whose statistics are buffers of the policy, so a weight sync or a policy checkpoint
carries them; the normalized value is written under `"observation_norm"`),
`("action_mask", head)` and the env's `"action_noise"` (one uniform per head; the actor
samples by inverse CDF with it, so its actions are a function of the env's random
streams, `esper_func.core.seeding`). Keys written by the actor: `("action", head)`,
`("action", "<head>_log_prob")`, and, with the LSTM, `recurrent_state_h/c`. The critic
writes `state_value` `[..., 1]`; built with `critic_observation_size > 0` it also reads
`"critic_observation"` (an env with a static twin: privileged columns the actor never
sees, normalized by a second `ObservationNormalizer` into `"critic_observation_norm"`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributions as D
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import (
    CompositeDistribution,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictSequential,
    composite_lp_aggregate,
)
from torch import nn
from torchrl.modules import LSTMModule, ValueOperator

from esper_func.core.config import require_fields
from esper_func.core.seeding import ACTION_NOISE
from esper_func.core.stages import ACTION_HEADS, BlendMode, Op

ACTION_KEYS: list[tuple[str, str]] = [("action", head) for head in ACTION_HEADS]
LOG_PROB_KEYS: list[tuple[str, str]] = [("action", f"{head}_log_prob") for head in ACTION_HEADS]
ENTROPY_KEYS: list[tuple[str, str]] = [("action", f"{head}_entropy") for head in ACTION_HEADS]
NORMALIZED_OBSERVATION = "observation_norm"
CRITIC_OBSERVATION = "critic_observation"
NORMALIZED_CRITIC_OBSERVATION = "critic_observation_norm"


@dataclass(frozen=True)
class PolicyConfig:
    """Sizes of the actor and critic networks (reference: 128 features, LSTM 128, heads 64)."""

    hidden: int = 128
    """Width of the feature MLP (Linear + LayerNorm + ReLU) of actor and critic."""
    head_hidden: int = 64
    """Width of each head's hidden layer."""
    lstm: bool = False
    """Put an LSTM after the actor's feature layer; its state rides in the tensordict and is
    zeroed at every episode start (`is_init`). The critic stays feed-forward: the
    observation already carries short histories and the episode clock."""
    lstm_hidden: int = 128

    def __post_init__(self) -> None:
        require_fields(self, ("hidden", "head_hidden", "lstm_hidden"), lambda value: value >= 1, ">= 1")


# --- distribution ------------------------------------------------------------------------


def _masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index `[...]` drawn from `probs` `[..., K]` by a uniform `[...]` in (0, 1]: the first
    index whose cumulative probability reaches `uniform` times the total. A zero-probability
    (masked) index is never drawn: `uniform` > 0 puts the target above an empty prefix."""
    cdf = probs.cumsum(-1)
    target = uniform.unsqueeze(-1) * cdf[..., -1:]
    return (cdf < target).sum(-1).clamp_max(probs.shape[-1] - 1)


class CausalCategorical(D.Categorical):
    """A masked categorical head whose entropy counts only when the op uses it.

    `usage` `[...]` is the probability that the op uses this head (1 for the op head).
    """

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor, usage: torch.Tensor) -> None:
        super().__init__(logits=_masked(logits, mask), validate_args=False)
        self.usage = usage

    def entropy(self) -> torch.Tensor:
        return self.usage * super().entropy()


class OpConditionedSlot(D.Distribution):
    """The slot head: one masked categorical per op, weighted by that op's probability.

    Sampling and log-probs need the op, so they live in `FactoredActionDistribution`;
    this object supplies the head's causal entropy `sum_{op != WAIT} p(op) H(slot | op)`.
    """

    arg_constraints: dict = {}

    def __init__(self, by_op: D.Categorical, op_probs: torch.Tensor) -> None:
        super().__init__(batch_shape=op_probs.shape[:-1], validate_args=False)
        self.by_op = by_op
        self.op_probs = op_probs

    def entropy(self) -> torch.Tensor:
        uses_slot = self.op_probs.clone()
        uses_slot[..., Op.WAIT] = 0.0
        return (uses_slot * self.by_op.entropy()).sum(-1)


class FactoredActionDistribution(CompositeDistribution):
    """Joint distribution of (op, slot, blueprint, blend) with op-conditioned slot masks.

    Built by `ProbabilisticActor` from the heads' logits and the env's masks. Samples are
    TensorDicts `{"action": {op, slot, blueprint, blend}}`; `log_prob` returns the per-head
    causal log-probs under `("action", "<head>_log_prob")` (their sum is the joint).
    """

    def __init__(
        self,
        op_logits: torch.Tensor,
        op_mask: torch.Tensor,
        slot_logits: torch.Tensor,
        slot_mask: torch.Tensor,
        blueprint_logits: torch.Tensor,
        blueprint_mask: torch.Tensor,
        blend_logits: torch.Tensor,
        blend_mask: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> None:
        """`noise` `[..., 4]`: one uniform in (0, 1] per head (op, slot, blueprint, blend)
        that `sample` draws with; without it, `sample` uses torch's default generator."""
        self.noise = noise
        self._batch_shape = op_logits.shape[:-1]
        self.log_prob_key = None
        self.entropy_key = None
        ones = torch.ones(self._batch_shape, dtype=op_logits.dtype, device=op_logits.device)
        self.op = CausalCategorical(op_logits, op_mask, ones)
        op_probs = self.op.probs
        # Rows of ops that cannot be drawn may be empty: open them (their weight is 0).
        slot_mask = slot_mask | ~slot_mask.any(-1, keepdim=True)
        n_ops = slot_mask.shape[-2]
        self.slot_by_op = D.Categorical(
            logits=_masked(slot_logits.unsqueeze(-2).expand(*slot_logits.shape[:-1], n_ops, -1), slot_mask),
            validate_args=False,
        )
        uses_seed = op_probs[..., Op.GERMINATE]
        self.blueprint = CausalCategorical(blueprint_logits, blueprint_mask, uses_seed)
        self.blend = CausalCategorical(blend_logits, blend_mask, uses_seed)
        self.dists = {
            ("action", "op"): self.op,
            ("action", "slot"): OpConditionedSlot(self.slot_by_op, op_probs),
            ("action", "blueprint"): self.blueprint,
            ("action", "blend"): self.blend,
        }

    def _slot_given_op(self, per_op: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
        return per_op.gather(-1, op.unsqueeze(-1)).squeeze(-1)

    def _actions(
        self, op: torch.Tensor, slot_per_op: torch.Tensor, blueprint: torch.Tensor, blend: torch.Tensor
    ) -> TensorDict:
        slot = self._slot_given_op(slot_per_op, op)
        actions = {"op": op, "slot": slot, "blueprint": blueprint, "blend": blend}
        return TensorDict({"action": TensorDict(actions, batch_size=op.shape)}, batch_size=op.shape)

    def sample(self, shape: torch.Size | None = None) -> TensorDict:
        shape = torch.Size([]) if shape is None else torch.Size(shape)
        if self.noise is not None:
            if shape:
                raise ValueError(f"one noise draw per action: sample() takes no shape with noise, got {tuple(shape)}")
            op_u, slot_u, blueprint_u, blend_u = self.noise.unbind(-1)
            op = inverse_cdf_sample(self.op.probs, op_u)
            slot_probs = self.slot_by_op.probs.gather(
                -2, op.view(*op.shape, 1, 1).expand(*op.shape, 1, self.slot_by_op.probs.shape[-1])
            )
            slot = inverse_cdf_sample(slot_probs.squeeze(-2), slot_u)
            actions = {
                "op": op,
                "slot": slot,
                "blueprint": inverse_cdf_sample(self.blueprint.probs, blueprint_u),
                "blend": inverse_cdf_sample(self.blend.probs, blend_u),
            }
            return TensorDict({"action": TensorDict(actions, batch_size=op.shape)}, batch_size=op.shape)
        return self._actions(
            self.op.sample(shape), self.slot_by_op.sample(shape), self.blueprint.sample(shape), self.blend.sample(shape)
        )

    @property
    def mode(self) -> TensorDict:
        return self._actions(self.op.mode, self.slot_by_op.mode, self.blueprint.mode, self.blend.mode)

    @property
    def deterministic_sample(self) -> TensorDict:
        return self.mode

    def log_prob(self, sample: TensorDictBase) -> torch.Tensor | TensorDict:
        op = sample["action", "op"]
        uses_slot = op != int(Op.WAIT)  # int: dynamo compares a tensor with an IntEnum member as a Python bool
        uses_seed = op == int(Op.GERMINATE)
        zero = torch.zeros((), dtype=self.op.logits.dtype, device=op.device)
        slot_lp = self._slot_given_op(
            self.slot_by_op.log_prob(
                sample["action", "slot"].unsqueeze(-1).expand(*op.shape, self.slot_by_op.logits.shape[-2])
            ),
            op,
        )
        per_head = {
            "op_log_prob": self.op.log_prob(op),
            "slot_log_prob": torch.where(uses_slot, slot_lp, zero),
            "blueprint_log_prob": torch.where(uses_seed, self.blueprint.log_prob(sample["action", "blueprint"]), zero),
            "blend_log_prob": torch.where(uses_seed, self.blend.log_prob(sample["action", "blend"]), zero),
        }
        if composite_lp_aggregate():
            return sum(per_head.values())
        return TensorDict({"action": TensorDict(per_head, batch_size=op.shape)}, batch_size=op.shape)

    def entropy(self, samples_mc: int = 1, **kwargs: object) -> TensorDict:
        entropies = {f"{name[-1]}_entropy": dist.entropy() for name, dist in self.dists.items()}
        return TensorDict({"action": TensorDict(entropies, batch_size=self.batch_shape)}, batch_size=self.batch_shape)


# --- networks ----------------------------------------------------------------------------


class ObservationNormalizer(nn.Module):
    """`(observation - loc) / scale`, the identity until the trainer writes statistics.

    The statistics are buffers, not an env transform: whatever runs the policy (a local
    collector, a remote worker that received the weights, an evaluation) normalizes with
    exactly the values the trainer set, and a policy checkpoint holds them."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(size))
        self.register_buffer("scale", torch.ones(size))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return (observation - self.loc) / self.scale


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _feature_net(in_features: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(_orthogonal(nn.Linear(in_features, hidden), math.sqrt(2)), nn.LayerNorm(hidden), nn.ReLU())


def _head(in_features: int, hidden: int, out: int, gain: float) -> nn.Sequential:
    return nn.Sequential(
        _orthogonal(nn.Linear(in_features, hidden), math.sqrt(2)), nn.ReLU(), _orthogonal(nn.Linear(hidden, out), gain)
    )


class ConcatInputs(nn.Module):
    """`net(cat(inputs, -1))`: a value net over the observation and the critic's own columns."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(inputs, dim=-1))


class ActionHeads(nn.Module):
    """Logits of the four heads from one embedding; output gain 0.01 keeps the first policy near uniform."""

    def __init__(self, embedding: int, hidden: int, n_slots: int, n_blueprints: int) -> None:
        super().__init__()
        sizes = {"op": len(Op), "slot": n_slots, "blueprint": n_blueprints, "blend": len(BlendMode)}
        self.heads = nn.ModuleDict({name: _head(embedding, hidden, size, 0.01) for name, size in sizes.items()})

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.heads[name](embedding) for name in ACTION_HEADS)


def _lstm_module(input_size: int, hidden: int) -> LSTMModule:
    lstm = LSTMModule(input_size=input_size, hidden_size=hidden, in_key="features", out_key="embedding")
    for name, weight in lstm.lstm.named_parameters():
        if name.startswith("weight"):
            nn.init.orthogonal_(weight)
        else:
            nn.init.zeros_(weight)
            weight.data[hidden : 2 * hidden] = 1.0  # forget gate
    return lstm


@dataclass(frozen=True)
class ActorCritic:
    """The actor (network + `FactoredActionDistribution`) and critic (the normalizer, then a
    `ValueOperator`), plus the LSTM when on.

    The actor is tensordict's `ProbabilisticTensorDictSequential`, which samples through the
    distribution's own `sample`/`log_prob` (TorchRL's `ProbabilisticActor` samples a
    composite head by head, which would lose the op-conditioned slot mask).
    """

    actor: ProbabilisticTensorDictSequential
    critic: TensorDictSequential
    lstm: LSTMModule | None
    normalizer: ObservationNormalizer
    """Shared by actor and critic (the first module of each)."""
    critic_normalizer: ObservationNormalizer | None
    """The critic's own columns' (`"critic_observation"`), when it reads any."""


def make_actor_critic(
    observation_size: int,
    n_slots: int,
    n_blueprints: int,
    config: PolicyConfig,
    device: torch.device | str = "cpu",
    critic_observation_size: int = 0,
) -> ActorCritic:
    """Build the actor and critic for an env with these sizes (orthogonal init, small output
    gains). The actor is built first, so its initial weights do not depend on
    `critic_observation_size`."""
    obs = NORMALIZED_OBSERVATION
    normalizer = ObservationNormalizer(observation_size)
    normalize = TensorDictModule(normalizer, ["observation"], [obs])
    modules: list[TensorDictModule] = [
        normalize,
        TensorDictModule(_feature_net(observation_size, config.hidden), [obs], ["features"]),
    ]
    lstm = None
    embedding_size = config.hidden
    if config.lstm:
        lstm = _lstm_module(config.hidden, config.lstm_hidden)
        modules.append(lstm)
        modules.append(TensorDictModule(nn.LayerNorm(config.lstm_hidden), ["embedding"], ["embedding"]))
        embedding_size = config.lstm_hidden
    else:
        modules.append(TensorDictModule(nn.Identity(), ["features"], ["embedding"]))
    logit_keys = [("params", f"{head}_logits") for head in ACTION_HEADS]
    modules.append(
        TensorDictModule(
            ActionHeads(embedding_size, config.head_hidden, n_slots, n_blueprints), ["embedding"], logit_keys
        )
    )
    dist_inputs = {}
    for head, logit_key in zip(ACTION_HEADS, logit_keys):
        dist_inputs[f"{head}_logits"] = logit_key
        dist_inputs[f"{head}_mask"] = ("action_mask", head)
    dist_inputs["noise"] = ACTION_NOISE
    sampler = ProbabilisticTensorDictModule(
        in_keys=dist_inputs,
        out_keys=ACTION_KEYS,
        distribution_class=FactoredActionDistribution,
        return_log_prob=True,
        log_prob_keys=LOG_PROB_KEYS,
        default_interaction_type="random",
    )
    actor = ProbabilisticTensorDictSequential(*modules, sampler).to(device)
    value_net = nn.Sequential(
        _orthogonal(nn.Linear(observation_size + critic_observation_size, config.hidden), math.sqrt(2)),
        nn.LayerNorm(config.hidden),
        nn.ReLU(),
        _orthogonal(nn.Linear(config.hidden, config.head_hidden), math.sqrt(2)),
        nn.ReLU(),
        _orthogonal(nn.Linear(config.head_hidden, 1), 1.0),
    )
    critic_normalizer = None
    if critic_observation_size > 0:
        critic_normalizer = ObservationNormalizer(critic_observation_size)
        critic = TensorDictSequential(
            normalize,
            TensorDictModule(critic_normalizer, [CRITIC_OBSERVATION], [NORMALIZED_CRITIC_OBSERVATION]),
            ValueOperator(ConcatInputs(value_net), in_keys=[obs, NORMALIZED_CRITIC_OBSERVATION]),
        )
    else:
        critic = TensorDictSequential(normalize, ValueOperator(value_net, in_keys=[obs]))
    return ActorCritic(
        actor=actor, critic=critic.to(device), lstm=lstm, normalizer=normalizer, critic_normalizer=critic_normalizer
    )
