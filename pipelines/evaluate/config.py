"""What ``spai evaluate`` is asked to do (:class:`EvaluateConfig`); saved in the report folder as ``config.yaml``,
which ``spai evaluate --config`` accepts back."""
from __future__ import annotations

import dataclasses
import functools

from pipelines.infra.settings import TrackingConfig
from spai_core.config import ConfigError, option
from spai_core.errors import UserError


PROTOCOLS = ("auto", "paired", "pooled")


class EvaluateError(UserError, ValueError):
    """A score table that cannot be evaluated; the message says what to do."""


def threshold_problem(threshold: float) -> str | None:
    """What is wrong with an accuracy threshold, if anything."""
    # A fake is predicted iff score > threshold, so at 0, 1 or beyond nearly every row gets the same prediction and
    # accuracy only measures the class balance: the open interval keeps out such mistakes (e.g. a percentage).
    if not 0 < threshold < 1:
        return f"must be strictly between 0 and 1 (scores are probabilities), got {threshold}"
    return None


@dataclasses.dataclass
class EvaluateConfig:
    """Options of one evaluation: the score tables, the report folder, the protocol's settings, the MLflow run."""

    scores: list[str] = option(default_factory=list, flag="SCORES", help="scored table(s) written by `spai score` "
                               "(Parquet or CSV, local or s3://)")
    output: str | None = option(None, flag="--output", short="-o", help="report directory (metrics.csv, metrics.md, "
                                "report.html, plots, config.yaml; default: print the tables only)")
    threshold: float = option(0.5, flag="--threshold", help="score threshold for accuracy (tables scored with "
                              "calibrated weights also get accuracy at the checkpoint's own threshold)")
    protocol: str = option("auto", flag="--protocol", choices=PROTOCOLS, help="paired: each generator's fakes "
                           "against each real source (the `source` of the real rows) apart, then the mean over "
                           "sources, as the SPAI paper reports; pooled: against all reals at once; auto: paired "
                           "when some table's reals come from two or more sources, else pooled")
    bootstrap: int = option(1000, flag="--bootstrap", help="resamples behind the 95 percent intervals of AUC and AP "
                            "(0: no intervals)")
    seed: int = option(0, flag="--seed", help="seed of the bootstrap resamples (the same seed, the same intervals)")
    seen: list[str] | None = option(None, flag="--seen", help="generators seen in training (listed apart)")
    split: str | None = option(None, flag="--split", help="evaluate only the rows of this split, e.g. test (default: "
                               "all rows; the report notes when they pool several splits)")
    explain: str | None = option(None, flag="--explain", help="weights (spai.pth or .safetensors) to draw the "
                                 "per-tile attention of each run's most confident false positives and false "
                                 "negatives with, on CPU, into the report (needs --output)")
    explain_count: int = option(3, flag="--explain-count", help="false positives and false negatives drawn per "
                                "run with --explain")
    run_id: str | None = option(None, flag="--run-id", help="MLflow run to attach the report to (e.g. the training "
                                "run) instead of a new one")
    tracking: TrackingConfig = dataclasses.field(
        default_factory=functools.partial(TrackingConfig, experiment="spai-evaluate"))

    def validate(self) -> None:
        if not self.scores:
            raise ConfigError("give at least one score table (the output of `spai score`)", "scores")
        if problem := threshold_problem(self.threshold):
            raise ConfigError(problem, "threshold")
        if self.bootstrap < 0:
            raise ConfigError(f"must be 0 (no intervals) or a number of resamples, got {self.bootstrap}", "bootstrap")
        if self.explain_count < 1:
            raise ConfigError(f"must be a positive number, got {self.explain_count}", "explain_count")
        if self.explain and not self.output:
            raise ConfigError("needs --output: the overlays go in the report folder", "explain")
        if self.run_id and not self.tracking.enabled:
            raise ConfigError("contradicts --no-mlflow; drop one of them", "run_id")
