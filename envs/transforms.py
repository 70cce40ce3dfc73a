"""TorchRL transforms that belong with `MorphogeneticEnv`."""

from __future__ import annotations

from tensordict import TensorDictBase
from torchrl.envs import Transform

from esper_func.core.masks import check_masks


class ActionMaskCheck(Transform):
    """Raise `ValueError` naming the envs whose `("action_mask", head)` rows leave a head
    with nothing to sample, at reset and after every step.

    The env's own masks always hold a legal action (WAIT, at least); put this after
    transforms that edit masks, so that a policy never samples from an empty row (a
    masked categorical would silently pick an illegal action). It reads the masks back to
    the host once per step: it is policy-side, outside the env step.
    """

    def __init__(self) -> None:
        super().__init__(in_keys=[], out_keys=[])

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        check_masks(next_tensordict["action_mask"])
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        check_masks(tensordict_reset["action_mask"])
        return tensordict_reset
