"""``spai fusion train``'s driver: check the feature table and the head before Ray starts, run ``TorchTrainer.fit``
on the table's train/val splits, and write the best epoch's head with the frozen models it was trained on as ONE
fused checkpoint (``<run>/best.safetensors``), logged and registered in MLflow."""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipelines.features.job import TABLE, FeaturesError, read_info
from pipelines.fusion.config import FusionTrainConfig
from pipelines.fusion.loop import COLUMNS, HEAD_STATE, LoopInputs, train_loop
from pipelines.infra import storage, tracking
from pipelines.score.inputs import local_weights
from pipelines.train import files
from pipelines.train.epochs import best_of
from pipelines.train.run import Tracked, check_local_resources, check_splits, record_run, run_config, scaling
from spai_core.config import check_config, from_dict, to_dict
from spai_core.fusion import FusionConfig, build_fused, build_head, save_fused
from spai_core.semantic import SemanticConfig

logger = logging.getLogger(__name__)


@dataclass
class FusionResult:
    run_dir: str
    best_checkpoint: str | None  # the fused detector of the best epoch by val AUC
    best_metrics: dict[str, Any]
    mlflow_run_id: str | None
    tracking_uri: str | None


def resolved(cfg: FusionTrainConfig) -> FusionTrainConfig:
    check_config(cfg)
    if not cfg.features:
        raise FeaturesError("FEATURES: no feature table given; pass the folder `spai fusion extract` wrote")
    return dataclasses.replace(cfg, features=storage.absolute(cfg.features), output=storage.absolute(cfg.output),
                               name=cfg.name or time.strftime("fusion-%Y%m%d-%H%M%S"))


def head_config(cfg: FusionTrainConfig, info: dict[str, Any]) -> FusionConfig:
    """``cfg.head`` with the table's feature widths; built once here, so a bad head fails before Ray starts."""
    head = dataclasses.replace(cfg.head, spectral_dim=info["spectral_dim"], semantic_dim=info["semantic_dim"])
    build_head(head, head.spectral_dim, head.semantic_dim)
    return head


def usable_rows(features: str, options: storage.StorageOptions, columns: tuple[str, ...] = ("split", "label")) -> Any:
    """The table's rows with features (no ``error``), ``columns`` only (``split`` and ``label``: what the split
    checks read)."""
    fs, path = storage.Files(options).resolve(storage.join(features, TABLE))
    table = pq.read_table(path, filesystem=fs, columns=[*columns, "error"])
    return table.filter(pc.is_null(table.column("error"))).drop_columns(["error"])


def datasets(features: str, options: storage.StorageOptions) -> dict[str, Any]:
    """The train and val splits of the table as Ray Datasets, read and filtered by Ray tasks."""
    import ray.data
    from ray.data.expressions import col

    fs, path = storage.Files(options).resolve(storage.join(features, TABLE))
    table = ray.data.read_parquet(path, filesystem=fs).select_columns([*COLUMNS, "split", "error"])
    table.context.enable_progress_bars = False  # the epoch lines say how training goes
    # materialized (in the object store, not on the driver): every epoch then iterates blocks instead of
    # re-reading and re-filtering the Parquet files
    return {split: table.filter(expr=col("error").is_null() & (col("split") == split)).select_columns(COLUMNS)
            .materialize() for split in ("train", "val")}


