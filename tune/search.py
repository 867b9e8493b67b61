"""``spai tune``: hyperparameter search over the training config with Ray Tune and ASHA, tracked in MLflow.

Every trial is a real ``spai train`` run: a small Tune function trainable calls :func:`pipelines.train.job.run_training`,
whose Ray Train workers (distributed when a trial has several) report each epoch to Tune through
``TuneReportCallback``, the Train V2 / Tune interop. ASHA stops trials whose validation AUC trails their peers' at a
rung. A search lives in ``<output>/<name>/``:

* ``spai_search.json``: what the search was started with; ``--resume`` continues exactly that search;
* ``<trial id>/``: Tune's per-trial results; ``train/<trial id>/``: the trial's Train run (checkpoints, config);
* ``trials.csv``, ``val_auc.png``, ``best_config.yaml`` (a ready ``spai train --config``) and ``best.safetensors``.

MLflow holds a parent run for the search with the table, plot and best config, and a child run per trial (params,
per-epoch metrics, and a ``spai.tune.status`` tag: completed, stopped_early by ASHA, or failed).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.tune
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from pipelines.infra import storage, tracking
from pipelines.data.manifest import read_manifest
from pipelines.infra.runtime import check_gpus, init_ray, node_cpus
from pipelines.train.job import (CONFIG_DIR, TrainConfig, epoch_metric_names, initial_model, load_train_config,
                             run_training)
from spai_core.config import ConfigError, from_dict, to_dict
from tune.space import (AshaConfig, SearchSpace, check_space, load_space, plain, space_from_dict, trial_config,
                        tune_param_space)

DEFAULT_SPACE = CONFIG_DIR / "search_space.yaml"
DEFAULT_OUTPUT = "runs/tune"
SEARCH_MARKER = "spai_search.json"
RUN_MARKER = "spai_run.json"  # written by run_training into every Train run folder; holds its MLflow run id
TABLE, PLOT, BEST_CONFIG, BEST_WEIGHTS = "trials.csv", "val_auc.png", "best_config.yaml", "best.safetensors"
TIME_ATTR = "epochs_done"  # ASHA's clock
DRIVER_CPUS = 0.01  # a trial only starts and watches its Train run; the Train workers request their own resources
DATA_CPUS = 2  # CPU slots init_ray keeps beyond the reservation for the Ray Data decode tasks that feed the workers
MLFLOW_STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED"}


class EpochReport(TuneReportCallback):
    """``TuneReportCallback`` that adds ``epochs_done`` (epochs trained so far) to every result.

    ASHA counts epochs with it rather than with Tune's ``training_iteration``, which restarts at 1 when a resumed
    search restarts an interrupted trial whose Train run then continues from its last checkpoint.
    """

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        super().after_report(run_context, [{**m, TIME_ATTR: m["epoch"] + 1} for m in metrics], checkpoint)


@dataclass
class TrialSetup:
    """What every trial needs besides its sampled params."""

    base: dict[str, Any]  # training config: epochs = max_t and the per-trial resources set
    manifest: str
    train_dir: str  # one Train run per trial under here, named by the trial id
    tracking_uri: str
    experiment: str
    parent_run_id: str
    init: str | None = None  # starting weights of every trial (official spai.pth or our checkpoint)
    backbone: str | None = None  # MFM ViT-B/16 backbone weights of every trial


@dataclass
class SearchPlan:
    """A search as started; saved as ``spai_search.json`` so that ``--resume`` runs the same trials again."""

    setup: TrialSetup
    space: dict[str, Any]
    trials: int
    max_concurrent: int


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
    mlflow_run_id: str
    tracking_uri: str


# ----------------------------------------------------------------------------------------------- trials


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: one ``spai train`` run with the sampled ``params``, reporting every epoch to Tune.

    A trial restarted by a resumed search finds its Train run and continues it from its last checkpoint.
    """
    # Trials do not register models: the search registers its best checkpoint once, from the parent run.
    cfg = dataclasses.replace(trial_config(setup.base, params), registered_model=None)
    trial_id = ray.tune.get_context().get_trial_id()
    resume = storage.exists(storage.join(setup.train_dir, trial_id, RUN_MARKER))
    run_training(cfg, setup.manifest, setup.train_dir, trial_id, resume=resume, init=setup.init,
                 backbone=setup.backbone, mlflow_uri=setup.tracking_uri, experiment=setup.experiment,
                 callbacks=[EpochReport()], parent_run_id=setup.parent_run_id)


