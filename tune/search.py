"""``spai tune``: hyperparameter search over the training config with Ray Tune and ASHA, tracked in MLflow.

Every trial is a real ``spai train`` run (or, with ``trainer: fusion``, a ``spai fusion train`` run of a Sem-SPAI
head; :mod:`tune.trainers`): a small Tune function trainable calls :func:`pipelines.train.run.run_training` (or
:func:`pipelines.fusion.run.run_fusion`), whose Ray Train workers (distributed when a trial has several) report each
epoch to Tune through ``TuneReportCallback``, the Train V2 / Tune interop. ASHA stops trials whose validation AUC
trails their peers' at a rung. A search lives in ``<output>/<name>/``:

* ``config.yaml``: the search's config (``spai tune --config`` of it reruns the search), and ``spai_search.json``:
  its MLflow parent run and concurrency, what ``--resume`` continues;
* ``<trial id>/``: Tune's per-trial results; ``train/<trial id>/``: the trial's Train run (checkpoints, config);
* ``trials.csv``, ``val_auc.png``, ``best_config.yaml`` (a ready ``spai train --config``) and ``best.safetensors``.

MLflow holds a parent run for the search with the table, plot and best config, and a child run per trial (params,
per-epoch metrics, and a ``spai.tune.status`` tag: completed, stopped_early by ASHA, or failed).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from pipelines.data.manifest import split_rows
from pipelines.infra import storage, tracking
from pipelines.infra.resume import check_resumable
from pipelines.infra.runtime import check_gpus, init_ray, node_cpus, remove_orphaned_placement_groups
from pipelines.train import files
from pipelines.train.epochs import epoch_metric_names
from pipelines.train.run import check_local_resources
from spai_core.config import ConfigError, check_config, dump_config, to_dict
from tune.config import TrialsConfig, TuneConfig
from tune.report import TIME_ATTR, SearchRecord, SearchResult, report_search
from tune.space import trial_config, tune_param_space
from tune.trainers import TRAINERS

logger = logging.getLogger(__name__)

DRIVER_CPUS = 0.01  # a trial only starts and watches its Train run; the Train workers request their own resources
DATA_CPUS = 2  # CPU slots init_ray keeps beyond the reservation for the Ray Data decode tasks that feed the workers
RESUMABLE_CHANGES = ("max_concurrent", "tracking")  # how a resumed search runs, not what it searches
T = TypeVar("T", bound=TrialsConfig)


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

    base: dict[str, Any]  # the trials' training config (TuneConfig.trial_base): output is the search's train dir
    parent_run_id: str | None  # the search's MLflow run; trials are its children
    trainer: str = "spai"  # what a trial runs (tune.trainers.TRAINERS): its config class and run function


@dataclass
class Search:
    """A search as it runs: its config, folder, MLflow parent run and concurrency (``spai_search.json``). Other jobs
    whose trials are training runs (``spai benchmark``) run as searches too, under their own ``command``."""

    cfg: TrialsConfig
    dir: str
    tracking_uri: str | None
    parent_run_id: str | None
    max_concurrent: int
    command: str = "spai tune"  # what runs it: its log lines and its resume hint say so

    @property
    def setup(self) -> TrialSetup:
        return TrialSetup(self.cfg.trial_base(storage.join(self.dir, files.SEARCH_TRIALS), self.tracking_uri),
                          self.parent_run_id, self.cfg.trainer_spec.name)

    def record(self, options: storage.StorageOptions) -> None:
        marker = {"mlflow_run_id": self.parent_run_id, "tracking_uri": self.tracking_uri,
                  "max_concurrent": self.max_concurrent}
        storage.write_bytes(storage.join(self.dir, files.SEARCH_MARKER), json.dumps(marker).encode(), options)
        storage.write_bytes(storage.join(self.dir, files.CONFIG), dump_config(self.cfg).encode(), options)


# ----------------------------------------------------------------------------------------------- trials


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: one run of the setup's trainer with the sampled ``params``, reporting every epoch to
    Tune. A ``spai train`` trial restarted by a resumed search continues its Train run from its last checkpoint."""
    trainer = TRAINERS[setup.trainer]
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = dataclasses.replace(trial_config(setup.base, params, trainer.config), name=trial_id)
    train_trial(cfg, setup.parent_run_id, setup.trainer)


