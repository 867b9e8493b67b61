"""``spai evaluate``: metrics per generator from score tables, the SPAI paper's protocol, with ROC plots and MLflow.

Protocol: each fake generator is evaluated as its fakes against ALL real rows (so AUC and AP are defined per
generator, as in the paper; :func:`spai_core.metrics.generator_sets`, which training's validation uses too); ``overall`` is all fakes against all reals
and ``real`` the reals alone (its accuracy is the true-negative rate). Generators seen in training (``seen``) are listed
apart from unseen ones, each group with its mean. Rows that failed to score (``error`` set) or have no label are left
out and counted. Scores are probabilities (the sigmoid ``score`` column, not ``logit``), so values outside [0, 1] are
refused, as are a threshold outside (0, 1) and ``seen`` names that match no generator in the data.

A scored manifest holds several splits; their rows are pooled unless ``split`` (``--split``) picks one, and the report
notes any pooling, since train rows make every metric look better than held-out performance.

Several tables (e.g. one per degradation: ``spai score --jpeg-quality 75``) are compared side by side; each is labelled
from the ``options`` column ``spai score`` writes (``jpeg_quality=75``, ``clean`` when nothing was degraded).

Report files (``--output``): ``metrics.csv``, ``metrics.md`` and one ROC plot per generator, ``roc_<generator>.png``,
with a curve per table.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from matplotlib.figure import Figure

from pipelines.data.manifest import present_splits, split_rows, table_from_parquet
from pipelines.infra.storage import Files, StorageOptions, basename, join
from spai_core.errors import UserError
from spai_core.metrics import binary_metrics, generator_sets, roc_points

METRICS = ("auc", "ap", "accuracy", "tpr_at_fpr_1", "tpr_at_fpr_5", "ece")
HEADERS = {"auc": "AUC", "ap": "AP", "accuracy": "Acc", "tpr_at_fpr_1": "TPR@1%FPR", "tpr_at_fpr_5": "TPR@5%FPR",
           "ece": "ECE"}
# Options that tell degradation runs apart (the rest of ``options`` is the same across a comparison).
LABEL_KEYS = ("jpeg_quality", "blur_sigma", "noise_sigma", "scale", "resize_to", "max_tiles")
REQUIRED = ("label", "generator", "score")
REAL = "real"
OVERALL = "overall"


class EvaluateError(UserError, ValueError):
    """A score table that cannot be evaluated; the message says what to do."""


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


# ---------------------------------------------------------------------------------------------------------------
# Inputs


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


def run_label(table: pa.Table, fallback: str) -> str:
    """``jpeg_quality=75,scale=0.5`` from the table's ``options`` column, ``clean`` when nothing was degraded."""
    if "options" not in table.column_names or table.num_rows == 0:
        return fallback
    options = json.loads(table.column("options")[0].as_py() or "{}")
    return ",".join(f"{k}={options[k]}" for k in LABEL_KEYS if options.get(k) is not None) or "clean"


def label_runs(score_tables: Mapping[str, pa.Table] | Sequence[pa.Table] | pa.Table) -> dict[str, pa.Table]:
    """Name each table by its options; tables that would share a label get their own name (file or index) added."""
    if isinstance(score_tables, pa.Table):
        score_tables = [score_tables]
    named = dict(score_tables) if isinstance(score_tables, Mapping) else {
        f"#{i}": t for i, t in enumerate(score_tables)}
    labels = {name: run_label(table, basename(name)) for name, table in named.items()}
    counts = {label: list(labels.values()).count(label) for label in labels.values()}
    return {(label if counts[label] == 1 else f"{label} [{basename(name)}]"): named[name]
            for name, label in labels.items()}


class UsableRows(NamedTuple):
    """The rows of one score table that can be evaluated, and counts of the rows left out."""

    labels: np.ndarray  # 0 real, 1 AI-generated
    generators: np.ndarray
    scores: np.ndarray
    excluded: dict[str, int]  # {"errors": n, "unlabelled": n}


def _select_split(table: pa.Table, run: str, split: str | None) -> tuple[pa.Table, list[str]]:
    """The rows of ``split`` (all rows when None), and the splits the returned rows pool when there are several."""
    present = present_splits(table)
    if split is None:
        return table, present if len(present) > 1 else []
    if split not in present:
        where = f"its splits are {', '.join(present)}" if present else "it has no split column, so drop --split"
        raise EvaluateError(f"score table {run!r} has no rows of split {split!r}; {where}")
    return split_rows(table, split), []


