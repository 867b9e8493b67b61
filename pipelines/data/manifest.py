"""Manifests: one Parquet table of images (uri, label, split, generator, source, group) from any dataset layout.

Every job (validate, train, tune, score, evaluate) reads a manifest, never a folder layout, so layouts are handled
once here: GenImage (all eight generator folders, and subsets such as the ``mini_gen`` fork), official SPAI CSVs,
and plain real/fake folders. Each builder works on local folders and ``s3://`` prefixes alike.

On storage a manifest is a directory: one Parquet file per split and generator under ``<split>/`` (so Ray Data reads
it in parallel and a job that needs one split reads only its files), plus ``_manifest.json`` with the schema version,
row counts, the file list and how it was built. The folder is also a plain Parquet dataset: pyarrow, pandas, Spark
and DuckDB read it directly, skipping the sidecar by its leading underscore.

``group`` is what must never straddle splits (a source photo, a prompt, an ImageNet class): every builder that
assigns splits does it per group, seeded, so the same inputs and seed give the same splits.
"""
from __future__ import annotations

import argparse
import collections
import csv
import datetime
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.data.decode import SNIFF_BYTES, sniff_image_format
from pipelines.infra.storage import (Files, StorageError, StorageOptions, absolute, basename, is_s3, join, parent,
                               relative_to)
from spai_core.errors import UserError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SIDECAR = "_manifest.json"  # "_": dataset readers (pyarrow, pandas, Spark) skip it, so the folder reads as Parquet
LEGACY_SIDECAR = "manifest.json"  # its name before 2026-12; still read, and replaced when the manifest is rewritten
SPLITS = ("train", "val", "test")
REAL = "real"
MANIFEST_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),  # absolute local path or s3://bucket/key
    pa.field("label", pa.int8()),  # 0 real, 1 AI-generated, null unknown
    pa.field("split", pa.string()),  # train / val / test
    pa.field("generator", pa.string()),  # 'real' for real images, null when unknown
    pa.field("source", pa.string()),  # dataset name
    pa.field("group", pa.string()),  # unit that never straddles splits
])
CORE_COLUMNS = tuple(MANIFEST_SCHEMA.names)
# What the builders take for an image by name (listing by content would read every file of a remote dataset);
# `spai validate` then rejects any that do not decode.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".avif")
ROWS_PER_FILE = 100_000
NOTES_KEY = b"spai.build_notes"  # schema metadata key for what a builder skipped, carried into the sidecar
_GENIMAGE_SPLITS = {"train": "train", "val": "test"}  # GenImage's val set is the benchmark's test set
_GENIMAGE_CLASSES = {"ai": 1, "nature": 0}


