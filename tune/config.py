"""The config of a search: how many trials and how they run, the search space, and the base training config every
trial starts from. Saved as ``<output>/<name>/config.yaml``; ``spai tune --config`` of that file reruns the search.
How trials run (:class:`TrialsConfig`) is shared with the other jobs whose trials are training runs (``spai
benchmark``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping

from pipelines.fusion.config import FusionTrainConfig
from pipelines.infra.settings import TrackingConfig
from pipelines.train.config import CONFIG_DIR, OFFICIAL_RECIPE, TrainConfig
from spai_core.config import ConfigError, option, read_yaml, section, to_dict
from tune.space import SearchSpace, check_space, trial_config
from tune.trainers import TRAINERS, Trainer

DEFAULT_SPACE = CONFIG_DIR / "search_space.yaml"
FUSION_SPACE = CONFIG_DIR / "fusion_search_space.yaml"  # the default space of a fusion head search


@dataclass
class TrialsConfig:
    """What every job whose trials are ``spai train`` runs shares (``spai tune``, ``spai benchmark``): the data, the
    resources and weights of each trial, where the trials run and are tracked, and the base training config."""

    manifest: str | None = option(None, flag="--manifest", short="-m",
                                  help="manifest path or s3:// URI with train and val rows")
    max_concurrent: int | None = option(None, flag="--max-concurrent",
                                        help="trials running at once (default: as many as the cluster's CPUs/GPUs "
                                        "hold)")
    workers_per_trial: int = option(1, flag="--workers-per-trial", help="Ray Train workers (DDP ranks) per trial")
    gpus_per_worker: float = option(0.0, flag="--gpus-per-worker",
                                    help="GPUs per Ray Train worker of a trial (0: CPU), as in spai train")
    output: str = option("runs/tune", flag="--output", short="-o", help="folder or s3:// URI of the searches")
    name: str | None = option(None, flag="--name", help="search name, its folder under --output (default: generated)")
    init: str | None = option(None, flag="--init", help="every trial starts from these weights: official spai.pth "
                              "or our checkpoint")
    backbone_weights: str | None = option(None, flag="--backbone", help="weights of the model's backbone for every "
                                          "trial (e.g. mfm_pretrain_vit_base.pth for the official recipe's "
                                          "mfm_vit_b16, which needs them)")
    tracking: TrackingConfig = field(default_factory=partial(TrackingConfig, experiment="spai-tune"))
    train: TrainConfig = section(TrainConfig, flags=False)  # set by --config and KEY=VALUE, not spai train's flags

    def validate(self) -> None:
        if self.workers_per_trial < 1:
            raise ConfigError(f"must be at least 1, got {self.workers_per_trial}", "workers_per_trial")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"must be at least 1, got {self.max_concurrent}", "max_concurrent")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"must be 0 or more, got {self.gpus_per_worker}", "gpus_per_worker")
        try:
            trial_config(self.trial_base(self.output), {}, self.trainer_spec.config)
        except ConfigError as exc:
            raise ConfigError(f"the base training config does not fit {self.workers_per_trial} worker(s) per trial "
                              f"and {self.trial_epochs} epochs: {exc}", "workers_per_trial") from None

    @staticmethod
    def base_section(layers: Mapping[str, Any]) -> str:
        """The section of the trials' base config in a config file layer (``KEY=VALUE`` overrides set it)."""
        return "train"

    @property
    def trainer_spec(self) -> Trainer:
        """What the trials are: ``spai train`` runs."""
        return TRAINERS["spai"]

    @property
    def base_config(self) -> Any:
        """The config every trial starts from, of :attr:`trainer_spec`'s class."""
        return self.train

    @property
    def trial_epochs(self) -> int:
        """Epochs every trial trains: the base config's."""
        return self.base_config.epochs

    def trial_base(self, train_dir: str, tracking_uri: str | None = None) -> dict[str, Any]:
        """The training config every trial starts from (as a dict): ``train`` with the job's data, weights,
        resources and tracking, :attr:`trial_epochs`, runs under ``train_dir``, and no model registration (a
        search registers its best trial once)."""
        tracking = {**to_dict(self.tracking), "uri": tracking_uri or self.tracking.uri}
        return {**to_dict(self.train), "manifest": self.manifest, "output": train_dir, "init": self.init,
                "backbone_weights": self.backbone_weights, "epochs": self.trial_epochs,
                "workers": self.workers_per_trial, "gpus_per_worker": self.gpus_per_worker,
                "registered_model": None, "tracking": tracking}

    @property
    def gpus_per_trial(self) -> float:
        return self.workers_per_trial * self.gpus_per_worker


