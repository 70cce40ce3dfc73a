"""Audit a region of code for host-device synchronization, on any device.

On a GPU, the host waits for the device whenever a value is read back (`.item()`,
`bool(t)`, `.tolist()`, `.cpu()`), when an output's shape depends on data (`nonzero`,
boolean-mask indexing, `unique`), and when pageable memory is copied between host and
device. `HostSyncAudit` records every such call in its scope with the line of our code
that made it, through a `TorchFunctionMode`, so the same check runs on CPU, where nothing
actually waits. Device moves (`.to(device)`, `.cpu()`, `.cuda()`, `torch.tensor(data)`)
are recorded when our code makes them: in a hot path everything is already in place.
On CUDA, `torch.cuda.set_sync_debug_mode("error")` is set as well, so the driver-level
check applies too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from torch.overrides import TorchFunctionMode

_READS = {
    torch.Tensor.item: "reads a value back",
    torch.Tensor.tolist: "reads values back",
    torch.Tensor.numpy: "reads values back",
    torch.Tensor.__bool__: "reads a value back (Python branch on a tensor)",
    torch.Tensor.__int__: "reads a value back",
    torch.Tensor.__float__: "reads a value back",
    torch.Tensor.__index__: "reads a value back (tensor used as a Python index)",
    torch.nonzero: "output shape depends on data",
    torch.Tensor.nonzero: "output shape depends on data",
    torch.argwhere: "output shape depends on data",
    torch.masked_select: "output shape depends on data",
    torch.Tensor.masked_select: "output shape depends on data",
    torch.unique: "output shape depends on data",
    torch.Tensor.unique: "output shape depends on data",
}
_MOVES = {
    torch.Tensor.cpu: "moves data to the host",
    torch.Tensor.cuda: "moves data to the device",
    torch.tensor: "copies Python data to the device",
    torch.as_tensor: "copies Python data to the device",
}
_OUR_PACKAGES = tuple(str(Path(__file__).resolve().parents[2] / name) for name in ("esper_func", "envs", "policies"))
_THIS_FILE = str(Path(__file__).resolve())


class HostSyncError(RuntimeError):
    """Code that must not synchronize with the device did; the message lists each call."""


@dataclass(frozen=True)
class SyncCall:
    operation: str
    reason: str
    location: str
    """`file:line in function` of the innermost frame of our code that led to the call."""

    def __str__(self) -> str:
        return f"{self.operation} ({self.reason}) at {self.location}"


def _is_bool_index(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(item, torch.Tensor) and item.dtype == torch.bool for item in items)


def _is_device_move(args: tuple[object, ...], kwargs: dict[str, object]) -> bool:
    """`Tensor.to(...)` with a device (positional or keyword), not only a dtype."""
    if "device" in kwargs:
        return True
    return any(isinstance(arg, (torch.device, str)) for arg in args[1:])


def _our_frame(depth: int) -> tuple[str, bool] | None:
    """Location of the innermost frame in our packages, and whether it made the call itself."""
    frame = sys._getframe(depth)
    direct = True
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_OUR_PACKAGES) and filename != _THIS_FILE:
            return f"{Path(filename).name}:{frame.f_lineno} in {frame.f_code.co_name}", direct
        direct = False
        frame = frame.f_back
    return None


class HostSyncAudit(TorchFunctionMode):
    """Records (`calls`) each synchronizing call made in its scope; see the module docstring."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.calls: list[SyncCall] = []
        self._previous_debug_mode = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        reason = _READS.get(func)
        move = func in _MOVES or (func is torch.Tensor.to and _is_device_move(args, kwargs))
        if reason is None and func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _is_bool_index(args[1]):
            reason = "boolean-mask indexing: output shape depends on data"
        where = _our_frame(2) if reason is not None or move else None
        if reason is not None:
            self.calls.append(
                SyncCall(getattr(func, "__name__", str(func)), reason, where[0] if where else "outside esper_func")
            )
        elif move and where is not None and where[1]:
            self.calls.append(
                SyncCall(getattr(func, "__name__", str(func)), _MOVES.get(func, "moves data between devices"), where[0])
            )
        return func(*args, **kwargs)

    def __enter__(self) -> HostSyncAudit:
        if self.device.type == "cuda":
            self._previous_debug_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        return super().__enter__()  # type: ignore[return-value]

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        super().__exit__(kind, error, trace)
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(self._previous_debug_mode)

    def raise_if_any(self, allowed: tuple[str, ...] = ()) -> None:
        """Raise `HostSyncError` for every recorded call not made in a function named in `allowed`."""
        offending = [
            call for call in self.calls if not call.location.endswith(tuple(f" in {name}" for name in allowed))
        ]
        if offending:
            lines = "\n".join(f"  {call}" for call in offending)
            raise HostSyncError(f"{len(offending)} host-device synchronization(s) in a sync-free region:\n{lines}")
