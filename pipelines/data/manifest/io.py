"""Manifests on storage: a directory of Parquet files (one per split and generator) plus ``_manifest.json``."""
from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.infra.storage import Files, StorageOptions, absolute, join

from .schema import (MANIFEST_SCHEMA, NOTES_KEY, ManifestError, add_counts, check_values, conform, count_summary,
                     rows_to_table)

SCHEMA_VERSION = 1
SIDECAR = "_manifest.json"  # "_": dataset readers (pyarrow, pandas, Spark) skip it, so the folder reads as Parquet
LEGACY_SIDECAR = "manifest.json"  # its name before 2026-12; still read, and replaced when the manifest is rewritten
CONFIG_FILE = "_config.yaml"  # the config of the command that wrote the manifest: `spai ... --config` reruns it
ROWS_PER_FILE = 100_000
FLUSH_ROWS = 16_384  # rows a file written in batches buffers before it writes them as one row group


def _safe_name(value: str | None) -> str:
    """A file-name-safe form of a generator name (``_null`` for unknown)."""
    if value is None:
        return "_null"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value) or "_"


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as zstd-compressed Parquet bytes, ready for :meth:`Files.write` on any storage."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def table_from_parquet(data: bytes) -> pa.Table:
    """A table from Parquet bytes (read from any storage by :class:`Files`).

    Without Arrow's thread pool: a pool thread may drop the last reference to ``data`` (a Python object) after the
    read returns, and if the interpreter is exiting by then, taking the GIL ends that thread inside C++ code that
    cannot unwind: "terminate called without an active exception", exit code 134 (seen in ``spai evaluate``, in
    about 1 run of 4 once torch is imported). These tables are small; one thread reads them as fast.
    """
    return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)


def _runs(table: pa.Table) -> Iterator[tuple[tuple[str, str | None], pa.Table]]:
    """((split, generator), rows) of each run of consecutive rows with the same split and generator."""
    keys = list(zip(table.column("split").to_pylist(), table.column("generator").to_pylist()))
    start = 0
    for end in range(1, len(keys) + 1):
        if end == len(keys) or keys[end] != keys[start]:
            yield keys[start], table.slice(start, end - start)
            start = end


class ParquetSink:
    """One Parquet file on any storage, written a table at a time (zstd) in row groups of at least
    :data:`FLUSH_ROWS` rows. Its schema is the first table's; later tables must cast to it."""

    def __init__(self, uri: str, files: Files):
        self.uri, self.files = uri, files
        self.rows = 0
        self.schema: pa.Schema | None = None
        self._buffer: list[pa.Table] = []
        self._stream: pa.NativeFile | None = None
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        elif not table.schema.equals(self.schema):
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
                raise ManifestError(f"{self.uri}: rows whose columns ({table.schema.names}) do not match the earlier "
                                    f"rows' ({exc}); every input file needs the same columns and types") from exc
        self._buffer.append(table)
        self.rows += table.num_rows
        if sum(t.num_rows for t in self._buffer) >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._writer is None:
            self._stream = self.files.open_output(self.uri)
            self._writer = pq.ParquetWriter(self._stream, self.schema, compression="zstd")
        if self._buffer:
            self._writer.write_table(pa.concat_tables(self._buffer))
            self._buffer = []

    def close(self) -> None:
        """Write what is buffered and the file's footer (closing again does nothing)."""
        if self._stream is not None and self._stream.closed:
            return
        self._flush()
        self._writer.close()
        self._stream.close()