def trial_dirname(trial) -> str:
    """Trial folders named by trial id alone: Tune's default name repeats every param and a timestamp."""
    return trial.trial_id


def per_trial_cpus(base: dict[str, Any]) -> float:
    """CPUs one trial holds while it runs: its Train workers' and its driver's."""
    return base["workers"] * base["cpus_per_worker"] + DRIVER_CPUS


def default_concurrency(cpus_per_trial: float, gpus_per_trial: float) -> int:
    """Trials whose Train runs fit the cluster at once; more would only wait for resources, each holding a driver.

    Each trial's decode tasks need a CPU on some node besides its workers', so a node keeps one: two trials on two
    2-CPU nodes held a CPU each and left 0.99 per node, and their 1-CPU decode tasks never started."""
    total = ray.cluster_resources()
    fits = [(total.get("CPU", 0.0) - DATA_CPUS) // cpus_per_trial,
            sum(max(0.0, cpus - 1) // cpus_per_trial for cpus in node_cpus())]
    if gpus_per_trial:
        fits.append(total.get("GPU", 0.0) // gpus_per_trial)
    return max(1, int(min(fits)))


def make_tuner(plan: SearchPlan, search_dir: str, options: storage.StorageOptions) -> ray.tune.Tuner:
    """The Tuner of a new search: the space's samplers, ASHA on epochs, trials limited to ``max_concurrent``."""
    space = space_from_dict(plan.space)
    asha = space.scheduler
    # Rungs strictly below max_t: a trial that trains all its epochs must end by itself, so that its Train run
    # exports the best checkpoint and closes its MLflow run instead of being killed at the last report.
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=asha.max_t - 1, grace_period=asha.grace_period,
                              reduction_factor=asha.reduction_factor, stop_last_trials=False)
    fs, path = storage.filesystem(storage.parent(search_dir), options)
    return ray.tune.Tuner(
        _trainable(plan),
        param_space=tune_param_space(space),
        # The generator limits concurrency itself: Tune ignores max_concurrent_trials next to a given generator.
        tune_config=ray.tune.TuneConfig(metric=asha.metric, mode=asha.mode, scheduler=scheduler,
                                        search_alg=BasicVariantGenerator(random_state=space.seed,
                                                                         max_concurrent=plan.max_concurrent),
                                        num_samples=plan.trials, trial_dirname_creator=trial_dirname),
        run_config=ray.tune.RunConfig(name=storage.basename(search_dir), storage_path=path,
                                      storage_filesystem=fs if storage.is_s3(search_dir) else None),
    )


def _trainable(plan: SearchPlan):
    """``run_trial`` bound to the plan's setup, asking Tune for a driver's tiny CPU share only."""
    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=plan.setup), {"CPU": DRIVER_CPUS})


# ----------------------------------------------------------------------------------------------- entry points


