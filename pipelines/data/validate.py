"""``spai validate``: open every image of a manifest with Ray Data before any training or scoring job relies on it.

Each row is read and decoded the way training will decode it; the job records width, height, format, byte size and
the SHA-256 of the file content, and sorts rows into a validated manifest (the good ones, with those columns added)
and a rejects table (with a reason from :data:`pipelines.data.decode.REASONS` and a message). No row is dropped:
accepted + rejected = input. The same content appearing in more than one split is leakage (a test image that was
also trained on inflates every metric), so it is reported with the URIs and splits involved; content carrying both
labels (e.g. a copy of a real photo among the fakes) is a label conflict, reported alike, since the model is told both
answers for the same pixels. A validated manifest can be validated again: every row is checked afresh and its check
columns are replaced.

Outputs, under the output directory (default ``<manifest>.validated``): the validated manifest itself,
``_rejects.parquet``, ``_leakage.parquet`` and ``_duplicates.parquet`` (every content hash on more than one row, with
its URIs, splits and labels). The leading underscores keep them out of the folder when pandas, pyarrow or Spark read it
as the manifest's dataset.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import ray

from pipelines import rowjob
from pipelines.data.config import ValidateConfig
from pipelines.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, read_image_bytes
from pipelines.data.manifest import CORE_COLUMNS, MANIFEST_SCHEMA, ManifestError, manifest_files, parquet_bytes
from pipelines.data.manifest.io import ManifestWriter, ParquetSink
from pipelines.infra.runtime import init_ray
from pipelines.infra.storage import Files, StorageOptions, absolute, join
from spai_core.config import dump_config, to_dict

logger = logging.getLogger(__name__)

# Rows per validation batch: each decodes a full-resolution image, so keep worker memory small.
BATCH_SIZE = 4
CHECK_SCHEMA = pa.schema([("width", pa.int32()), ("height", pa.int32()), ("format", pa.string()),
                          ("bytes", pa.int64()), ("sha256", pa.string()), ("reason", pa.string()),
                          ("message", pa.string())])
REJECTS_FILE = "_rejects.parquet"
LEAKAGE_FILE = "_leakage.parquet"
LEAKAGE_SCHEMA = pa.schema([("sha256", pa.string()), ("uris", pa.list_(pa.string())),
                            ("splits", pa.list_(pa.string()))])
DUPLICATES_FILE = "_duplicates.parquet"
DUPLICATES_SCHEMA = LEAKAGE_SCHEMA.append(pa.field("labels", pa.list_(pa.int8())))  # distinct non-null labels
# what the leakage, conflict and duplicate findings need of each accepted row
FINDING_SCHEMA = pa.schema([CHECK_SCHEMA.field("sha256"),
                            *(MANIFEST_SCHEMA.field(name) for name in ("uri", "split", "label"))])
# Hashes listed in the summary per finding; the Parquet files hold them all.
EXAMPLES = 10


@dataclasses.dataclass
class ValidationReport:
    """What ``validate_manifest`` found and where it wrote it."""

    manifest_uri: str
    output_uri: str
    rejects_uri: str
    leakage_uri: str
    duplicates_uri: str
    total: int
    accepted: int
    rejected: int
    reasons: dict[str, int]
    leakage: pa.Table  # sha256, uris, splits: content found in more than one split
    duplicates: int  # extra copies of the same content within one split (wasteful, not leakage)
    conflicts: pa.Table  # sha256, uris, splits, labels: content labelled both real (0) and AI-generated (1)
    duplicated: int  # content hashes on more than one row, all listed in duplicates_uri

    def summary(self) -> str:
        """A human-readable table of the outcome."""
        lines = [f"validated {self.manifest_uri}: {self.total} rows -> {self.accepted} accepted, "
                 f"{self.rejected} rejected", f"{'reason':<22}{'rows':>8}"]
        lines += [f"{reason:<22}{count:>8}" for reason, count in sorted(self.reasons.items())] or [f"{'(none)':<22}"]
        lines.append(f"leakage: {self.leakage.num_rows} content hash(es) in more than one split")
        lines += _examples(self.leakage, "splits")
        lines.append(f"label conflicts: {self.conflicts.num_rows} content hash(es) labelled both 0 (real) and 1 "
                     "(AI-generated)")
        lines += _examples(self.conflicts, "labels")
        lines.append(f"duplicates: {self.duplicated} content hash(es) on more than one row, "
                     f"{self.duplicates} extra copies within a split")
        lines.append(f"validated manifest: {self.output_uri}")
        lines.append(f"rejects: {self.rejects_uri}   leakage: {self.leakage_uri}   duplicates: {self.duplicates_uri}")
        return "\n".join(lines)


def _examples(findings: pa.Table, column: str) -> list[str]:
    """Summary lines for the first hashes of a finding: short hash, its ``column`` values, up to three URIs."""
    lines = []
    for row in findings.slice(0, EXAMPLES).to_pylist():
        more = f" (+{len(row['uris']) - 3} more)" if len(row["uris"]) > 3 else ""
        values = ",".join(str(v) for v in row[column])
        lines.append(f"  {row['sha256'][:12]}  {values}  {', '.join(row['uris'][:3])}{more}")
    return lines


def _check_one(uri: str, files: Files, max_pixels: int) -> dict:
    """Width, height, format, bytes, sha256 of one file, or the reason it is unusable (never raises)."""
    row = dict.fromkeys(CHECK_SCHEMA.names)
    try:
        data = read_image_bytes(uri, files)
        row.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        _, info = decode_image(data, max_pixels)
        row.update(width=info["width"], height=info["height"], format=info["format"])
    except DecodeError as exc:
        row.update(reason=exc.reason, message=exc.message)
    return row


class Checker:
    """The validation job's actor (:mod:`pipelines.rowjob`): the checks of each row's file."""

    def __init__(self, options: StorageOptions, max_pixels: int):
        self.files = Files(options)  # one S3 client per actor, not per image
        self.max_pixels = max_pixels

    def __call__(self, batch: dict) -> pa.Table:
        checked = [_check_one(uri, self.files, self.max_pixels) for uri in batch["uri"]]
        return pa.table({field.name: pa.array([row[field.name] for row in checked], field.type)
                         for field in CHECK_SCHEMA})


def find_duplicates(table: pa.Table) -> tuple[pa.Table, int]:
    """(content hashes on more than one row with their uris, splits and labels, extra copies within a split)."""
    if table.num_rows == 0:
        return DUPLICATES_SCHEMA.empty_table(), 0
    grouped = table.group_by("sha256").aggregate([("uri", "list"), ("split", "distinct"), ("label", "distinct"),
                                                  ("uri", "count")])
    per_split = table.group_by(["sha256", "split"]).aggregate([("uri", "count")])
    copies = pc.sum(pc.subtract(per_split.column("uri_count"), 1)).as_py() or 0
    repeated = grouped.filter(pc.greater(grouped.column("uri_count"), 1))
    duplicates = pa.table({
        "sha256": repeated.column("sha256"), "uris": repeated.column("uri_list"),
        "splits": [sorted(s) for s in repeated.column("split_distinct").to_pylist()],
        "labels": [sorted(labels) for labels in repeated.column("label_distinct").to_pylist()]},
        schema=DUPLICATES_SCHEMA)
    return duplicates.sort_by("sha256"), copies


def with_several(duplicates: pa.Table, column: str) -> pa.Table:
    """The duplicated hashes whose ``column`` (``splits``: leakage, ``labels``: label conflict) has several values."""
    return duplicates.filter(pc.greater(pc.list_value_length(duplicates.column(column)), 1))


def default_output(uri: str) -> str:
    """``<manifest>.validated`` next to the manifest (a ``.parquet`` manifest loses its suffix first)."""
    base = uri.rstrip("/")
    return (base[:-len(".parquet")] if base.lower().endswith(".parquet") else base) + ".validated"


def validate_manifest(uri: str, output_uri: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                      options: StorageOptions | None = None, progress: bool = True) -> ValidationReport:
    """Decode every image of a manifest in a :mod:`pipelines.rowjob` job (rows read in tasks, checks written by the
    workers under ``<output>.parts``); write the validated manifest (with the job's :class:`ValidateConfig` beside
    it) and the rejects table streaming from the parts, then the leakage and duplicates tables."""
    options = options or StorageOptions.from_env()
    output_uri = output_uri or default_output(uri)
    cfg = ValidateConfig(absolute(uri), absolute(output_uri), max_pixels)
    manifest_files(cfg.manifest, options)  # a missing or unreadable manifest is refused before Ray starts
    writer = ManifestWriter(cfg.output, options)  # so is an output that is not a manifest's folder
    init_ray()
    # A validated manifest already has the check columns: the checks replace them, so every row is checked afresh.
    job = rowjob.RowJob(rowjob.Rows(cfg.manifest), cfg.output.rstrip("/") + ".parts", Checker,
                        {"options": options, "max_pixels": max_pixels}, CHECK_SCHEMA, decode=False, options=options)
    rowjob.remove(job.work, options)  # a run stopped before: validation starts over
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # one CPU left to the read and write tasks, which the actors would otherwise starve
    compute = rowjob.Compute(workers=max(1, cpus - 1), batch_size=BATCH_SIZE)
    found = rowjob.run(job, compute, progress, desc="validating")
    if found.rows == 0:
        raise ManifestError(f"{uri} has no rows to validate; rebuild it with `spai manifest`")
    files = Files(options)
    rejects_uri, leakage_uri, duplicates_uri = (join(output_uri, name)
                                                for name in (REJECTS_FILE, LEAKAGE_FILE, DUPLICATES_FILE))
    rejects = ParquetSink(rejects_uri, files)
    reasons: collections.Counter = collections.Counter()
    for batch in rowjob.compacted(job.work, options, found):  # in input order, a batch at a time
        batch = batch.drop_columns(["row_id", "variant"])
        failed = pc.is_valid(batch.column("reason"))
        writer.write(batch.filter(pc.invert(failed)).drop_columns(["reason", "message"]))
        bad = batch.filter(failed)
        rejects.write(bad.select(list(CORE_COLUMNS) + [c for c in bad.column_names if c not in CORE_COLUMNS]))
        reasons.update(bad.column("reason").to_pylist())
    rejects.close()
    rowjob.remove(job.work, options)
    accepted = writer.rows
    duplicated, copies = find_duplicates(repeated_content(writer.finish(), accepted, options))
    leakage = with_several(duplicated, "splits").select(LEAKAGE_SCHEMA.names)
    conflicts = with_several(duplicated, "labels")
    writer.close({"builder": "validate", "config": to_dict(cfg), "notes": {
        "rejected": dict(reasons), "leakage_hashes": leakage.num_rows, "duplicates_within_split": copies,
        "label_conflict_hashes": conflicts.num_rows, "duplicated_hashes": duplicated.num_rows}},
        config_yaml=dump_config(cfg))
    for target, findings in ((leakage_uri, leakage), (duplicates_uri, duplicated)):
        files.write(target, parquet_bytes(findings))
    return ValidationReport(
        manifest_uri=uri, output_uri=output_uri, rejects_uri=rejects_uri, leakage_uri=leakage_uri,
        duplicates_uri=duplicates_uri, total=found.rows, accepted=accepted, rejected=sum(reasons.values()),
        reasons=dict(reasons), leakage=leakage, duplicates=copies, conflicts=conflicts, duplicated=duplicated.num_rows)


def repeated_content(uris: list[str], rows: int, options: StorageOptions) -> pa.Table:
    """The sha256, uri, split and label of the rows of Parquet files ``uris`` (``rows`` in all) whose content hash
    is on more than one row: all that :func:`find_duplicates` needs.

    Up to :data:`pipelines.rowjob.COMPACT_ROWS` rows are read where the caller runs (a Ray Data job costs seconds of
    start-up); more are counted per hash in the cluster, so that only the repeated hashes' rows reach the caller."""
    files = Files(options)
    fs, _ = files.resolve(uris[0])
    paths = [files.resolve(u)[1] for u in uris]
    if rows <= rowjob.COMPACT_ROWS:
        table = pa.concat_tables([pq.read_table(p, filesystem=fs, columns=FINDING_SCHEMA.names) for p in paths])
        counts = table.group_by("sha256").aggregate([("uri", "count")])
        return _rows_with(table, _repeated_hashes(counts, "uri_count").column("sha256").combine_chunks())
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=FINDING_SCHEMA.names)
    ds.context.enable_progress_bars = False
    # partitions of about COMPACT_ROWS hashes, not Ray's default of 200 (each one an aggregator to start)
    counts = ds.groupby("sha256", num_partitions=-(-rows // rowjob.COMPACT_ROWS)).count()
    counts = counts.map_batches(_repeated_hashes, batch_format="pyarrow")
    hashes = pa.chunked_array([chunk for batch in counts.iter_batches(batch_size=None, batch_format="pyarrow")
                               for chunk in batch.column("sha256").chunks], pa.string()).combine_chunks()
    if len(hashes) == 0:
        return FINDING_SCHEMA.empty_table()
    rows_of = ds.map_batches(_rows_with, batch_format="pyarrow", fn_kwargs={"hashes": hashes})
    return pa.concat_tables(rows_of.iter_batches(batch_size=None, batch_format="pyarrow"))


def _repeated_hashes(counts: pa.Table, column: str = "count()") -> pa.Table:
    """The hashes whose row count (``column``; ``count()`` from Ray Data) is over one."""
    return counts.filter(pc.greater(counts.column(column), 1)).select(["sha256"])


def _rows_with(rows: pa.Table, hashes: pa.Array) -> pa.Table:
    return rows.filter(pc.is_in(rows.column("sha256"), value_set=hashes))


def run_validation(cfg: ValidateConfig, progress: bool = True) -> ValidationReport:
    """``spai validate``: run the job ``cfg`` describes and log its summary."""
    report = validate_manifest(cfg.manifest, cfg.output, cfg.max_pixels, progress=progress)
    logger.info("%s", report.summary())
    return report