class ManifestError(UserError, ValueError):
    """A manifest, CSV or dataset layout that cannot be used; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Tables


def conform(table: pa.Table, where: str = "manifest") -> pa.Table:
    """Check and cast the six manifest columns (naming any missing or mistyped one); extra columns follow as-is."""
    missing = [name for name in CORE_COLUMNS if name not in table.column_names]
    if missing:
        raise ManifestError(f"{where} lacks column(s) {missing}; a manifest needs {list(CORE_COLUMNS)} "
                            "(build one with `spai manifest`)")
    columns = []
    for field in MANIFEST_SCHEMA:
        try:
            columns.append(table.column(field.name).cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ManifestError(f"{where}: column {field.name!r} has type {table.schema.field(field.name).type}, "
                                f"which cannot be read as {field.type} ({exc}); fix that column") from exc
    extras = [name for name in table.column_names if name not in CORE_COLUMNS]
    schema = pa.schema(list(MANIFEST_SCHEMA) + [table.schema.field(name) for name in extras])
    return pa.Table.from_arrays(columns + [table.column(name) for name in extras], schema=schema)


def _typed_column(rows: Sequence[Mapping[str, Any]], field: pa.Field) -> pa.Array:
    try:
        return pa.array([row.get(field.name) for row in rows], type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
        raise ManifestError(f"column {field.name!r} cannot be read as {field.type} ({exc}); fix those values") from exc


def rows_to_table(rows: Sequence[Mapping[str, Any]], extras: Sequence[str] | None = None,
                  notes: Mapping | None = None) -> pa.Table:
    """A manifest table from dict rows: the six columns typed, ``extras`` (default: every other key, in first-seen
    order) as strings, builder notes as schema metadata."""
    if extras is None:
        extras = list(dict.fromkeys(key for row in rows for key in row if key not in CORE_COLUMNS))
    arrays = [_typed_column(rows, field) for field in MANIFEST_SCHEMA]
    for name in extras:
        arrays.append(pa.array([None if row.get(name) is None else str(row[name]) for row in rows], pa.string()))
    schema = pa.schema(list(MANIFEST_SCHEMA) + [pa.field(name, pa.string()) for name in extras])
    if notes:
        schema = schema.with_metadata({NOTES_KEY: json.dumps(notes)})
    return pa.Table.from_arrays(arrays, schema=schema)


def _bad_values(values: list, allowed: Iterable) -> list[tuple[int, Any]]:
    allowed = set(allowed)
    return [(i, v) for i, v in enumerate(values) if v not in allowed]


def check_values(table: pa.Table) -> None:
    """Raise a ManifestError naming the rows whose uri, label or split cannot be used."""
    uris = table.column("uri").to_pylist()
    problems = {
        "uri": [(i, v) for i, v in enumerate(uris) if not v],
        "label": _bad_values(table.column("label").to_pylist(), (0, 1, None)),
        "split": _bad_values(table.column("split").to_pylist(), SPLITS),
    }
    expected = {"uri": "a non-empty path", "label": "0, 1 or null", "split": "one of train/val/test"}
    messages = [f"column {name!r} must be {expected[name]} but {len(bad)} row(s) are not, e.g. "
                + ", ".join(f"row {i} ({uris[i]!r}): {v!r}" for i, v in bad[:3])
                for name, bad in problems.items() if bad]
    if not problems["label"] and (both := _labelled_both(table)):
        messages.append(f"{len(both)} file(s) are labelled both 0 (real) and 1 (AI-generated), e.g. "
                        f"{', '.join(both[:3])}; a file is one or the other (do the real and fake folders overlap?)")
    if messages:
        raise ManifestError("; ".join(messages))


def _labelled_both(table: pa.Table) -> list[str]:
    """URIs listed with label 0 and with label 1."""
    labels = table.select(["uri", "label"]).group_by("uri").aggregate([("label", "count_distinct")])
    return sorted(labels.filter(pc.greater(labels.column("label_count_distinct"), 1)).column("uri").to_pylist())


def _counts(values: Iterable) -> dict[str, int]:
    return {("null" if k is None else str(k)): v for k, v in sorted(collections.Counter(values).items(), key=str)}


def count_summary(table: pa.Table) -> dict[str, Any]:
    """Row counts per split, label, generator and source, and labels per split (for the sidecar and reports)."""
    splits, labels = table.column("split").to_pylist(), table.column("label").to_pylist()
    return {
        "rows": table.num_rows,
        "split": _counts(splits),
        "label": _counts(labels),
        "generator": _counts(table.column("generator").to_pylist()),
        "source": _counts(table.column("source").to_pylist()),
        "split_label": {s: _counts(lab for sp, lab in zip(splits, labels) if sp == s) for s in sorted(set(splits))},
    }


def format_summary(table: pa.Table, splits_by_group: bool = False) -> str:
    """A small text table: rows per split and label, then per generator; ``splits_by_group`` when the builder split
    the rows by group (``manifest folders``), which a group per image undoes."""
    summary = count_summary(table)
    lines = [f"{'split':<8}{'real':>10}{'fake':>10}{'unknown':>10}{'total':>10}"]
    for split, labels in summary["split_label"].items():
        row = [labels.get("0", 0), labels.get("1", 0), labels.get("null", 0)]
        lines.append(f"{split:<8}" + "".join(f"{n:>10}" for n in row) + f"{sum(row):>10}")
    lines.append("generators: " + ", ".join(f"{k}={v}" for k, v in summary["generator"].items()))
    one_class = [split for split, labels in summary["split_label"].items()
                 if split in ("train", "val") and not {"0", "1"} <= set(labels)]
    lines += [f"warning: split {split} lacks real or AI-generated images, so training cannot use it fully (val AUC "
              "is undefined; a train split needs both); add images or change --split / --seed" for split in one_class]
    groups = set(table.column("group").to_pylist())
    if splits_by_group and len(groups) == table.num_rows > 1 and {"0", "1"} <= set(summary["label"]):
        lines.append(f"note: {len(groups)} groups for {table.num_rows} images, none shared: if fakes were made from "
                     "the real photos, a photo and its fakes may land in different splits; name each fake after its "
                     "photo (beach.png -> beach_sdxl.png) or use --group-by folder")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing


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


def _previous_files(uri: str, files: Files) -> list[str]:
    """Data files of the manifest about to be replaced at ``uri``; refuse to write into any other non-empty folder."""
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
    return [entry["path"] for entry in json.loads(files.read(sidecar)).get("files", [])]


def write_manifest(table_or_rows: pa.Table | Sequence[Mapping[str, Any]], uri: str, build_info: Mapping[str, Any],
                   options: StorageOptions | None = None) -> str:
    """Write a manifest directory (Parquet per split/generator + ``_manifest.json``) and return its URI.

    ``build_info`` says how it was made (builder name, arguments); the time, counts, file list and any builder
    notes (e.g. files skipped) are added. An existing manifest at ``uri`` is replaced.
    """
    table = table_or_rows if isinstance(table_or_rows, pa.Table) else rows_to_table(table_or_rows)
    notes = json.loads((table.schema.metadata or {}).get(NOTES_KEY, b"{}"))
    table = conform(table.replace_schema_metadata(None))
    check_values(table)
    table = table.sort_by([("split", "ascending"), ("generator", "ascending"), ("uri", "ascending")])
    uri = absolute(uri)
    files = Files(options)
    previous = _previous_files(uri, files)
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
    # Old files go only once the new sidecar points elsewhere, so a failed write leaves the old manifest readable.
    for path in (set(previous) | {LEGACY_SIDECAR}) - {e["path"] for e in entries}:
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


# ---------------------------------------------------------------------------------------------------------------
# Splits and groups


def check_fractions(fractions: Sequence[float]) -> None:
    """Train, val and test fractions must be three non-negative numbers summing to 1."""
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ManifestError(f"split fractions must be three non-negative numbers (train,val,test) summing to 1, "
                            f"got {tuple(fractions)}")


def assign_splits(groups: Sequence[str], fractions: Sequence[float], seed: int = 0) -> list[str]:
    """Seeded train/val/test assignment where every group lands in exactly one split.

    Groups are shuffled with ``seed``, then laid end to end by row count; a group goes to the split whose share of
    rows its middle falls in, so split sizes track ``fractions`` by rows, not by number of groups.
    """
    check_fractions(fractions)
    sizes = collections.Counter(groups)
    order = sorted(sizes)
    np.random.default_rng(seed).shuffle(order)
    bounds = np.cumsum(fractions) * len(groups)
    last = max(i for i, f in enumerate(fractions) if f > 0)
    split_of, done = {}, 0
    for group in order:
        middle = done + sizes[group] / 2
        split_of[group] = SPLITS[min(int(np.searchsorted(bounds, middle, side="right")), last)]
        done += sizes[group]
    return [split_of[g] for g in groups]


def _stem(uri: str) -> str:
    return os.path.splitext(basename(uri))[0]


def stem_group(uri: str, tags: Iterable[str]) -> str:
    """A file's stem with trailing generator tags stripped: ``beach_waifu2x.png`` -> ``beach`` when ``waifu2x`` is a
    tag, so a generated copy and its source photo share a group. Separators are ``_``, ``-``, ``.`` and spaces."""
    stem = _stem(uri)
    pattern = re.compile(r"[_\-. ]+(" + "|".join(re.escape(t) for t in sorted(tags, key=len, reverse=True)) + r")$",
                         re.IGNORECASE)
    while True:
        stripped = pattern.sub("", stem)
        if stripped == stem or not stripped:
            return stem
        stem = stripped


# ---------------------------------------------------------------------------------------------------------------
# Builders


def _list_images(uri: str, files: Files, recursive: bool = True) -> tuple[list[str], list[str]]:
    """(image files by suffix, other files) under a folder or prefix; an empty folder is an error."""
    everything = files.list(uri, recursive=recursive)
    images = [u for u in everything if u.lower().endswith(IMAGE_SUFFIXES)]
    others = [u for u in everything if not u.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise ManifestError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {uri}; check the path")
    return images, others


def _skipped_note(others: Sequence[str], why: str) -> dict[str, Any]:
    """Log and describe files a builder did not take, so nothing is dropped without a trace."""
    if not others:
        return {}
    logger.warning("skipped %d file(s) %s, e.g. %s", len(others), why, ", ".join(others[:3]))
    return {"skipped": {"count": len(others), "why": why, "examples": list(others[:20])}}


def genimage_generator(folder: str) -> str:
    """Normalised generator name of a GenImage folder: ``imagenet_ai_0419_sdv4`` -> ``sdv4``,
    ``imagenet_glide`` -> ``glide``; other names are lower-cased unchanged."""
    return re.sub(r"^imagenet_(ai_\d{4}_)?", "", folder.lower())


def _picks(name: str, folder: str) -> bool:
    """Whether a ``--generators`` name picks a GenImage folder: by folder name or normalised generator name."""
    return name.lower() == folder.lower() or genimage_generator(name) == genimage_generator(folder)


def genimage_group(folder: str, uri: str) -> str:
    """The ImageNet class of a GenImage file, prefixed by its generator folder (the unit of a prompt).

    Nature images carry a synset (``n01440764_10026.JPEG``), generated ones the class number before
    ``_<generator>_<n>`` (``014_sdv4_00021.png``, ``GLIDE_1000_200_08_014_glide_00021.png``); anything else is
    its own group (its file stem).
    """
    stem = _stem(uri)
    found = re.search(r"(n\d{8})", stem) or re.search(r"(?:^|_)(\d+)_[A-Za-z][A-Za-z0-9]*_\d+$", stem)
    return f"{folder}/{found.group(1) if found else stem}"


def from_genimage(root: str, generators: Sequence[str] | None = None, val_fraction: float = 0.0, seed: int = 0,
                  options: StorageOptions | None = None, source: str | None = None) -> pa.Table:
    """Manifest rows for a GenImage tree: ``<root>/[...]/<generator folder>/{train,val}/{ai,nature}/...``.

    Works for the full benchmark (``imagenet_ai_0419_sdv4``, ``imagenet_ai_0424_wukong``, ``imagenet_ai_0508_adm``,
    ``imagenet_ai_0419_vqdm``, ``imagenet_ai_0424_sdv5``, ``imagenet_glide``, ``imagenet_midjourney``,
    ``imagenet_biggan`` / ``imagenet_ai_0419_biggan``, also when nested in a per-generator download folder) and for
    subsets like the ``mini_gen`` fork. ``ai`` images get label 1 and the normalised generator name (``sdv4``),
    ``nature`` images label 0 and generator ``real``; every row's source is ``<source or genimage>/<folder>``.
    GenImage's ``val`` becomes split ``test`` (it is the benchmark's test set); ``val_fraction`` moves that share
    of each generator folder's ``train`` rows to ``val``, whole ImageNet classes at a time (see
    :func:`genimage_group`). ``generators`` keeps only these folders (folder or normalised names).
    """
    if not 0 <= val_fraction < 1:  # checked before listing, which can take minutes on S3
        raise ManifestError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")
    files = Files(options)
    images, others = _list_images(root, files)
    rows, unmatched, folders = [], list(others), set()
    for uri in images:
        parts = relative_to(uri, root).split("/")
        hit = next((i for i in range(1, len(parts) - 2)
                    if parts[i] in _GENIMAGE_SPLITS and parts[i + 1] in _GENIMAGE_CLASSES), None)
        if hit is None:
            unmatched.append(uri)
            continue
        folder = parts[hit - 1]
        folders.add(folder)
        if generators is not None and not any(_picks(name, folder) for name in generators):
            continue
        label = _GENIMAGE_CLASSES[parts[hit + 1]]
        rows.append({"uri": uri, "label": label, "split": _GENIMAGE_SPLITS[parts[hit]],
                     "generator": genimage_generator(folder) if label else REAL,
                     "source": f"{source or 'genimage'}/{folder}", "group": genimage_group(folder, uri)})
    unknown = [name for name in generators or () if not any(_picks(name, folder) for folder in folders)]
    if unknown:  # a typo would otherwise silently leave a generator out
        raise ManifestError(f"--generators {' '.join(unknown)}: no such generator folder under {root}; it has "
                            f"{', '.join(sorted(folders)) or 'none'}")
    if not rows:
        raise ManifestError(f"no GenImage images under {root} (expected <generator>/train|val/ai|nature/<file>"
                            + (f" for generators {sorted(generators)}" if generators else "") + ")")
    if val_fraction:
        _carve_val(rows, val_fraction, seed)
    return rows_to_table(rows, notes=_skipped_note(unmatched, "outside <generator>/{train,val}/{ai,nature}"))


def _carve_val(rows: list[dict[str, Any]], val_fraction: float, seed: int) -> None:
    """Move ``val_fraction`` of each source's train rows to val, by group (in place)."""
    by_source = collections.defaultdict(list)
    for row in rows:
        if row["split"] == "train":
            by_source[row["source"]].append(row)
    for members in by_source.values():
        splits = assign_splits([r["group"] for r in members], (1 - val_fraction, val_fraction, 0.0), seed)
        for row, split in zip(members, splits):
            row["split"] = split


