"""``spai score``: batch scoring of an image corpus with Ray Data, streaming, resumable, at any resolution.

Pipeline (:mod:`~pipelines.score.scorer`, a :mod:`pipelines.rowjob` job): input (image, folder, official CSV,
manifest, ``s3://`` prefix) -> manifest rows, read in Ray tasks (a manifest by file and row group; a folder, CSV or
image is listed on the driver) -> decode (+ resize and degradations) on CPU tasks ->
:class:`~pipelines.score.scorer.Scorer` actors, each holding one :class:`~spai_core.detector.Detector` (one actor per
GPU, else ``--workers`` CPU actors) -> Parquet part files, written by the workers. No row and no result passes
through the driver until the output is streamed together at the end.

Checks first, then Ray: the config, the output (a finished one needs ``--overwrite``), the MLflow store, the input's
listing, the weights (loaded once on the driver, the way every actor will) and, for a local Ray, the GPUs asked for
and the resume record all fail before Ray starts; on a cluster (``RAY_ADDRESS``) the last two once it is joined.

Sweeps (:mod:`~pipelines.score.variants`): ``--perturb`` scores every variant of each image (``jpeg=75``,
``filter=clarendon``, ``meme``... and ``none``, the image as it is) in the one job; each image is read and decoded once
and its variants made in the same Ray Data task. A result is one (input row, variant) pair: that is what resumes, what
fails on its own, and what the output's ``variant``, ``perturbation`` and ``strength`` columns name (a plain job scores
the variant ``none`` only and has no such columns).

Resumability (:mod:`~pipelines.score.workdir`, :mod:`pipelines.rowjob`): every input row gets a stable ``row_id``
(hash of its manifest file's name, its row index in that file and its uri), computed in the read task. Finished rows
are written by the workers in Parquet part files (``--part-rows`` each) under a work directory next to the output
(``<output>.parts/``), together with ``job.json`` (model hash, scoring options, input fingerprint). A re-run of the
same command skips the finished (row, variant) pairs in the read tasks, scores the others, then streams the output
from the parts in input order (sorted in the cluster; first result per pair wins), checks that every input row is
there exactly once, and deletes the work directory. A re-run with other weights, options or input is refused, so one
output never mixes two configurations.

Output (:mod:`~pipelines.score.outputs`, our layout): the input columns (a name that clashes with a result column gets
an ``input_`` prefix), then ``row_id`` (a sweep's ``variant``, ``perturbation`` and ``strength`` after it), ``score``
(sigmoid of the logit), ``logit``, ``tiles`` (224-px tiles pooled), ``error`` (null, or ``"reason: message"``: a decode
reason from :data:`pipelines.data.decode.REASONS`, ``perturb_failed``, ``transform_failed`` or ``model_failed``),
``model_id`` (checkpoint hash), ``precision`` and ``options`` (JSON of every option that changes scores, the variants
included). Weights with a threshold from ``spai calibrate`` add ``threshold`` and ``predicted`` (1: AI-generated, iff
score > threshold). Rows that failed keep null score, logit and prediction. With ``--official-csv`` the output is the
official layout instead: the input CSV's columns (``image, split, class`` for other inputs) plus the ``--tag`` column;
failed rows have an empty score and are listed in ``<output>.errors.csv``. The
:class:`~pipelines.score.config.ScoreConfig` is written next to the output as
``<output>.config.yaml`` when the job starts: ``spai score --config`` of it reruns (or continues) the job.

Tracking: each invocation is an MLflow run (experiment ``spai-score``, named after the output file) with every option,
the model hash and the actor plan as params, and the row counts (per failure reason) and speed as metrics; weights
that ``spai train`` made tag it with their training run (``train_run_id``) and epoch. A run that is stopped is marked
KILLED or FAILED; its resumption is a new run whose ``resumed_rows`` says how many rows it found done.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

import pyarrow.fs as pafs
import ray

from pipelines import rowjob
from pipelines.infra import tracking
from pipelines.infra.console import progress_bar
from pipelines.infra.runtime import ClusterError, check_gpus, init_ray, local_capacity, node_cpus
from pipelines.infra.storage import Files, StorageOptions, basename
from pipelines.score.config import ActorPlan, ScoreConfig, ScoreError, plan_actors
from pipelines.rowjob import Rows, Shard
from pipelines.score.inputs import check_weights, input_rows
from pipelines.score.outputs import Written, absolute_paths, result_batch, write_config, write_outputs
from pipelines.score.scorer import compute, scoring_job
from pipelines.score.workdir import WorkDir
from spai_core.config import check_config, to_dict

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ScoreResult:
    """What a scoring job did: the output's counts (:class:`~pipelines.score.outputs.Written`), for the summary."""

    output: str
    written: Written
    scored_now: int  # results scored by this invocation (the rest came from an interrupted run)
    seconds: float
    skipped: dict[str, Any]  # files the input listing left out: {"count", "why", "examples"}, or empty
    # seconds to the first part written and its results: start-up apart from speed
    first: tuple[float, int] | None = None
    tracking_uri: str | None = None  # the MLflow store of the job's run, when tracked
    run_id: str | None = None
    decoded: int = 0  # images this invocation read and decoded (a sweep scores several variants of each)

    def metrics(self) -> dict[str, float]:
        """Counts and speed for MLflow: rows, scored, failed (and per reason), this invocation's images/s."""
        rows, failed = self.written.rows, self.written.failed
        return {"rows": rows, "scored": rows - failed, "failed": failed,
                "scored_now": self.scored_now, "decoded": self.decoded, "seconds": self.seconds,
                "images_per_s": self.scored_now / self.seconds if self.seconds else 0.0,
                **({"first_results_s": self.first[0]} if self.first else {}),
                **{f"failed_{reason}": count for reason, count in self.written.reasons.items()}}

    def summary(self) -> str:
        rows, failed, reasons = self.written.rows, self.written.failed, self.written.reasons
        rate = f"{self.scored_now / self.seconds if self.seconds else 0.0:.2f} img/s"
        # The rate since the first results says something only if they came early (else it is a burst of last rows).
        if self.first and self.scored_now > self.first[1] and self.first[0] <= self.seconds / 2:
            since = (self.scored_now - self.first[1]) / (self.seconds - self.first[0])
            rate += f"; first results after {self.first[0]:.1f} s, {since:.2f} img/s since"
        what = (f"{self.scored_now} images" if self.decoded in (0, self.scored_now)
                else f"{self.scored_now} variants of {self.decoded} images")
        lines = [f"scored {what} in {self.seconds:.1f} s ({rate}); output has {rows} rows: {rows - failed} scored, "
                 f"{failed} failed"
                 + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) + ")" if reasons else "")]
        if self.skipped:
            lines.append(f"not in the output: {self.skipped['count']} input file(s) {self.skipped['why']}, e.g. "
                         + ", ".join(self.skipped["examples"][:3]))
        lines.append(f"wrote {self.output}")
        if self.all_failed:
            lines.append(f"error: none of the {failed} rows could be scored, e.g. {self.written.example}; check the "
                         "input's paths (--root for a CSV), the storage settings and the weights")
        return "\n".join(lines)

    @property
    def all_failed(self) -> bool:
        """Every row failed: an exit status for scripts, though the output (each row's reason) is written."""
        return self.written.rows > 0 and self.written.failed == self.written.rows


