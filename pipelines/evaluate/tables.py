"""The score tables ``spai evaluate`` reads: each one read, labelled by the options it was scored with, split into
the settings of a sweep (``variant``, ``perturbation``, ``strength`` of ``spai score --perturb``) and reduced to the
rows that can be evaluated (labelled, scored, probabilities), with their real source and, for weights that carried
a calibrated threshold, the ``predicted`` label at it."""
from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from pipelines.data.manifest import present_splits, split_rows, table_from_parquet
from pipelines.evaluate.config import EvaluateError
from pipelines.infra.storage import Files, StorageOptions, basename

# Options that tell runs apart (the rest of ``options`` is the same across a comparison); the settings of a
# perturbation sweep come from its variant columns instead.
LABEL_KEYS = ("resize_to", "max_tiles")
REQUIRED = ("label", "generator", "score")
CLEAN = "clean"  # the label of a table scored without any degradation


def read_scores(uri: str, options: StorageOptions | None = None) -> pa.Table:
    """A score table written by ``spai score`` (Parquet or CSV, local or s3://)."""
    data = Files(options).read(uri)
    try:
        # one thread, for the reason table_from_parquet gives
        table = (pacsv.read_csv(io.BytesIO(data), pacsv.ReadOptions(use_threads=False))
                 if uri.lower().endswith(".csv") else table_from_parquet(data))
    except pa.ArrowInvalid as exc:
        raise EvaluateError(f"{uri} is not a readable score table ({exc}); give the output of `spai score`") from exc
    return table


def table_options(table: pa.Table) -> dict | None:
    """The options ``spai score`` recorded in the table's ``options`` column (None without one)."""
    if "options" not in table.column_names or table.num_rows == 0:
        return None
    return json.loads(table.column("options")[0].as_py() or "{}")


def run_label(table: pa.Table, fallback: str) -> str:
    """``resize_to=512`` from the table's ``options`` column, :data:`CLEAN` when none of :data:`LABEL_KEYS` is set."""
    options = table_options(table)
    if options is None:
        return fallback
    return ",".join(f"{k}={options[k]}" for k in LABEL_KEYS if options.get(k) is not None) or CLEAN


def named_tables(score_tables: Mapping[str, pa.Table] | Sequence[pa.Table] | pa.Table) -> dict[str, pa.Table]:
    """``{source: table}``: the names given (file names), else ``table #i`` by position."""
    if isinstance(score_tables, pa.Table):
        score_tables = [score_tables]
    if isinstance(score_tables, Mapping):
        return dict(score_tables)
    return {f"table #{i}": t for i, t in enumerate(score_tables)}


def label_runs(named: Mapping[str, pa.Table]) -> dict[str, str]:
    """``{source: run label}``: each table named by its options; tables that would share a label get their source's
    base name added."""
    labels = {name: run_label(table, basename(name)) for name, table in named.items()}
    counts = {label: list(labels.values()).count(label) for label in labels.values()}
    return {name: label if counts[label] == 1 else f"{label} [{basename(name)}]" for name, label in labels.items()}


class UsableRows(NamedTuple):
    """The rows of one score table that can be evaluated, and counts of the rows left out."""

    labels: np.ndarray  # 0 real, 1 AI-generated
    generators: np.ndarray
    scores: np.ndarray
    excluded: dict[str, int]  # {"errors": n, "unlabelled": n}
    sources: np.ndarray  # the ``source`` column (the real set a real row belongs to), "unknown" where absent
    predicted: np.ndarray | None = None  # 0/1 at the calibrated threshold, where the weights carried one
    thresholds: tuple[float, ...] = ()  # the calibrated threshold(s) of those predictions
    uris: np.ndarray | None = None  # the ``uri`` column ("" where absent): the images behind the mistakes


class Variant(NamedTuple):
    """One perturbation setting of a sweep (``spai score --perturb``): its label, registry name and strength."""

    label: str  # "none", "jpeg=75", "filter=clarendon"
    perturbation: str  # "none", "jpeg", "filter"
    strength: float | None  # None for kinds without one


def select_split(table: pa.Table, source: str, split: str | None) -> tuple[pa.Table, list[str]]:
    """The rows of ``split`` (all rows when None), and the splits the returned rows pool when there are several."""
    present = present_splits(table)
    if split is None:
        return table, present if len(present) > 1 else []
    if split not in present:
        where = f"its splits are {', '.join(present)}" if present else "it has no split column, so drop --split"
        raise EvaluateError(f"score table {source} has no rows of split {split!r}; {where}")
    return split_rows(table, split), []


