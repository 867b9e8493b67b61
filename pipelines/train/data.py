"""Training data per rank and epoch: a ``(seed, epoch)`` shuffle of the manifest dealt to the ranks, decoded and
augmented by Ray Data, handed to the model as float tensors."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from pipelines.data.dataset import decode_images, read_manifest_dataset
from pipelines.infra import storage


def epoch_shard(table: pa.Table, epoch: int, seed: int, rank: int, world: int, equal: bool) -> pa.Table:
    """This rank's rows for an epoch: a ``(seed, epoch)`` shuffle dealt round-robin, cut to equal length if asked."""
    order = np.random.default_rng([seed, epoch]).permutation(table.num_rows)
    mine = order[rank::world]
    if equal:
        mine = mine[: table.num_rows // world]
    return table.take(pa.array(np.sort(mine) if not equal else mine))


def iter_image_batches(table: pa.Table, transform, seed: int, batch_size: int, options: storage.StorageOptions,
                       drop_last: bool) -> Iterator[dict[str, np.ndarray]]:
    """Decode (and transform) rows with Ray Data and yield numpy batches in the table's order; failed rows keep their
    ``error``."""
    ds = decode_images(read_manifest_dataset(table), transform, seed=seed, options=options)
    ds.context.enable_progress_bars = False  # one bar per worker per epoch drowns the log
    # Without it the threads that format prefetched batches hand them over as they finish, so batches (and the
    # weights they train) differ from run to run: a seeded run must see the same batches in the same order.
    ds.context.execution_options.preserve_order = True
    yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last, prefetch_batches=2)


def to_views_tensor(images, device: torch.device) -> torch.Tensor:
    """``B`` arrays of ``V x S x S x 3`` uint8 -> ``B x V x 3 x S x S`` float in [0, 1]."""
    batch = torch.from_numpy(np.stack(list(images)))
    return batch.to(device).permute(0, 1, 4, 2, 3).float() * (1 / 255)


def to_image_tensors(images, device: torch.device) -> list[torch.Tensor]:
    """Arrays of ``H x W x 3`` uint8 (any sizes) -> ``3 x H x W`` floats in [0, 1] for the any-resolution path."""
    # a copy: Ray hands out read-only arrays, which torch warns about sharing
    return [torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1).float() * (1 / 255) for image in images]


def first_failure(batch: dict[str, np.ndarray]) -> str | None:
    """``uri (reason)`` of the first row of a batch that failed to decode or transform, else None."""
    return next((f"{uri} ({error})" for uri, error in zip(batch["uri"], batch["error"]) if error is not None), None)