@dataclasses.dataclass
class Job:
    """A scoring job whose inputs are checked: what it scores, with which weights, and where it is recorded."""

    cfg: ScoreConfig
    files: Files
    work: WorkDir
    rows: Rows
    shards: list[Shard]
    digest: str  # the input's fingerprint (see inputs.input_digest)
    skipped: dict[str, Any]
    model_id: str
    provenance: dict[str, Any]
    tracking_uri: str | None

    @property
    def threshold(self) -> float | None:
        """The decision threshold ``spai calibrate`` stored in the weights, if any."""
        return (self.provenance.get("threshold") or {}).get("value")


def prepare(cfg: ScoreConfig, options: StorageOptions) -> Job:
    """Every check of the job's files that needs no Ray: the output, the MLflow store, the input's listing, the
    weights."""
    files = Files(options)
    work = WorkDir(cfg.output, files)
    if not cfg.overwrite and not work.exists() and files.info(cfg.output).type != pafs.FileType.NotFound:
        raise ScoreError(f"{cfg.output} already exists (a finished run); pass --overwrite to score again and replace "
                         "it, or choose another --output")
    # an unreachable store fails now
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri) if cfg.tracking.enabled else None
    rows, shards, digest, skipped = input_rows(cfg, options)
    model_id, provenance = check_weights(cfg.weights, options, cfg.runtime)
    job = Job(cfg, files, work, rows, shards, digest, skipped, model_id, provenance, tracking_uri)
    if job.threshold is not None:
        logger.info("predicting AI-generated iff score > %g, the threshold the weights carry (%s); output columns "
                    "threshold and predicted", job.threshold, provenance["threshold"].get("target"))
    return job


