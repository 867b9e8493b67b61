"""The Ray Data image pipeline: manifest rows -> bytes -> RGB uint8 -> optional transform, streamed in small blocks.

Training, scoring and any other job that needs pixels builds on :func:`read_manifest_dataset` and
:func:`decode_images`. Bad files never stop the stream: each output row carries ``error`` (null, or
``"reason: message"`` with a reason from :data:`pipelines.data.decode.REASONS`, or ``transform_failed``) and the consumer
decides what to do with it (``ds.filter(expr=col("error").is_null())`` keeps the good rows; count the rest).

Transforms run right after decoding, inside the same task, so when they crop (the training views) a full-resolution
photo never enters the object store. Each row gets its own random generator derived from ``(seed, uri)``, so
augmentations do not depend on how rows fall into blocks, workers or retries.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data.extensions import ArrowTensorArray, ArrowVariableShapedTensorArray

from pipelines.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, read_image_bytes
from pipelines.data.manifest import ManifestError, conform, read_manifest, split_rows
from pipelines.data.transforms import row_rng
from pipelines.infra.storage import Files, StorageOptions

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]

# Decoded bytes per output block. A decode task emits a block whenever its images fill this budget, so a worker holds
# at most one budget of pixels (plus one image) and the object store a bounded number of blocks, whatever the input
# block's row count or the images' sizes (a camera photo decodes to 30-300 MB), under Ray Data's 128 MB block target.
DEFAULT_OUTPUT_BYTES = 72 << 20
# Each input block is one decode task, and tasks must be long: Ray Data 2.60's executor notices a finished task only
# on its next 0.1 s tick (ray.wait with a 0.1 s timeout on all running tasks), so tasks of ~0.1 s left one of two CPUs
# idle. Memory does not grow with the block, since its output is emitted every DEFAULT_OUTPUT_BYTES.
# Decoded pixels per input block when the manifest knows image sizes (a validated manifest has width and height):
# 256 MP is ~1 s of decoding on one core (1024 rows of 512-px images, 64 of 2048-px ones). Against 24 MP blocks on
# 2 CPUs this measured 1050-1100 vs 745 images/s on 512-px JPEGs.
DEFAULT_BLOCK_PIXELS = 256 << 20
MAX_ROWS_PER_BLOCK = 2048  # bounds the rows of thumbnails a task takes
# Manifest rows per input block when image sizes are unknown: ~0.5 s of work for 1-MP images, a few seconds for camera
# photos.
DEFAULT_ROWS_PER_BLOCK = 64
# Columns decode_images adds; input columns of the same name (a validated manifest's width/height, a CSV's image
# path) are replaced, since the manifest table keeps the originals.
DECODED_COLUMNS = ("image", "height", "width", "error")


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
        table = split_rows(table, split)
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


class ImageColumnBuilder:
    """Builds a Ray tensor column of per-row images, copying each into one preallocated array while shapes agree.

    Decoded images go into their block as they arrive (:meth:`slot` lets the decoder write them there directly), so
    a batch is never held twice (per-row arrays and their stack) and a worker reuses its freed memory instead of
    faulting in fresh pages for every image, which costs as much as a JPEG decode on small VMs. Same-shaped rows give
    a fixed-shape tensor column, differing shapes a variable-shaped one. Failed rows (None) become empty arrays of the
    same rank rather than nulls, because Ray cannot join an all-null block with typed ones.
    """

    def __init__(self, capacity: int, max_bytes: int = DEFAULT_OUTPUT_BYTES):
        self._capacity = capacity  # rows still to come in this batch: the stack never needs more
        self._max_bytes = max_bytes
        self._stack: np.ndarray | None = None
        self._ragged: list[np.ndarray | None] | None = None
        self.rows = 0
        self.nbytes = 0

    def full(self) -> bool:
        """Whether the column holds its byte budget (or all its stacked rows): time to emit it as a block."""
        if self._ragged is None and self._stack is not None:
            return self.rows == len(self._stack)
        return self.nbytes >= self._max_bytes

    def slot(self, shape: tuple[int, ...]) -> np.ndarray:
        """Where to write the next row's image of ``shape`` before :meth:`append`-ing it: its row of the stack while
        shapes agree (appending it then costs no copy), else a new array."""
        if self._ragged is None:
            if self._stack is None:
                self._stack = self._new_stack(shape)
            if shape == self._stack.shape[1:]:
                return self._stack[self.rows]
        return np.empty(shape, np.uint8)

    def _new_stack(self, shape: tuple[int, ...]) -> np.ndarray:
        """Room for the batch's rows of ``shape``, within the byte budget. From Arrow's memory pool, which hands freed
        blocks out again: a numpy array this big is a fresh mmap each time, and the kernel zeroing its pages cost ~12%
        of decoding 512-px JPEGs."""
        rows = max(1, min(self._capacity, self._max_bytes // max(math.prod(shape), 1)))
        return np.frombuffer(pa.allocate_buffer(rows * math.prod(shape)), np.uint8).reshape(rows, *shape)

    def append(self, image: np.ndarray | None) -> None:
        if self._ragged is None:
            if self._stack is None and image is not None:
                self._stack = self._new_stack(image.shape)
            if image is not None and image.shape == self._stack.shape[1:]:
                row = self._stack[self.rows]
                if image.ctypes.data != row.ctypes.data:  # not already written there through slot()
                    row[...] = image
                self.rows += 1
                self.nbytes += image.nbytes
                return
            self._ragged = [] if self._stack is None else list(self._stack[:self.rows])
        self._ragged.append(image)
        self.rows += 1
        self.nbytes += 0 if image is None else image.nbytes

    def finish(self) -> pa.Array:
        if self._ragged is None:
            return ArrowTensorArray.from_numpy(self._stack[:self.rows])
        ndim = next((im.ndim for im in self._ragged if im is not None), 3)
        empty = np.zeros((0,) * (ndim - 1) + (3,), np.uint8)
        return ArrowVariableShapedTensorArray.from_numpy([empty if im is None else im for im in self._ragged])


def _decode_one(uri: str, files: Files, transform: Transform | None, seed: int, max_pixels: int,
                images: ImageColumnBuilder) -> tuple[np.ndarray | None, dict | None, str | None]:
    """(image, info, error) of one row, the untransformed image decoded straight into ``images``' next slot; every
    failure is returned, never raised."""
    try:
        array, info = decode_image(read_image_bytes(uri, files), max_pixels, images.slot if transform is None else None)
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


def decode_block(batch: pa.Table, transform: Transform | None, seed: int, options: StorageOptions,
                 max_pixels: int, max_bytes: int) -> Iterator[pa.Table]:
    """Decode a manifest block's rows (adding :data:`DECODED_COLUMNS`), yielding a table whenever their images fill
    ``max_bytes``; rows keep their order and every row comes out once, failed ones with their ``error``."""
    files = Files(options)  # one S3 client per batch, not per image
    batch = batch.drop_columns([name for name in DECODED_COLUMNS if name in batch.column_names])
    uris = batch.column("uri").to_pylist()
    start = 0
    while start < len(uris):
        images = ImageColumnBuilder(len(uris) - start, max_bytes)
        heights, widths, errors = [], [], []
        while start + images.rows < len(uris) and not images.full():
            image, info, error = _decode_one(uris[start + images.rows], files, transform, seed, max_pixels, images)
            images.append(image)
            heights.append(info and info["height"])
            widths.append(info and info["width"])
            errors.append(error)
        yield (batch.slice(start, images.rows).append_column("image", images.finish())
               .append_column("height", pa.array(heights, pa.int32()))
               .append_column("width", pa.array(widths, pa.int32()))
               .append_column("error", pa.array(errors, pa.string())))
        start += images.rows


def decode_images(ds: ray.data.Dataset, transform: Transform | None = None, seed: int = 0,
                  options: StorageOptions | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_bytes: int = DEFAULT_OUTPUT_BYTES) -> ray.data.Dataset:
    """Stream manifest rows to decoded images: adds ``image``, ``height``, ``width`` (original size) and ``error``.

    ``image`` is the uint8 ``H x W x 3`` array, or whatever uint8 array ``transform(image, rng)`` returns (e.g.
    ``V x 224 x 224 x 3`` training views); failed rows have an empty ``image``, null sizes (unless only the
    transform failed) and the reason in ``error``. Input columns with these names are replaced. In numpy batches
    ``image`` is one stacked array when every row has the same shape, else an object array of per-row arrays (a
    failed row's empty image makes shapes differ), so stack the good rows yourself. ``seed`` feeds
    :func:`row_rng`; pass ``seed + epoch`` for new augmentations each epoch. Each input block is one task, which
    emits an output block whenever its decoded images reach ``max_bytes``.
    """
    return ds.map_batches(
        decode_block,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"transform": transform, "seed": seed, "options": options or StorageOptions.from_env(),
                   "max_pixels": max_pixels, "max_bytes": max_bytes},
    )