class ManifestWriter:
    """A manifest written a table at a time, so that no process holds all its rows: each (split, generator) goes to
    its own Parquet files of at most :data:`ROWS_PER_FILE` rows, rows in the order they come; :meth:`close` writes
    the sidecar. An existing manifest at ``uri`` is replaced when ``overwrite``, else refused (when it is opened)."""

    def __init__(self, uri: str, options: StorageOptions | None = None, overwrite: bool = True):
        self.uri = absolute(uri)
        self.files = Files(options)
        self._previous = _previous_files(self.uri, self.files, overwrite)
        self._open: dict[tuple[str, str | None], ParquetSink] = {}
        self._entries: list[dict[str, Any]] = []
        self._counts: dict[str, Any] = {}
        self._notes: dict[str, Any] = {}
        self._schema: pa.Schema | None = None

    def write(self, table: pa.Table) -> None:
        """Add rows (checked and typed as :func:`conform` and :func:`check_values` do)."""
        self._notes.update(json.loads((table.schema.metadata or {}).get(NOTES_KEY, b"{}")))
        table = conform(table.replace_schema_metadata(None))
        check_values(table)
        self._schema = self._schema or table.schema
        add_counts(self._counts, count_summary(table))
        for key, rows in _runs(table):
            while rows.num_rows:
                sink = self._sink(key)
                room = ROWS_PER_FILE - sink.rows
                sink.write(rows.slice(0, room))
                rows = rows.slice(room)

    def _sink(self, key: tuple[str, str | None]) -> ParquetSink:
        """The open file of ``key`` with room for more rows (a new one when it is full)."""
        sink = self._open.get(key)
        if sink is None or sink.rows >= ROWS_PER_FILE:
            split, generator = key
            path = f"{split}/part-{len(self._entries):05d}-{_safe_name(generator)}.parquet"
            sink = self._open[key] = ParquetSink(join(self.uri, path), self.files)
            self._entries.append({"path": path, "split": split, "generator": generator, "sink": sink})
        return sink

    @property
    def rows(self) -> int:
        return sum(entry["sink"].rows for entry in self._entries)

    def finish(self) -> list[str]:
        """Close the data files and return their URIs; they are a manifest once :meth:`close` writes the sidecar."""
        if not self._entries:  # an empty manifest is one empty file, so that readers find its columns
            self._sink(("test", None)).write(self._schema.empty_table() if self._schema else
                                             conform(MANIFEST_SCHEMA.empty_table()))
        for entry in self._entries:
            entry["sink"].close()
        return [entry["sink"].uri for entry in self._entries]

    def close(self, build_info: Mapping[str, Any], config_yaml: str | None = None) -> str:
        """Finish the files and write the sidecar (``build_info``: how the manifest was made, see
        :func:`write_manifest`); returns the manifest's URI."""
        self.finish()
        entries = [{**{k: v for k, v in e.items() if k != "sink"}, "rows": e["sink"].rows} for e in self._entries]
        sidecar = {
            "format": "spai-manifest",
            "schema_version": SCHEMA_VERSION,
            "columns": {field.name: str(field.type) for field in self._schema or MANIFEST_SCHEMA},
            "counts": self._counts or count_summary(MANIFEST_SCHEMA.empty_table()),
            "files": entries,
            "build": {**build_info, "notes": {**self._notes, **build_info.get("notes", {})},
                      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        }
        self.files.write(join(self.uri, SIDECAR), json.dumps(sidecar, indent=2, default=str).encode())
        if config_yaml is not None:
            self.files.write(join(self.uri, CONFIG_FILE), config_yaml.encode())
        # Old files go only once the new sidecar points elsewhere, so a failed write leaves the old manifest readable.
        stale = set(self._previous) | {LEGACY_SIDECAR} | ({CONFIG_FILE} if config_yaml is None else set())
        for path in stale - {e["path"] for e in entries}:
            if self.files.info(join(self.uri, path)).type == pafs.FileType.File:
                self.files.remove(join(self.uri, path))
        return self.uri


def _previous_files(uri: str, files: Files, overwrite: bool = True) -> list[str]:
    """Data files of the manifest about to be replaced at ``uri`` (refused unless ``overwrite``); refuse to write into
    any other non-empty folder."""
    info = files.info(uri)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        raise ManifestError(f"{uri} is a file; a manifest is a directory, choose another --output")
    sidecar = sidecar_uri(uri, files)
    if sidecar is None:
        if files.list(uri):
            raise ManifestError(f"{uri} exists and is not a manifest; choose a new --output or empty the folder")
        return []
    if not overwrite:
        raise ManifestError(f"{uri} already holds a manifest; pass --overwrite to replace it, or choose another "
                            "--output")
    return [entry["path"] for entry in json.loads(files.read(sidecar)).get("files", [])]


def check_output(uri: str, overwrite: bool, options: StorageOptions | None = None) -> None:
    """Refuse an output that :func:`write_manifest` would refuse, before a builder spends minutes listing images."""
    _previous_files(absolute(uri), Files(options), overwrite)


def write_manifest(table_or_rows: pa.Table | Sequence[Mapping[str, Any]], uri: str, build_info: Mapping[str, Any],
                   options: StorageOptions | None = None, overwrite: bool = True,
                   config_yaml: str | None = None) -> str:
    """Write a manifest directory (Parquet per split/generator + ``_manifest.json``) and return its URI; rows sorted
    by split, generator and uri (:class:`ManifestWriter` writes one in batches, in the order they come).

    ``build_info`` says how it was made (builder name, config); the time, counts, file list and any builder notes
    (e.g. files skipped) are added. An existing manifest at ``uri`` is replaced when ``overwrite``, else refused.
    ``config_yaml``, the command's config, is saved beside the sidecar (:data:`CONFIG_FILE`).
    """
    table = table_or_rows if isinstance(table_or_rows, pa.Table) else rows_to_table(table_or_rows)
    writer = ManifestWriter(uri, options, overwrite)
    notes = (table.schema.metadata or {}).get(NOTES_KEY)
    table = conform(table.replace_schema_metadata(None))
    writer.write(table.sort_by([("split", "ascending"), ("generator", "ascending"), ("uri", "ascending")])
                 .replace_schema_metadata({NOTES_KEY: notes} if notes else None))
    return writer.close(build_info, config_yaml)


def sidecar_uri(uri: str, files: Files) -> str | None:
    """The sidecar of manifest directory ``uri`` (:data:`SIDECAR`, or :data:`LEGACY_SIDECAR`), None when it has none."""
    for name in (SIDECAR, LEGACY_SIDECAR):
        if files.info(join(uri, name)).type == pafs.FileType.File:
            return join(uri, name)
    return None


def read_sidecar(uri: str, options: StorageOptions | None = None) -> dict[str, Any] | None:
    """The ``_manifest.json`` of a manifest directory, or None when there is none."""
    files = Files(options)
    sidecar = sidecar_uri(uri, files)
    if sidecar is None:
        return None
    try:
        return json.loads(files.read(sidecar))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{sidecar} is not valid JSON ({exc}); rebuild the manifest with `spai manifest`") from exc


def manifest_files(uri: str, options: StorageOptions | None = None, split: str | None = None) -> list[str]:
    """URIs of a manifest's Parquet files: those listed in its ``_manifest.json`` (only ``split``'s when given),
    else every ``.parquet`` file under the folder (e.g. written by Ray), or the file itself."""
    files = Files(options)
    info = files.info(uri)
    if info.type == pafs.FileType.NotFound:
        raise files.missing(uri)
    if info.type == pafs.FileType.File:
        if not uri.lower().endswith(".parquet"):
            raise ManifestError(f"{uri} is not a manifest (a directory with {SIDECAR}, or a .parquet file)")
        return [uri]
    sidecar = read_sidecar(uri, options)
    if sidecar is not None:
        return [join(uri, e["path"]) for e in sidecar.get("files", []) if split is None or e.get("split") == split]
    found = files.list(uri, suffixes=(".parquet",))
    if not found:
        raise ManifestError(f"{uri} holds no manifest ({SIDECAR} or .parquet files); build one with `spai manifest`")
    return found


def read_manifest(uri: str, options: StorageOptions | None = None, split: str | None = None) -> pa.Table:
    """Read a manifest (directory, or one Parquet file) with its columns typed as :data:`MANIFEST_SCHEMA`.

    ``split`` reads only the files that hold that split when ``_manifest.json`` says which (rows are not filtered).
    """
    files = Files(options)
    tables = []
    for path in manifest_files(uri, options, split):
        try:
            tables.append(table_from_parquet(files.read(path)))
        except pa.ArrowInvalid as exc:
            raise ManifestError(f"{path} is not a readable Parquet file ({exc}); rebuild the manifest") from exc
    if not tables:
        return MANIFEST_SCHEMA.empty_table()
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as exc:
        raise ManifestError(f"the Parquet files of {uri} have incompatible columns ({exc}); rebuild it") from exc
    return conform(table, where=uri)

