"""Config sections that several commands share, so that one concept has one flag name on every command.

Light on purpose (no MLflow or Ray import): command parsers are built from these classes.
"""
from __future__ import annotations

from dataclasses import dataclass

from spai_core.config import ConfigError, option


@dataclass
class TrackingConfig:
    """Where a job records its MLflow run; every run is tracked unless ``enabled`` is false.

    A command gives its own default experiment: ``field(default_factory=partial(TrackingConfig, experiment=...))``.
    """

    uri: str | None = option(None, flag="--mlflow-uri",
                             help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a local ./mlruns store)")
    experiment: str = option("spai", flag="--experiment", help="MLflow experiment name")
    enabled: bool = option(True, flag="--no-mlflow", help="do not record this run in MLflow")

    def validate(self) -> None:
        if not self.experiment.strip():
            raise ConfigError("the experiment name is empty", "experiment")