def run_fusion(cfg: FusionTrainConfig, callbacks: list | None = None,
               parent_run_id: str | None = None) -> FusionResult:
    """Train the head ``cfg`` describes and write the fused checkpoint; the library entry of ``spai fusion train``.
    ``callbacks`` and ``parent_run_id`` are for ``spai tune``, whose trials are runs."""
    from ray.train.torch import TorchTrainer

    from pipelines.infra.runtime import init_ray

    options = storage.StorageOptions.from_env()
    cfg = resolved(cfg)
    run_dir = storage.join(cfg.output, cfg.name)
    if storage.exists(storage.join(run_dir, files.CONFIG), options):
        raise FileExistsError(f"{run_dir} already holds a run; choose another --name")
    info = read_info(cfg.features, options)
    head = head_config(cfg, info)
    rows = usable_rows(cfg.features, options)
    for warning in check_splits(rows, cfg):
        logger.warning(warning)
    check_local_resources(cfg)
    init_ray(reserved_cpus=cfg.workers * cfg.cpus_per_worker)
    tracked = start_tracking(cfg, head, parent_run_id)
    with tracked.ended_on_error():
        record_run(cfg, tracked, options)  # its config, and the marker naming its MLflow run (what spai tune reads)
        train_rows = int(pc.sum(pc.equal(rows.column("split"), "train")).as_py() or 0)
        logger.info(f"[spai fusion] {cfg.head.kind} head on {train_rows} train rows of {cfg.features} "
                    f"({info['spectral_dim']}-d spectral, {info['semantic_dim']}-d semantic)")
        inputs = LoopInputs(to_dict(cfg), to_dict(head), train_rows, tracked.run_id, tracked.uri)
        trainer = TorchTrainer(train_loop, train_loop_config=dataclasses.asdict(inputs),
                               datasets=datasets(cfg.features, options), scaling_config=scaling(cfg),
                               run_config=run_config(cfg, callbacks, options))
        try:
            result = trainer.fit()
        except SystemExit as exc:  # Ray Train's Ctrl-C handler (see pipelines.train.run)
            raise KeyboardInterrupt from exc
        return export_fused(result, run_dir, cfg, info, head, tracked, options)


def start_tracking(cfg: FusionTrainConfig, head: FusionConfig, parent_run_id: str | None) -> Tracked:
    if not cfg.tracking.enabled:
        return Tracked()
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    params = {**{k: v for k, v in to_dict(cfg).items() if k != "tracking"}, "head": to_dict(head)}
    return Tracked(uri, tracking.start_run(uri, cfg.tracking.experiment, cfg.name, params,
                                           {"features": cfg.features, "output": storage.join(cfg.output, cfg.name)},
                                           parent_run_id))


def export_fused(result, run_dir: str, cfg: FusionTrainConfig, info: dict[str, Any], head_cfg: FusionConfig,
                 tracked: Tracked, options: storage.StorageOptions) -> FusionResult:
    """The best epoch's head with the table's frozen models as ``<run>/best.safetensors``; logged in MLflow."""
    ranked = [(m, c) for c, m in (result.best_checkpoints or []) if m.get("val_auc") == m.get("val_auc")]
    if not ranked and result.checkpoint is not None:  # no val AUC (one class in val): the last epoch
        ranked = [(result.metrics or {}, result.checkpoint)]
    if not ranked:
        if tracked.run_id:
            tracking.finish_run(tracked.uri, tracked.run_id, "FAILED")
        return FusionResult(run_dir, None, {}, tracked.run_id, tracked.uri)
    metrics, checkpoint = best_of(ranked)
    head = build_head(head_cfg, head_cfg.spectral_dim, head_cfg.semantic_dim)
    with checkpoint.as_directory() as directory:
        head.load_state_dict(torch.load(os.path.join(directory, HEAD_STATE), map_location="cpu",
                                        weights_only=True)["head"])
    with local_weights(info["weights"], options) as spai_weights:
        model = build_fused(spai_weights, from_dict(SemanticConfig, info["semantic"]), head)
    clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, files.BEST_WEIGHTS)
        save_fused(local, model, {"epoch": int(metrics["epoch"]), "metrics": clean, "run": cfg.name,
                                  "mlflow_run_id": tracked.run_id, "features": cfg.features,
                                  "fusion_train_config": to_dict(cfg)}, features=info["identity"])
        weights = local.read_bytes()
    best_uri = storage.join(run_dir, files.BEST_WEIGHTS)
    storage.write_bytes(best_uri, weights, options)
    if tracked.run_id:
        version = tracking.log_weights(tracked.uri, tracked.run_id, weights, files.BEST_WEIGHTS,
                                       cfg.registered_model)
        if version:
            logger.info(f"[spai fusion] registered {cfg.registered_model} version {version}")
        tracking.log_metrics(tracked.uri, tracked.run_id, {f"best_{k}": v for k, v in clean.items()
                                                           if k.startswith("val_")}, step=int(metrics["epoch"]))
        tracking.finish_run(tracked.uri, tracked.run_id)
    return FusionResult(run_dir, best_uri, dict(metrics), tracked.run_id, tracked.uri)