def _checked_values(table: pa.Table, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores as floats; raises on values that are not labels (0, 1, null) or probabilities."""
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise EvaluateError(f"score table {source} lacks column(s) {missing}; evaluate the output of `spai score` "
                            "(without --official-csv) on a labelled input (a manifest or an official CSV)")
    try:
        labels, scores = (table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)
                          for name in ("label", "score"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise EvaluateError(f"score table {source}: label and score must be numbers ({exc})") from exc
    odd = np.unique(labels[~np.isnan(labels) & (labels != 0) & (labels != 1)])
    # Out-of-range scores (a logit, a percentage, inf) still rank, so AUC would look fine while calibration and the
    # threshold are meaningless: refuse them rather than report half-valid metrics.
    outside = scores[~np.isnan(scores) & ((scores < 0) | (scores > 1))]
    problems = []
    if odd.size:
        problems.append(f"labels must be 0 (real), 1 (AI-generated) or null; found labels {odd[:5].tolist()}")
    if outside.size:
        problems.append(f"scores must be probabilities in [0, 1] but {outside.size} row(s) are not, e.g. "
                        f"{outside[0]:g}; give the sigmoid probability (`score` of `spai score`), not a logit")
    if problems:
        raise EvaluateError(f"score table {source}: " + "; ".join(problems))
    return labels, scores


def _calibrated(table: pa.Table, scores: np.ndarray) -> tuple[np.ndarray | None, tuple[float, ...]]:
    """Predictions at the calibrated threshold (its ``predicted`` column, else ``score > threshold``) and the
    threshold values; (None, ()) for tables scored without one."""
    names = table.column_names
    if "predicted" not in names and "threshold" not in names:
        return None, ()
    threshold = (table.column("threshold").cast(pa.float64()).to_numpy(zero_copy_only=False) if "threshold" in names
                 else np.full(table.num_rows, np.nan))
    predicted = (table.column("predicted").cast(pa.float64()).to_numpy(zero_copy_only=False) if "predicted" in names
                 else np.full(table.num_rows, np.nan))
    predicted = np.where(np.isnan(predicted), scores > threshold, predicted)
    return predicted, tuple(sorted(set(threshold[~np.isnan(threshold)].tolist())))


def _strings(table: pa.Table, name: str, missing: str) -> np.ndarray:
    values = table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
    return np.array([missing if v is None else v for v in values], dtype=object)


def usable_rows(table: pa.Table, source: str) -> UsableRows:
    """The rows of a score table that scored and have a label; raises when there are none."""
    labels, scores = _checked_values(table, source)
    errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * table.num_rows
    failed = np.array([bool(e) for e in errors], dtype=bool) | np.isnan(scores)
    unlabelled = np.isnan(labels) & ~failed
    keep = ~failed & ~unlabelled
    if not keep.any():
        raise EvaluateError(f"score table {source} has no labelled rows that scored; evaluation needs labels "
                            "(score a manifest or an official CSV, not a bare folder)")
    counts = {"errors": int(failed.sum()), "unlabelled": int(unlabelled.sum())}
    predicted, thresholds = _calibrated(table.filter(pa.array(keep)), scores[keep])
    return UsableRows(labels[keep].astype(np.int64), _strings(table, "generator", "unknown")[keep], scores[keep],
                      counts, _strings(table, "source", "unknown")[keep],
                      None if predicted is None else predicted.astype(np.int64), thresholds,
                      _strings(table, "uri", "")[keep])


def variant_parts(table: pa.Table) -> list[tuple[Variant | None, pa.Table]]:
    """The rows of each perturbation setting of a sweep table, the original images ("none") first, then grouped by
    perturbation in the order they appear; ``[(None, table)]`` for a table scored without ``--perturb``."""
    if "variant" not in table.column_names:
        return [(None, table)]
    labels = _strings(table, "variant", "unknown")
    kinds = _strings(table, "perturbation", "unknown")
    strengths = (table.column("strength").cast(pa.float64()).to_numpy(zero_copy_only=False)
                 if "strength" in table.column_names else np.full(table.num_rows, np.nan))
    first = {label: i for i, label in reversed(list(enumerate(labels)))}
    kind_order = {kind: i for i, kind in reversed(list(enumerate(kinds)))}
    order = sorted(first, key=lambda label: (kinds[first[label]] != "none", kind_order[kinds[first[label]]],
                                             first[label]))
    parts = []
    for label in order:
        i = first[label]
        strength = None if np.isnan(strengths[i]) else float(strengths[i])
        parts.append((Variant(label, kinds[i], strength), table.filter(pa.array(labels == label))))
    return parts
