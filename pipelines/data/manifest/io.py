"""Manifests on storage: a directory of Parquet files (one per split and generator) plus ``_manifest.json``."""
from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.infra.storage import Files, StorageOptions, absolute, join

from .schema import MANIFEST_SCHEMA, NOTES_KEY, ManifestError, check_values, conform, count_summary, rows_to_table

SCHEMA_VERSION = 1
SIDECAR = "_manifest.json"  # "_": dataset readers (pyarrow, pandas, Spark) skip it, so the folder reads as Parquet
LEGACY_SIDECAR = "manifest.json"  # its name before 2026-12; still read, and replaced when the manifest is rewritten
CONFIG_FILE = "_config.yaml"  # the config of the command that wrote the manifest: `spai ... --config` reruns it
ROWS_PER_FILE = 100_000


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


def _partitions(table: pa.Table) -> list[tuple[str, str | None, pa.Table]]:
    """(split, generator, rows) runs of a table sorted by split, generator and uri, at most ROWS_PER_FILE each."""
    keys = list(zip(table.column("split").to_pylist(), table.column("generator").to_pylist()))
    parts, start = [], 0
    for end in range(1, len(keys) + 1):
        if end == len(keys) or keys[end] != keys[start] or end - start == ROWS_PER_FILE:
            parts.append((*keys[start], table.slice(start, end - start)))
            start = end
    return parts


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
    """Write a manifest directory (Parquet per split/generator + ``_manifest.json``) and return its URI.

    ``build_info`` says how it was made (builder name, config); the time, counts, file list and any builder notes
    (e.g. files skipped) are added. An existing manifest at ``uri`` is replaced when ``overwrite``, else refused.
    ``config_yaml``, the command's config, is saved beside the sidecar (:data:`CONFIG_FILE`).
    """
    table = table_or_rows if isinstance(table_or_rows, pa.Table) else rows_to_table(table_or_rows)
    notes = json.loads((table.schema.metadata or {}).get(NOTES_KEY, b"{}"))
    table = conform(table.replace_schema_metadata(None))
    check_values(table)
    table = table.sort_by([("split", "ascending"), ("generator", "ascending"), ("uri", "ascending")])
    uri = absolute(uri)
    files = Files(options)
    previous = _previous_files(uri, files, overwrite)
    entries = []
    for index, (split, generator, part) in enumerate(_partitions(table) or [("test", None, table)]):
        path = f"{split}/part-{index:05d}-{_safe_name(generator)}.parquet"
        files.write(join(uri, path), parquet_bytes(part))
        entries.append({"path": path, "split": split, "generator": generator, "rows": part.num_rows})
    sidecar = {
        "format": "spai-manifest",
        "schema_version": SCHEMA_VERSION,
        "columns": {field.name: str(field.type) for field in table.schema},
        "counts": count_summary(table),
        "files": entries,
        "build": {**build_info, "notes": {**notes, **build_info.get("notes", {})},
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    }
    files.write(join(uri, SIDECAR), json.dumps(sidecar, indent=2, default=str).encode())
    if config_yaml is not None:
        files.write(join(uri, CONFIG_FILE), config_yaml.encode())
    # Old files go only once the new sidecar points elsewhere, so a failed write leaves the old manifest readable.
    stale = set(previous) | {LEGACY_SIDECAR} | ({CONFIG_FILE} if config_yaml is None else set())
    for path in stale - {e["path"] for e in entries}:
        if files.info(join(uri, path)).type == pafs.FileType.File:
            files.remove(join(uri, path))
    return uri


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