def train_trial(cfg: Any, parent_run_id: str | None, trainer: str = "spai") -> Any:
    """A trial's run ``cfg`` (of ``trainer``), reporting every epoch to Tune."""
    return TRAINERS[trainer].run(cfg, parent_run_id, [EpochReport()])


def trial_dirname(trial) -> str:
    """Trial folders named by trial id alone: Tune's default name repeats every param and a timestamp."""
    return trial.trial_id


class OrphanSweep(ray.tune.Callback):
    """Every few seconds of a search, frees what stopped trials' Train runs left holding CPUs
    (:func:`~pipelines.infra.runtime.remove_orphaned_placement_groups`), so that the trials after them start."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last = 0.0

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last >= self.interval_s:
            self._last = time.monotonic()
            remove_orphaned_placement_groups()


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


def make_tuner(search: Search, options: storage.StorageOptions) -> ray.tune.Tuner:
    """The Tuner of a new search: the space's samplers, ASHA on epochs, trials limited to ``max_concurrent``."""
    space = search.cfg.space
    asha = space.scheduler
    # Rungs strictly below max_t: a trial that trains all its epochs must end by itself, so that its Train run
    # exports the best checkpoint and closes its MLflow run instead of being killed at the last report.
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=asha.max_t - 1, grace_period=asha.grace_period,
                              reduction_factor=asha.reduction_factor, stop_last_trials=False)
    return ray.tune.Tuner(
        _trainable(search),
        param_space=tune_param_space(space),
        # The generator limits concurrency itself: Tune ignores max_concurrent_trials next to a given generator.
        tune_config=ray.tune.TuneConfig(metric=asha.metric, mode=asha.mode, scheduler=scheduler,
                                        search_alg=BasicVariantGenerator(random_state=space.seed,
                                                                         max_concurrent=search.max_concurrent),
                                        num_samples=search.cfg.trials, trial_dirname_creator=trial_dirname),
        run_config=run_config(search.dir, options),
    )


def run_config(search_dir: str, options: storage.StorageOptions) -> ray.tune.RunConfig:
    """Tune keeps a search's state (and its trials' results) in the search folder, on s3:// too."""
    fs, path = storage.filesystem(storage.parent(search_dir), options)
    return ray.tune.RunConfig(name=storage.basename(search_dir), storage_path=path, callbacks=[OrphanSweep()],
                              storage_filesystem=fs if storage.is_s3(search_dir) else None)


def _trainable(search: Search):
    """``run_trial`` bound to the search's trial setup."""
    return driver_trainable(run_trial, search.setup)


def driver_trainable(trial, setup: Any):
    """Function trainable ``trial`` bound to ``setup``, asking Tune for a driver's tiny CPU share only."""
    return ray.tune.with_resources(ray.tune.with_parameters(trial, setup=setup), {"CPU": DRIVER_CPUS})


# ----------------------------------------------------------------------------------------------- entry points


def resolved(cfg: T, prefix: str = "tune", splits: str = "train and val") -> T:
    """``cfg`` checked, with absolute paths (trials run in other folders and on other nodes) and a name (default:
    ``prefix`` and the time); the trials' data (a manifest, or a feature table) with rows of ``splits`` is
    required."""
    check_config(cfg)
    data = cfg.trainer_spec.data
    if not getattr(cfg, data):
        what = "manifest" if data == "manifest" else "feature table of `spai fusion extract`"
        raise ConfigError(f"--{data} ({data}): no {what} given; pass the {what} (a path or s3:// URI) with "
                          f"{splits} rows")
    absolute = {k: storage.absolute(getattr(cfg, k)) for k in (data, "output", "init", "backbone_weights")
                if getattr(cfg, k)}
    return dataclasses.replace(cfg, **absolute, name=cfg.name or time.strftime(f"{prefix}-%Y%m%d-%H%M%S"))


