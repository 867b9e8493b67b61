"""Search spaces of ``spai tune``: distributions over training-config fields, and the ASHA settings, from YAML.

A space file (``configs/search_space.yaml`` is the default) looks like::

    seed: 0
    scheduler: {metric: val_auc, mode: max, max_t: 12, grace_period: 2, reduction_factor: 2}
    params:
      optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
      model.mask_radius: {type: randint, low: 8, high: 32}

Every key of ``params`` must be a field of :class:`pipelines.train.job.TrainConfig`, and every value its distribution can
produce must give a valid config; both are checked when the space is loaded, so a typo fails before any trial runs.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipelines.train.job import TrainConfig
from spai_core.config import ConfigError, from_dict, read_yaml

RANGED = ("loguniform", "uniform", "randint")
LISTED = ("choice", "grid")
# Fields a trial may not sample: they are set for every trial from the scheduler or the command line.
FIXED_FIELDS = {"epochs": "it is scheduler.max_t", "workers": "set it with --workers-per-trial",
                "gpus_per_worker": "set it with --gpus-per-trial",
                "cpus_per_worker": "it sizes the CPUs reserved per trial; set it in the base config"}


@dataclass
class ParamSpec:
    """One searched field: a range (``low``, ``high``) for loguniform/uniform/randint, or ``values`` for choice/grid."""

    type: str
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    def __post_init__(self) -> None:
        if self.type not in RANGED + LISTED:
            raise ConfigError(f"type {self.type!r} is not one of {RANGED + LISTED}")
        if self.type in LISTED:
            if not self.values or self.low is not None or self.high is not None:
                raise ConfigError(f"a {self.type} takes a non-empty `values` list and no low/high")
            return
        if self.values is not None or self.low is None or self.high is None:
            raise ConfigError(f"a {self.type} takes `low` and `high` and no values")
        if not self.low < self.high:
            raise ConfigError(f"low must be below high, got low={self.low}, high={self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ConfigError(f"a loguniform needs low > 0, got {self.low}")
        if self.type == "randint" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ConfigError(f"a randint needs integer low and high, got {self.low}, {self.high}")

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

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ConfigError(f"scheduler.mode must be min or max, got {self.mode!r}")
        if not 1 <= self.grace_period < self.max_t:
            raise ConfigError(f"scheduler needs 1 <= grace_period < max_t (else ASHA never stops a trial), got "
                              f"grace_period={self.grace_period}, max_t={self.max_t}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"scheduler.reduction_factor must be above 1, got {self.reduction_factor}")


@dataclass
class SearchSpace:
    """What to search (``params``: dotted config path -> distribution), how to schedule it, and the sampling seed."""

    params: dict[str, ParamSpec]
    scheduler: AshaConfig = field(default_factory=AshaConfig)
    seed: int | None = 0


def space_from_dict(data: Mapping[str, Any], where: str = "search space") -> SearchSpace:
    """Build a :class:`SearchSpace` from its YAML/JSON form, naming the offending entry on any error."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with params, scheduler and seed")
    unknown = sorted(set(data) - {"params", "scheduler", "seed"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a space has params, scheduler and seed")
    params = data.get("params")
    if not isinstance(params, Mapping) or not params:
        raise ConfigError(f"{where}: `params` must map dotted config paths to distributions, e.g. "
                          "optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}")
    specs = {}
    for path, spec in params.items():
        try:
            specs[path] = from_dict(ParamSpec, spec if isinstance(spec, Mapping) else {"type": spec},
                                    f"{where}: params.{path}")
        except ConfigError as exc:
            raise ConfigError(f"{where}: params.{path}: {exc}") from None
    scheduler = from_dict(AshaConfig, data.get("scheduler") or {}, f"{where}: scheduler")
    seed = data.get("seed", 0)
    return SearchSpace(specs, scheduler, None if seed is None else int(seed))


def load_space(path: str | Path) -> SearchSpace:
    """Read a search space YAML file."""
    return space_from_dict(read_yaml(path, "search space"), str(path))


def field_type(path: str, cls: type = TrainConfig) -> Any:
    """The annotation of dotted field ``path`` of config dataclass ``cls``; the error lists the fields there."""
    node, done = cls, []
    for part in path.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            where = ".".join(done) or "the training config"
            known = sorted(hints) if hints else []
            raise ConfigError(f"search space: {path!r} is not a training config field; {where} has "
                              f"{known or 'no fields (it is a value)'}")
        node = hints[part]
        done.append(part)
    if dataclasses.is_dataclass(node):
        example = f"{path}.{dataclasses.fields(node)[0].name}"
        raise ConfigError(f"search space: {path!r} is a section; search one of its fields, e.g. {example}")
    return node


def _is_integer_field(annotation: Any) -> bool:
    """True for ``int`` and ``int | None``: continuous samples would not fit."""
    inner = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return inner[0] is int


def check_space(space: SearchSpace, base: Mapping[str, Any]) -> None:
    """Fail early on a space that names unknown or fixed fields, or that can produce an invalid trial config."""
    for path, spec in space.params.items():
        if path in FIXED_FIELDS:
            raise ConfigError(f"search space: {path} cannot be searched: {FIXED_FIELDS[path]}")
        if _is_integer_field(field_type(path)) and spec.type in ("loguniform", "uniform"):
            raise ConfigError(f"search space: {path} is an integer; use randint, choice or grid, not {spec.type}")
        for value in spec.probes():
            try:
                trial_config(base, {path: value})
            except (ConfigError, ValueError, TypeError) as exc:
                raise ConfigError(f"search space: {path}={value!r} gives an invalid training config: {exc}") from None


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


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> TrainConfig:
    """The training config of one trial: the ``base`` config dict with each dotted ``params`` path set."""
    data = copy.deepcopy(dict(base))
    for path, value in params.items():
        *sections, leaf = path.split(".")
        node = data
        for section in sections:
            node = node[section]
        node[leaf] = plain(value)
    return from_dict(TrainConfig, data)

