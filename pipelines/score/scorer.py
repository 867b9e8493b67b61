"""The scoring pipeline on Ray Data: manifest rows -> decode, then each image's variants (+ resize), on CPU tasks ->
:class:`Scorer` actors, each holding one :class:`~spai_core.detector.Detector` -> the driver, which keeps finished
rows in the work folder."""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import ray.data
import torch
from tqdm.auto import tqdm

from pipelines.data.dataset import decode_images, read_manifest_dataset
from pipelines.data.manifest import CORE_COLUMNS
from pipelines.data.transforms import make_score_transform
from pipelines.infra.storage import StorageOptions, absolute
from pipelines.score.config import ActorPlan, ScoreConfig, ScoreError
from pipelines.score.inputs import local_weights
from pipelines.score.variants import variant_block
from pipelines.score.workdir import PART_SCHEMA, PartBuffer, WorkDir
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


def scored_batches(todo: pa.Table, cfg: ScoreConfig, plan: ActorPlan, model_id: str,
                   options: StorageOptions) -> ray.data.Dataset:
    """The dataset of ``todo``'s results: decode and variant tasks feeding a pool of :class:`Scorer` actors."""
    # width/height of a validated manifest let the input blocks be sized by pixels (see dataset.block_bounds)
    ds = read_manifest_dataset(todo.select([c for c in (*CORE_COLUMNS, "row_id", "variants", "width", "height")
                                            if c in todo.column_names]))
    ds = decode_images(ds, None, cfg.seed, options, cfg.max_pixels)
    # the same task as decoding (Ray fuses the two stages): the decoded image does not cross the object store
    ds = ds.map_batches(variant_block, batch_format="numpy", batch_size=None,
                        fn_kwargs={"variants": {v.label: v for v in cfg.variants()},
                                   "transform": make_score_transform(cfg.transform), "seed": cfg.seed})
    # Blocks of one model batch each; the repartition boundary also keeps Ray from fusing decoding into the actors,
    # so decode tasks run beside scoring instead of stalling it (and a GPU never waits on JPEG decoding).
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    ds = ds.map_batches(Scorer, batch_size=cfg.batch_size, batch_format="numpy",
                        # "true multi-threading" with one call at a time runs calls on the actor's main thread, where
                        # the model was built. Ray Data's default hands them to a helper thread: a second OpenMP pool,
                        # and with more OpenMP threads than CPUs libgomp stops spin-waiting, so small ops slow ~2x and
                        # a CPU model pass ~5%
                        compute=ray.data.ActorPoolStrategy(size=plan.workers, enable_true_multi_threading=True,
                                                           max_tasks_in_flight_per_actor=plan.batches_in_flight),
                        num_cpus=plan.num_cpus,
                        num_gpus=plan.num_gpus or None,
                        # absolute: actors on a running cluster (RAY_ADDRESS) work in another folder than the driver
                        fn_constructor_kwargs={"weights": absolute(cfg.weights), "model_id": model_id, "plan": plan,
                                               "max_tiles": cfg.max_tiles, "feature_batch": cfg.feature_batch,
                                               "options": options, "runtime": cfg.runtime})
    # Ray Data's own bars count only this run's rows; the driver's bar counts the whole corpus instead. (The dataset's
    # context, shared by its whole chain, is a copy made when it was read: changing the global one now does nothing.)
    ds.context.enable_progress_bars = False
    return ds


def score_rows(todo: pa.Table, cfg: ScoreConfig, plan: ActorPlan, model_id: str, options: StorageOptions,
               work: WorkDir, bar: tqdm) -> tuple[float, int] | None:
    """Stream ``todo`` through decode and the actor pool; finished rows go to the work directory as they come.

    Returns when (``time.monotonic()``) the first results came and how many rows they held, if any came."""
    buffer, first = PartBuffer(work, cfg.part_rows), None
    try:
        # No prefetch: with one, each batch reached the driver only when the next was done, so the progress bar and
        # the resumable parts lagged a whole batch (minutes on CPU)
        for batch in scored_batches(todo, cfg, plan, model_id, options).iter_batches(
                batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            buffer.add(batch)
            bar.update(batch.num_rows)
            first = first or (time.monotonic(), batch.num_rows)
    finally:  # on Ctrl-C too: rows already scored are kept
        buffer.flush()
    return first
