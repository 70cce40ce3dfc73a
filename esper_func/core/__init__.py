"""The pure core: stages, state, model, lifecycle, host training and evaluation, governor,
rewards, observation and the step.

Pure functions over TensorDicts with a leading env dimension; it imports nothing above it
(no TorchRL, no tasks)."""
