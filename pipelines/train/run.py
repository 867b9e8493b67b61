"""``spai train``'s driver: check everything that can be checked before Ray starts, run ``TorchTrainer.fit``, export
the best and the last epoch's weights, and record the run in MLflow (unless ``tracking.enabled`` is off)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.data.manifest import read_manifest, split_rows
from pipelines.infra import storage, tracking
from pipelines.infra.resume import check_resumable
from pipelines.infra.runtime import ClusterError, local_capacity
from pipelines.train import files
from pipelines.train.config import TrainConfig
from pipelines.train.epochs import best_of
from pipelines.train.loop import LoopInputs, train_loop
from pipelines.train.model import initial_model
from spai_core.config import ConfigError, check_config, dump_config, field_flag, to_dict
from spai_core.errors import UserError

logger = logging.getLogger(__name__)

# What a resumed run may change: its length and how it runs, not what it learns from or how (that would make its
# checkpoints and its MLflow record describe another run). More epochs re-plan the learning-rate schedule. Where it
# is tracked and found (output, name, tracking) is checked on its own.
RESUMABLE_CHANGES = ("epochs", "patience", "progress_every_s", "max_failures", "keep_checkpoints", "workers",
                     "gpus_per_worker", "cpus_per_worker", "output", "name", "tracking")
DATA_CPUS = 2  # CPU slots a local Ray keeps beyond the workers' for the Ray Data decode tasks that feed them


class TrainingDataError(UserError, RuntimeError):
    """Every training image of an epoch failed, so the run has nothing worth exporting or registering."""


@dataclass
class TrainResult:
    run_dir: str
    best_checkpoint: str | None  # our .safetensors of the best epoch by val AUC
    best_metrics: dict[str, Any]
    mlflow_run_id: str | None  # None when the run was not tracked
    tracking_uri: str | None
    last_checkpoint: str | None = None  # our .safetensors of the last epoch trained


@dataclass
class Tracked:
    """Where a run is recorded in MLflow; both None when it is not."""

    uri: str | None = None
    run_id: str | None = None

    def ended_on_error(self):
        return tracking.ended_on_error(self.uri, self.run_id) if self.run_id else contextlib.nullcontext()


def run_dir_of(cfg: TrainConfig) -> str:
    return storage.join(cfg.output, cfg.name)


def saved_config(output: str, name: str) -> dict[str, Any]:
    """The config a run was started with (its ``config.yaml``): what ``spai train --resume`` starts from."""
    import yaml

    uri = storage.join(storage.absolute(output), name, files.CONFIG)
    options = storage.StorageOptions.from_env()
    if not storage.exists(uri, options):
        raise FileNotFoundError(f"nothing to resume at {storage.parent(uri)}; check --output and --name")
    return yaml.safe_load(storage.read_bytes(uri, options)) or {}


def resolved(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` checked, with absolute paths (workers of a cluster run in other folders, a resume may run elsewhere)
    and a run name."""
    check_config(cfg)
    if not cfg.manifest:
        raise ConfigError(f"{field_flag(TrainConfig, 'manifest')} (manifest): no manifest given; pass the manifest "
                          "(a path or s3:// URI) with train and val rows")
    absolute = {k: storage.absolute(getattr(cfg, k)) for k in ("manifest", "output", "init", "backbone_weights")
                if getattr(cfg, k)}
    return dataclasses.replace(cfg, **absolute, name=cfg.name or time.strftime("spai-%Y%m%d-%H%M%S"))


def check_splits(manifest: pa.Table, cfg: TrainConfig) -> list[str]:
    """Refuse a manifest whose train split cannot make one batch of both classes; warn when val AUC is undefined."""
    def labels(split: str) -> tuple[int, set[int]]:
        rows = split_rows(manifest, split)
        return rows.num_rows, set(rows.column("label").drop_null().to_pylist())

    (train, train_labels), (val, val_labels) = labels("train"), labels("val")
    per_worker = train // cfg.workers
    if per_worker < cfg.per_worker_batch:  # each worker drops its last incomplete batch
        fix = (f"lower batch_size, e.g. batch_size={per_worker * cfg.workers}, or add training images" if per_worker
               else "add training images or use fewer workers")
        raise ConfigError(f"the manifest's train split has {train} image(s), less than one batch of batch_size="
                          f"{cfg.batch_size} over {cfg.workers} worker(s); {fix}")
    if train_labels != {0, 1}:
        raise ConfigError(f"the manifest's train split has labels {sorted(train_labels)}; a detector learns from "
                          "both real (0) and AI-generated (1) images: rebuild the manifest with both")
    if val_labels != {0, 1}:
        return [f"the val split has {val} image(s) with labels {sorted(val_labels)}, so val AUC is undefined: "
                "patience never stops the run early, and the last epoch is exported as the best; rebuild the "
                "manifest with real and AI-generated images in val to select epochs by val AUC"]
    return []


