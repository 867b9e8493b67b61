"""``spai fusion extract``: SPAI's spectral feature and logit (native resolution) and a semantic encoder's feature
(224 px) of every manifest row, extracted once into a Parquet table for head training (``spai fusion train``).

It is :mod:`pipelines.rowjob` (the runner ``spai score`` uses) with :class:`FeatureExtractor` actors: rows are read,
decoded and written by Ray workers, a rerun finds the rows done, and an image that fails is a row with its
``error``. The folder holds:

* ``features.parquet``: ``row_id``, the manifest's columns (``uri``, ``label``, ``generator``, ``split``, ...),
  ``spectral`` (float32[F]), ``spai_logit``, ``semantic`` (float32[D]) and ``error`` (null when extracted);
* ``features.json``: the frozen models' identity (names, widths, weight fingerprints), which
  :func:`spai_core.fusion.save_fused` checks, and the counts; ``config.yaml``: the job (``--config`` reruns it);
* ``parts/``: the results as the workers wrote them, what a rerun resumes from (a rerun of a finished job finds
  every row done and writes nothing); the table is their compaction, so ``parts/`` may be deleted once it is done.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines import rowjob
from pipelines.infra import storage
from pipelines.infra.resume import check_resumable
from pipelines.score.inputs import local_weights
from pipelines.features.config import FeaturesConfig
from spai_core.config import check_config, dump_config, from_dict, to_dict
from spai_core.errors import UserError
from spai_core.fusion import FusedDetector
from spai_core.semantic import SemanticConfig

logger = logging.getLogger(__name__)

TABLE = "features.parquet"
INFO = "features.json"
CONFIG = "config.yaml"
PARTS = "parts"
# how the job runs, not what it extracts: a resume may change these
RESUMABLE_CHANGES = ("device", "batch_size", "workers", "cpus_per_worker", "feature_batch", "part_rows", "output")


class FeaturesError(UserError, RuntimeError):
    """A feature table that cannot be made or read; the message says what to do."""


def result_schema(spectral_dim: int, semantic_dim: int) -> pa.Schema:
    return pa.schema([("row_id", pa.string()), ("variant", pa.string()),
                      ("spectral", pa.list_(pa.float32(), spectral_dim)), ("spai_logit", pa.float32()),
                      ("semantic", pa.list_(pa.float32(), semantic_dim)), ("error", pa.string())])


class FeatureExtractor:
    """Ray Data actor: both frozen models (:meth:`FusedDetector.for_extraction`), features of decoded batches."""

    def __init__(self, weights: str, semantic: dict[str, Any], fingerprints: dict[str, str], device: str,
                 threads: int, feature_batch: int | None, max_tiles: int | None, options: storage.StorageOptions):
        torch.set_num_threads(threads)
        with local_weights(weights, options) as path:
            self.extractor = FusedDetector.for_extraction(path, from_dict(SemanticConfig, semantic), device=device,
                                                          precision="fp32", feature_batch=feature_batch,
                                                          max_tiles=max_tiles)
        here = {part: ident["fingerprint"] for part, ident in self.extractor.identity.items()}
        if here != fingerprints:
            raise FeaturesError(f"the frozen models on this node ({here}) differ from the driver's ({fingerprints}); "
                                "put one copy of the weights on shared storage or s3://")
        self.dims = (self.extractor.config.descriptor_dim, self.extractor.model.semantic.dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = list(batch["error"])
        rows = len(errors)
        spectral: list[Any] = [None] * rows
        logits: list[float | None] = [None] * rows
        semantic: list[Any] = [None] * rows
        good = [i for i, error in enumerate(errors) if error is None]
        for i, result in zip(good, self._features([batch["image"][i] for i in good])):
            if isinstance(result, str):
                errors[i] = result
            else:
                spectral[i], logits[i], semantic[i] = result
        return pa.Table.from_arrays(
            [pa.array(list(batch["row_id"]), pa.string()), pa.array(list(batch["variant"]), pa.string()),
             pa.array(spectral, pa.list_(pa.float32(), self.dims[0])), pa.array(logits, pa.float32()),
             pa.array(semantic, pa.list_(pa.float32(), self.dims[1])), pa.array(errors, pa.string())],
            schema=result_schema(*self.dims))

    def _features(self, images: list[np.ndarray]) -> list[tuple | str]:
        """(spectral, logit, semantic) or an error per image: the batch at once, or one by one when it fails (one
        image, e.g. a huge one out of memory, must not sink the others)."""
        if not images:
            return []
        try:
            spectral, logits, semantic = self.extractor.features(images)
            return [(s, float(v), m) for s, v, m in zip(spectral, logits, semantic)]
        except Exception as exc:  # noqa: BLE001 - recorded per row
            if len(images) == 1:
                return [f"model_failed: {type(exc).__name__}: {exc}"]
        return [result for image in images for result in self._features([image])]


@dataclass
class FeaturesResult:
    table: str  # the feature table's URI
    rows: int
    failed: int  # rows with an error (no features)
    done_before: int  # rows a previous run had extracted (resume)


def extractor_on_driver(cfg: FeaturesConfig, options: storage.StorageOptions) -> FusedDetector:
    """Both frozen models, loaded once here: a wrong file fails before Ray starts, and the table records their
    identity."""
    with local_weights(cfg.weights, options) as path:
        return FusedDetector.for_extraction(path, cfg.semantic, device="cpu", precision="fp32")


def check_resume(cfg: FeaturesConfig, options: storage.StorageOptions) -> None:
    """A folder that holds another extraction's parts or table is refused: its rows would mix two sets of models."""
    saved = storage.join(cfg.output, CONFIG)
    if not storage.exists(saved, options):
        return
    import yaml

    recorded = yaml.safe_load(storage.read_bytes(saved, options)) or {}
    check_resumable(recorded, to_dict(cfg), RESUMABLE_CHANGES, f"the feature table at {cfg.output}",
                    "Extract into another --output, or give the settings it was started with")


