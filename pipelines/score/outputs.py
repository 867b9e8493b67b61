"""What a scoring job writes: its config (``<output>.config.yaml``, first), then the output in our layout or the
official CSV one (with ``<output>.errors.csv``), streamed from the work folder's parts in input order."""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.infra.storage import Files, absolute, is_s3
from pipelines.perturb import Variant
from pipelines.score.config import ScoreConfig
from pipelines.score.inputs import clash_free
from pipelines.score.variants import variant_columns
from spai_core.config import dump_config
from spai_core.metrics import sigmoid

CONFIG_SUFFIX = ".config.yaml"
PATH_FIELDS = ("weights", "input", "output", "root")


def absolute_paths(cfg: ScoreConfig) -> ScoreConfig:
    """``cfg`` with absolute paths: what is recorded (the saved config, MLflow) must mean the same from anywhere."""
    return dataclasses.replace(cfg, **{k: absolute(getattr(cfg, k)) for k in PATH_FIELDS if getattr(cfg, k)})


def write_config(cfg: ScoreConfig, files: Files) -> str:
    """``<output>.config.yaml``: ``spai score --config`` of it reruns (or continues) the job from any folder."""
    uri = cfg.output + CONFIG_SUFFIX
    files.write(uri, dump_config(absolute_paths(cfg)).encode())
    return uri


def result_batch(batch: pa.Table, model_id: str, options: Mapping[str, Any], threshold: float | None = None,
                 variants: Sequence[Variant] | None = None) -> pa.Table:
    """A compacted batch of parts (the input's columns, ``row_id``, ``variant``, ``logit``, ``tiles``, ``error``) in
    the output layout: a sweep's variant columns after ``row_id`` (a plain job has none), then the score and the
    job's columns; with the calibrated ``threshold`` of the weights, also that and ``predicted`` (1 iff score >
    threshold)."""
    n = batch.num_rows
    logit = batch.column("logit")
    # failed rows (null logit) keep a null score
    score = pa.array(sigmoid(logit.fill_null(0.0).to_numpy()), pa.float64(),
                     mask=logit.is_null().to_numpy(zero_copy_only=False))
    labels = variant_columns(variants, batch.column("variant")) if variants else {}
    results = {**labels, "score": score, "logit": logit, "tiles": batch.column("tiles"),
               "error": batch.column("error"), "model_id": pa.repeat(pa.scalar(model_id), n),
               "precision": pa.repeat(pa.scalar(options["precision"]), n),
               "options": pa.repeat(pa.scalar(json.dumps(options, sort_keys=True)), n)}
    if threshold is not None:
        results["threshold"] = pa.repeat(pa.scalar(threshold, pa.float64()), n)
        results["predicted"] = pc.greater(score, threshold).cast(pa.int8())  # null where the row failed
    out = batch.select(batch.column_names[:batch.column_names.index("row_id") + 1])
    for name, column in results.items():
        out = out.append_column(name, column)
    return out


def official_header(cfg: ScoreConfig, files: Files) -> list[str]:
    """The official layout's columns: the input CSV's in its order (``image, split, class`` for other inputs)."""
    if cfg.input.lower().endswith(".csv"):
        return next(csv.reader(io.StringIO(files.read(cfg.input).decode("utf-8-sig"))))
    return ["image", "split", "class"]


def official_table(table: pa.Table, header: Sequence[str], tag: str) -> pa.Table:
    """Output rows in the official layout: the ``header`` columns plus the score in a column named ``tag``. Unknown
    labels stay empty rather than the official dummy 1."""

    def column(name: str) -> pa.ChunkedArray:
        if name == "class":
            return table.column("label").cast(pa.string())
        if name == "image" and "image" not in table.column_names:
            return table.column("uri")
        return table.column(clash_free(name))

    columns = {name: column(name) for name in header}
    columns[tag] = table.column("score")  # replaces an existing column of that name, as the official code does
    return pa.table(columns)


class TableWriter:
    """One Parquet or CSV file (by the suffix of ``uri``) written batch by batch, never the whole table in memory;
    it takes its place only at :meth:`close` (written as ``<uri>.tmp``, then moved), so a stopped job leaves no
    half output."""

    def __init__(self, uri: str, files: Files):
        self.uri = uri
        self.files = files
        self.fs, self.path = files.resolve(uri)
        self.rows = 0
        self._sink = self._writer = self._schema = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            if not is_s3(self.uri):
                self.fs.create_dir(self.path.rsplit("/", 1)[0] or "/", recursive=True)
            self._sink = self.fs.open_output_stream(self.path + ".tmp")
            self._schema = table.schema
            self._writer = (pacsv.CSVWriter(self._sink, table.schema, write_options=pacsv.WriteOptions(
                quoting_style="needed")) if self.uri.lower().endswith(".csv") else pq.ParquetWriter(
                    self._sink, table.schema))
        self._writer.write_table(table.cast(self._schema))
        self.rows += table.num_rows

    def close(self) -> bool:
        """Put the file in place; False (and nothing written) when no batch came."""
        if self._writer is None:
            return False
        self._writer.close()
        self._sink.close()
        self.fs.move(self.path + ".tmp", self.path)
        return True

    def abort(self) -> None:
        if self._writer is not None:
            self._sink.close()
            self.fs.delete_file(self.path + ".tmp")


@dataclasses.dataclass
class Written:
    """Counts of what :func:`write_outputs` wrote: rows, failed rows per reason, a first error for the summary."""

    rows: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    example: str | None = None

    @property
    def failed(self) -> int:
        return sum(self.reasons.values())

    def add(self, batch: pa.Table) -> None:
        self.rows += batch.num_rows
        errors = batch.column("error").drop_null().to_pylist()
        self.reasons.update(e.split(":", 1)[0] for e in errors)
        self.example = self.example or (errors[0] if errors else None)


def write_outputs(batches: Iterable[pa.Table], cfg: ScoreConfig, files: Files) -> Written:
    """Stream the output's batches (our layout) into the output file, or (official layout) the official one and the
    failed rows beside it; the counts for the summary."""
    main, written = TableWriter(cfg.output, files), Written()
    errors_uri = cfg.output + ".errors.csv"
    errors = TableWriter(errors_uri, files) if cfg.official_csv else None
    header = official_header(cfg, files) if cfg.official_csv else None
    try:
        for batch in batches:
            written.add(batch)
            if errors is None:
                main.write(batch)
                continue
            main.write(official_table(batch, header, cfg.tag))
            failed = batch.filter(pc.is_valid(batch.column("error"))).select(["uri", "error"])
            if failed.num_rows:
                errors.write(failed)
    except BaseException:
        main.abort()
        if errors is not None:
            errors.abort()
        raise
    main.close()
    if errors is not None and not errors.close() and files.info(errors_uri).type == pafs.FileType.File:
        files.remove(errors_uri)  # left by an earlier run into the same output
    return written
