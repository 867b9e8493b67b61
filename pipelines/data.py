"""The Ray Data image pipeline: manifest rows -> bytes -> RGB uint8 -> optional transform, streamed in small blocks.

Training, scoring and any other job that needs pixels builds on :func:`read_manifest_dataset` and
:func:`decode_images`. Bad files never stop the stream: each output row carries ``error`` (null, or
``"reason: message"`` with a reason from :data:`pipelines.decode.REASONS`, or ``transform_failed``) and the consumer
decides what to do with it (``ds.filter(expr=col("error").is_null())`` keeps the good rows; count the rest).

Transforms run right after decoding, inside the same task, so when they crop (the training views) a full-resolution
photo never enters the object store. Each row gets its own random generator derived from ``(seed, uri)``, so
augmentations do not depend on how rows fall into blocks, workers or retries.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data.extensions import ArrowTensorArray, ArrowVariableShapedTensorArray

from pipelines.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, read_image_bytes
from pipelines.manifest import ManifestError, conform, read_manifest
from pipelines.storage import Files, StorageOptions

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]

# Rows per decode batch. A decoded camera photo is 30-300 MB, so a few rows per batch keep a worker's memory and each
# output block small; the object store then holds a bounded number of images whatever the corpus size.
DEFAULT_BATCH_SIZE = 4
# Manifest rows per input block when image sizes are unknown. Each block is one decode task: enough rows to hide the
# task overhead (16 small images are ~50 ms of work), few enough that tasks spread over all CPUs and a block of large
# photos stays bounded.
DEFAULT_ROWS_PER_BLOCK = 16
# Decoded pixels per input block when the manifest knows image sizes (a validated manifest has width and height):
# 24 MP is ~96 rows of 512-px images but 6 of 2048-px ones, so a block's decoded output stays ~72 MB, under Ray Data's
# 128 MB block target, whatever the image size (16 rows of 100 MP photos would be 4.8 GB). Small images share a task:
# on 512-px JPEGs this measured 7-27% more images/s wall-clock than 16-row blocks, at the same CPU time per image.
DEFAULT_BLOCK_PIXELS = 24 << 20
MAX_ROWS_PER_BLOCK = 128
# Columns decode_images adds; input columns of the same name (a validated manifest's width/height, a CSV's image
# path) are replaced, since the manifest table keeps the originals.
DECODED_COLUMNS = ("image", "height", "width", "error")


def row_rng(seed: int, uri: str) -> np.random.Generator:
    """The random generator of one row: a function of ``(seed, uri)`` only, so results ignore block layout."""
    digest = int.from_bytes(hashlib.sha256(uri.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def read_manifest_dataset(uri_or_table: str | pa.Table, options: StorageOptions | None = None,
                          split: str | None = None, override_num_blocks: int | None = None) -> ray.data.Dataset:
    """A Ray Dataset of manifest rows (local or S3 Parquet, or an in-memory table), optionally one split only.

    The manifest is read with pyarrow on the driver (only the split's files when given): rows are a few hundred bytes,
    and this skips the file-listing and repartition stages a Parquet read would add to every job (over a second each
    on a busy machine). Rows come in small blocks (``override_num_blocks`` blocks, else sized by
    :func:`block_bounds`) because a block is one decode task.
    """
    if isinstance(uri_or_table, pa.Table):
        table = conform(uri_or_table)
    else:
        table = read_manifest(uri_or_table, options, split)
    if split is not None:
        table = table.filter(pc.equal(table.column("split"), split))
        if table.num_rows == 0:
            raise ManifestError(f"the manifest has no rows of split {split!r}; check the split name (train, val or "
                                "test) or rebuild the manifest")
    bounds = block_bounds(table, override_num_blocks)
    return ray.data.from_arrow([table.slice(start, end - start) for start, end in zip(bounds, bounds[1:])])


def row_pixels(table: pa.Table) -> np.ndarray | None:
    """Pixels of each row from ``width`` x ``height`` columns (a validated manifest's), or None where any is unknown."""
    if not {"width", "height"} <= set(table.column_names):
        return None
    try:
        width, height = (pc.cast(table.column(name), pa.int64()) for name in ("width", "height"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if width.null_count or height.null_count:
        return None
    return width.to_numpy() * height.to_numpy()


def block_bounds(table: pa.Table, num_blocks: int | None = None) -> list[int]:
    """Row offsets of contiguous input blocks: ``num_blocks`` equal ones if given, else blocks of about
    :data:`DEFAULT_BLOCK_PIXELS` decoded pixels (at most :data:`MAX_ROWS_PER_BLOCK` rows) when sizes are known, else
    :data:`DEFAULT_ROWS_PER_BLOCK` rows."""
    rows = table.num_rows
    pixels = None if num_blocks else row_pixels(table)
    if pixels is None or rows == 0:
        blocks = max(1, min(num_blocks or math.ceil(rows / DEFAULT_ROWS_PER_BLOCK), rows))
        return [i * rows // blocks for i in range(blocks + 1)]
    # A row belongs to the budget-sized slot its first pixel falls in; long runs of tiny images are cut.
    slot = (np.cumsum(pixels) - pixels) // DEFAULT_BLOCK_PIXELS
    ends = (np.flatnonzero(np.diff(slot)) + 1).tolist()
    bounds = []
    for start, end in zip([0] + ends, ends + [rows]):
        bounds.extend(range(start, end, MAX_ROWS_PER_BLOCK))
    return bounds + [rows]


def image_column(images: list[np.ndarray | None]) -> pa.Array:
    """A Ray tensor column of per-row images; failed rows (None) become empty arrays of the same rank.

    Same-shaped images give a fixed-shape tensor column (stacked batches), differing shapes a variable-shaped one.
    Empty arrays rather than nulls, because Ray cannot join an all-null block with typed ones.
    """
    ndim = next((im.ndim for im in images if im is not None), 3)
    empty = np.zeros((0,) * (ndim - 1) + (3,), np.uint8)
    filled = [empty if im is None else im for im in images]
    if len({im.shape for im in filled}) == 1:
        return ArrowTensorArray.from_numpy(np.stack(filled))
    return ArrowVariableShapedTensorArray.from_numpy(filled)


def _decode_one(uri: str, files: Files, transform: Transform | None, seed: int, max_pixels: int
                ) -> tuple[np.ndarray | None, dict | None, str | None]:
    """(image, info, error) of one row; every failure is returned, never raised."""
    try:
        array, info = decode_image(read_image_bytes(uri, files), max_pixels)
    except DecodeError as exc:
        return None, None, str(exc)
    if transform is None:
        return array, info, None
    try:
        out = transform(array, row_rng(seed, uri))
    except Exception as exc:  # noqa: BLE001 - one odd image (too small to crop...) must not stop the job
        return None, info, f"transform_failed: {type(exc).__name__}: {exc}"
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8:
        raise TypeError(f"the transform must return a uint8 numpy array, got {type(out).__name__} "
                        f"{getattr(out, 'dtype', '')}; keep 0..255 uint8 here and normalise in the model")
    return out, info, None


def _decode_batch(batch: pa.Table, transform: Transform | None, seed: int, options: StorageOptions,
                  max_pixels: int) -> pa.Table:
    files = Files(options)  # one S3 client per batch, not per image
    results = [_decode_one(uri, files, transform, seed, max_pixels) for uri in batch.column("uri").to_pylist()]
    sizes = [(info["height"], info["width"]) if info else (None, None) for _, info, _ in results]
    batch = batch.drop_columns([name for name in DECODED_COLUMNS if name in batch.column_names])
    return (batch.append_column("image", image_column([image for image, _, _ in results]))
            .append_column("height", pa.array([h for h, _ in sizes], pa.int32()))
            .append_column("width", pa.array([w for _, w in sizes], pa.int32()))
            .append_column("error", pa.array([error for _, _, error in results], pa.string())))


def decode_images(ds: ray.data.Dataset, transform: Transform | None = None, seed: int = 0,
                  options: StorageOptions | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> ray.data.Dataset:
    """Stream manifest rows to decoded images: adds ``image``, ``height``, ``width`` (original size) and ``error``.

    ``image`` is the uint8 ``H x W x 3`` array, or whatever uint8 array ``transform(image, rng)`` returns (e.g.
    ``V x 224 x 224 x 3`` training views); failed rows have an empty ``image``, null sizes (unless only the
    transform failed) and the reason in ``error``. Input columns with these names are replaced. In numpy batches
    ``image`` is one stacked array when every row has the same shape, else an object array of per-row arrays (a
    failed row's empty image makes shapes differ), so stack the good rows yourself. ``seed`` feeds
    :func:`row_rng`; pass ``seed + epoch`` for new augmentations each epoch.
    """
    return ds.map_batches(
        _decode_batch,
        batch_format="pyarrow",
        batch_size=batch_size,
        fn_kwargs={"transform": transform, "seed": seed, "options": options or StorageOptions.from_env(),
                   "max_pixels": max_pixels},
    )
