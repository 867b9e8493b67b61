"""What a search found: each trial's outcome from its Train run, the table, the plot, the best config and weights.

Results are written to the search folder and, when the search is tracked, to its MLflow parent run.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.infra import storage, tracking
from pipelines.train import files
from pipelines.train.epochs import epoch_rank
from spai_core.config import dump_config, to_dict
from tune.config import TuneConfig
from tune.space import AshaConfig, plain, trial_config

logger = logging.getLogger(__name__)

TIME_ATTR = "epochs_done"  # ASHA's clock: epochs trained, reported by every trial's Train run
MLFLOW_STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED"}


@dataclass
class TrialSummary:
    """One trial's outcome: a row of ``trials.csv`` and a curve of the plot."""

    trial_id: str
    params: dict[str, Any]
    status: str  # completed | stopped_early (by ASHA) | failed
    epochs: int  # epochs trained
    best_value: float  # best value of the scheduler's metric (NaN when none)
    best_epoch: int | None  # 0-based epoch of the best value, as in ``spai train`` and MLflow steps
    checkpoint: str | None  # model.safetensors of the best epoch
    curve: list[tuple[int, float]]  # (epoch, metric) per reported epoch
    mlflow_run_id: str | None


@dataclass
class SearchResult:
    search_dir: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    best_config: str | None  # ready-to-run training config YAML of the best trial
    best_checkpoint: str | None  # copy of the best trial's best checkpoint
    mlflow_run_id: str | None  # None when the search was not tracked
    tracking_uri: str | None


@dataclass
class SearchRecord:
    """Where a search's results go: its folder, its trials' Train runs, and its MLflow parent run (if tracked)."""

    search_dir: str
    train_dir: str
    tracking_uri: str | None
    parent_run_id: str | None


def _storage_uri(path: str, like: str) -> str:
    """A path reported by Ray Train (inside its file system) as a URI like ``like`` (``s3://`` when that is)."""
    return "s3://" + path.lstrip("/") if storage.is_s3(like) and not storage.is_s3(path) else path


def epoch_history(result, client, run_id: str | None, keys: tuple[str, ...]) -> dict[int, dict[str, float]]:
    """``{epoch: {key: value}}`` as a trial's Train run logged them to its MLflow run (``client``), else as Tune
    recorded them (an untracked search).

    Unlike Tune's record MLflow's survives restarts: Tune starts the results of a restarted trial afresh, while its
    Train run continues in the same MLflow run. An epoch logged twice (redone after a restart) keeps its latest value.
    """
    history: dict[int, dict[str, float]] = {}
    if client is None:
        frame = result.metrics_dataframe
        for row in ([] if frame is None else frame.to_dict("records")):
            history[int(row["epoch"])] = {k: float(row[k]) for k in keys if k in row}
        return dict(sorted(history.items()))
    for key in keys:
        for metric in sorted(client.get_metric_history(run_id, key) if run_id else [], key=lambda m: m.timestamp):
            history.setdefault(metric.step, {})[key] = metric.value
    return dict(sorted(history.items()))


def trial_status(failed: bool, last_result: Mapping[str, Any] | None, max_t: int, patience: int | None) -> str:
    """completed, stopped_early (by ASHA) or failed, from the last result Tune took from the trial.

    Tune marks trials that ASHA stopped ``done`` like completed ones, so epochs tell them apart: a trial that ends by
    itself reports epoch ``max_t`` (or its own patience running out), one that ASHA stopped last reported a rung below.
    Tune's record, not the trial's MLflow history: the stop reaches Train workers asynchronously, so a trial stopped
    at a rung of ``max_t - 1`` may still log epoch ``max_t`` to MLflow.
    """
    if failed:
        return "failed"
    last = last_result or {}
    own_stop = patience is not None and last.get("stale_epochs", 0) > patience
    return "completed" if own_stop or last.get(TIME_ATTR, 0) >= max_t else "stopped_early"


