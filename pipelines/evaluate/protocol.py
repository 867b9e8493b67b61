"""The evaluation protocol of the SPAI paper on score tables: metrics per generator, each fake generator's fakes
against ALL real rows (:func:`spai_core.metrics.generator_sets`, which training's validation uses too, so that AUC and
AP are defined per generator), ``overall`` (all fakes against all reals) and ``real`` (the reals alone: its accuracy
is the true-negative rate). Generators seen in training are listed apart from unseen ones, each group with its mean.
Rows that failed to score or have no label are left out and counted (:mod:`~pipelines.evaluate.tables`)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from pipelines.evaluate.config import EvaluateError, threshold_problem
from pipelines.evaluate.tables import UsableRows, label_runs, named_tables, select_split, usable_rows
from spai_core.metrics import binary_metrics, generator_sets, roc_points

METRICS = ("auc", "ap", "accuracy", "tpr_at_fpr_1", "tpr_at_fpr_5", "ece")
HEADERS = {"auc": "AUC", "ap": "AP", "accuracy": "Acc", "tpr_at_fpr_1": "TPR@1%FPR", "tpr_at_fpr_5": "TPR@5%FPR",
           "ece": "ECE"}
REAL = "real"
OVERALL = "overall"


@dataclasses.dataclass
class EvalReport:
    """Metrics per (run, generator), ROC curves, and the rows left out per run."""

    rows: list[dict]  # run, generator, group (seen/unseen/""), METRICS..., n_fake, n_real
    curves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (run, generator) -> (fpr, tpr)
    excluded: dict[str, dict[str, int]]  # run -> {"errors": n, "unlabelled": n}
    threshold: float
    pooled: dict[str, list[str]]  # run -> the splits its metrics pool, for runs that pool several

    @property
    def runs(self) -> list[str]:
        return list(self.excluded)

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows)

    def markdown(self) -> str:
        """The metrics table; with several runs also AUC per generator side by side."""
        columns = ["run", "generator", "group", *METRICS, "n_fake", "n_real"]
        header = ["run", "generator", "seen", *(HEADERS[m] for m in METRICS), "fakes", "reals"]
        lines = [_md_row(header), _md_row(["---"] * len(header))]
        lines += [_md_row([_cell(row[c]) for c in columns]) for row in self.rows]
        if len(self.runs) > 1:
            auc = {(r["run"], r["generator"]): r["auc"] for r in self.rows}
            generators = list(dict.fromkeys(r["generator"] for r in self.rows))
            lines += ["", "AUC per run:", "", _md_row(["generator", *self.runs]),
                      _md_row(["---"] * (len(self.runs) + 1))]
            lines += [_md_row([g, *(_cell(auc.get((run, g), math.nan)) for run in self.runs)]) for g in generators]
        notes = [f"{run}: left out {n['errors']} row(s) that failed to score and {n['unlabelled']} without a label"
                 for run, n in self.excluded.items() if n["errors"] or n["unlabelled"]]
        notes += [f"{run}: the metrics pool splits {', '.join(splits)}; `--split test` restricts them to the test rows"
                  for run, splits in self.pooled.items()]
        notes += self._low_fpr_notes()
        return "\n".join(lines + ([""] + notes if notes else []))

    def _low_fpr_notes(self) -> list[str]:
        """Where too few reals make TPR at 1% or 5% FPR an interpolation between ROC points rather than a
        measurement: with n reals the false-positive rate moves in steps of 1/n."""
        reals = {r["run"]: r["n_real"] for r in self.rows if r["generator"] == REAL}
        notes = []
        for run, n in reals.items():
            coarse = [fpr for fpr in (0.01, 0.05) if 0 < n < 1 / fpr]
            if coarse:
                notes.append(f"{run}: {n} real images put the false-positive rate in steps of {1 / n:.1%}, so TPR at "
                             f"{' and '.join(f'{fpr:.0%}' for fpr in coarse)} FPR is interpolated between ROC points, "
                             f"not measured ({round(1 / coarse[0])}+ reals measure it)")
        return notes


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _metrics_row(run: str, generator: str, group: str, labels: np.ndarray, scores: np.ndarray,
                 threshold: float) -> dict:
    m = binary_metrics(labels, scores, threshold)
    return {"run": run, "generator": generator, "group": group, **{k: m[k] for k in METRICS},
            "n_fake": m["n_pos"], "n_real": m["n_neg"]}


def _mean_row(run: str, name: str, group: str, rows: list[dict]) -> dict:
    """Unweighted mean over generators (the paper's average), ignoring undefined values."""
    def mean(key: str) -> float:
        values = [r[key] for r in rows if not math.isnan(r[key])]
        return float(np.mean(values)) if values else math.nan

    return {"run": run, "generator": name, "group": group, **{k: mean(k) for k in METRICS},
            "n_fake": sum(r["n_fake"] for r in rows), "n_real": rows[0]["n_real"]}


def _check_seen(seen: Sequence[str] | None, runs: Mapping[str, UsableRows]) -> None:
    """Refuse seen generators absent from every table: a typo would silently file all generators as unseen."""
    present = set().union(*(generator_sets(u.labels, u.generators) for u in runs.values()))
    unknown = sorted(set(seen or ()) - present)
    if unknown:
        raise EvaluateError(f"seen generator(s) {unknown} have no scored AI-generated rows; the generators present "
                            f"are {', '.join(sorted(present)) or 'none'}")


def _evaluate_run(run: str, usable: UsableRows, threshold: float, seen: set[str] | None
                  ) -> tuple[list[dict], dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]]:
    labels, generators, scores, _ = usable
    real = labels == 0
    sets = generator_sets(labels, generators)
    groups = [("", list(sets))] if seen is None else [
        ("seen", [g for g in sets if g in seen]), ("unseen", [g for g in sets if g not in seen])]
    rows, curves = [], {}
    for group, names in groups:
        group_rows = []
        for name in names:
            mask = sets[name]
            group_rows.append(_metrics_row(run, name, group, labels[mask], scores[mask], threshold))
            if real.any():
                curves[(run, name)] = roc_points(labels[mask], scores[mask])[:2]
        rows += group_rows
        if len(group_rows) > 1:
            rows.append(_mean_row(run, f"mean ({group})" if group else "mean", group, group_rows))
    if real.any():
        rows.append(_metrics_row(run, REAL, "", labels[real], scores[real], threshold))
    if labels.size:
        rows.append(_metrics_row(run, OVERALL, "", labels, scores, threshold))
        if real.any() and not real.all():
            curves[(run, OVERALL)] = roc_points(labels, scores)[:2]
    return rows, curves


