"""The manifest table: its columns, typing and checks, and the counts a summary shows."""
from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from spai_core.errors import UserError

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
NOTES_KEY = b"spai.build_notes"  # schema metadata key for what a builder skipped, carried into the sidecar


class ManifestError(UserError, ValueError):
    """A manifest, CSV or dataset layout that cannot be used; the message names the problem and the fix."""


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


def add_counts(total: dict[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """Counts of a :func:`count_summary` added into ``total`` (the summary of a table written in batches)."""
    for key, value in more.items():
        total[key] = (add_counts(total.get(key, {}), value) if isinstance(value, Mapping)
                      else total.get(key, 0) + value)
    return total


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




def present_splits(table: pa.Table) -> list[str]:
    """The splits a table's rows hold (sorted; none when it has no ``split`` column)."""
    if "split" not in table.column_names:
        return []
    return sorted(set(table.column("split").to_pylist()) - {None})


def split_rows(table: pa.Table, split: str | None) -> pa.Table:
    """The rows of ``split`` (every row when None): the one split filter of every job."""
    return table if split is None else table.filter(pc.equal(table.column("split"), split))