def check_local_resources(cfg: TrainConfig) -> None:
    """Refuse workers that a local Ray cannot hold: it would start them all (one process each, however few cores)
    or wait forever for GPUs it lacks. A cluster (``RAY_ADDRESS``) may add nodes, so there its autoscaler waits."""
    capacity = local_capacity()
    if capacity is None:
        return
    cores, gpus = capacity
    cpus = cfg.workers * cfg.cpus_per_worker
    if cpus > cores:
        most = max(1, int(cores // cfg.cpus_per_worker))
        raise ClusterError(f"--workers {cfg.workers} x cpus_per_worker {cfg.cpus_per_worker:g} needs {cpus:g} CPUs, "
                           f"but this machine has {cores}; use --workers {most} or fewer, or set RAY_ADDRESS to a Ray "
                           "cluster with more")
    if cfg.workers * cfg.gpus_per_worker > gpus:
        raise ClusterError(f"--workers {cfg.workers} --gpus-per-worker {cfg.gpus_per_worker:g} needs "
                           f"{cfg.workers * cfg.gpus_per_worker:g} GPU(s), but this machine has {gpus}; ask for "
                           "fewer, --gpus-per-worker 0 to train on CPU, or set RAY_ADDRESS to a Ray cluster with GPUs")


def preflight(cfg: TrainConfig, resume: bool, options: storage.StorageOptions) -> dict[str, Any] | None:
    """Every check that needs no Ray, in the order a user would fix them; returns the run's record on a resume."""
    run_dir = run_dir_of(cfg)
    marker = storage.join(run_dir, files.RUN_MARKER)
    recorded = None
    if resume:
        if not storage.exists(marker, options):
            raise FileNotFoundError(f"nothing to resume at {run_dir}; check --output and --name")
        recorded = json.loads(storage.read_bytes(marker, options))
        check_resumable(recorded["config"], to_dict(cfg), RESUMABLE_CHANGES, f"run {cfg.name}",
                        f"Drop those changes (a resume may change only {', '.join(RESUMABLE_CHANGES)}) or start a new "
                        "run with another --name")
    elif storage.exists(marker, options):
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name")
    for warning in check_splits(read_manifest(cfg.manifest, options), cfg):
        logger.warning(warning)
    if cfg.init or cfg.backbone_weights:  # a wrong file fails here once, not in every worker (and retry) later
        initial_model(cfg)
    check_local_resources(cfg)
    return recorded


def start_tracking(cfg: TrainConfig, recorded: dict[str, Any] | None, parent_run_id: str | None) -> Tracked:
    """The run's MLflow record: a new run, or the one a resumed run was tracked in (which must still exist)."""
    if not cfg.tracking.enabled:
        return Tracked()
    if recorded is None:
        uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
        params = {k: v for k, v in to_dict(cfg).items() if k != "tracking"}
        return Tracked(uri, tracking.start_run(uri, cfg.tracking.experiment, cfg.name, params,
                                               {"manifest": cfg.manifest, "output": run_dir_of(cfg)}, parent_run_id))
    # The run continues in the store it started in (unless told otherwise): resolved afresh, the default store is
    # ./mlruns of the current folder, which does not hold the run when resuming from anywhere else.
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri or recorded.get("tracking_uri"))
    run_id = recorded["mlflow_run_id"]
    if run_id:
        tracking.require_run(uri, run_id, f"{run_dir_of(cfg)} was tracked as MLflow run {run_id}")
    return Tracked(uri if run_id else None, run_id)


def run_training(cfg: TrainConfig, resume: bool = False, callbacks: list | None = None,
                 parent_run_id: str | None = None) -> TrainResult:
    """Run ``TorchTrainer.fit`` for ``cfg`` (or continue it, ``resume``) and export the best checkpoint; the library
    entry of ``spai train``. ``callbacks`` and ``parent_run_id`` are for ``spai tune``, whose trials are runs."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.infra.runtime import check_gpus, init_ray

    options = storage.StorageOptions.from_env()
    cfg = resolved(cfg)
    recorded = preflight(cfg, resume, options)
    # a resume's MLflow store must hold the run before Ray starts; a new run is recorded once Ray is up
    tracked = start_tracking(cfg, recorded, parent_run_id) if recorded else None
    init_ray(reserved_cpus=cfg.workers * cfg.cpus_per_worker)
    if cfg.gpus_per_worker:  # on a cluster: says that it waits for GPU nodes
        check_gpus(cfg.workers * cfg.gpus_per_worker, f"--workers {cfg.workers} --gpus-per-worker "
                   f"{cfg.gpus_per_worker:g}")
    tracked = tracked or start_tracking(cfg, None, parent_run_id)
    run_dir = run_dir_of(cfg)
    data_error_uri = storage.join(run_dir, files.DATA_ERROR)  # written by rank 0 when an epoch had nothing to train
    with tracked.ended_on_error():  # e.g. a missing output bucket: the run must not stay RUNNING
        record_run(cfg, tracked, options)
        if storage.exists(data_error_uri, options):  # a resumed run may have been fixed since
            storage.Files(options).remove(data_error_uri)
    inputs = LoopInputs(to_dict(cfg), dataclasses.asdict(options), tracked.run_id, tracked.uri, data_error_uri)
    trainer = TorchTrainer(train_loop, train_loop_config=dataclasses.asdict(inputs),
                           scaling_config=scaling(cfg), run_config=run_config(cfg, callbacks, options))
    with tracked.ended_on_error():
        try:
            result = trainer.fit()
        except SystemExit as exc:
            # Ray Train's own Ctrl-C handler aborts the run and then leaves fit() with SystemExit(1): an interruption,
            # which the CLI answers with how to resume
            raise KeyboardInterrupt from exc
        if storage.exists(data_error_uri, options):
            raise TrainingDataError(storage.read_bytes(data_error_uri, options).decode())
    return export_weights(result, run_dir, cfg, options, tracked)


def record_run(cfg: TrainConfig, tracked: Tracked, options: storage.StorageOptions) -> None:
    """The run's marker (what --resume reads) and its config (what --config reruns). Rewritten on resume too: a resume
    may change the epochs (see RESUMABLE_CHANGES), and the record must say so."""
    run_dir = run_dir_of(cfg)
    marker = {"mlflow_run_id": tracked.run_id, "tracking_uri": tracked.uri, "config": to_dict(cfg)}
    storage.write_bytes(storage.join(run_dir, files.RUN_MARKER), json.dumps(marker).encode(), options)
    storage.write_bytes(storage.join(run_dir, files.CONFIG), dump_config(cfg).encode(), options)


def scaling(cfg: TrainConfig):
    import ray.train

    gpus = {"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {}
    return ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                   resources_per_worker={"CPU": cfg.cpus_per_worker, **gpus})


def run_config(cfg: TrainConfig, callbacks: list | None, options: storage.StorageOptions):
    import ray.train

    fs, storage_path = storage.filesystem(cfg.output, options)
    return ray.train.RunConfig(
        name=cfg.name, storage_path=storage_path, storage_filesystem=fs if storage.is_s3(cfg.output) else None,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                     checkpoint_score_attribute="val_auc",
                                                     checkpoint_score_order="max"),
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        # INFO echoes every report's whole metrics dict and each checkpoint's path; the epoch lines say it shorter
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        callbacks=callbacks or None)


def _copy_weights(checkpoint, uri: str, options: storage.StorageOptions) -> bytes:
    """Write a Ray checkpoint's weights to ``uri``; returns their bytes."""
    with checkpoint.as_directory() as directory:
        weights = Path(directory, files.CHECKPOINT_WEIGHTS).read_bytes()
    storage.write_bytes(uri, weights, options)
    return weights


def export_weights(result, run_dir: str, cfg: TrainConfig, options: storage.StorageOptions,
                   tracked: Tracked) -> TrainResult:
    """Copy the best and the last checkpoint's weights to ``<run>/{best,last}.safetensors``; log and register the best
    in MLflow. On a small validation set the best epoch is a noisy pick, and the last one is where training ended."""
    ranked = [(m, c) for c, m in (result.best_checkpoints or []) if not math.isnan(m.get("val_auc", float("nan")))]
    if not ranked and result.checkpoint is not None:
        ranked = [(result.metrics or {}, result.checkpoint)]
    if not ranked:  # no epoch ended with a checkpoint: nothing to export, and the MLflow run must not stay RUNNING
        if tracked.run_id:
            tracking.finish_run(tracked.uri, tracked.run_id, "FAILED")
        return TrainResult(run_dir, None, {}, tracked.run_id, tracked.uri)
    best_metrics, best = best_of(ranked)
    best_uri = storage.join(run_dir, files.BEST_WEIGHTS)
    weights = _copy_weights(best, best_uri, options)
    last_uri = storage.join(run_dir, files.LAST_WEIGHTS) if result.checkpoint is not None else None
    if last_uri:
        _copy_weights(result.checkpoint, last_uri, options)
    if tracked.run_id:
        log_best(weights, best_metrics, run_dir, cfg, tracked)
    return TrainResult(run_dir, best_uri, dict(best_metrics), tracked.run_id, tracked.uri, last_uri)


def log_best(weights: bytes, best_metrics: dict[str, Any], run_dir: str, cfg: TrainConfig, tracked: Tracked) -> None:
    """Log the best weights and their val metrics on the run, register them, and end the run."""
    try:
        version = tracking.log_weights(tracked.uri, tracked.run_id, weights, files.BEST_WEIGHTS, cfg.registered_model)
        if version:
            logger.info(f"[spai train] registered {cfg.registered_model} version {version}")
        tracking.log_metrics(tracked.uri, tracked.run_id, {f"best_{k}": v for k, v in best_metrics.items()
                                                           if k.startswith("val_")}, step=int(best_metrics["epoch"]))
        tracking.finish_run(tracked.uri, tracked.run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow's own error type varies with the store
        raise tracking.TrackingError(
            f"training finished and its weights are in {run_dir} ({files.BEST_WEIGHTS}, {files.LAST_WEIGHTS}), but "
            f"MLflow at {tracked.uri} did not take them ({type(exc).__name__}: {str(exc)[:300]}); once it is "
            "reachable, run the same command with --resume to log and register them") from exc
