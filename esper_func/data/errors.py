"""The error a task raises for a data file that exists but is not what it expects."""

from __future__ import annotations


class TaskDataError(ValueError):
    """A data file exists but is not what the task expects; the message names the path and the format."""