def _arrays(table: pa.Table, run: str) -> UsableRows:
    """The usable rows of a score table; raises on values that are not labels or probabilities, or no usable row."""
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise EvaluateError(f"score table {run!r} lacks column(s) {missing}; evaluate the output of `spai score` "
                            "(without --official-csv) on a labelled input (a manifest or an official CSV)")
    try:
        labels, scores = (table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)
                          for name in ("label", "score"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise EvaluateError(f"score table {run!r}: label and score must be numbers ({exc})") from exc
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
        raise EvaluateError(f"score table {run!r}: " + "; ".join(problems))
    errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * table.num_rows
    failed = np.array([bool(e) for e in errors], dtype=bool) | np.isnan(scores)
    unlabelled = np.isnan(labels) & ~failed
    keep = ~failed & ~unlabelled
    generators = np.array([g if g is not None else "unknown" for g in table.column("generator").to_pylist()], object)
    if not keep.any():
        raise EvaluateError(f"score table {run!r} has no labelled rows that scored; evaluation needs labels "
                            "(score a manifest or an official CSV, not a bare folder)")
    counts = {"errors": int(failed.sum()), "unlabelled": int(unlabelled.sum())}
    return UsableRows(labels[keep].astype(np.int64), generators[keep], scores[keep], counts)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


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


def _check_threshold(threshold: float) -> None:
    """Refuse a threshold that cannot separate probabilities."""
    # A fake is predicted iff score > threshold, so at 0, 1 or beyond nearly every row gets the same prediction and
    # accuracy only measures the class balance: the open interval keeps out such mistakes (e.g. a percentage).
    if not 0 < threshold < 1:
        raise EvaluateError(f"threshold must be strictly between 0 and 1 (scores are probabilities), got {threshold}")


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

    ``score_tables``: one table, a list, or ``{name: table}`` (names break ties between tables with the same options).
    ``seen``: generators seen in training, reported as their own group.
    ``split``: evaluate only the rows of this split; by default all rows, pooling splits (noted in the report).
    """
    _check_threshold(threshold)
    runs, pooled = {}, {}
    for run, table in label_runs(score_tables).items():
        table, splits = _select_split(table, run, split)
        runs[run] = _arrays(table, run)
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


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def _file_name(generator: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", generator).strip("_") or "_"


def roc_png(report: EvalReport, generator: str) -> bytes:
    """ROC plots of a generator (against all reals) with a curve per run: on a linear and on a log false-positive
    axis, where the low rates that matter for screening (1%, 0.1%) can be read."""
    fig = Figure(figsize=(9, 4.5), dpi=100)  # the object API: no pyplot state, no GUI backend
    linear, log = fig.subplots(1, 2)
    auc = {(r["run"], r["generator"]): r["auc"] for r in report.rows}
    lowest = 1.0
    for run in report.runs:
        if (run, generator) in report.curves:
            fpr, tpr = report.curves[(run, generator)]
            lowest = min([lowest, *fpr[fpr > 0]])
            for ax in (linear, log):
                ax.plot(fpr, tpr, label=f"{run} (AUC {auc[(run, generator)]:.3f})")
    chance = np.geomspace(1e-4, 1, 100)  # points along it, or the log axis draws y = x as a straight chord
    for ax in (linear, log):
        ax.plot(chance, chance, linestyle=":", color="grey")
        ax.set(xlabel="false positive rate (reals)", ylabel="true positive rate (fakes)", ylim=(0, 1.01))
    linear.set(title=f"ROC: {generator}", xlim=(0, 1))
    log.set(title="low false-positive rates", xscale="log", xlim=(min(lowest, 0.01) / 2, 1))
    linear.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_report(report: EvalReport, output: str, options: StorageOptions | None = None) -> list[str]:
    """``metrics.csv``, ``metrics.md`` and ``roc_<generator>.png`` under ``output`` (local or s3://); their URIs."""
    files = Files(options)
    csv_buffer = io.BytesIO()
    pacsv.write_csv(report.table(), csv_buffer, pacsv.WriteOptions(quoting_style="needed"))
    written = {join(output, "metrics.csv"): csv_buffer.getvalue(),
               join(output, "metrics.md"): (report.markdown() + "\n").encode()}
    for generator in dict.fromkeys(g for _, g in report.curves):
        written[join(output, f"roc_{_file_name(generator)}.png")] = roc_png(report, generator)
    for uri, data in written.items():
        files.write(uri, data)
    return list(written)


def mlflow_metrics(report: EvalReport) -> dict[str, float]:
    """``eval/<run>/<generator>/<metric>`` values; each part's runs of other characters than MLflow's (and spaces)
    become one ``_``: ``jpeg_quality=75 [a.parquet]`` -> ``jpeg_quality_75_a.parquet``, ``mean (unseen)`` ->
    ``mean_unseen``."""
    def key(*parts: str) -> str:
        return "/".join(re.sub(r"[^\w.\-]+", "_", p).strip("_") for p in parts)

    return {key("eval", r["run"], r["generator"], m): r[m] for r in report.rows for m in METRICS}


def log_report(report: EvalReport, tracking_uri: str | None, run_id: str | None,
               experiment: str = "spai-evaluate") -> str:
    """Log metrics and report files to ``run_id`` (or a new run in ``experiment``); the run id."""
    from pipelines.infra import tracking  # MLflow is slow to import; only this path needs it

    uri = tracking.resolve_tracking_uri(tracking_uri)
    own_run = run_id is None
    if own_run:
        named = report.runs[:3] + ([f"{len(report.runs) - 3} more"] if len(report.runs) > 3 else [])
        run_id = tracking.start_run(uri, experiment, f"evaluate {', '.join(named)}"[:250],
                                    {"threshold": report.threshold, "runs": ",".join(report.runs)})
    tracking.log_metrics(uri, run_id, mlflow_metrics(report), step=0)
    with tempfile.TemporaryDirectory(prefix="spai-eval-") as tmp:
        for path in write_report(report, tmp):
            tracking.log_artifact(uri, run_id, path, "evaluation")
    if own_run:
        tracking.finish_run(uri, run_id)
    return run_id


def main(args: argparse.Namespace) -> int:
    """``spai evaluate``: print the table, write report files when asked, and log to MLflow (unless --no-mlflow)."""
    if args.no_mlflow and args.run_id:
        raise EvaluateError("--no-mlflow and --run-id contradict each other; drop one of them")
    report = evaluate({uri: read_scores(uri) for uri in args.scores}, threshold=args.threshold, seen=args.seen,
                      split=args.split)
    print(report.markdown())
    if args.output:
        written = write_report(report, args.output)
        print(f"wrote {len(written)} report file(s) to {args.output}")
    if args.no_mlflow:
        return 0
    print(f"logged to MLflow run {log_report(report, args.mlflow_uri, args.run_id, args.experiment)}")
    return 0
