"""The scoring pipeline, a :mod:`pipelines.rowjob` job: manifest rows -> decode, then each image's variants (+ resize),
on CPU tasks -> :class:`Scorer` actors, each holding one :class:`~spai_core.detector.Detector` -> Parquet parts in the
work folder, written by the workers."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipelines.data.transforms import make_score_transform
from pipelines.infra.storage import StorageOptions, absolute
from pipelines.rowjob import Compute, RowJob, Rows
from pipelines.score.config import ActorPlan, ScoreConfig, ScoreError
from pipelines.score.inputs import local_weights
from pipelines.score.variants import variant_block
from pipelines.score.workdir import PART_SCHEMA, WorkDir
from spai_core.onnx_runtime import load_detector


class Scorer:
    """Ray Data actor: loads the Detector once, then turns decoded rows into ``row_id, variant, logit, tiles,
    error``."""

    def __init__(self, weights: str, model_id: str, plan: ActorPlan, max_tiles: int | None,
                 feature_batch: int | None, options: StorageOptions, runtime: str = "pytorch"):
        torch.set_num_threads(plan.threads)
        with local_weights(weights, options) as path:
            self.detector = load_detector(path, runtime, device=plan.device, precision=plan.precision,
                                          feature_batch=feature_batch, max_tiles=max_tiles)
        if self.detector.model_id != model_id:
            raise ScoreError(f"the weights at {weights} on this node (hash {self.detector.model_id}) differ from "
                             f"the driver's (hash {model_id}); put one copy on shared storage or s3://")

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = list(batch["error"])
        good = [i for i, error in enumerate(errors) if error is None]
        images = [batch["image"][i] for i in good]
        logits: list[float | None] = [None] * len(errors)
        tiles: list[int | None] = [None] * len(errors)
        for i, image, (logit, error) in zip(good, images, self._logits(images)):
            logits[i], errors[i] = logit, error
            tiles[i] = None if error else self.detector.num_tiles(*image.shape[:2])
        return pa.Table.from_arrays([pa.array(list(batch["row_id"]), pa.string()),
                                     pa.array(list(batch["variant"]), pa.string()), pa.array(logits, pa.float32()),
                                     pa.array(tiles, pa.int32()), pa.array(errors, pa.string())], schema=PART_SCHEMA)

    def _logits(self, images: list[np.ndarray]) -> list[tuple[float | None, str | None]]:
        """(logit, error) per image: the batch at once, or one by one when the batch fails (so one image cannot
        sink the others, e.g. a huge one running out of memory)."""
        try:
            return [(float(v), None) for v in self.detector.logits(images)]
        except Exception as exc:  # noqa: BLE001 - recorded per row below
            if len(images) == 1:
                return [(None, f"model_failed: {type(exc).__name__}: {exc}")]
        if self.detector.device.type == "cuda":
            torch.cuda.empty_cache()
        return [result for image in images for result in self._logits([image])]


def scoring_job(rows: Rows, cfg: ScoreConfig, plan: ActorPlan, model_id: str, options: StorageOptions,
                work: WorkDir) -> RowJob:
    """The job as a :class:`~pipelines.rowjob.RowJob`: decode and variant tasks feeding a pool of :class:`Scorer`
    actors, whose results the workers write under ``work``."""
    variants = cfg.variants()
    return RowJob(
        rows, work.uri, Scorer, schema=PART_SCHEMA, labels=[v.label for v in variants],
        # absolute: actors on a running cluster (RAY_ADDRESS) work in another folder than the driver
        actor_kwargs={"weights": absolute(cfg.weights), "model_id": model_id, "plan": plan, "max_tiles": cfg.max_tiles,
                      "feature_batch": cfg.feature_batch, "options": options, "runtime": cfg.runtime},
        # the same task as decoding (Ray fuses the two stages): the decoded image does not cross the object store
        expand=variant_block, expand_kwargs={"variants": {v.label: v for v in variants},
                                             "transform": make_score_transform(cfg.transform), "seed": cfg.seed},
        seed=cfg.seed, max_pixels=cfg.max_pixels, options=options)


def compute(cfg: ScoreConfig, plan: ActorPlan) -> Compute:
    return Compute(workers=plan.workers, num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, batch_size=cfg.batch_size,
                   batches_in_flight=plan.batches_in_flight, part_rows=cfg.part_rows)