def _resolve_path(image: str, root: str) -> str:
    """An image path of a CSV as a full URI: absolute paths and s3:// URIs as they are, others under ``root``."""
    if is_s3(image) or os.path.isabs(image):
        return image
    return join(root, image) if is_s3(root) else os.path.normpath(os.path.join(os.path.abspath(root), image))


def _parse_csv_row(line: int, row: Mapping[str, str], errors: list[str],
                   labelled: bool) -> tuple[int | None, str] | None:
    """(label, split) of an official CSV row, or None with a message appended to ``errors``. Unless ``labelled``, an
    empty class is an unknown label and an empty split is ``test``."""
    text, split = (row.get("class") or "").strip(), (row.get("split") or "").strip()
    if not (row.get("image") or "").strip():
        errors.append(f"line {line}: empty image path")
    elif text not in ("0", "1") and (labelled or text):
        errors.append(f"line {line}: class {text!r} is not 0 (real) or 1 (AI-generated)")
    elif split not in SPLITS and (labelled or split):
        errors.append(f"line {line}: split {split!r} is not one of {'/'.join(SPLITS)}")
    else:
        return (int(text) if text else None), split or "test"
    return None


def from_spai_csv(csv_uri: str, root: str | None = None, generator: str | None = None,
                  options: StorageOptions | None = None, source: str | None = None, labelled: bool = True) -> pa.Table:
    """Manifest rows for an official SPAI CSV (``image,class,split``; extra columns kept as strings).

    Relative image paths resolve against ``root`` (default: the CSV's folder), as the official code does. Real rows
    get generator ``real``; fake rows ``generator``, else a ``generator`` column, else ``unknown``. Source is
    ``source``, else a ``source`` column, else the CSV's name (``fake_dalle2``); group is a ``group`` column, else the
    file stem. The original ``image`` value is kept as an extra column so outputs can be written back in the
    official layout. Unless ``labelled`` (scoring needs no labels), only the ``image`` column is required: rows
    without a class have an unknown label and generator, rows without a split are ``test``.
    """
    text = Files(options).read(csv_uri).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in (("image", "class", "split") if labelled else ("image",)) if c not in header]
    if missing:
        raise ManifestError(f"{csv_uri} lacks column(s) {missing}; official SPAI CSVs have a header with image,class,"
                            f"split (found {header})")
    root = root or parent(csv_uri)
    dataset = source or os.path.splitext(basename(csv_uri))[0]
    consumed = {"class", "split", "generator", "source", "group", "label", "uri"}
    extras = ["image"] + [c for c in header if c not in consumed and c != "image"]
    rows, errors = [], []
    for line, row in enumerate(reader, start=2):
        parsed = _parse_csv_row(line, row, errors, labelled)
        if parsed is None:
            continue
        label, split = parsed
        image = row["image"].strip()
        rows.append({
            **{name: row.get(name) for name in extras},
            "uri": _resolve_path(image, root), "label": label, "split": split,
            "generator": REAL if label == 0 else (generator or row.get("generator") or
                                                  ("unknown" if label == 1 else None)),
            "source": source or row.get("source") or dataset, "group": row.get("group") or _stem(image),
        })
    if errors:
        raise ManifestError(f"{csv_uri}: {len(errors)} bad row(s): " + "; ".join(errors[:5]) + " - fix these rows")
    if not rows:
        raise ManifestError(f"{csv_uri} has a header but no rows")
    return rows_to_table(rows, extras=extras)


