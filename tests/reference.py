"""A plain, per-env reference of the functional core, for equivalence tests.

One `RefEnv` is one environment written the ordinary PyTorch way: a host `nn.Module`, one
blueprint module per seeded slot (plus a `BlendGate` when gated), a Python `if` per stage,
`torch.optim.SGD` and `clip_grad_norm_`. No vmap, no functional_call, no stage tables from
the core: the per-stage forward is spelled out here from the rules (docs/architecture.md,
where each lifecycle stage lives), so a disagreement with the vectorized core points at one of the two.

Forward at a slot, host features `h`, seed `s = blueprint(x_s)`:
- GERMINATED, TRAINING: `x_s = h.detach()`, out = `h + (s - s.detach())`; the seed is not
  in the optimizer (its gradient exists, and is not applied).
- BLENDING / PROBATIONARY: out = `h + a (s - x_s)`; `x_s` detached for CNN hosts only.
- FOSSILIZED: out = `h + a (s - x_s)` with `x_s = h` (never detached), i.e. `lerp(h, s, a)`.
- `a = alpha`, or `alpha * gate(x_s)` when the blend mode is GATED.
- any other stage: out = `h`, the seed does not run.

Learning rates: host and seeds at their base rate times the cosine factor of the env's
epoch, `floor + (1 - floor) (1 + cos(pi min(epoch / max_epochs, 1))) / 2`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

from esper_func.core.blending import BlendGate
from esper_func.core.blueprints import blueprint_names, build_blueprint
from esper_func.core.config import CNNHostConfig, CoreConfig
from esper_func.core.hosts import build_host

# Stage values, written out rather than imported so the reference does not share the
# core's tables (they are the documented, serialized values).
DORMANT, GERMINATED, TRAINING, BLENDING, PROBATIONARY, FOSSILIZED, CULLED, EMBARGOED, RESETTING = (
    1, 2, 3, 4, 6, 7, 8, 9, 10,
)
GATED = 2
SEED_RUNS = (GERMINATED, TRAINING, BLENDING, PROBATIONARY, FOSSILIZED)
STRAIGHT_THROUGH = (GERMINATED, TRAINING)
BLEND_STAGES = (BLENDING, PROBATIONARY, FOSSILIZED)


@dataclass
class RefSlot:
    stage: int
    blueprint: str
    gated: bool
    alpha: torch.Tensor  # 0-d float32
    seed: nn.Module | None  # built only when the seed runs in the forward
    gate: nn.Module | None  # built only when the seed runs and the blend is GATED
    prefix: str  # "banks.<s>."


def _load(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], n: int) -> None:
    """Load env `n`'s slice of every `prefix*` tensor into `module` (strict: names must match)."""
    local = {k[len(prefix):]: v[n].detach().clone() for k, v in tensors.items() if k.startswith(prefix)}
    module.load_state_dict(local, strict=True)


