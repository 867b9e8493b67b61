"""The report of an evaluation: ``metrics.csv``, ``metrics.md`` and one ROC plot per generator,
``roc_<generator>.png``, with a curve per score table; and the same metrics and files logged to an MLflow run."""
from __future__ import annotations

import io
import re
import tempfile

import numpy as np
import pyarrow.csv as pacsv
from matplotlib.figure import Figure

from pipelines.evaluate.protocol import METRICS, EvalReport
from pipelines.infra.storage import Files, StorageOptions, join


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
