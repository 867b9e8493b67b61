"""Search spaces of ``spai tune``: distributions over training-config fields, and the ASHA settings, as typed configs.

A space file (``configs/search_space.yaml`` is the default) looks like::

    seed: 0
    scheduler: {metric: val_auc, mode: max, max_t: 12, grace_period: 2, reduction_factor: 2}
    params:
      optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
      model.mask_radius: {type: randint, low: 8, high: 32}

Every key of ``params`` must be a field of the trials' config class (:class:`pipelines.train.config.TrainConfig`,
or :class:`pipelines.fusion.config.FusionTrainConfig` for a fusion head search, e.g. ``head.proj_dim``), and every
value its distribution can produce must give a valid config; both are checked with the search's config, so a typo
fails before any trial runs.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from pipelines.train.config import TrainConfig
from spai_core.config import ConfigError, check_config, from_dict

RANGED = ("loguniform", "uniform", "randint")
LISTED = ("choice", "grid")
# Fields a trial may not sample: the search sets them for every trial, from the scheduler or its own settings.
FIXED_FIELDS = {"epochs": "it is scheduler.max_t", "workers": "set it with --workers-per-trial",
                "gpus_per_worker": "set it with --gpus-per-worker",
                "cpus_per_worker": "it sizes the CPUs reserved per trial; set it in the base config",
                "manifest": "set it with --manifest", "features": "set it with --features",
                "output": "trials run under the search's --output",
                "name": "trials are named by their ids", "init": "set it with --init",
                "backbone_weights": "set it with --backbone", "tracking": "trials are tracked with the search",
                "registered_model": "the search registers its best trial"}


@dataclass
class ParamSpec:
    """One searched field: a range (``low``, ``high``) for loguniform/uniform/randint, or ``values`` for choice/grid."""

    type: str
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    def validate(self) -> None:
        if self.type not in RANGED + LISTED:
            raise ConfigError(f"type {self.type!r} is not one of {RANGED + LISTED}", "type")
        if self.type in LISTED:
            if not self.values or self.low is not None or self.high is not None:
                raise ConfigError(f"a {self.type} takes a non-empty `values` list and no low/high", "values")
            return
        if self.values is not None or self.low is None or self.high is None:
            raise ConfigError(f"a {self.type} takes `low` and `high` and no values", "low")
        if not self.low < self.high:
            raise ConfigError(f"low must be below high, got low={self.low}, high={self.high}", "low")
        if self.type == "loguniform" and self.low <= 0:
            raise ConfigError(f"a loguniform needs low > 0, got {self.low}", "low")
        if self.type == "randint" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ConfigError(f"a randint needs integer low and high, got {self.low}, {self.high}", "low")

    def probes(self) -> list[Any]:
        """Values the distribution can produce that are worth checking against the config: its ends or all values."""
        if self.type == "randint":
            return [int(self.low), int(self.high)]
        return [self.low, self.high] if self.type in RANGED else list(self.values)


@dataclass
class AshaConfig:
    """ASHA on one metric reported every epoch; epochs are its time unit and ``max_t`` every trial's ``epochs``."""

    metric: str = "val_auc"
    mode: str = "max"
    max_t: int = 12
    grace_period: int = 2  # epochs every trial trains before ASHA may stop it
    reduction_factor: float = 2.0  # at each rung, trials below the top 1/reduction_factor of their peers stop

    def validate(self) -> None:
        if self.mode not in ("min", "max"):
            raise ConfigError(f"must be min or max, got {self.mode!r}", "mode")
        if not 1 <= self.grace_period < self.max_t:
            raise ConfigError(f"needs 1 <= grace_period < max_t (else ASHA never stops a trial), got grace_period="
                              f"{self.grace_period}, max_t={self.max_t}", "grace_period")
        if self.reduction_factor <= 1:
            raise ConfigError(f"must be above 1, got {self.reduction_factor}", "reduction_factor")