def resolved(cfg: FeaturesConfig) -> FeaturesConfig:
    check_config(cfg)
    paths = {k: storage.absolute(getattr(cfg, k)) for k in ("manifest", "weights", "output")}
    semantic = cfg.semantic
    if semantic.weights:
        semantic = dataclasses.replace(semantic, weights=storage.absolute(semantic.weights))
    return dataclasses.replace(cfg, **paths, semantic=semantic)


def plan_device(cfg: FeaturesConfig) -> tuple[str, float]:
    """(torch device, GPUs per actor): auto takes a GPU per actor when the Ray cluster has GPUs."""
    import ray

    from pipelines.infra.runtime import check_gpus

    if cfg.device == "cpu" or (cfg.device == "auto" and not ray.cluster_resources().get("GPU")):
        return "cpu", 0.0
    check_gpus(cfg.workers, f"--device {cfg.device} --workers {cfg.workers}")
    return "cuda", 1.0


def run_extraction(cfg: FeaturesConfig, show_progress: bool = True) -> FeaturesResult:
    """Extract the features ``cfg`` asks for (continuing an interrupted run); the library entry of ``spai fusion
    extract``."""
    from pipelines.infra.runtime import init_ray

    options = storage.StorageOptions.from_env()
    cfg = resolved(cfg)
    check_resume(cfg, options)
    extractor = extractor_on_driver(cfg, options)
    identity = extractor.identity
    dims = (extractor.config.descriptor_dim, extractor.model.semantic.dim)
    del extractor
    init_ray(reserved_cpus=cfg.workers * cfg.cpus_per_worker)
    device, gpus = plan_device(cfg)
    storage.write_bytes(storage.join(cfg.output, CONFIG), dump_config(cfg).encode(), options)
    work = storage.join(cfg.output, PARTS)
    job = rowjob.RowJob(
        rows=rowjob.Rows(cfg.manifest, cfg.split), work=work, actor=FeatureExtractor,
        actor_kwargs={"weights": cfg.weights, "semantic": to_dict(cfg.semantic),
                      "fingerprints": {part: ident["fingerprint"] for part, ident in identity.items()},
                      "device": device, "threads": cfg.cpus_per_worker, "feature_batch": cfg.feature_batch,
                      "max_tiles": cfg.max_tiles, "options": options},
        schema=result_schema(*dims), max_pixels=cfg.max_pixels, options=options)
    compute = rowjob.Compute(workers=cfg.workers, num_cpus=cfg.cpus_per_worker, num_gpus=gpus,
                             batch_size=cfg.batch_size, part_rows=cfg.part_rows)
    progress = rowjob.run(job, compute, show_progress)
    logger.info(f"[spai fusion] {progress.left} row(s) extracted, {progress.done_before} found done before")
    info_uri = storage.join(cfg.output, INFO)
    if storage.exists(info_uri, options):
        if progress.left <= 0:  # finished before: the table is up to date
            info = json.loads(storage.read_bytes(info_uri, options))
            return FeaturesResult(storage.join(cfg.output, TABLE), info["rows"], info["failed"], progress.done_before)
        storage.Files(options).remove(info_uri)  # the table is rewritten: no info until it is whole again
    rows, failed = write_table(cfg.output, work, progress, options)
    info = {"identity": identity, "spectral_dim": dims[0], "semantic_dim": dims[1], "rows": rows, "failed": failed,
            "weights": cfg.weights, "semantic": to_dict(cfg.semantic), "manifest": cfg.manifest}
    storage.write_bytes(info_uri, json.dumps(info, indent=2).encode(), options)
    return FeaturesResult(storage.join(cfg.output, TABLE), rows, failed, progress.done_before)


def write_table(output: str, work: str, progress: rowjob.Progress, options: storage.StorageOptions
                ) -> tuple[int, int]:
    """The parts as one table in input order (streamed); returns its rows and failed rows."""
    fs, path = storage.Files(options).resolve(storage.join(output, TABLE))
    writer, rows, failed = None, 0, 0
    try:
        for batch in rowjob.compacted(work, options, progress):
            batch = batch.drop_columns(["variant"])
            if writer is None:
                writer = pq.ParquetWriter(path, batch.schema, filesystem=fs)
            writer.write_table(batch)
            rows += batch.num_rows
            failed += batch.num_rows - batch.column("error").null_count
    except rowjob.MissingResults as exc:
        raise FeaturesError(str(exc)) from None
    finally:
        if writer is not None:
            writer.close()
    return rows, failed


def read_info(features: str, options: storage.StorageOptions) -> dict[str, Any]:
    """A feature table's ``features.json``; a folder without one is not a finished feature table."""
    uri = storage.join(features, INFO)
    if not storage.exists(uri, options):
        raise FeaturesError(f"{features} holds no finished feature table ({INFO} is missing); run `spai fusion "
                            "extract` into it (again: an interrupted run continues)")
    return json.loads(storage.read_bytes(uri, options))
