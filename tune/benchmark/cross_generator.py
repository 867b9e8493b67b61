"""``spai benchmark cross-generator``: GenImage's cross-generator matrix (its Table 4) as a grid of Ray Tune trials.

Each row of the matrix is a training set (:mod:`.sets`): one generator's AI-generated images with every real one, or
with ``--leave-one-out`` every generator's but one. Its trial is a real ``spai train`` run of the benchmark's training
config on that set (the trials of :mod:`tune.search`, run in parallel and tracked as children of one MLflow run),
whose best checkpoint then scores the manifest's whole test split with ``spai score``'s pipeline. The driver turns
those scores into the matrix (:mod:`.matrix`). A benchmark lives in ``<output>/<name>/``:

* ``config.yaml`` (``--config`` of it reruns the benchmark) and ``spai_search.json``, what ``--resume`` continues;
* ``manifests/<row>/``: the manifest each row's model trains on;
* ``train/<row>/``: the row's Train run (``best.safetensors``, ``config.yaml``) and ``test_scores.parquet``, its
  model's scores of the test split (``spai evaluate`` reads it);
* ``auc.csv``, ``accuracy.csv``, ``cross_generator.md`` and ``cross_generator.png``: the matrix.

MLflow holds the parent run with the matrix files and its means, and a child run per row (its training run) with the
row's test metrics (``test_auc_<generator>``, ``test_accuracy_<generator>``).
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray.tune
from ray.tune.search import BasicVariantGenerator

from pipelines.data.manifest import read_manifest, write_manifest
from pipelines.evaluate.tables import read_scores
from pipelines.infra import storage, tracking
from pipelines.score.config import ScoreConfig
from pipelines.score.job import score
from pipelines.train import files
from pipelines.train.run import check_splits
from spai_core.config import ConfigError, field_flag, from_dict
from spai_core.detector import PRECISIONS
from spai_core.errors import UserError
from tune.benchmark.config import CrossGeneratorConfig
from tune.benchmark.matrix import METRICS, CrossGeneratorMatrix, build_matrix
from tune.benchmark.sets import TrainingSet, fake_generators, slug, tested_generators, training_sets
from tune.search import (Search, check_trial, driver_trainable, fit_trials, open_search, reopen_search, resolved,
                         restore_tuner, run_config, start_ray, train_trial, trial_dirname)
from tune.space import trial_config

logger = logging.getLogger(__name__)

COMMAND = "spai benchmark cross-generator"
PARAM = "train_on"  # the grid's one parameter: the row's slug
MANIFESTS = "manifests"
TEST_SCORES = "test_scores.parquet"
AUC_TABLE, ACCURACY_TABLE = "auc.csv", "accuracy.csv"
MARKDOWN, HEATMAP = "cross_generator.md", "cross_generator.png"


class TrialError(UserError, RuntimeError):
    """A row's trial that cannot test its model."""


@dataclass
class TrialSetup:
    """What every row's trial needs besides its row."""

    base: dict[str, Any]  # the trials' training config (TrialsConfig.trial_base), under the benchmark's train/
    parent_run_id: str | None
    dir: str  # the benchmark's folder
    score: dict[str, Any]  # the ScoreConfig of the test scoring, but for its weights and output


@dataclass
class BenchmarkResult:
    dir: str
    matrix: CrossGeneratorMatrix
    files: list[str]  # the matrix's CSV, Markdown and PNG
    mlflow_run_id: str | None
    tracking_uri: str | None


def run_dir(bench_dir: str, row: str) -> str:
    return storage.join(bench_dir, files.SEARCH_TRIALS, row)


