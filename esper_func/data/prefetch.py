"""The next env step's batches, drawn ahead of time (on a side CUDA stream on a GPU).

An env draws everything random from one generator, in the order: step t's batches,
step t's germinations, step t+1's batches, ... Drawing step t+1's batches at the end of
step t keeps that order, so a prefetching env equals a non-prefetching one draw for draw.
On CUDA the draw is enqueued on a side stream, where it runs beside the tail of step t
and the controller's work between steps; step t+1's stream waits for it with an event (a
device-side wait, not a host synchronization). On a CPU it is the same work done earlier.

A pending draw has moved the generator past what the steps so far consumed. So the state
a checkpoint holds is the one from before it (`generator_state`), and whatever sets the
generator (a reset, a restored checkpoint, a new seed) first drops it (`drop`), which
rewinds the generator: resume stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from esper_func.core.step import Batches
from esper_func.data.tasks import Task


@dataclass(frozen=True)
class PendingBatches:
    """A draw made ahead: its batches, the event that marks them ready (CUDA only), and
    the generator's state from before the draw."""

    batches: Batches
    ready: torch.cuda.Event | None
    generator_before: torch.Tensor


class BatchPrefetcher:
    """Serves an env's batches (`take`), drawing the next ones ahead when `enabled`."""

    def __init__(self, task: Task, generator: torch.Generator, enabled: bool) -> None:
        self.task = task
        self.generator = generator
        self.enabled = enabled
        self.side_stream: torch.cuda.Stream | None = None
        if enabled and task.device.type == "cuda":
            self.side_stream = torch.cuda.Stream(task.device)
            # The task's data was written on the current stream; order the side stream after it once.
            self.side_stream.wait_stream(torch.cuda.current_stream(task.device))
        self.pending: PendingBatches | None = None

    def prefetch(self) -> None:
        """Draw the next step's batches now (no-op when disabled or already drawn)."""
        if not self.enabled or self.pending is not None:
            return
        before = self.generator.get_state()
        with record_function("esper.sample_batches"):
            if self.side_stream is None:
                self.pending = PendingBatches(self.task.sample_batches(self.generator), None, before)
                return
            with torch.cuda.stream(self.side_stream):
                batches = self.task.sample_batches(self.generator)
                ready = torch.cuda.Event()
                ready.record(self.side_stream)
        self.pending = PendingBatches(batches, ready, before)

    def take(self) -> Batches:
        """This step's batches: the prefetched ones (made ready for the current stream), else drawn now."""
        pending, self.pending = self.pending, None
        if pending is None:
            with record_function("esper.sample_batches"):
                return self.task.sample_batches(self.generator)
        if pending.ready is not None:
            stream = torch.cuda.current_stream(self.task.device)
            stream.wait_event(pending.ready)
            # Allocated on the side stream, used on this one: the allocator must wait for this use too.
            pending.batches.train_x.record_stream(stream)
            pending.batches.train_y.record_stream(stream)
        return pending.batches

    def drop(self) -> None:
        """Forget a pending draw and rewind the generator to before it."""
        if self.pending is not None:
            self.generator.set_state(self.pending.generator_before)
            self.pending = None

    def generator_state(self) -> torch.Tensor:
        """The generator's state as the steps so far left it (a pending draw excluded)."""
        return self.generator.get_state() if self.pending is None else self.pending.generator_before
