"""The report folder of an evaluation: ``metrics.csv`` (one row per run and generator), ``pairs.csv`` (per real
source, under the paired protocol), ``metrics.md``, the self-contained ``report.html``, one ROC plot per generator
(``roc_<generator>.png``, a curve per run) and one robustness plot per sweep table (``sweep_<table>.png``); and the
same metrics and files logged to an MLflow run."""
from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from pipelines.evaluate.html import page
from pipelines.evaluate.mistakes import Mistake
from pipelines.evaluate.mistakes import markdown as mistakes_markdown
from pipelines.evaluate.plots import roc_png, sweep_png, sweep_tables
from pipelines.evaluate.protocol import CALIBRATED, INTERVALS, METRICS, EvalReport
from pipelines.infra.storage import Files, StorageOptions, join


def _file_name(generator: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", generator).strip("_") or "_"


def _csv(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer, pacsv.WriteOptions(quoting_style="needed"))
    return buffer.getvalue()


def plots(report: EvalReport) -> dict[str, tuple[str, bytes]]:
    """``{file name: (title, PNG)}`` of the report's plots."""
    out = {f"roc_{_file_name(g)}.png": (f"ROC: {g}", roc_png(report, g))
           for g in dict.fromkeys(g for _, g, _ in report.curves)}
    out.update({f"sweep_{_file_name(t)}.png": (f"robustness: {t}", sweep_png(report, t)) for t in sweep_tables(report)})
    return out


def write_report(report: EvalReport, output: str, options: StorageOptions | None = None,
                 mistakes: list[Mistake] | None = None) -> list[str]:
    """The report files under ``output`` (local or s3://), with the overlays of ``mistakes`` when given; their URIs."""
    figures = plots(report)
    text = report.markdown() + ("" if mistakes is None else "\n\n" + mistakes_markdown(mistakes, report.threshold))
    written = {join(output, "metrics.csv"): _csv(report.table()),
               join(output, "metrics.md"): (text + "\n").encode(),
               join(output, "report.html"): page(report, figures, mistakes).encode()}
    if report.pairs:
        written[join(output, "pairs.csv")] = _csv(pa.Table.from_pylist(report.pairs))
    written.update({join(output, name): png for name, (_, png) in figures.items()})
    written.update({join(output, m.file): m.png for m in mistakes or () if m.png is not None})
    files = Files(options)
    for uri, data in written.items():
        files.write(uri, data)
    return list(written)


def mlflow_metrics(report: EvalReport) -> dict[str, float]:
    """``eval/<run>/<generator>/<metric>`` values; each part's runs of other characters
    than MLflow's (and spaces) become one ``_``: ``resize_to=512 [a.parquet]`` -> ``resize_to_512_a.parquet``,
    ``mean (unseen)`` -> ``mean_unseen``."""
    def key(*parts: str) -> str:
        return "/".join(re.sub(r"[^\w.\-]+", "_", p).strip("_") for p in parts)

    names = METRICS + INTERVALS + (CALIBRATED if report.calibrated else ())
    return {key("eval", r["run"], r["generator"], m): r[m] for r in report.rows for m in names}


def log_report(report: EvalReport, tracking_uri: str | None, run_id: str | None,
               experiment: str = "spai-evaluate", mistakes: list[Mistake] | None = None) -> str:
    """Log metrics and report files to ``run_id`` (or a new run in ``experiment``); the run id."""
    from pipelines.infra import tracking  # MLflow is slow to import; only this path needs it

    uri = tracking.resolve_tracking_uri(tracking_uri)
    own_run = run_id is None
    if own_run:
        named = report.runs[:3] + ([f"{len(report.runs) - 3} more"] if len(report.runs) > 3 else [])
        run_id = tracking.start_run(uri, experiment, f"evaluate {', '.join(named)}"[:250],
                                    {"threshold": report.threshold, "protocol": report.protocol,
                                     "bootstrap": report.bootstrap, "seed": report.seed,
                                     "runs": ",".join(report.runs)[:500]})
    tracking.log_metrics(uri, run_id, mlflow_metrics(report), step=0)
    with tempfile.TemporaryDirectory(prefix="spai-eval-") as tmp:
        for path in write_report(report, tmp, mistakes=mistakes):
            # overlays keep their folder (explain/...) under the artifact path
            tracking.log_artifact(uri, run_id, path, "/".join(["evaluation", *Path(path).relative_to(tmp).parts[:-1]]))
    if own_run:
        tracking.finish_run(uri, run_id)
    return run_id