def _asked_for_gpus(cfg: ScoreConfig) -> str:
    """The flags that made the job ask for GPUs, for an error about them."""
    return " ".join([f"--device {cfg.device}", *([f"--workers {cfg.workers}"] if cfg.workers else []),
                     *([f"--gpus-per-worker {cfg.gpus_per_worker:g}"] if cfg.gpus_per_worker else [])])


def local_plan(cfg: ScoreConfig) -> ActorPlan | None:
    """The plan on the local Ray that :func:`init_ray` would start, known before it starts, so that GPUs this machine
    lacks are refused at once (its actors would wait for them forever); None when Ray is up already or a cluster is
    to be joined (``RAY_ADDRESS``)."""
    capacity = local_capacity()
    if capacity is None:
        return None
    cpus, gpus = map(float, capacity)
    plan = plan_actors(cfg, {"CPU": cpus, "GPU": gpus}, [cpus])
    if plan.gpus > gpus:
        raise ClusterError(f"{_asked_for_gpus(cfg)} needs {plan.gpus:g} GPU(s) but this machine has {gpus:g}; ask "
                           "for fewer, drop the GPU options to run on CPU, or set RAY_ADDRESS to a Ray cluster with "
                           "GPUs")
    return plan


def cluster_plan(cfg: ScoreConfig) -> ActorPlan:
    """The plan on the running Ray; GPUs it lacks are an error on a local Ray, a wait for the autoscaler on a
    cluster."""
    plan = plan_actors(cfg, ray.cluster_resources(), node_cpus())
    if plan.device == "cuda":
        check_gpus(plan.gpus, _asked_for_gpus(cfg))
    return plan


def record(job: Job, plan: ActorPlan) -> None:
    """Record the job in its work folder, or check it against the record of the run it continues (the precision
    resolved by the plan is part of it); then save its config beside the output."""
    job.work.start({"model_id": job.model_id, **job.cfg.options(plan.precision), "input_digest": job.digest})
    write_config(job.cfg, job.files)


def score(cfg: ScoreConfig, options: StorageOptions | None = None, progress: bool = True) -> ScoreResult:
    """Run (or resume) a scoring job, write its output and record it in MLflow; see the module docstring."""
    check_config(cfg)
    plan = local_plan(cfg)
    job = prepare(cfg, options or StorageOptions.from_env())
    if plan is not None:
        record(job, plan)
        logger.info("starting a local Ray...")
    elif not ray.is_initialized():
        logger.info("joining the Ray cluster at %s...", os.environ.get("RAY_ADDRESS"))
    init_ray()
    if plan is None:
        plan = cluster_plan(cfg)
        record(job, plan)
    return run_job(job, plan, progress)


