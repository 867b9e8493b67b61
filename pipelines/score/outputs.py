"""What a scoring job writes: its config (``<output>.config.yaml``, first), then the output table in our layout or
the official CSV one (with ``<output>.errors.csv``), assembled from the work folder's parts."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from pipelines.data.manifest import parquet_bytes
from pipelines.infra.storage import Files, absolute
from pipelines.perturb import NONE, Variant
from pipelines.score.config import ScoreConfig, ScoreError
from pipelines.score.inputs import clash_free
from pipelines.score.variants import expand, result_keys, variant_columns
from pipelines.score.workdir import write_atomic
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


def assemble(table: pa.Table, parts: pa.Table, model_id: str, options: Mapping[str, Any],
             threshold: float | None = None, variants: Sequence[Variant] | None = None) -> pa.Table:
    """Input rows joined with their results (first result per row and variant), in input order; every row must have
    one. A sweep's ``variants`` repeat each row once per variant, with the variant columns after ``row_id``.
    With the calibrated ``threshold`` of the weights, also that and ``predicted`` (1 iff score > threshold)."""
    table = expand(table, variants or [NONE])
    n = table.num_rows
    labels = variant_columns(variants, n // len(variants)) if variants else {}
    keys = result_keys(table.column("row_id"), labels.get("variant", pa.repeat(pa.scalar(NONE.label), n)))
    index = pc.index_in(keys, value_set=result_keys(parts.column("row_id"), parts.column("variant")))
    if index.null_count:
        raise ScoreError(f"{index.null_count} of {n} rows have no result; re-run the same command to score them")
    found = parts.take(index)
    logit = found.column("logit")
    # failed rows (null logit) keep a null score
    score = pa.array(sigmoid(logit.fill_null(0.0).to_numpy()), pa.float64(),
                     mask=logit.is_null().to_numpy(zero_copy_only=False))
    results = {**labels, "score": score, "logit": logit, "tiles": found.column("tiles"),
               "error": found.column("error"), "model_id": pa.repeat(pa.scalar(model_id), n),
               "precision": pa.repeat(pa.scalar(options["precision"]), n),
               "options": pa.repeat(pa.scalar(json.dumps(options, sort_keys=True)), n)}
    if threshold is not None:
        results["threshold"] = pa.repeat(pa.scalar(threshold, pa.float64()), n)
        results["predicted"] = pc.greater(score, threshold).cast(pa.int8())  # null where the row failed
    out = table
    for name, column in results.items():
        out = out.append_column(name, column)
    return out


def official_table(table: pa.Table, cfg: ScoreConfig, files: Files) -> pa.Table:
    """The official output layout: the input CSV's columns in its order (``image, split, class`` for other inputs)
    plus the score in a column named ``cfg.tag``. Unknown labels stay empty rather than the official dummy 1."""
    if cfg.input.lower().endswith(".csv"):
        header = next(csv.reader(io.StringIO(files.read(cfg.input).decode("utf-8-sig"))))
    else:
        header = ["image", "split", "class"]

    def column(name: str) -> pa.ChunkedArray:
        if name == "class":
            return table.column("label").cast(pa.string())
        if name == "image" and "image" not in table.column_names:
            return table.column("uri")
        return table.column(clash_free(name))

    columns = {name: column(name) for name in header}
    columns[cfg.tag] = table.column("score")  # replaces an existing column of that name, as the official code does
    return pa.table(columns)


def table_bytes(table: pa.Table, uri: str) -> bytes:
    """A table as CSV or Parquet, by the suffix of ``uri``."""
    if not uri.lower().endswith(".csv"):
        return parquet_bytes(table)
    sink = io.BytesIO()
    pacsv.write_csv(table, sink, pacsv.WriteOptions(quoting_style="needed"))
    return sink.getvalue()


def write_outputs(out: pa.Table, cfg: ScoreConfig, files: Files) -> None:
    """The output file, and (official layout) the failed rows beside it."""
    if not cfg.official_csv:
        write_atomic(files, cfg.output, table_bytes(out, cfg.output))
        return
    write_atomic(files, cfg.output, table_bytes(official_table(out, cfg, files), cfg.output))
    errors_uri = cfg.output + ".errors.csv"
    failed = out.filter(pc.is_valid(out.column("error"))).select(["uri", "error"])
    if failed.num_rows:
        write_atomic(files, errors_uri, table_bytes(failed, errors_uri))
    elif files.info(errors_uri).type == pafs.FileType.File:
        files.remove(errors_uri)  # left by an earlier run into the same output
