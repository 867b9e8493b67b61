"""MLflow tracking: a local store by default, any tracking URI when given; params flattened from configs."""
from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.tracking import MlflowClient

from pipelines.infra.net import connect_error
from spai_core.errors import UserError

DEFAULT_STORE = "mlruns"


class TrackingError(UserError, LookupError):
    """The tracking store is unreachable, or lacks a run it should hold."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``--mlflow-uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store under ``./mlruns`` (registry included).

    An HTTP(S) server must answer a TCP connection at once: MLflow's client retries for minutes before failing.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri.startswith(("http://", "https://")):
        parsed = urllib.parse.urlsplit(uri)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if parsed.hostname and (exc := connect_error(parsed.hostname, port)):
            raise TrackingError(f"cannot reach the MLflow server at {uri}: {exc}; check --mlflow-uri (or "
                                "MLFLOW_TRACKING_URI) and that the server is up") from exc
    if uri:
        return absolute_store(uri)
    store = Path(DEFAULT_STORE).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def absolute_store(uri: str) -> str:
    """A local store's URI with an absolute path: Ray workers (which log rank 0's metrics) run in other folders, and
    MLflow cannot place a relative SQLite store's artifacts. ``sqlite:///x.db`` (three slashes) is relative to the
    current folder, ``sqlite:////abs/x.db`` absolute; a path without a scheme (``./mlruns``) is a file store, while
    names such as ``databricks`` are not paths."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and ":memory:" not in uri:
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if ":" not in uri and (uri.startswith(".") or "/" in uri):
        return str(Path(uri).resolve())
    return uri


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Experiment id for ``name``; a local SQLite store keeps artifacts beside its database."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> ``{"optim.lr": "0.0005", ...}`` for MLflow params (values cut to MLflow's limit)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def system_info() -> dict[str, str]:
    import ray
    import torch

    return {"sys.python": platform.python_version(), "sys.platform": platform.platform(),
            "sys.torch": torch.__version__,
            "sys.ray": ray.__version__, "sys.cuda": str(torch.cuda.is_available()), "sys.cpus": str(os.cpu_count())}


def start_run(tracking_uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
              tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """Create a run (optionally nested under ``parent_run_id``), log params and system info; return its id."""
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, tracking_uri)
    all_tags = {"mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    log_params(client, run.info.run_id, {**flatten(params), **system_info()})
    return run.info.run_id


def require_run(tracking_uri: str, run_id: str, what: str) -> None:
    """Fail early, saying where to look, when ``run_id`` is not in the store at ``tracking_uri``."""
    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"{what}, which the MLflow store {tracking_uri} does not hold ({exc.message}); pass the "
                            "store it was tracked in with --mlflow-uri") from exc


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[start:start + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric
    import math
    import time

    stamp = int(time.time() * 1000)
    items = [Metric(k, float(v), stamp, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not math.isnan(float(v))]
    MlflowClient(tracking_uri).log_batch(run_id, metrics=items)


def log_artifact(tracking_uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    MlflowClient(tracking_uri).log_artifact(run_id, str(path), artifact_path)


def log_weights(tracking_uri: str, run_id: str, weights: bytes, filename: str, registered_model: str | None = None
                ) -> str | None:
    """Log checkpoint bytes as ``model/<filename>`` on a run and register them as a version of ``registered_model``
    when one is named; returns that version."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / filename
        local.write_bytes(weights)
        log_artifact(tracking_uri, run_id, local, "model")
    return register_model(tracking_uri, run_id, f"model/{filename}", registered_model) if registered_model else None


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status)


@contextlib.contextmanager
def ended_on_error(tracking_uri: str, run_id: str) -> Iterator[None]:
    """Mark the run KILLED on Ctrl-C (or ``SystemExit``) and FAILED on any other error, then re-raise, so a job that
    stops early never leaves its run RUNNING."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        finish_run(tracking_uri, run_id, "KILLED")
        raise
    except BaseException:
        finish_run(tracking_uri, run_id, "FAILED")
        raise


def register_model(tracking_uri: str, run_id: str, artifact_path: str, name: str) -> str:
    """Register an artifact of a run as a version of model ``name``; returns the version.

    Idempotent per run and artifact: a resumed run that registers again gets its existing version back.
    """
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri}/{artifact_path}"
    for existing in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if existing.source == source:
            return existing.version
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    version = client.create_model_version(name, source, run_id=run_id)
    return version.version


def ui_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return f"MLflow runs: {tracking_uri}"
    return f"MLflow store: {tracking_uri}\n  open the UI with: mlflow ui --backend-store-uri {tracking_uri}"
