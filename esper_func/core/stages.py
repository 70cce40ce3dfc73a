"""Seed stages, lifecycle ops, slots and blend modes, with their lookup tables.

Stage values keep the reference's numbering (5 is a deliberate hole: SHADOWING was
removed) so that serialized values stay stable. Every per-stage behaviour the pure
functions need is a lookup tensor indexed by stage, never a Python branch.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class Stage(IntEnum):
    DORMANT = 1
    GERMINATED = 2
    TRAINING = 3
    BLENDING = 4
    PROBATIONARY = 6
    FOSSILIZED = 7
    CULLED = 8
    EMBARGOED = 9
    RESETTING = 10


class Op(IntEnum):
    WAIT = 0
    GERMINATE = 1
    CULL = 2
    FOSSILIZE = 3


class BlendMode(IntEnum):
    LINEAR = 0
    SIGMOID = 1
    GATED = 2


ACTION_HEADS: tuple[str, ...] = ("op", "slot", "blueprint", "blend")
"""An action is a TensorDict `[N]` of int64 heads with these keys, in this order: the op,
the slot it acts on, and for GERMINATE the blueprint and the blend mode."""

SLOT_NAMES: tuple[str, ...] = ("early", "mid", "late")
"""Canonical slot order; slot index = position in this tuple."""

NUM_STAGE_VALUES = 11  # table size: stage values 0..10 index directly (0 and 5 unused)

_LEGAL_TRANSITIONS: dict[Stage, tuple[Stage, ...]] = {
    Stage.DORMANT: (Stage.GERMINATED,),
    Stage.GERMINATED: (Stage.TRAINING, Stage.CULLED),
    Stage.TRAINING: (Stage.BLENDING, Stage.CULLED),
    Stage.BLENDING: (Stage.PROBATIONARY, Stage.CULLED),
    Stage.PROBATIONARY: (Stage.FOSSILIZED, Stage.CULLED),
    Stage.FOSSILIZED: (),
    Stage.CULLED: (Stage.EMBARGOED,),
    Stage.EMBARGOED: (Stage.RESETTING,),
    Stage.RESETTING: (Stage.DORMANT,),
}


_TABLES: dict[int, torch.Tensor] = {}
"""Every lookup table by id (`lookup_table`); holding them keeps their ids from being reused."""
_DEVICE_COPIES: dict[tuple[int, torch.device], torch.Tensor] = {}


def lookup_table(values: torch.Tensor) -> torch.Tensor:
    """Register a long-lived lookup table (a module constant, or one cached per config), so
    that `preload_tables` puts it on an env's device before any step looks it up."""
    _TABLES[id(values)] = values
    return values


def preload_tables(device: torch.device) -> None:
    """Copy every registered table to `device` now, while an env is built: copying one at
    its first use inside a step would make the host wait for the device."""
    for table in _TABLES.values():
        on_device(table, device)


def on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A registered lookup table on `device` (copied there once, by `preload_tables`)."""
    if id(table) not in _TABLES:
        raise ValueError(
            f"on_device takes registered lookup tables; register this {tuple(table.shape)} table with "
            "esper_func.core.stages.lookup_table where it is made, so preload_tables copies it before any step"
        )
    if table.device == device:
        return table
    key = (id(table), device)
    if key not in _DEVICE_COPIES:
        _DEVICE_COPIES[key] = table.to(device)
    return _DEVICE_COPIES[key]


def stage_lookup(table: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
    """Index a stage table by a stage tensor of any shape, on the stage's device."""
    return on_device(table, stage.device)[stage]


def stage_mask(*stages: Stage) -> torch.Tensor:
    """A registered `[NUM_STAGE_VALUES]` bool table, True at `stages`."""
    mask = torch.zeros(NUM_STAGE_VALUES, dtype=torch.bool)
    mask[[int(s) for s in stages]] = True
    return lookup_table(mask)


def _transition_table() -> torch.Tensor:
    table = torch.zeros(NUM_STAGE_VALUES, NUM_STAGE_VALUES, dtype=torch.bool)
    for src, targets in _LEGAL_TRANSITIONS.items():
        for dst in targets:
            table[int(src), int(dst)] = True
    return lookup_table(table)


LEGAL_TRANSITION = _transition_table()
"""`[11, 11]` bool: `LEGAL_TRANSITION[from, to]` is True when the move is allowed."""

IN_FORWARD = stage_mask(Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY, Stage.FOSSILIZED)
"""The seed runs in the forward pass. v2: GERMINATED too, straight-through like TRAINING,
so the seed runs (and G2 reads its gradient) from the epoch it is germinated in instead of
idling for one."""

SEED_TRAINABLE = stage_mask(Stage.BLENDING, Stage.PROBATIONARY, Stage.FOSSILIZED)
"""The seed's parameters receive optimizer updates: once its output is in the value
(fossilized seeds keep training). v2: not in GERMINATED/TRAINING, where the straight-through
gradient is a linear objective with no curvature (the loss never sees the seed's output),
so applying it drives the seed's features along the host's gradient without bound. It cost
accuracy in probes with a 3-epoch dwell and slots before the pool; on the default host and
timings it makes no measurable difference (docs/architecture.md). TRAINING is a probe: G2
checks that gradient reaches the seed."""

STRAIGHT_THROUGH = stage_mask(Stage.GERMINATED, Stage.TRAINING)
"""Output is the host's value; the seed reads a detached input and gets the full output gradient."""

BLENDED = stage_mask(Stage.BLENDING, Stage.PROBATIONARY)
"""Output is lerp(host, seed, alpha); CNN seeds read a detached input."""

LIVE = stage_mask(Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY)
"""Stages a CULL can end."""

OCCUPIED = stage_mask(
    Stage.GERMINATED,
    Stage.TRAINING,
    Stage.BLENDING,
    Stage.PROBATIONARY,
    Stage.FOSSILIZED,
    Stage.CULLED,
    Stage.EMBARGOED,
    Stage.RESETTING,
)
"""The slot cannot be germinated (holds a seed or is cooling down)."""

HOLDS_SEED = stage_mask(Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY, Stage.FOSSILIZED)
"""The slot holds a seed (live or fossilized): part of the network, counted in its parameters."""

COUNTS_AGE = HOLDS_SEED
"""Stages whose ticks add to `epochs_total` (a seed's age)."""