def preflight(cfg: TuneConfig, options: storage.StorageOptions) -> None:
    """What a search can check before Ray starts: the manifest and metric, the weights, and that a trial fits."""
    # fail fast on missing data or a metric training never reports, before starting Ray and MLflow runs
    trainer = cfg.trainer_spec
    check_metric(cfg.space.scheduler.metric, trainer.metric_rows(getattr(cfg, trainer.data), options))
    check_trial(cfg, options)


def check_trial(cfg: TrialsConfig, options: storage.StorageOptions | None = None) -> None:
    """The weights (or head) every trial starts from load, and a trial fits this machine (a local Ray)."""
    trainer = cfg.trainer_spec
    one_trial = trial_config(cfg.trial_base(cfg.output), {}, trainer.config)
    trainer.check(one_trial, options or storage.StorageOptions.from_env())
    check_local_resources(one_trial)


def start_ray(cfg: TrialsConfig) -> int:
    """Start (or join) Ray for the search; returns how many trials run at once."""
    per_trial = per_trial_cpus(cfg.trial_base(cfg.output))
    init_ray(reserved_cpus=(cfg.max_concurrent or 1) * per_trial)
    fits = default_concurrency(per_trial, cfg.gpus_per_trial)
    if cfg.gpus_per_trial:
        check_gpus(cfg.gpus_per_trial, f"--workers-per-trial {cfg.workers_per_trial} --gpus-per-worker "
                   f"{cfg.gpus_per_worker:g}")
    if cfg.max_concurrent is None:
        return fits
    if cfg.max_concurrent > fits:
        logger.warning(f"--max-concurrent {cfg.max_concurrent}, but {fits} trial(s) fit this cluster at once with a "
                       "CPU left per node for their data loading; the others wait, and trials that hold every CPU can "
                       "starve each other's decode tasks")
    return cfg.max_concurrent


def run_search(cfg: TuneConfig) -> SearchResult:
    """Start the search ``cfg`` describes; the library entry of ``spai tune``."""
    options = storage.StorageOptions.from_env()
    cfg = resolved(cfg)
    search_dir = storage.join(cfg.output, cfg.name)
    if storage.exists(storage.join(search_dir, files.SEARCH_MARKER), options):
        raise FileExistsError(f"{search_dir} already holds a search; pass --resume to continue it or choose another "
                              "--name")
    preflight(cfg, options)
    search = open_search(cfg, search_dir, start_ray(cfg), "tune", options)
    logger.info(f"[spai tune] {search_dir}: {cfg.trials} trial(s), at most {search.max_concurrent} at once, "
                f"{cfg.workers_per_trial} worker(s) each")
    return _fit(make_tuner(search, options), search, options)


def open_search(cfg: TrialsConfig, search_dir: str, max_concurrent: int, kind: str,
                options: storage.StorageOptions, command: str = "spai tune") -> Search:
    """A new search: its MLflow parent run (tagged ``spai.kind``: ``kind``) when tracked, and its record."""
    tracking_uri = parent_run_id = None
    if cfg.tracking.enabled:
        tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
        params = {k: v for k, v in to_dict(cfg).items() if k != "tracking"}
        parent_run_id = tracking.start_run(tracking_uri, cfg.tracking.experiment, cfg.name,
                                           {**params, "max_concurrent": max_concurrent},
                                           {"spai.kind": kind, "output": search_dir})
    search = Search(cfg, search_dir, tracking_uri, parent_run_id, max_concurrent, command)
    search.record(options)
    return search


def check_metric(metric: str, manifest: pa.Table) -> None:
    """Refuse a scheduler metric that no epoch reports (Tune would find out only when the first trial reports)."""
    val = split_rows(manifest, "val")
    val = val.filter(pc.equal(val.column("label"), 1))
    known = epoch_metric_names(sorted(set(val.column("generator").to_pylist())))
    if metric not in known:
        raise ConfigError(f"space.scheduler.metric: {metric!r} is not reported by training on this manifest; pick one "
                          f"of {', '.join(sorted(known))}")


def saved_search(output: str, name: str) -> dict[str, Any]:
    """The config a search was started with (its ``config.yaml``): what ``spai tune --resume`` starts from."""
    import yaml

    search_dir = storage.join(storage.absolute(output), name)
    options = storage.StorageOptions.from_env()
    if not storage.exists(storage.join(search_dir, files.SEARCH_MARKER), options):
        raise FileNotFoundError(f"nothing to resume at {search_dir}; check --output and --name")
    return yaml.safe_load(storage.read_bytes(storage.join(search_dir, files.CONFIG), options))


