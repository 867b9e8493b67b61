"""The config of ``spai demo``: light to import, since the CLI derives its flags from it."""
from __future__ import annotations

from dataclasses import dataclass

from spai_core.config import ConfigError, option


@dataclass
class DemoConfig:
    """``spai demo``: where it works and how long it trains."""

    output: str = option("demo_out", flag="--output", short="-o",
                         help="working directory for corpus, runs and report")
    workers: int = option(2, flag="--workers", help="Ray Train workers")
    epochs: int | None = option(None, flag="--epochs", help="override the demo's epoch count (default: the tiny "
                                "config's)")
    rebuild: bool = option(False, flag="--rebuild", help="rebuild the corpus even if it exists")

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"must be at least 1, got {self.workers}", "workers")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"must be at least 1 (or unset for the tiny config's), got {self.epochs}", "epochs")
