"""The config of ``spai benchmark cross-generator``: which training sets, how their trials run, and the base training
config of every trial. Saved as ``<output>/<name>/config.yaml``; ``--config`` of that file reruns the benchmark."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from pipelines.evaluate.config import threshold_problem
from pipelines.infra.settings import TrackingConfig
from spai_core.config import ConfigError, option
from tune.config import TrialsConfig


@dataclass
class CrossGeneratorConfig(TrialsConfig):
    """GenImage's cross-generator protocol: a model per training set (one generator's fakes, or all generators' but
    one, with every real row), each a ``spai train`` run of the ``train`` config, tested on every generator of the
    test split."""

    manifest: str | None = option(None, flag="--manifest", short="-m",
                                  help="manifest path or s3:// URI whose train, val and test splits hold real images "
                                  "and AI-generated ones of several generators")
    output: str = option("runs/benchmark", flag="--output", short="-o", help="folder or s3:// URI of the benchmarks")
    name: str | None = option(None, flag="--name", help="benchmark name, its folder under --output (default: "
                              "generated)")
    tracking: TrackingConfig = field(default_factory=partial(TrackingConfig, experiment="spai-benchmark"))
    leave_one_out: bool = option(False, flag="--leave-one-out",
                                 help="train each model on every generator but one (its row's) instead of on one")
    generators: list[str] | None = option(None, flag="--generators",
                                          help="the training generators (default: every generator with AI-generated "
                                          "images in the train split); every generator of the test split is tested")
    threshold: float = option(0.5, flag="--threshold", help="score above which an image counts as AI-generated, for "
                              "the accuracy matrix")

    def validate(self) -> None:
        super().validate()
        if problem := threshold_problem(self.threshold):
            raise ConfigError(problem, "threshold")
        if self.generators is not None:
            if len(set(self.generators)) != len(self.generators) or not self.generators:
                raise ConfigError(f"must name distinct generators, got {self.generators}", "generators")
            if self.leave_one_out and len(self.generators) < 2:
                raise ConfigError("--leave-one-out needs two or more generators: each model trains on all but one",
                                  "generators")
