"""The variants of a scoring job: the Ray Data stage that turns each decoded image into the variants still to score.

Every job scores variants: a plain job has one, ``none`` (the image as it is); a ``--perturb`` sweep has several. An
output row, and a part row of the work folder, is one (input row, variant) pair, keyed by ``row_id`` and the variant's
label (the read tasks of :mod:`pipelines.rowjob` say which pairs are left). An image is read and decoded once however
many of its variants are to score; they are made right after, in the same Ray Data task (the stage fuses with
decoding), each from its own generator seeded by ``(seed, uri, label)``.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockAccessor

from pipelines.data.dataset import DEFAULT_OUTPUT_BYTES, ImageColumnBuilder, Transform
from pipelines.data.transforms import row_rng
from pipelines.perturb import Variant

VARIANT_COLUMNS = ("variant", "perturbation", "strength")  # what a sweep adds to each output row


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


def variant_block(batch: pa.Table, variants: Mapping[str, Variant], transform: Transform | None, seed: int,
                  max_bytes: int = DEFAULT_OUTPUT_BYTES) -> Iterator[pa.Table]:
    """Every variant each decoded row asks for (its ``variants`` list): the row's columns with ``variant``, ``image``
    and ``error``, a table whenever the images fill ``max_bytes``. A row that failed to decode gives each of its
    variants its error."""
    wanted = batch.column("variants").to_pylist()
    decoded = BlockAccessor.for_block(batch.select(["image"])).to_batch_format("numpy")["image"]
    rest = batch.drop_columns(["image", "error", "variants"])
    left = sum(map(len, wanted))
    for_row = zip(batch.column("uri").to_pylist(), decoded, batch.column("error").to_pylist(), wanted)
    images, rows, labels, errors = ImageColumnBuilder(left, max_bytes), [], [], []
    for index, (uri, image, error, names) in enumerate(for_row):
        for label in names:
            out, failure = (None, error) if error is not None else _make(image, variants[label], transform,
                                                                          row_rng(seed, f"{uri}\n{label}"))
            images.append(out)
            rows.append(index)
            labels.append(label)
            errors.append(failure)
            if images.full():
                yield _table(rest, rows, labels, images, errors)
                left -= len(rows)
                images, rows, labels, errors = ImageColumnBuilder(left, max_bytes), [], [], []
    if rows:
        yield _table(rest, rows, labels, images, errors)


def _table(rest: pa.Table, rows: list[int], labels: list[str], images: ImageColumnBuilder,
           errors: list[str | None]) -> pa.Table:
    return (rest.take(pa.array(rows, pa.int64())).append_column("variant", pa.array(labels, pa.string()))
            .append_column("image", images.finish()).append_column("error", pa.array(errors, pa.string())))


def variant_columns(variants: Sequence[Variant], labels: pa.Array | pa.ChunkedArray) -> dict[str, pa.Array]:
    """A sweep's columns for result rows of these variant ``labels``."""
    index = pc.index_in(labels, value_set=pa.array([v.label for v in variants], pa.string()))
    return {"variant": labels,
            "perturbation": pa.array([v.perturbation for v in variants], pa.string()).take(index),
            "strength": pa.array([v.numeric_strength for v in variants], pa.float64()).take(index)}