def best_weights(result, ranked_epochs: list[int], run_dir: str, options: storage.StorageOptions) -> str | None:
    """A trial's best weights: its Train run's export (a completed trial), else the best epoch's checkpoint that
    Train kept (the best few by val AUC), as reported to Tune."""
    exported = storage.join(run_dir, files.BEST_WEIGHTS)
    if storage.exists(exported, options):
        return exported
    frame = result.metrics_dataframe
    reported = {} if frame is None or "checkpoint_path" not in frame else {
        int(epoch): path for epoch, path in zip(frame["epoch"], frame["checkpoint_path"]) if isinstance(path, str)}
    candidates = (storage.join(_storage_uri(reported[e], run_dir), files.CHECKPOINT_WEIGHTS) for e in ranked_epochs
                  if e in reported)
    return next((uri for uri in candidates if storage.exists(uri, options)), None)


def summarize_trial(result, asha: AshaConfig, train_dir: str, patience: int | None, client,
                    options: storage.StorageOptions) -> TrialSummary:
    """A trial's outcome: epochs and metric per epoch from its MLflow run, its status, and its best weights."""
    trial_id = storage.basename(result.path)
    run_dir = storage.join(train_dir, trial_id)
    marker = storage.join(run_dir, files.RUN_MARKER)
    run_id = json.loads(storage.read_bytes(marker, options))["mlflow_run_id"] if storage.exists(marker, options) \
        else None
    history = epoch_history(result, client, run_id, (asha.metric, "stale_epochs"))
    curve = [(epoch, values[asha.metric]) for epoch, values in history.items() if asha.metric in values]
    ranked = sorted(curve, key=lambda ev: epoch_rank(ev[1], ev[0], asha.mode), reverse=True)
    status = trial_status(bool(result.error), result.metrics, asha.max_t, patience)
    return TrialSummary(
        trial_id, {k: plain(v) for k, v in (result.config or {}).items()}, status, max(history, default=-1) + 1,
        ranked[0][1] if ranked else math.nan, ranked[0][0] if ranked else None,
        best_weights(result, [epoch for epoch, _ in ranked], run_dir, options), curve, run_id)


