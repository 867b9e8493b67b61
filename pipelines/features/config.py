"""The config of a feature extraction job (``spai fusion extract``); saved beside the table as ``config.yaml``."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.data.config import DEFAULT_MAX_PIXELS
from spai_core.config import ConfigError, option
from spai_core.semantic import SemanticConfig

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class FeaturesConfig:
    """Which images, which frozen models, where the table goes and how the actors run."""

    manifest: str | None = option(None, flag="MANIFEST", help="manifest path or s3:// URI (its label, generator and "
                                  "split columns go into the table)")
    weights: str = option("", flag="--weights", short="-w", help="frozen SPAI weights: official spai.pth or our "
                          ".safetensors (local or s3://)")
    output: str = option("", flag="--output", short="-o", help="folder (or s3:// URI) of the feature table: "
                         "features.parquet, features.json and the resumable parts/")
    semantic: SemanticConfig = field(default_factory=SemanticConfig)  # semantic.encoder=..., semantic.weights=...
    split: str | None = option(None, flag="--split", help="extract only rows of this split (default: all)")
    device: str = option("auto", flag="--device", choices=DEVICES, help="where the models run (auto: GPUs when the "
                         "Ray cluster has them)")
    batch_size: int = option(8, flag="--batch-size", help="images per model call")
    workers: int = option(1, flag="--workers", help="extraction actors (each holds both frozen models)")
    cpus_per_worker: int = option(1, flag="--cpus-per-worker", help="torch threads of each CPU actor")
    feature_batch: int | None = option(None, flag="--feature-batch", help="SPAI tiles encoded at once (memory bound)")
    max_tiles: int | None = option(None, flag="--max-tiles", help="cap on 224-px SPAI tiles per image")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, flag="--max-pixels", help="larger images are rows with a "
                             "decompression_bomb error")
    part_rows: int = option(1000, flag="--part-rows", help="rows per resumable part file (what a kill may redo)")

    def validate(self) -> None:
        for name in ("manifest", "weights", "output"):
            if not getattr(self, name):
                raise ConfigError("is required", name)
        for name in ("batch_size", "workers", "cpus_per_worker", "part_rows", "max_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be at least 1, got {getattr(self, name)}", name)
        for name in ("feature_batch", "max_tiles"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"must be at least 1 (or null), got {getattr(self, name)}", name)