def run_job(job: Job, plan: ActorPlan, progress: bool) -> ScoreResult:
    """Score the results not done yet (the workers write them), stream the output from them, and track the run."""
    cfg, work = job.cfg, job.work
    rows = scoring_job(job.rows, cfg, plan, job.model_id, job.files.options, work)
    found, done = rowjob.start(rows, job.shards)
    if found.rows == 0:
        work.remove()
        raise ScoreError(f"{cfg.input} has no rows" + (f" of split {cfg.split!r}; fix --split" if cfg.split else ""))
    if found.done_before:
        logger.info("resuming %s: %d of %d rows were scored before", work.uri, found.done_before, found.expected)
    run_id = start_tracking(job, plan, resumed=found.done_before)
    with tracking.ended_on_error(job.tracking_uri, run_id) if run_id else contextlib.nullcontext():
        started, first = time.monotonic(), None
        if found.left:
            logger.info("loading the model on %d %s actor(s); scoring starts when it is loaded", plan.workers,
                        "GPU" if plan.device == "cuda" else "CPU")
            with progress_bar(progress, total=found.expected, initial=found.done_before, unit="img", desc="scoring",
                              smoothing=0.05) as bar:
                for written in rowjob.execute(rows, found, done, compute(cfg, plan)):
                    bar.update(written)
                    first = first or (time.monotonic() - started, written)
        seconds = time.monotonic() - started
        variants = cfg.variants() if cfg.sweep else None
        try:
            written = write_outputs(
                (result_batch(batch, job.model_id, cfg.options(plan.precision), job.threshold, variants)
                 for batch in rowjob.compacted(work.uri, job.files.options, found)), cfg, job.files)
        except rowjob.MissingResults as exc:
            raise ScoreError(f"{exc} (rows of {work.uri})") from exc
        work.remove()
    result = ScoreResult(cfg.output, written, found.left, seconds, job.skipped, first, job.tracking_uri, run_id,
                         decoded=found.rows_left)
    if run_id:
        finish_tracking(result)
    return result


def start_tracking(job: Job, plan: ActorPlan, resumed: int) -> str | None:
    """The job's MLflow run (None when not tracked): every option, the model hash and where the actors run, tagged
    with the training run that made the weights when they say (``train_run_id``, ``train_run``, ``train_epoch``)."""
    if job.tracking_uri is None:
        return None
    cfg, provenance = absolute_paths(job.cfg), job.provenance  # absolute, as train records its paths
    origin = {f"train_{key}": str(provenance[source]) for key, source in
              (("run_id", "mlflow_run_id"), ("run", "run"), ("epoch", "epoch")) if provenance.get(source) is not None}
    params = {**to_dict(cfg), "model_id": job.model_id, "plan": dataclasses.asdict(plan), "resumed_rows": resumed,
              **({"threshold": job.threshold} if job.threshold is not None else {})}
    try:
        return tracking.start_run(job.tracking_uri, cfg.tracking.experiment, basename(cfg.output).rsplit(".", 1)[0],
                                  params, {"output": cfg.output, **origin})
    except Exception as exc:  # noqa: BLE001 - MLflow's own error type varies with the store
        raise tracking.TrackingError(f"MLflow at {job.tracking_uri} did not take the scoring run "
                                     f"({type(exc).__name__}: {str(exc)[:300]}); fix --mlflow-uri (or "
                                     "MLFLOW_TRACKING_URI), or pass --no-mlflow") from exc


def finish_tracking(result: ScoreResult) -> None:
    """Log the counts and speed and end the run (FAILED when no row could be scored, as the exit status says). The
    output is written by then, so an MLflow that fails now costs a warning, not the job."""
    try:
        tracking.log_metrics(result.tracking_uri, result.run_id, result.metrics(), step=0)
        tracking.finish_run(result.tracking_uri, result.run_id, "FAILED" if result.all_failed else "FINISHED")
    except Exception as exc:  # noqa: BLE001 - as above
        logger.warning("%s is written, but MLflow at %s did not record its counts (%s: %s)", result.output,
                       result.tracking_uri, type(exc).__name__, str(exc)[:300])