def _folder_group(uri: str, folder: str, tags: Iterable[str], group_by: str) -> str:
    if group_by == "folder":
        relative = relative_to(uri, folder)
        if "/" in relative:
            return relative.rsplit("/", 1)[0]
    return stem_group(uri, tags)


def from_folders(real: Sequence[str], fake: Sequence[str] | Mapping[str, str | Sequence[str]], balance: bool = False,
                 fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, options: StorageOptions | None = None,
                 source: str | None = None, group_by: str = "stem") -> pa.Table:
    """Manifest rows for folders of real and generated images, searched recursively, split by group.

    ``fake`` is a list of folders (the generator is the folder name; folders of one name are one generator) or
    ``{generator: folder or folders}``. ``balance``
    subsamples reals (seeded) to the number of fakes, as the SVD fork's ``create_true_fake_csv`` does.
    Groups (``group_by``): ``stem`` (default) is the file stem with trailing generator names stripped
    (``beach_waifu2x.png`` -> ``beach``; see :func:`stem_group`), so a fake made from a real photo joins its source;
    ``folder`` is the parent folder relative to the real/fake folder (class or source-photo folders), falling back
    to the stem rule for files directly inside it. Splits follow ``fractions`` (train, val, test) by group.
    """
    if group_by not in ("stem", "folder"):
        raise ManifestError(f"group_by must be 'stem' or 'folder', got {group_by!r}")
    check_fractions(fractions)  # before listing, which can take minutes on S3
    fakes = _folders_by_generator(fake)
    if REAL in fakes:
        raise ManifestError(f"a fake folder is named {REAL!r}, which means real images here; name it with NAME=PATH")
    tags = set(fakes) | {REAL, "fake"}
    files = Files(options)
    rows, others = [], []
    for name, folder in [(REAL, f) for f in real] + [(name, f) for name, folders in fakes.items() for f in folders]:
        images, skipped = _list_images(folder, files)
        others += skipped
        rows += [{"uri": u, "label": int(name != REAL), "generator": name, "source": source or basename(folder),
                  "group": _folder_group(u, folder, tags, group_by)} for u in images]
    notes = _skipped_note(others, "without an image suffix")
    reals = [r for r in rows if r["label"] == 0]
    n_fake = len(rows) - len(reals)
    if balance and len(reals) > n_fake:
        keep = set(np.random.default_rng(seed).choice(len(reals), size=n_fake, replace=False).tolist())
        dropped = {r["uri"] for i, r in enumerate(reals) if i not in keep}
        rows = [r for r in rows if r["uri"] not in dropped]
        notes["balanced"] = {"reals_found": len(reals), "reals_kept": n_fake}
    for row, split in zip(rows, assign_splits([r["group"] for r in rows], fractions, seed)):
        row["split"] = split
    return rows_to_table(rows, notes=notes)


