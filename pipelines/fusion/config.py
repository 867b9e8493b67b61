"""The config of a fusion head run (``spai fusion train``); saved as ``<run>/config.yaml`` (``--config`` reruns it).

The frozen models are not configured here: they are the ones the feature table was extracted with (its
``features.json``), and the fused checkpoint embeds them."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pipelines.infra.settings import TrackingConfig
from pipelines.train.config import CONFIG_DIR, OptimConfig
from spai_core.config import ConfigError, option
from spai_core.fusion import FusionConfig

FUSION_RECIPE: Path = CONFIG_DIR / "fusion.yaml"  # what `spai fusion train` starts from without --config


@dataclass
class FusionTrainConfig:
    """A head (``head.kind``: late or logit fusion) trained on a feature table's train split, selected by val AUC."""

    features: str | None = option(None, flag="FEATURES", help="feature table folder of `spai fusion extract`")
    output: str = option("runs/fusion", flag="--output", short="-o", help="folder or s3:// URI of the runs")
    name: str | None = option(None, flag="--name", help="run name, its folder under --output (default: generated)")
    head: FusionConfig = field(default_factory=FusionConfig)  # head.kind=logit, head.proj_dim=128, ...
    epochs: int = 30
    batch_size: int = 64  # rows per optimizer step over all workers
    seed: int = 0
    patience: int | None = 5  # early stopping: epochs without a better val AUC (None: never stop early)
    keep_checkpoints: int = 2
    max_failures: int = 1
    workers: int = option(1, flag="--workers", help="Ray Train workers (DDP ranks)")
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # a head trains in seconds on CPU
    registered_model: str | None = "spai-fusion"  # MLflow registered model of the best checkpoint (null: none)
    optim: OptimConfig = field(default_factory=partial(OptimConfig, lr=1e-3, weight_decay=1e-4, warmup_epochs=0.0))
    tracking: TrackingConfig = field(default_factory=partial(TrackingConfig, experiment="spai-fusion"))

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "keep_checkpoints", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be at least 1, got {getattr(self, name)}", name)
        if self.max_failures < 0:
            raise ConfigError(f"must be 0 or more, got {self.max_failures}", "max_failures")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"must be 0 or more, got {self.gpus_per_worker}", "gpus_per_worker")
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"must be above 0, got {self.cpus_per_worker}", "cpus_per_worker")
        if self.patience is not None and self.patience < 0:
            raise ConfigError(f"must be 0 or more (or null: never stop early), got {self.patience}", "patience")
        if self.batch_size % self.workers:
            raise ConfigError(f"{self.workers} worker(s) cannot split batch_size={self.batch_size} evenly", "workers")

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.workers