# ----------------------------------------------------------------------------------------------- trials


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: train the row's model (``spai train``, every epoch reported to Tune), then score the
    test split with its best checkpoint. A restarted trial continues its Train run, or its scoring, where it
    stopped."""
    row = params[PARAM]
    scores = storage.join(run_dir(setup.dir, row), TEST_SCORES)
    if storage.exists(scores):  # trained and scored before the benchmark was interrupted
        return
    cfg = trial_config(setup.base, {"manifest": storage.join(setup.dir, MANIFESTS, row), "name": row})
    trained = train_trial(cfg, setup.parent_run_id)
    if trained.best_checkpoint is None:
        raise TrialError(f"training {row} ended without a checkpoint to test")
    score(from_dict(ScoreConfig, {**setup.score, "weights": trained.best_checkpoint, "output": scores}),
          progress=False)


def score_settings(cfg: CrossGeneratorConfig) -> dict[str, Any]:
    """How each row's model scores the test split: as training validates (precision, batch, resize), on the
    trial's own resources, tracked only through the row's training run."""
    train, gpus = cfg.train, cfg.gpus_per_worker
    return {"input": cfg.manifest, "split": "test", "device": "cuda" if gpus else "cpu",
            "gpus_per_worker": gpus or None, "workers": cfg.workers_per_trial,
            "cpus_per_worker": None if gpus else max(1, int(train.cpus_per_worker)),
            "precision": train.amp if train.amp in PRECISIONS else "auto", "batch_size": train.val_batch_size,
            "transform": {"resize_to": train.val_resize_to}, "tracking": {"enabled": False}}


def trainable(search: Search):
    cfg = search.cfg
    setup = TrialSetup(cfg.trial_base(storage.join(search.dir, files.SEARCH_TRIALS), search.tracking_uri),
                       search.parent_run_id, search.dir, score_settings(cfg))
    return driver_trainable(run_trial, setup)


def make_tuner(search: Search, rows: list[TrainingSet], options: storage.StorageOptions) -> ray.tune.Tuner:
    """A grid over the rows, ``max_concurrent`` at once; no scheduler: every row trains its full epochs."""
    return ray.tune.Tuner(
        trainable(search), param_space={PARAM: ray.tune.grid_search([row.slug for row in rows])},
        tune_config=ray.tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=search.max_concurrent),
                                        num_samples=1, trial_dirname_creator=trial_dirname),
        run_config=run_config(search.dir, options))


# ----------------------------------------------------------------------------------------------- entry points


def plan(cfg: CrossGeneratorConfig, options: storage.StorageOptions) -> tuple[pa.Table, list[TrainingSet], list[str]]:
    """The manifest, the matrix's rows (training sets) and its columns (test generators)."""
    manifest = read_manifest(cfg.manifest, options)
    try:
        return (manifest, training_sets(fake_generators(manifest, "train"), cfg.generators, cfg.leave_one_out),
                tested_generators(manifest))
    except ConfigError as exc:  # name the flag, as check_config does
        raise ConfigError(f"{field_flag(CrossGeneratorConfig, exc.field)} ({exc.field}): {exc}", exc.field) from None


def preflight(cfg: CrossGeneratorConfig, manifest: pa.Table, rows: list[TrainingSet]) -> None:
    """What fails before Ray starts: the weights, a trial's resources, and each row's training data."""
    check_trial(cfg)
    one_trial = trial_config(cfg.trial_base(cfg.output), {})
    for row in rows:
        try:
            warnings = check_splits(row.rows(manifest), one_trial)
        except ConfigError as exc:
            raise ConfigError(f"training set {row.name}: {exc}") from None
        for warning in warnings:
            logger.warning(f"[{COMMAND}] training set {row.name}: {warning}")