def _folders_by_generator(fake: Sequence[str] | Mapping[str, str | Sequence[str]]) -> dict[str, list[str]]:
    """``{generator: [folders]}`` from folders (named after themselves) or a mapping to a folder or folders."""
    if not isinstance(fake, Mapping):
        return _group_folders((basename(f), f) for f in fake)
    return _group_folders((name, folder) for name, value in fake.items()
                          for folder in ([value] if isinstance(value, str) else value))


def _group_folders(named: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """``(generator, folder)`` pairs -> ``{generator: [folders]}``, in order; a name given twice gathers its folders."""
    folders: dict[str, list[str]] = {}
    for name, folder in named:
        folders.setdefault(name, []).append(folder)
    return folders


def _image_folder(uri: str, files: Files, recursive: bool) -> pa.Table:
    """Rows for every file under a folder named or sniffed as an image (label unknown, split test).

    A file with an image suffix is a row whatever its content, so a zero-byte or corrupt ``x.jpg`` comes back as a
    failed row with its reason; other files are rows only when their first bytes say they are images.
    """
    candidates = files.list(uri, recursive=recursive)
    files.resolve(uri)  # build the file system once, before the threads share it

    def is_image(path: str) -> bool:
        if path.lower().endswith(IMAGE_SUFFIXES):
            return True
        try:
            return sniff_image_format(files.head(path, SNIFF_BYTES)) is not None
        except StorageError:  # unreadable here means unreadable later: keep it so scoring records the failure
            return True

    with ThreadPoolExecutor(max_workers=16) as pool:
        flags = list(pool.map(is_image, candidates))
    images = [u for u, ok in zip(candidates, flags) if ok]
    others = [u for u, ok in zip(candidates, flags) if not ok]
    if not images:
        deeper = "" if recursive else " only its top level was searched: add --recursive for its subfolders, or"
        raise ManifestError(f"no images in {uri} ({len(candidates)} file(s), none named or sniffed as an image);"
                            f"{deeper} point --input at images, a folder of images, an official CSV or a manifest "
                            f"({SIDECAR})")
    folder = parent(uri) if candidates == [uri] else uri  # one image file: a folder of one
    rows = [{"uri": u, "label": None, "split": "test", "generator": None, "source": basename(folder),
             "group": _stem(u), "image": relative_to(u, folder)} for u in images]
    return rows_to_table(rows, extras=["image"], notes=_skipped_note(others, "that are not images by name or "
                                                                             "content"))


def resolve_input(uri: str, root: str | None = None, options: StorageOptions | None = None,
                  recursive: bool = False) -> pa.Table:
    """Rows for anything a user may point a scoring job at: an official CSV (paths against ``root``), a manifest
    (directory or .parquet), a folder / S3 prefix of images, or one image file. Images are files with an image
    suffix (a bad one becomes a failed row) or other files whose first bytes say they are images.

    Folder input matches the official directory mode: not recursive unless asked, label unknown, split ``test``,
    generator unknown, and an ``image`` column with the path relative to the folder.
    """
    files = Files(options)
    if uri.lower().endswith(".csv"):
        return from_spai_csv(uri, root=root, options=options, labelled=False)
    info = files.info(uri)
    if info.type == pafs.FileType.NotFound:
        raise files.missing(uri)
    if uri.lower().endswith(".parquet") or read_sidecar(uri, options) is not None:
        return read_manifest(uri, options)
    return _image_folder(uri, files, recursive)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ManifestError(f"--split must be three comma-separated numbers like 0.8,0.1,0.1, got {text!r}") from exc
    if len(values) != 3:
        raise ManifestError(f"--split must be three numbers (train,val,test), got {text!r}")
    return values


def _parse_fakes(items: Sequence[str]) -> dict[str, list[str]]:
    """``NAME=PATH`` or ``PATH`` (named after its folder) -> {generator: folders}; a name given twice gathers its
    folders into one generator."""
    def named(item: str) -> tuple[str, str]:
        name, sep, path = item.partition("=")
        if not sep or "/" in name or ":" in name:  # a plain path, which may itself hold '=' (s3://b/gen=x/)
            return basename(item), item
        return name, path

    return _group_folders(named(item) for item in items)


def build_from_args(args: argparse.Namespace, options: StorageOptions) -> pa.Table:
    """The manifest table the ``spai manifest`` arguments ask for."""
    if args.layout == "genimage":
        return from_genimage(args.root, args.generators, args.val_fraction, args.seed, options, args.source)
    if args.layout == "csv":
        return from_spai_csv(args.csv, args.root, args.generator, options, args.source)
    return from_folders(args.real, _parse_fakes(args.fake), args.balance, _parse_fractions(args.split), args.seed,
                        options, args.source, args.group_by)


def main(args: argparse.Namespace) -> int:
    """``spai manifest LAYOUT ...``: build, write and summarise a manifest."""
    options = StorageOptions.from_env()
    arguments = {k: v for k, v in vars(args).items() if k not in ("command", "layout", "output")}
    table = build_from_args(args, options)
    uri = write_manifest(table, args.output, {"builder": args.layout, "arguments": arguments}, options)
    print(f"wrote {table.num_rows} rows to {uri}\n{format_summary(table, splits_by_group=args.layout == 'folders')}")
    print(f"next: spai validate {uri}")
    return 0
