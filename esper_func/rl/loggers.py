"""TorchRL loggers by name (`get_logger`: csv, tensorboard, wandb, mlflow), checked for
their packages before a run builds anything, with the resolved config as hyperparameters."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from torchrl.record.loggers import Logger, get_logger

from esper_func.core.config import require
from esper_func.core.config_json import to_dict
from esper_func.rl.run_config import TrainingConfig
from esper_func.rl.run_sections import TelemetryConfig

LOGGER_PACKAGES: dict[str, tuple[str, ...]] = {
    "csv": (),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
    "mlflow": ("mlflow", "omegaconf"),  # MLFlowLogger.log_hparams imports omegaconf
}
"""What each TorchRL logger imports beyond TorchRL."""


def uses_logger(telemetry: TelemetryConfig) -> bool:
    """Whether a run with `telemetry` builds a logger at all."""
    return telemetry.logger != "none" and telemetry.level != "off"


def require_logger_packages(telemetry: TelemetryConfig) -> None:
    """Raise `ConfigError` naming the configured logger's missing packages and their pip
    command. Checked before a run builds anything: TorchRL would fail only when the
    logger is built, after the env."""
    if not uses_logger(telemetry):
        return
    missing = [name for name in LOGGER_PACKAGES[telemetry.logger] if importlib.util.find_spec(name) is None]
    require(
        not missing,
        f"telemetry.logger={telemetry.logger!r} needs the package(s) {', '.join(missing)}, missing here; "
        f"pip install {' '.join(missing)}, or use the 'csv' logger",
    )


def make_logger(config: TrainingConfig, run_dir: Path) -> Logger | None:
    """TorchRL's logger named by `telemetry.logger` (`get_logger`) under `RUN_DIR/logger`,
    with the resolved config logged once as its hyperparameters."""
    if not uses_logger(config.telemetry):
        return None
    require_logger_packages(config.telemetry)
    logger = get_logger(config.telemetry.logger, logger_name=str(run_dir / "logger"), experiment_name="ppo")
    logger.log_hparams(flat_hparams(config))
    return logger


def flat_hparams(config: TrainingConfig) -> dict[str, bool | int | float | str]:
    """The resolved config as `section.field` scalars, the form every logger's
    `log_hparams` accepts (lists and None as their JSON text)."""
    flat: dict[str, bool | int | float | str] = {}
    pending = list(to_dict(config).items())
    while pending:
        key, value = pending.pop()
        if isinstance(value, dict):
            pending.extend((f"{key}.{name}", item) for name, item in value.items())
        else:
            flat[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return dict(sorted(flat.items()))