def evaluate(score_tables: Mapping[str, pa.Table] | Sequence[pa.Table] | pa.Table, threshold: float = 0.5,
             seen: Sequence[str] | None = None, split: str | None = None) -> EvalReport:
    """Metrics per fake generator (its fakes against all reals), per real set and overall, for each score table.

    ``score_tables``: one table, a list, or ``{source: table}`` (sources, e.g. file names, name a table in errors and
    break ties between tables with the same options). Each table is a run, labelled by the options it was scored
    with (``jpeg_quality=75``, ``clean`` when nothing was degraded).
    ``seen``: generators seen in training, reported as their own group.
    ``split``: evaluate only the rows of this split; by default all rows, pooling splits (noted in the report).
    """
    if problem := threshold_problem(threshold):
        raise EvaluateError(f"threshold {problem}")
    named = named_tables(score_tables)
    runs, pooled = {}, {}
    for source, run in label_runs(named).items():
        table, splits = select_split(named[source], source, split)
        runs[run] = usable_rows(table, source)
        if splits:
            pooled[run] = splits
    _check_seen(seen, runs)
    rows, curves = [], {}
    seen_set = None if seen is None else set(seen)
    for run, usable in runs.items():
        run_rows, run_curves = _evaluate_run(run, usable, threshold, seen_set)
        rows += run_rows
        curves.update(run_curves)
    return EvalReport(rows, curves, {run: usable.excluded for run, usable in runs.items()}, threshold, pooled)