class RefEnv:
    """Env `n` of a core state, as ordinary modules and an ordinary optimizer."""

    def __init__(self, config: CoreConfig, state: TensorDict, n: int) -> None:
        self.config = config
        self.topology = "cnn" if isinstance(config.host, CNNHostConfig) else "transformer"
        params = state["params"].to_dict()
        buffers = state["buffers"].to_dict()
        momentum = state["momentum"].to_dict()
        self.host = build_host(config.host)
        _load(self.host, "host.", {**params, **buffers}, n)
        names = blueprint_names(self.topology)
        self.slots: list[RefSlot] = []
        for s, channels in enumerate(config.host.slot_channels()):
            stage = int(state["slots", "stage"][n, s])
            name = names[int(state["slots", "blueprint"][n, s])]
            gated = int(state["slots", "blend"][n, s]) == GATED
            prefix = f"banks.{s}."
            seed = gate = None
            if stage in SEED_RUNS:
                seed = build_blueprint(self.topology, name, channels)
                _load(seed, f"{prefix}blueprints.{name}.", params, n)
                if gated:
                    gate = BlendGate(channels, spatial=self.topology == "cnn")
                    _load(gate, f"{prefix}gate.", params, n)
            alpha = state["slots", "alpha"][n, s].detach().clone()
            self.slots.append(RefSlot(stage, name, gated, alpha, seed, gate, prefix))

        # Parameters by their state name; host first, then the trained (blended-in) seeds.
        self.host_params = {f"host.{k}": p for k, p in self.host.named_parameters()}
        self.seed_params: dict[str, nn.Parameter] = {}
        for slot in self.slots:
            if slot.seed is not None and slot.stage not in STRAIGHT_THROUGH:
                bp = f"{slot.prefix}blueprints.{slot.blueprint}."
                self.seed_params.update({bp + k: p for k, p in slot.seed.named_parameters()})
            if slot.gate is not None:
                self.seed_params.update({f"{slot.prefix}gate.{k}": p for k, p in slot.gate.named_parameters()})

        optim = config.optim
        epoch = int(state["epoch"][n])
        factor = 1.0
        if optim.lr_schedule == "cosine":
            progress = min(epoch / config.lifecycle.max_epochs, 1.0)
            factor = optim.lr_floor + (1 - optim.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))
        groups = [
            {
                "params": list(self.host_params.values()),
                "lr": optim.host_lr * factor,
                "momentum": optim.host_momentum,
                "weight_decay": optim.host_weight_decay,
            }
        ]
        if self.seed_params:
            groups.append(
                {
                    "params": list(self.seed_params.values()),
                    "lr": optim.seed_lr * factor,
                    "momentum": optim.seed_momentum,
                    "weight_decay": optim.seed_weight_decay,
                }
            )
        self.optimizer = torch.optim.SGD(groups, lr=optim.host_lr)
        for name, p in self.trained_params().items():
            self.optimizer.state[p]["momentum_buffer"] = momentum[name][n].detach().clone()
        self.seed_gap: dict[int, float] = {}
        """Per slot: max |seed output - host features| seen in the latest forward."""

    def trained_params(self) -> dict[str, nn.Parameter]:
        return {**self.host_params, **self.seed_params}

    # --- forward -------------------------------------------------------------------

    def slot_forward(self, s: int, h: torch.Tensor) -> torch.Tensor:
        slot = self.slots[s]
        if slot.stage in STRAIGHT_THROUGH:
            seed_out = slot.seed(h.detach())
            self.seed_gap[s] = float((seed_out - h).detach().abs().max())
            return h + (seed_out - seed_out.detach())
        if slot.stage in BLEND_STAGES:
            if slot.stage == FOSSILIZED or self.topology == "transformer":
                seed_in = h
            else:
                seed_in = h.detach()
            seed_out = slot.seed(seed_in)
            self.seed_gap[s] = float((seed_out - h).detach().abs().max())
            weight = slot.alpha
            if slot.gated:
                weight = slot.alpha * slot.gate(seed_in)
            return h + weight * (seed_out - seed_in)
        return h

    def forward(self, x: torch.Tensor, off_slot: int | None = None) -> torch.Tensor:
        """Logits; `off_slot` forces that slot to identity (the counterfactual)."""
        h = x
        for s in range(len(self.slots)):
            h = self.host.segment(s, h)
            if s != off_slot:
                h = self.slot_forward(s, h)
        return self.host.tail(h)

    # --- training ------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """One SGD step on batch (x, y); returns (loss, pre-clip host grad norm)."""
        self.host.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.forward(x)
        loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
        loss.backward()
        trained = self.trained_params()
        groups = [[p for n, p in trained.items() if n.startswith("host.")]]
        groups += [[p for n, p in trained.items() if n.startswith(f"banks.{s}.")] for s in range(len(self.slots))]
        clip = self.config.optim.grad_clip_norm
        norms = []
        for group in groups:  # the host and each slot's seed are clipped separately
            grads = [p.grad for p in group if p.grad is not None]
            if not grads:
                continue
            if clip is not None:
                norms.append(float(torch.nn.utils.clip_grad_norm_(group, clip)))
            else:
                norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        self.optimizer.step()
        return float(loss.detach()), norms[0]

    def momentum(self) -> dict[str, torch.Tensor]:
        return {
            name: self.optimizer.state[p]["momentum_buffer"].detach().clone()
            for name, p in self.trained_params().items()
        }

    def buffers(self) -> dict[str, torch.Tensor]:
        return {f"host.{k}": b.detach().clone() for k, b in self.host.named_buffers()}

    # --- evaluation ----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, xs: torch.Tensor, ys: torch.Tensor, near_tie: float = 1e-4) -> dict[str, torch.Tensor]:
        """Eval-mode metrics over batches `xs[v]`, `ys[v]`.

        Returns `loss` (mean CE), `accuracy` `[S+1]` in percent (config 0 as is, config
        k+1 with slot k off) and `near_ties` `[S+1]`: predictions whose top-2 logit margin
        is below `near_tie` (an argmax that fp32 rounding could flip).
        """
        self.host.eval()
        n_configs = len(self.slots) + 1
        correct = torch.zeros(n_configs, dtype=torch.int64)
        ties = torch.zeros(n_configs, dtype=torch.int64)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for v in range(xs.shape[0]):
            for k in range(n_configs):
                logits = self.forward(xs[v], off_slot=None if k == 0 else k - 1).flatten(0, -2)
                target = ys[v].flatten()
                if k == 0:
                    loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
                correct[k] += int((logits.argmax(-1) == target).sum())
                top2 = logits.topk(2, dim=-1).values
                ties[k] += int(((top2[:, 0] - top2[:, 1]) < near_tie).sum())
        count = ys.numel()
        return {
            "loss": (loss_sum / count).float(),
            "accuracy": 100.0 * correct.float() / count,
            "near_ties": ties,
        }