def resume_search(cfg: TuneConfig) -> SearchResult:
    """Continue an interrupted search: finished trials are kept, unfinished and errored ones run again.

    Restarted trials continue their Train runs from their last checkpoints. Tune saves no scheduler state, so ASHA's
    rungs start empty: trials are compared only with results reported after the resume.
    """
    options = storage.StorageOptions.from_env()
    if cfg.trainer == "fusion":  # spai fusion train has no resume: a restarted trial would find its run and fail
        raise ConfigError("--resume (resume): a fusion search cannot be resumed (its trials train in seconds); start "
                          "it again with another --name")
    search = reopen_search(resolved(cfg), options)
    return _fit(restore_tuner(search, _trainable(search), options), search, options)


def reopen_search(cfg: TrialsConfig, options: storage.StorageOptions, command: str = "spai tune") -> Search:
    """A search to resume, as recorded, once ``cfg`` is checked against the config it was started with; starts Ray."""
    search_dir = storage.join(cfg.output, cfg.name)
    recorded = saved_search(cfg.output, cfg.name)
    check_resumable(recorded, to_dict(cfg), RESUMABLE_CHANGES, f"search {cfg.name}",
                    "Resume it with the settings it was started with, or start a new search with another --name")
    marker = json.loads(storage.read_bytes(storage.join(search_dir, files.SEARCH_MARKER), options))
    search = Search(cfg, search_dir, marker["tracking_uri"], marker["mlflow_run_id"], marker["max_concurrent"],
                    command)
    init_ray(reserved_cpus=search.max_concurrent * per_trial_cpus(cfg.trial_base(cfg.output)))
    return search


def restore_tuner(search: Search, trainable, options: storage.StorageOptions) -> ray.tune.Tuner:
    """The Tuner of an interrupted search from its saved state: finished trials stay, the others run again."""
    fs, path = storage.filesystem(search.dir, options)
    if not ray.tune.Tuner.can_restore(path, storage_filesystem=fs):
        raise FileNotFoundError(f"{search.dir} has no Tune state (the search stopped before its first trial); "
                                "start it again with another --name")
    logger.info(f"[{search.command}] resuming {search.dir}")
    return ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)


def unfinished_trials(search_dir: str, options: storage.StorageOptions) -> list[str]:
    """Trials the search's saved state has not ended: on Ctrl+C Tune saves its state and returns without raising.

    The returned results cannot tell: Tune marks the trials it cuts short as terminated once it has saved the state.
    """
    fs, path = storage.filesystem(search_dir, options)
    analysis = ray.tune.ExperimentAnalysis(path, storage_filesystem=fs)
    return [t.trial_id for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")]


def _fit(tuner: ray.tune.Tuner, search: Search, options: storage.StorageOptions) -> SearchResult:
    """Run the trials, then report."""
    record = SearchRecord(search.dir, storage.join(search.dir, files.SEARCH_TRIALS), search.tracking_uri,
                          search.parent_run_id)
    return report_search(fit_trials(tuner, search, options), search.cfg, record, options)


def fit_trials(tuner: ray.tune.Tuner, search: Search, options: storage.StorageOptions) -> list:
    """Run the trials; returns Tune's result per trial. An interrupted search leaves its parent MLflow run KILLED
    until resumed, and raises KeyboardInterrupt."""
    def finish(status: str) -> None:
        if search.parent_run_id:
            tracking.finish_run(search.tracking_uri, search.parent_run_id, status)

    try:
        grid = tuner.fit()
    except BaseException as exc:
        finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:  # the last stopped trials' groups, before the Ray is used for anything else
        remove_orphaned_placement_groups()
    if unfinished_trials(search.dir, options):
        finish("KILLED")
        logger.warning(f"search interrupted; continue it with: {search.command} --resume --output "
                       f"{storage.parent(search.dir)} --name {storage.basename(search.dir)}")
        raise KeyboardInterrupt
    return list(grid)
