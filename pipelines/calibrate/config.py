"""What ``spai calibrate`` is asked to do (:class:`CalibrateConfig`); saved next to the weights it writes as
``<weights>.calibrate.yaml``, which ``spai calibrate --config`` accepts back."""
from __future__ import annotations

import dataclasses
import functools

from pipelines.infra.settings import TrackingConfig
from spai_core.config import ConfigError, option
from spai_core.errors import UserError


class CalibrateError(UserError, ValueError):
    """A calibration that cannot be made from the given table and weights; the message says what to do."""


@dataclasses.dataclass
class CalibrateConfig:
    """Options of one calibration: the weights, the score table of the calibration images, the target."""

    weights: str = option("", flag="--weights", short="-w", help="our checkpoint (.safetensors; convert an official "
                          ".pth with `spai convert` first), local or s3://")
    scores: str = option("", flag="--scores", short="-s", help="the table `spai score` wrote for the calibration "
                         "images with these very weights (Parquet or CSV of our layout)")
    split: str | None = option(None, flag="--split", help="calibrate on the rows of this split, e.g. val (needed when "
                               "the table holds several; never calibrate on training rows)")
    target_fpr: float | None = option(None, flag="--target-fpr", help="choose the threshold that keeps the "
                                      "false-positive rate on new real images at most this, e.g. 0.05")
    balanced: bool = option(False, flag="--balanced", help="choose the threshold of the best balanced accuracy "
                            "(mean of real and fake accuracy) instead")
    output: str | None = option(None, flag="--output", short="-o", help="write the calibrated checkpoint here "
                                "(.safetensors; default: update --weights in place)")
    tracking: TrackingConfig = dataclasses.field(
        default_factory=functools.partial(TrackingConfig, experiment="spai-calibrate"))

    @property
    def target(self) -> str:
        """The target as the checkpoint records it: ``fpr=0.05`` or ``balanced``."""
        return "balanced" if self.balanced else f"fpr={self.target_fpr:g}"

    @property
    def destination(self) -> str:
        """Where the calibrated checkpoint goes."""
        return self.output or self.weights

    def validate(self) -> None:
        for name in ("weights", "scores"):
            if not getattr(self, name):
                raise ConfigError("is required", name)
        if self.balanced == (self.target_fpr is not None):
            raise ConfigError("give one target: --target-fpr RATE (e.g. 0.05) or --balanced", "target_fpr")
        if self.target_fpr is not None and not 0 < self.target_fpr < 0.5:
            raise ConfigError(f"must be a rate strictly between 0 and 0.5, e.g. 0.05, got {self.target_fpr}",
                              "target_fpr")
        for name in ("weights", "output"):
            value = getattr(self, name)
            if value and value.lower().endswith((".pth", ".pt")):
                raise ConfigError(f"{value}: official .pth weights carry no metadata to keep a threshold in; "
                                  "`spai convert` them to .safetensors, score with that file, and calibrate it", name)
            if value and not value.lower().endswith(".safetensors"):
                raise ConfigError(f"{value!r} must end with .safetensors (our checkpoint format)", name)