def best_trial(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    scored = [t for t in trials if math.isfinite(t.best_value) and t.checkpoint]
    return (max if mode == "max" else min)(scored, key=lambda t: t.best_value) if scored else None


def close_trial_runs(client, trials: list[TrialSummary]) -> None:
    """Tag each trial's MLflow run with its outcome and end it so; runs of stopped trials never ended themselves."""
    for trial in trials:
        if not trial.mlflow_run_id:
            continue
        client.set_tag(trial.mlflow_run_id, "spai.tune.status", trial.status)
        client.set_tag(trial.mlflow_run_id, "spai.tune.epochs", str(trial.epochs))
        if client.get_run(trial.mlflow_run_id).info.status != MLFLOW_STATUS[trial.status]:
            client.set_terminated(trial.mlflow_run_id, MLFLOW_STATUS[trial.status])


def table_rows(trials: list[TrialSummary], metric: str) -> list[dict[str, Any]]:
    """The trial table: id, outcome, epochs, best metric and epoch, each sampled param, checkpoint, MLflow run."""
    paths = sorted({p for t in trials for p in t.params})
    return [{"trial_id": t.trial_id, "status": t.status, "epochs": t.epochs, f"best_{metric}": t.best_value,
             "best_epoch": t.best_epoch, **{p: t.params.get(p) for p in paths}, "checkpoint": t.checkpoint,
             "mlflow_run_id": t.mlflow_run_id} for t in trials]


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned text of the table without the long path columns (they are in the CSV)."""
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)

    columns = [c for c in rows[0] if c not in ("checkpoint", "mlflow_run_id")]
    cells = [columns] + [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)


def plot_curves(trials: list[TrialSummary], metric: str) -> bytes:
    """PNG of one line per trial of the metric per epoch; dashed for trials ASHA stopped."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)  # the object API: no pyplot state, no GUI backend
    ax = fig.add_subplot()
    for trial in trials:
        if trial.curve:
            epochs, values = zip(*trial.curve)
            ax.plot(epochs, values, marker="o", linestyle="-" if trial.status == "completed" else "--",
                    label=f"{trial.trial_id} ({trial.status.replace('_', ' ')})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric.removeprefix('val_').upper()}" if metric.startswith("val_") else metric)
    ax.set_title("spai tune: trials per epoch (dashed: stopped early)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    png = io.BytesIO()
    fig.savefig(png, format="png", bbox_inches="tight")
    return png.getvalue()


def best_config_yaml(best: TrialSummary, cfg: TuneConfig, search_dir: str) -> str:
    """The best trial's full training config, ready for ``spai train --config`` (``spai fusion train --config`` for
    a fusion search), with where it came from: the trials' config with the base's own output, registered model and
    tracking."""
    own = cfg.base_config
    base = {**cfg.trial_base(own.output), "registered_model": own.registered_model, "tracking": to_dict(own.tracking)}
    metric = cfg.space.scheduler.metric
    header = (f"# Best trial {best.trial_id} of the search {search_dir}: {metric} {best.best_value:.4f} at epoch "
              f"{best.best_epoch}.\n# Train it with: {cfg.trainer_spec.command} --config THIS_FILE\n")
    return header + dump_config(trial_config(base, best.params, cfg.trainer_spec.config))


def report_search(results: list, cfg: TuneConfig, record: SearchRecord,
                  options: storage.StorageOptions) -> SearchResult:
    """Summarize the trials; write (and log) the table, plot, best config and checkpoint; close the MLflow runs."""
    from mlflow.tracking import MlflowClient

    asha = cfg.space.scheduler
    client = MlflowClient(record.tracking_uri) if record.parent_run_id else None
    trials = sorted((summarize_trial(r, asha, record.train_dir, cfg.base_config.patience, client, options)
                     for r in results), key=lambda t: t.trial_id)
    if client:
        close_trial_runs(client, trials)
    best = best_trial(trials, asha.mode)
    rows = table_rows(trials, asha.metric)
    outputs = {files.TRIALS_TABLE: to_csv(rows).encode(), files.TRIALS_PLOT: plot_curves(trials, asha.metric)}
    if best:
        outputs[files.BEST_CONFIG] = best_config_yaml(best, cfg, record.search_dir).encode()
        outputs[files.BEST_WEIGHTS] = storage.read_bytes(best.checkpoint, options)
    for name, data in outputs.items():
        storage.write_bytes(storage.join(record.search_dir, name), data, options)
    if client:
        log_search(outputs, trials, best, cfg, record)
    logger.info(format_table(rows))
    return SearchResult(record.search_dir, trials, best,
                        storage.join(record.search_dir, files.BEST_CONFIG) if best else None,
                        storage.join(record.search_dir, files.BEST_WEIGHTS) if best else None,
                        record.parent_run_id, record.tracking_uri)


def log_search(outputs: dict[str, bytes], trials: list[TrialSummary], best: TrialSummary | None, cfg: TuneConfig,
               record: SearchRecord) -> None:
    """The search's files and counts on its parent run, the best weights registered (one model version per search),
    and the run ended."""
    uri, run_id, metric = record.tracking_uri, record.parent_run_id, cfg.space.scheduler.metric
    weights = outputs.pop(files.BEST_WEIGHTS, None)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in outputs.items():
            (Path(tmp) / name).write_bytes(data)
            tracking.log_artifact(uri, run_id, Path(tmp) / name)
    name = cfg.base_config.registered_model
    if weights is not None and name:
        version = tracking.log_weights(uri, run_id, weights, files.BEST_WEIGHTS, name)
        logger.info(f"[spai tune] registered {name} version {version} (best trial)")
    counts = {f"trials_{s}": sum(t.status == s for t in trials) for s in MLFLOW_STATUS}
    tracking.log_metrics(uri, run_id, {**counts, **({f"best_{metric}": best.best_value} if best else {})}, step=0)
    tracking.finish_run(uri, run_id)
