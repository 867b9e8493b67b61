"""The variants of a scoring job: which (image, variant) pairs are still to score, and the Ray Data stage that turns
each decoded image into its variants.

Every job scores variants: a plain job has one, ``none`` (the image as it is); a ``--perturb`` sweep has several. An
output row, and a part row of the work folder, is one (input row, variant) pair, keyed by ``row_id`` and the variant's
label. An image is read and decoded once however many of its variants are to score; they are made right after, in the
same Ray Data task (the stage fuses with decoding), each from its own generator seeded by ``(seed, uri, label)``.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.data.dataset import DEFAULT_OUTPUT_BYTES, ImageColumnBuilder, Transform
from pipelines.data.transforms import row_rng
from pipelines.perturb import Variant

VARIANT_COLUMNS = ("variant", "perturbation", "strength")  # what a sweep adds to each output row


def result_keys(row_ids: pa.Array | pa.ChunkedArray, labels: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """One key per (row, variant) pair."""
    return pc.binary_join_element_wise(row_ids, labels, "\n")


def todo_rows(table: pa.Table, done: pa.Table, labels: Sequence[str]) -> pa.Table:
    """Input rows with variants still to score, each with a ``variants`` list column naming them (in sweep order)."""
    missing = np.stack([~pc.is_in(table.column("row_id"), value_set=done.filter(pc.equal(done.column("variant"),
                                                                                          label)).column("row_id"))
                        .to_numpy(zero_copy_only=False) for label in labels], axis=1)
    keep = missing.any(axis=1)
    rows, cols = np.nonzero(missing[keep])
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=int(keep.sum())))]).astype(np.int32)
    todo = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(labels, object)[cols], pa.string()))
    return table.filter(pa.array(keep)).append_column("variants", todo)


def pairs(todo: pa.Table) -> int:
    """The (image, variant) pairs ``todo`` holds."""
    return int(pc.sum(pc.list_value_length(todo.column("variants"))).as_py() or 0)


def _make(image: np.ndarray, variant: Variant, transform: Transform | None, rng: np.random.Generator
          ) -> tuple[np.ndarray | None, str | None]:
    """(image, error) of one variant; every failure is returned, never raised."""
    try:
        image = variant.apply(image, rng)
    except Exception as exc:  # noqa: BLE001 - one image a perturbation cannot take must not stop the job
        return None, f"perturb_failed: {variant.label}: {type(exc).__name__}: {exc}"
    if transform is None:
        return image, None
    try:
        return transform(image, rng), None
    except Exception as exc:  # noqa: BLE001 - as above
        return None, f"transform_failed: {type(exc).__name__}: {exc}"


def variant_block(batch: Mapping[str, np.ndarray], variants: Mapping[str, Variant], transform: Transform | None,
                  seed: int, max_bytes: int = DEFAULT_OUTPUT_BYTES) -> Iterator[pa.Table]:
    """``row_id, variant, image, error`` for every variant each decoded row asks for, a table whenever the images fill
    ``max_bytes``. A row that failed to decode gives each of its variants its error."""
    wanted = [list(labels) for labels in batch["variants"]]
    left = sum(map(len, wanted))
    for_row = zip(batch["row_id"], batch["uri"], batch["image"], batch["error"], wanted)
    images, ids, labels, errors = ImageColumnBuilder(left, max_bytes), [], [], []
    for row_id, uri, image, error, names in for_row:
        for label in names:
            out, failure = (None, error) if error is not None else _make(image, variants[label], transform,
                                                                          row_rng(seed, f"{uri}\n{label}"))
            images.append(out)
            ids.append(row_id)
            labels.append(label)
            errors.append(failure)
            if images.full():
                yield _table(ids, labels, images, errors)
                left -= len(ids)
                images, ids, labels, errors = ImageColumnBuilder(left, max_bytes), [], [], []
    if ids:
        yield _table(ids, labels, images, errors)


def _table(ids: list[str], labels: list[str], images: ImageColumnBuilder, errors: list[str | None]) -> pa.Table:
    return pa.table({"row_id": pa.array(ids, pa.string()), "variant": pa.array(labels, pa.string()),
                     "image": images.finish(), "error": pa.array(errors, pa.string())})


def variant_columns(variants: Sequence[Variant], rows: int) -> dict[str, pa.Array]:
    """The sweep's columns for ``rows`` input rows, each repeated once per variant (the order of :func:`expand`)."""
    repeat = np.tile(np.arange(len(variants)), rows)
    return {"variant": pa.array([v.label for v in variants], pa.string()).take(repeat),
            "perturbation": pa.array([v.perturbation for v in variants], pa.string()).take(repeat),
            "strength": pa.array([v.numeric_strength for v in variants], pa.float64()).take(repeat)}


def expand(table: pa.Table, variants: Sequence[Variant]) -> pa.Table:
    """Each input row once per variant, image-major (an image's variants together, in sweep order)."""
    return table.take(np.repeat(np.arange(table.num_rows), len(variants))) if len(variants) > 1 else table
