"""What a scoring job reads: the input (a manifest read in Ray tasks, or a small listing made here) and the weights,
checked on the driver before any actor starts."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.data.manifest import NOTES_KEY, present_splits, read_sidecar, resolve_input, split_rows
from pipelines.infra.storage import Files, StorageOptions, absolute, basename, filesystem, is_s3
from pipelines.rowjob import Rows, Shard, plan_shards
from pipelines.score.config import ScoreConfig, ScoreError
from spai_core.onnx_runtime import load_detector

RESULT_COLUMNS = ("row_id", "variant", "perturbation", "strength", "score", "logit", "tiles", "error", "model_id",
                  "precision", "options", "threshold", "predicted")


def input_digest(shards: Sequence[Shard], split: str | None) -> str:
    """A fingerprint of the input (its files, row groups and row counts, or the driver's listing) and the split: a
    resume must see the same input. Row ids and contents are not read for it: they are the read tasks' to compute."""
    what = [(s.name, s.row_group, s.offset, s.rows) for s in shards]
    return hashlib.sha256(json.dumps([what, split]).encode()).hexdigest()


def listing_digest(table: pa.Table) -> str:
    """A fingerprint of a listing made on the driver (a folder, a CSV): its uris in order."""
    return hashlib.sha256("\n".join(table.column("uri").to_pylist()).encode()).hexdigest()


def clash_free(name: str) -> str:
    """The name an input column gets in the output: result column names are taken, so clashes get a prefix."""
    return f"input_{name}" if name in RESULT_COLUMNS else name


def is_manifest(uri: str, options: StorageOptions) -> bool:
    """A manifest (a ``.parquet`` file or a folder with ``_manifest.json``): read in Ray tasks, not on the driver."""
    return uri.lower().endswith(".parquet") or (not uri.lower().endswith(".csv") and read_sidecar(uri, options)
                                                is not None)


def input_rows(cfg: ScoreConfig, options: StorageOptions) -> tuple[Rows, list[Shard], str, dict[str, Any]]:
    """What the job reads (clashing names prefixed), its shards, its fingerprint, and what a listing skipped (a
    folder's files that are not images by name or content), so the summary can say so. A manifest is planned from
    its Parquet footers; a folder, CSV or image is listed here, on the driver (small inputs)."""
    if is_manifest(cfg.input, options):
        rows = Rows(absolute(cfg.input), cfg.split, clash_free)  # absolute: read by workers in another folder
        shards = plan_shards(rows.source, options, cfg.split)
        return rows, shards, input_digest(shards, cfg.split), {}
    table = resolve_input(cfg.input, root=cfg.root, options=options, recursive=cfg.recursive)
    skipped = json.loads((table.schema.metadata or {}).get(NOTES_KEY, b"{}")).get("skipped", {})
    if cfg.split is not None:
        present = present_splits(table)
        table = split_rows(table, cfg.split)
        if table.num_rows == 0:
            raise ScoreError(f"{cfg.input} has no rows of split {cfg.split!r} (it has {present}); fix --split")
    rows = Rows(table, None, clash_free)
    shards = plan_shards(table, options)
    return rows, shards, listing_digest(table), skipped


def check_weights(uri: str, options: StorageOptions, runtime: str = "pytorch") -> tuple[str, dict[str, Any]]:
    """Load the weights once on the driver, the way every actor will; return their hash (``Detector.model_id``) and
    their provenance (our checkpoints name their training run and epoch).

    A wrong, corrupt or incompatible file then stops the job with its own message before Ray starts, instead of
    killing each actor with a traceback after the job (and its resumable work folder) has begun.
    """
    files = Files(options)
    kind = files.info(uri).type
    if runtime == "onnxruntime":  # an export folder, read where it is
        if is_s3(uri):
            raise ScoreError(f"--runtime onnxruntime reads a local export folder (or one on shared storage), not "
                             f"{uri}; copy it to each node")
        detector = load_detector(uri, runtime, device="cpu", precision="fp32")
        return detector.model_id, detector.provenance
    if kind == pafs.FileType.Directory:
        raise ScoreError(f"--weights {uri} is a folder; give the weights file in it (an official spai.pth or our "
                         ".safetensors), or add --runtime onnxruntime for a folder of `spai export onnx`")
    if kind != pafs.FileType.File:
        raise files.missing(uri)
    with local_weights(uri, options) as path:
        detector = load_detector(path, runtime, device="cpu", precision="fp32")
    return detector.model_id, detector.provenance


@contextlib.contextmanager
def local_weights(uri: str, options: StorageOptions) -> Iterator[str]:
    """A local path to the weights: the file itself, or a temporary copy of an ``s3://`` object."""
    if not is_s3(uri):
        yield uri
        return
    fs, path = filesystem(uri, options)
    with tempfile.TemporaryDirectory(prefix="spai-weights-") as tmp:
        local = os.path.join(tmp, basename(uri))
        with fs.open_input_stream(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield local