def run_search(base: TrainConfig, manifest: str, space: SearchSpace, trials: int, max_concurrent: int | None = None,
               gpus_per_trial: float = 0.0, workers_per_trial: int = 1, output: str = DEFAULT_OUTPUT,
               name: str | None = None, mlflow_uri: str | None = None, experiment: str = "spai-tune",
               init: str | None = None, backbone: str | None = None) -> SearchResult:
    """Start a search of ``trials`` samples of ``space`` around ``base``; the library entry of ``spai tune``."""
    options = storage.StorageOptions.from_env()
    search_dir = storage.join(storage.absolute(output), name or time.strftime("tune-%Y%m%d-%H%M%S"))
    marker = storage.join(search_dir, SEARCH_MARKER)
    if storage.exists(marker, options):
        raise FileExistsError(f"{search_dir} already holds a search; pass --resume to continue it or choose another "
                              "--name")
    if trials < 1 or workers_per_trial < 1 or gpus_per_trial < 0:
        raise ConfigError(f"need --trials >= 1, --workers-per-trial >= 1 and --gpus-per-trial >= 0, got {trials}, "
                          f"{workers_per_trial}, {gpus_per_trial}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be at least 1, got {max_concurrent}")
    base_dict = {**to_dict(base), "epochs": space.scheduler.max_t, "workers": workers_per_trial,
                 "gpus_per_worker": gpus_per_trial / workers_per_trial}
    trial_config(base_dict, {})  # the base itself must be valid with the per-trial resources
    check_space(space, base_dict)
    manifest = storage.absolute(manifest)
    # absolute: trials run in other folders (and on other nodes); a wrong file fails here, not in every trial
    init, backbone = (storage.absolute(path) if path else None for path in (init, backbone))
    if init or backbone:
        initial_model(base, init, backbone)
    # fail fast on a missing manifest or a metric training never reports, before starting Ray and MLflow runs
    check_metric(space.scheduler.metric, read_manifest(manifest, options))

    if max_concurrent is None:
        init_ray(reserved_cpus=per_trial_cpus(base_dict))
        max_concurrent = default_concurrency(per_trial_cpus(base_dict), gpus_per_trial)
    else:
        init_ray(reserved_cpus=max_concurrent * per_trial_cpus(base_dict))
        fits = default_concurrency(per_trial_cpus(base_dict), gpus_per_trial)
        if max_concurrent > fits:
            print(f"[spai tune] warning: --max-concurrent {max_concurrent}, but {fits} trial(s) fit this cluster at "
                  "once with a CPU left per node for their data loading; the others wait, and trials that hold every "
                  "CPU can starve each other's decode tasks", file=sys.stderr, flush=True)
    if gpus_per_trial:
        check_gpus(gpus_per_trial, f"--gpus-per-trial {gpus_per_trial:g}")
    tracking_uri = tracking.resolve_tracking_uri(mlflow_uri)
    parent_run_id = tracking.start_run(
        tracking_uri, experiment, storage.basename(search_dir),
        {"base": base_dict, "space": dataclasses.asdict(space), "search": {"trials": trials,
                                                                           "max_concurrent": max_concurrent}},
        {"spai.kind": "tune", "output": search_dir})
    setup = TrialSetup(base_dict, manifest, storage.join(search_dir, "train"), tracking_uri, experiment, parent_run_id,
                       init, backbone)
    plan = SearchPlan(setup, dataclasses.asdict(space), trials, max_concurrent)
    storage.write_bytes(marker, json.dumps(dataclasses.asdict(plan), indent=2).encode(), options)
    print(f"[spai tune] {search_dir}: {trials} trial(s), at most {max_concurrent} at once, "
          f"{workers_per_trial} worker(s) each", flush=True)
    return _fit(make_tuner(plan, search_dir, options), plan, search_dir, options)


def check_metric(metric: str, manifest: pa.Table) -> None:
    """Refuse a scheduler metric that no epoch reports (Tune would find out only when the first trial reports)."""
    val = manifest.filter(pc.and_(pc.equal(manifest.column("split"), "val"), pc.equal(manifest.column("label"), 1)))
    known = epoch_metric_names(sorted(set(val.column("generator").to_pylist())))
    if metric not in known:
        raise ConfigError(f"scheduler.metric {metric!r} is not reported by training on this manifest; pick one of "
                          f"{', '.join(sorted(known))}")


def resume_search(output: str, name: str, manifest: str | None = None) -> SearchResult:
    """Continue an interrupted search: finished trials are kept, unfinished and errored ones run again.

    Restarted trials continue their Train runs from their last checkpoints. Tune saves no scheduler state, so ASHA's
    rungs start empty: trials are compared only with results reported after the resume.
    """
    options = storage.StorageOptions.from_env()
    search_dir = storage.join(storage.absolute(output), name)
    marker = storage.join(search_dir, SEARCH_MARKER)
    if not storage.exists(marker, options):
        raise FileNotFoundError(f"nothing to resume at {search_dir}; check --output and --name")
    plan = from_dict(SearchPlan, json.loads(storage.read_bytes(marker, options)), where=marker)
    if manifest is not None and storage.absolute(manifest) != plan.setup.manifest:
        raise ConfigError(f"search {name} runs on {plan.setup.manifest}; resume it with that --manifest")
    init_ray(reserved_cpus=plan.max_concurrent * per_trial_cpus(plan.setup.base))
    fs, path = storage.filesystem(search_dir, options)
    if not ray.tune.Tuner.can_restore(path, storage_filesystem=fs):
        raise FileNotFoundError(f"{search_dir} has no Tune state (the search stopped before its first trial); "
                                "start it again with another --name")
    tuner = ray.tune.Tuner.restore(path, trainable=_trainable(plan), resume_errored=True, storage_filesystem=fs)
    print(f"[spai tune] resuming {search_dir}", flush=True)
    return _fit(tuner, plan, search_dir, options)