@dataclass
class SearchSpace:
    """What to search (``params``: dotted config path -> distribution), how to schedule it, and the sampling seed."""

    params: dict[str, ParamSpec] = field(default_factory=dict)
    scheduler: AshaConfig = field(default_factory=AshaConfig)
    seed: int | None = 0  # seeds the sampling, so the same search samples the same trials

    def validate(self) -> None:
        if not self.params:
            raise ConfigError("must map dotted training-config paths to distributions, e.g. "
                              "optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}", "params")
        for path, spec in self.params.items():
            try:
                spec.validate()
            except ConfigError as exc:
                raise ConfigError(str(exc), f"params.{path}.{exc.field}") from None
            if path in FIXED_FIELDS or path.split(".")[0] in FIXED_FIELDS:
                raise ConfigError(f"{path} cannot be searched: {FIXED_FIELDS[path.split('.')[0]]}", f"params.{path}")


def field_type(path: str, cls: type = TrainConfig) -> Any:
    """The annotation of dotted field ``path`` of config dataclass ``cls``; the error lists the fields there."""
    node, done = cls, []
    for part in path.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            where = ".".join(done) or "the training config"
            known = sorted(hints) if hints else []
            raise ConfigError(f"{path!r} is not a training config field; {where} has "
                              f"{known or 'no fields (it is a value)'}", f"params.{path}")
        node = hints[part]
        done.append(part)
    if dataclasses.is_dataclass(node):
        example = f"{path}.{dataclasses.fields(node)[0].name}"
        raise ConfigError(f"{path!r} is a section; search one of its fields, e.g. {example}", f"params.{path}")
    return node


def _is_integer_field(annotation: Any) -> bool:
    """True for ``int`` and ``int | None``: continuous samples would not fit."""
    inner = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return inner[0] is int


def check_space(space: SearchSpace, base: Mapping[str, Any], cls: type = TrainConfig) -> None:
    """Fail early on a space whose keys are not fields of config class ``cls`` or whose distributions can produce an
    invalid trial config around ``base``."""
    for path, spec in space.params.items():
        if _is_integer_field(field_type(path, cls)) and spec.type in ("loguniform", "uniform"):
            raise ConfigError(f"{path} is an integer; use randint, choice or grid, not {spec.type}", f"params.{path}")
        for value in spec.probes():
            try:
                trial_config(base, {path: value}, cls)
            except (ConfigError, ValueError, TypeError) as exc:
                raise ConfigError(f"{path}={value!r} gives an invalid training config: {exc}",
                                  f"params.{path}") from None


def tune_param_space(space: SearchSpace) -> dict[str, Any]:
    """Ray Tune's ``param_space``: one sampler (or grid) per dotted path."""
    from ray import tune

    def sampler(spec: ParamSpec) -> Any:
        if spec.type == "loguniform":
            return tune.loguniform(spec.low, spec.high)
        if spec.type == "uniform":
            return tune.uniform(spec.low, spec.high)
        if spec.type == "randint":
            return tune.randint(int(spec.low), int(spec.high) + 1)  # Tune's upper end is exclusive, ours inclusive
        if spec.type == "choice":
            return tune.choice(spec.values)
        return tune.grid_search(spec.values)

    return {path: sampler(spec) for path, spec in space.params.items()}


def plain(value: Any) -> Any:
    """A sampled value as a plain Python value (Tune samples numpy scalars), so it fits YAML, JSON and MLflow."""
    return value.item() if isinstance(value, np.generic) else value


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any], cls: type = TrainConfig) -> Any:
    """The checked config (of class ``cls``) of one trial: the ``base`` config dict with each dotted ``params`` path
    set."""
    data = copy.deepcopy(dict(base))
    for path, value in params.items():
        *sections, leaf = path.split(".")
        node = data
        for section in sections:
            node = node[section]
        node[leaf] = plain(value)
    return check_config(from_dict(cls, data))