def run_benchmark(cfg: CrossGeneratorConfig) -> BenchmarkResult:
    """Start the benchmark ``cfg`` describes; the library entry of ``spai benchmark cross-generator``."""
    options = storage.StorageOptions.from_env()
    cfg = resolved(cfg, "cross-generator", "train, val and test")
    bench_dir = storage.join(cfg.output, cfg.name)
    if storage.exists(storage.join(bench_dir, files.SEARCH_MARKER), options):
        raise FileExistsError(f"{bench_dir} already holds a benchmark; pass --resume to continue it or choose "
                              "another --name")
    manifest, rows, columns = plan(cfg, options)
    preflight(cfg, manifest, rows)
    for row in rows:
        write_manifest(row.rows(manifest), storage.join(bench_dir, MANIFESTS, row.slug),
                       {"builder": COMMAND, "source": cfg.manifest, "generators": list(row.generators)}, options)
    search = open_search(cfg, bench_dir, start_ray(cfg), "cross_generator", options, COMMAND)
    logger.info(f"[{COMMAND}] {bench_dir}: {len(rows)} model(s) ({', '.join(r.name for r in rows)}), tested on "
                f"{len(columns)} generator(s), at most {search.max_concurrent} at once")
    return report(fit_trials(make_tuner(search, rows, options), search, options), search, rows, columns, options)


def resume_benchmark(cfg: CrossGeneratorConfig) -> BenchmarkResult:
    """Continue an interrupted benchmark: finished rows are kept, the others train (and score) on from where they
    stopped."""
    options = storage.StorageOptions.from_env()
    cfg = resolved(cfg, "cross-generator", "train, val and test")
    search = reopen_search(cfg, options, COMMAND)
    _, rows, columns = plan(cfg, options)
    tuner = restore_tuner(search, trainable(search), options)
    return report(fit_trials(tuner, search, options), search, rows, columns, options)


# ----------------------------------------------------------------------------------------------- report


def trial_failure(error: BaseException) -> str:
    """The last line of a failed trial's error: Tune wraps the trial's own in a traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def report(results: list, search: Search, rows: list[TrainingSet], columns: list[str],
           options: storage.StorageOptions) -> BenchmarkResult:
    """The matrix from every row's test scores, written to the benchmark folder and its MLflow parent run."""
    failures = {r.config[PARAM]: trial_failure(r.error) for r in results if r.error}
    scores = {}
    for row in rows:
        uri = storage.join(run_dir(search.dir, row.slug), TEST_SCORES)
        scores[row.slug] = read_scores(uri, options) if storage.exists(uri, options) else None
    matrix = build_matrix(rows, columns, scores, search.cfg.threshold, failures)
    title = f"Cross-generator benchmark {storage.basename(search.dir)}"
    outputs = {AUC_TABLE: matrix.csv("auc").encode(), ACCURACY_TABLE: matrix.csv("accuracy").encode(),
               MARKDOWN: matrix.markdown(title).encode(), HEATMAP: matrix.heatmap_png(title)}
    for name, data in outputs.items():
        storage.write_bytes(storage.join(search.dir, name), data, options)
    if search.parent_run_id:
        log_benchmark(search, matrix, outputs, len(failures), options)
    return BenchmarkResult(search.dir, matrix, [storage.join(search.dir, name) for name in outputs],
                           search.parent_run_id, search.tracking_uri)


def log_benchmark(search: Search, matrix: CrossGeneratorMatrix, outputs: dict[str, bytes], failed: int,
                  options: storage.StorageOptions) -> None:
    """Each row's test metrics on its training run; the matrix files and means on the parent run, then ended."""
    uri, run_id = search.tracking_uri, search.parent_run_id
    for i, row in enumerate(matrix.rows):
        marker = storage.join(run_dir(search.dir, row.slug), files.RUN_MARKER)
        child = json.loads(storage.read_bytes(marker, options))["mlflow_run_id"] \
            if storage.exists(marker, options) else None
        metrics = {f"test_{metric}_{slug(column)}": matrix.values[metric][i, j] for metric in METRICS
                   for j, column in enumerate(matrix.columns)}
        if child:
            tracking.log_metrics(uri, child, _finite(metrics), step=0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in outputs.items():
            (Path(tmp) / name).write_bytes(data)
            tracking.log_artifact(uri, run_id, Path(tmp) / name)
    tracking.log_metrics(uri, run_id, {**_finite(matrix.summary()), "trials_failed": failed}, step=0)
    tracking.finish_run(uri, run_id, "FINISHED" if not failed else "FAILED")


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}