def unfinished_trials(search_dir: str, options: storage.StorageOptions) -> list[str]:
    """Trials the search's saved state has not ended: on Ctrl+C Tune saves its state and returns without raising.

    The returned results cannot tell: Tune marks the trials it cuts short as terminated once it has saved the state.
    """
    fs, path = storage.filesystem(search_dir, options)
    analysis = ray.tune.ExperimentAnalysis(path, storage_filesystem=fs)
    return [t.trial_id for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")]


def _fit(tuner: ray.tune.Tuner, plan: SearchPlan, search_dir: str, options: storage.StorageOptions) -> SearchResult:
    """Run the trials, then report; an interrupted search leaves its parent MLflow run KILLED until resumed."""
    setup = plan.setup
    try:
        grid = tuner.fit()
    except BaseException as exc:
        tracking.finish_run(setup.tracking_uri, setup.parent_run_id,
                            "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if unfinished_trials(search_dir, options):
        tracking.finish_run(setup.tracking_uri, setup.parent_run_id, "KILLED")
        print(f"[spai tune] search interrupted; continue it with: spai tune --resume --output "
              f"{storage.parent(search_dir)} --name {storage.basename(search_dir)} --manifest {setup.manifest}",
              file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    return report_search(list(grid), plan, search_dir, options)


# ----------------------------------------------------------------------------------------------- results


def _storage_uri(path: str, like: str) -> str:
    """A path reported by Ray Train (inside its file system) as a URI like ``like`` (``s3://`` when that is)."""
    return "s3://" + path.lstrip("/") if storage.is_s3(like) and not storage.is_s3(path) else path


def epoch_history(client: MlflowClient, run_id: str | None, keys: tuple[str, ...]) -> dict[int, dict[str, float]]:
    """``{epoch: {key: value}}`` as a trial's Train run logged them to its MLflow run.

    Unlike Tune's record this survives restarts: Tune starts the results of a restarted trial afresh, while its Train
    run continues in the same MLflow run. An epoch logged twice (redone after a restart) keeps its latest value.
    """
    history: dict[int, dict[str, float]] = {}
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
    exported = storage.join(run_dir, BEST_WEIGHTS)  # run_training's export has the same name
    if storage.exists(exported, options):
        return exported
    frame = result.metrics_dataframe
    reported = {} if frame is None or "checkpoint_path" not in frame else {
        int(epoch): path for epoch, path in zip(frame["epoch"], frame["checkpoint_path"]) if isinstance(path, str)}
    candidates = (storage.join(_storage_uri(reported[e], run_dir), "model.safetensors") for e in ranked_epochs
                  if e in reported)
    return next((uri for uri in candidates if storage.exists(uri, options)), None)


def summarize_trial(result, asha: AshaConfig, setup: TrialSetup, client: MlflowClient,
                    options: storage.StorageOptions) -> TrialSummary:
    """A trial's outcome: epochs and metric per epoch from its MLflow run, its status, and its best weights."""
    trial_id = storage.basename(result.path)
    run_dir = storage.join(setup.train_dir, trial_id)
    marker = storage.join(run_dir, RUN_MARKER)
    run_id = json.loads(storage.read_bytes(marker, options))["mlflow_run_id"] if storage.exists(marker, options) \
        else None
    history = epoch_history(client, run_id, (asha.metric, "stale_epochs"))
    curve = [(epoch, values[asha.metric]) for epoch, values in history.items() if asha.metric in values]
    sign = 1.0 if asha.mode == "max" else -1.0
    ranked = sorted(curve, key=lambda ev: (sign * ev[1], ev[0]), reverse=True)  # ties: the later epoch, as Train
    status = trial_status(bool(result.error), result.metrics, asha.max_t, setup.base["patience"])
    return TrialSummary(
        trial_id, {k: plain(v) for k, v in (result.config or {}).items()}, status, max(history, default=-1) + 1,
        ranked[0][1] if ranked else math.nan, ranked[0][0] if ranked else None,
        best_weights(result, [epoch for epoch, _ in ranked], run_dir, options), curve, run_id)


def best_trial(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    scored = [t for t in trials if math.isfinite(t.best_value) and t.checkpoint]
    return (max if mode == "max" else min)(scored, key=lambda t: t.best_value) if scored else None


def close_trial_runs(client: MlflowClient, trials: list[TrialSummary]) -> None:
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


def plot_curves(trials: list[TrialSummary], metric: str, path: Path) -> None:
    """One line per trial of the metric per epoch; dashed for trials ASHA stopped."""
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
    fig.savefig(path, bbox_inches="tight")


def best_config_yaml(best: TrialSummary, base: dict[str, Any], metric: str, search_dir: str) -> str:
    """The best trial's full training config, ready for ``spai train --config``, with where it came from."""
    cfg = trial_config(base, best.params)
    header = (f"# Best trial {best.trial_id} of the search {search_dir}: {metric} {best.best_value:.4f} at epoch "
              f"{best.best_epoch}.\n# Train it with: spai train --config THIS_FILE --manifest MANIFEST\n")
    return header + yaml.safe_dump(to_dict(cfg), sort_keys=False)


def report_search(results: list, plan: SearchPlan, search_dir: str, options: storage.StorageOptions) -> SearchResult:
    """Summarize the trials; write and log the table, plot, best config and checkpoint; close the MLflow runs."""
    setup, asha = plan.setup, space_from_dict(plan.space).scheduler
    client = MlflowClient(setup.tracking_uri)
    trials = sorted((summarize_trial(r, asha, setup, client, options) for r in results), key=lambda t: t.trial_id)
    close_trial_runs(client, trials)
    best = best_trial(trials, asha.mode)
    rows = table_rows(trials, asha.metric)
    with tempfile.TemporaryDirectory() as tmp:
        files = {TABLE: Path(tmp) / TABLE, PLOT: Path(tmp) / PLOT}
        files[TABLE].write_text(to_csv(rows))
        plot_curves(trials, asha.metric, files[PLOT])
        if best:
            files[BEST_CONFIG] = Path(tmp) / BEST_CONFIG
            files[BEST_CONFIG].write_text(best_config_yaml(best, setup.base, asha.metric, search_dir))
        for name, local in files.items():
            storage.write_bytes(storage.join(search_dir, name), local.read_bytes(), options)
            tracking.log_artifact(setup.tracking_uri, setup.parent_run_id, local)
    best_checkpoint = None
    if best:
        best_checkpoint = storage.join(search_dir, BEST_WEIGHTS)
        weights = storage.read_bytes(best.checkpoint, options)
        storage.write_bytes(best_checkpoint, weights, options)
        register_best(weights, setup)
    counts = {f"trials_{s}": sum(t.status == s for t in trials) for s in MLFLOW_STATUS}
    tracking.log_metrics(setup.tracking_uri, setup.parent_run_id,
                         {**counts, **({f"best_{asha.metric}": best.best_value} if best else {})}, step=0)
    tracking.finish_run(setup.tracking_uri, setup.parent_run_id)
    print(format_table(rows), flush=True)
    return SearchResult(search_dir, trials, best, storage.join(search_dir, BEST_CONFIG) if best else None,
                        best_checkpoint, setup.parent_run_id, setup.tracking_uri)


def register_best(weights: bytes, setup: TrialSetup) -> None:
    """Log the best trial's weights on the parent run and register them (one model version per search)."""
    name = setup.base.get("registered_model")
    if not name:
        return
    version = tracking.log_weights(setup.tracking_uri, setup.parent_run_id, weights, BEST_WEIGHTS, name)
    print(f"[spai tune] registered {name} version {version} (best trial)", flush=True)


def main(args: argparse.Namespace) -> int:
    output = args.output or DEFAULT_OUTPUT
    if args.resume:
        if not args.name:
            raise ConfigError("--resume needs the --name of the search to continue (its folder under --output)")
        if args.config or args.space or args.overrides:
            print("[spai tune] resuming: the search keeps the config and space it started with; --config, --space "
                  "and overrides are ignored", flush=True)
        result = resume_search(output, args.name, args.manifest)
    else:
        default = CONFIG_DIR / "spai.yaml"
        cfg = load_train_config(args.config or (default if default.exists() else None), list(args.overrides))
        result = run_search(cfg, args.manifest, load_space(args.space or DEFAULT_SPACE), args.trials,
                            args.max_concurrent, args.gpus_per_trial, args.workers_per_trial, output, args.name,
                            args.mlflow_uri, args.experiment, args.init, args.backbone)
    print(f"[spai tune] search directory: {result.search_dir}")
    if result.best:
        print(f"[spai tune] best trial {result.best.trial_id}: {result.best.best_value:.4f} at epoch "
              f"{result.best.best_epoch} with {result.best.params}")
        print(f"[spai tune] best config: {result.best_config}\n[spai tune] best checkpoint: {result.best_checkpoint}")
    print(tracking.ui_hint(result.tracking_uri))
    return 0
