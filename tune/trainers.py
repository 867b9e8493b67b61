"""What a search's trials are: ``spai train`` runs or ``spai fusion train`` runs (a Sem-SPAI head on a feature table).

A :class:`Trainer` names the config class every sampled trial is checked against, the run function a trial calls,
the field that holds its data, and the checks a search runs before Ray starts; the search, ASHA, MLflow and the
report are the same for both."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from pipelines.infra import storage


@dataclass(frozen=True)
class Trainer:
    name: str
    config: type  # the config class of one trial
    command: str  # the command that runs one trial's config (best_config.yaml says so)
    data: str  # the config field holding the trial's data, set with the flag ``--<data>``
    run: Callable[[Any, str | None, list], Any]  # (cfg, parent MLflow run id, callbacks) -> result
    metric_rows: Callable[[str, storage.StorageOptions], pa.Table]  # rows with split, label, generator
    check: Callable[[Any, storage.StorageOptions], None]  # one trial's config loads its weights or head


def _run_spai(cfg, parent_run_id: str | None, callbacks: list):
    from pipelines.train import files
    from pipelines.train.run import run_training

    # a trial restarted by a resumed search finds its Train run and continues it from its last checkpoint
    resume = storage.exists(storage.join(cfg.output, cfg.name, files.RUN_MARKER))
    return run_training(cfg, resume=resume, callbacks=callbacks, parent_run_id=parent_run_id)


def _spai_rows(manifest: str, options: storage.StorageOptions) -> pa.Table:
    from pipelines.data.manifest import read_manifest

    return read_manifest(manifest, options)


def _check_spai(cfg, options: storage.StorageOptions) -> None:
    from pipelines.train.model import initial_model

    if cfg.init or cfg.backbone_weights:  # a wrong file fails here, not in every trial
        initial_model(cfg)


def _run_fusion(cfg, parent_run_id: str | None, callbacks: list):
    from pipelines.fusion.run import run_fusion

    return run_fusion(cfg, callbacks=callbacks, parent_run_id=parent_run_id)


def _feature_rows(features: str, options: storage.StorageOptions) -> pa.Table:
    from pipelines.features.job import read_info
    from pipelines.fusion.run import usable_rows

    read_info(features, options)  # a folder without a finished table fails with what to run
    return usable_rows(features, options, ("split", "label", "generator"))


def _check_fusion(cfg, options: storage.StorageOptions) -> None:
    from pipelines.features.job import read_info
    from pipelines.fusion.run import head_config, usable_rows
    from pipelines.train.run import check_splits

    head_config(cfg, read_info(cfg.features, options))  # a head that cannot be built fails before any trial
    check_splits(usable_rows(cfg.features, options), cfg)  # so does a train split smaller than one batch


def _trainers() -> dict[str, Trainer]:
    from pipelines.fusion.config import FusionTrainConfig
    from pipelines.train.config import TrainConfig

    return {t.name: t for t in (
        Trainer("spai", TrainConfig, "spai train", "manifest", _run_spai, _spai_rows, _check_spai),
        Trainer("fusion", FusionTrainConfig, "spai fusion train", "features", _run_fusion, _feature_rows,
                _check_fusion))}


TRAINERS = _trainers()