@dataclass
class TuneConfig(TrialsConfig):
    """A search of ``trials`` samples of ``space`` around a base config: ``train`` (each trial a ``spai train``
    run), or ``fusion`` with ``trainer: fusion`` (each trial a ``spai fusion train`` run on the ``features`` table)."""

    trials: int = option(8, flag="--trials", help="number of trials to sample (a grid: repeats of it)")
    # what every trial trains (tune.trainers): spai, or fusion when --config is a `spai fusion train` recipe
    trainer: str = "spai"
    features: str | None = option(None, flag="--features", help="feature table of `spai fusion extract` (fusion "
                                  "trials)")
    fusion: FusionTrainConfig = section(FusionTrainConfig, flags=False)  # base config of fusion trials
    space: SearchSpace = section(SearchSpace, flags=False)

    def validate(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"must be at least 1, got {self.trials}", "trials")
        if self.trainer not in TRAINERS:
            raise ConfigError(f"must be one of {', '.join(TRAINERS)}, got {self.trainer!r}", "trainer")
        if self.trainer == "fusion":
            if self.init or self.backbone_weights:
                raise ConfigError("fusion trials train a head on frozen features; --init and --backbone do not "
                                  "apply", "init")
            if self.manifest:
                raise ConfigError("fusion trials read a feature table: pass --features (the folder of `spai fusion "
                                  "extract`), not --manifest", "manifest")
        elif self.features:
            raise ConfigError("--features is for a fusion head search: pass a `spai fusion train` recipe "
                              "(configs/fusion.yaml) as --config", "features")
        super().validate()
        try:
            check_space(self.space, self.trial_base(self.output), self.trainer_spec.config)
        except ConfigError as exc:
            raise ConfigError(str(exc), f"space.{exc.field}") from None

    @staticmethod
    def base_section(layers: Mapping[str, Any]) -> str:
        return "fusion" if layers.get("trainer") == "fusion" else "train"

    @property
    def trainer_spec(self) -> Trainer:
        return TRAINERS[self.trainer]

    @property
    def base_config(self) -> Any:
        return self.fusion if self.trainer == "fusion" else self.train

    def trial_base(self, train_dir: str, tracking_uri: str | None = None) -> dict[str, Any]:
        if self.trainer != "fusion":
            return super().trial_base(train_dir, tracking_uri)
        tracking = {**to_dict(self.tracking), "uri": tracking_uri or self.tracking.uri}
        return {**to_dict(self.fusion), "features": self.features, "output": train_dir, "epochs": self.trial_epochs,
                "workers": self.workers_per_trial, "gpus_per_worker": self.gpus_per_worker,
                "registered_model": None, "tracking": tracking}

    @property
    def trial_epochs(self) -> int:
        """ASHA's ``max_t``: a trial that no rung stops trains that long."""
        return self.space.scheduler.max_t


def trial_layers(config: str | None) -> dict[str, Any]:
    """The config file layer of a job whose trials are training runs, from ``--config``: either a saved config of the
    job (it has a ``train`` section) or a training config, which becomes the base of every trial (default: the
    official recipe)."""
    data = read_yaml(config) if config else {}
    return data if "train" in data else {"train": data if config else read_yaml(OFFICIAL_RECIPE)}


def search_layers(config: str | None, space: str | None) -> dict[str, Any]:
    """The config file layer of a search from ``--config`` and ``--space``.

    ``--config`` is either a saved search config (it has a ``train`` section) or a training config, which becomes the
    base of every trial (default: the official recipe); a fusion head config (it has a ``head`` section) makes a
    fusion search. ``--space`` replaces the search space (default: ``configs/search_space.yaml``, or
    ``configs/fusion_search_space.yaml`` for a fusion recipe, unless a saved search brings its own).
    """
    data = trial_layers(config)
    if "head" in data["train"]:  # a `spai fusion train` config
        data = {"trainer": "fusion", "fusion": data["train"]}
    if space or "space" not in data:
        data["space"] = read_yaml(space or (FUSION_SPACE if data.get("trainer") == "fusion" else DEFAULT_SPACE),
                                  "search space")
    return data
