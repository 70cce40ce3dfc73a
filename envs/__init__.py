"""TorchRL environments over the functional core (arrives with the environment issue)."""
