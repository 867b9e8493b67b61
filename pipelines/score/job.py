"""``spai score``: batch scoring of an image corpus with Ray Data, streaming, resumable, at any resolution.

Pipeline: input (image, folder, official CSV, manifest, ``s3://`` prefix) -> manifest rows -> decode (+ resize and
degradations) on CPU tasks -> :class:`Scorer` actors, each holding one :class:`~spai_core.detector.Detector`
(one actor per GPU, else ``--workers`` CPU actors) -> the driver, which writes finished rows as part files.

Resumability: every input row gets a stable ``row_id`` (hash of its uri and its occurrence number). Finished rows are
written in small Parquet part files under a work directory next to the output (``<output>.parts/``), together with
``job.json`` (model hash, scoring options, input fingerprint). A re-run of the same command reads the finished row ids,
scores only the others, then assembles the output from the parts (first result per row id wins), checks that every
input row is there exactly once, writes it, and deletes the work directory. A re-run with other weights, options or
input is refused, so one output never mixes two configurations. The weights are loaded once on the driver before
any of this, so a wrong file stops the job before it starts.

Output (our layout): the input columns (a name that clashes with a result column gets an ``input_`` prefix), then
``row_id``, ``score`` (sigmoid of the logit), ``logit``, ``tiles`` (224-px tiles pooled), ``error`` (null, or
``"reason: message"``: a decode reason from :data:`pipelines.data.decode.REASONS`, ``transform_failed`` or
``model_failed``), ``model_id`` (checkpoint hash), ``precision`` and ``options`` (JSON of every option that changes
scores; ``spai evaluate`` labels degradation runs from it). Rows that failed keep null score and logit.
With ``--official-csv`` the output is the official layout instead: the input CSV's columns (``image, split, class``
for other inputs) plus the ``--tag`` column; failed rows have an empty score and are listed in
``<output>.errors.csv``. The :class:`ScoreConfig` is written next to the output as ``<output>.config.yaml``.

Tracking: each invocation is an MLflow run (experiment ``spai-score``, named after the output file) with every option,
the model hash and the actor plan as params, and the row counts (per failure reason) and speed as metrics; weights
that ``spai train`` made tag it with their training run (``train_run_id``) and epoch. A run that is stopped is marked
KILLED or FAILED; its resumption is a new run whose ``resumed_rows`` says how many rows it found done.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import ray
import ray.data
import torch
import yaml
from tqdm.auto import tqdm

from pipelines.infra import tracking
from pipelines.infra.console import progress_bar
from pipelines.data.dataset import decode_images, read_manifest_dataset
from pipelines.data.decode import DEFAULT_MAX_PIXELS
from pipelines.data.manifest import CORE_COLUMNS, NOTES_KEY, parquet_bytes, resolve_input, table_from_parquet
from pipelines.infra.runtime import check_gpus, init_ray, node_cpus
from pipelines.infra.storage import Files, StorageOptions, absolute, basename, filesystem, is_s3, join
from pipelines.data.transforms import ScoreTransformConfig, make_score_transform
from spai_core.config import ConfigError, to_dict
from spai_core.detector import PRECISIONS, Detector, resolve_precision
from spai_core.errors import UserError

RESULT_COLUMNS = ("row_id", "score", "logit", "tiles", "error", "model_id", "precision", "options")
PART_SCHEMA = pa.schema([("row_id", pa.string()), ("logit", pa.float32()), ("tiles", pa.int32()),
                         ("error", pa.string())])
JOB_FILE = "job.json"
PART_SECONDS = 60.0  # a part file is written at least this often, so a kill loses at most a minute of work
GPU_ACTOR_THREADS = 2  # a GPU actor only pads and tiles on the CPU


class ScoreError(UserError, RuntimeError):
    """A scoring job that cannot start or finish; the message says what to do."""


@dataclasses.dataclass
class ScoreConfig:
    """Options of one scoring job (``spai score`` flags); saved next to the output and checked on resume."""

    weights: str = ""  # official spai.pth (spai_vit_b16) or our .safetensors; local path or s3://
    input: str = ""  # image, folder, official CSV, manifest or s3:// prefix
    recursive: bool = False  # a folder's subfolders too
    output: str = ""  # PATH.parquet or PATH.csv, local or s3://
    device: str = "auto"  # auto: cuda when the Ray cluster has GPUs, else cpu
    precision: str = "auto"  # auto: bf16 on GPU, fp32 (exact official scores) on CPU
    batch_size: int = 8  # images per model call; their tiles are encoded together
    workers: int | None = None  # scoring actors (default: one per GPU, else 1)
    gpus: float | None = None  # GPUs per actor (default 1 on GPU)
    cpus_per_worker: int | None = None  # torch threads per CPU actor (default: its node's CPUs split between them)
    feature_batch: int | None = None  # tiles encoded at once (default: the Detector's, 4 on CPU, the model's on GPU)
    max_tiles: int | None = None  # cap on tiles per image
    transform: ScoreTransformConfig = dataclasses.field(default_factory=ScoreTransformConfig)
    root: str | None = None  # root of relative paths in a CSV input
    split: str | None = None  # score only this split
    seed: int = 0  # seeds the noise degradation per image
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit
    tag: str = "spai"  # score column of the official CSV layout
    official_csv: bool = False
    part_rows: int = 1000  # rows per part file of the work directory
    overwrite: bool = False  # score again into an existing output (an unfinished run is still continued)
    track: bool = True  # record the job as an MLflow run (params, counts, speed)
    mlflow_uri: str | None = None  # MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlruns)
    experiment: str = "spai-score"  # MLflow experiment of the job's run

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("auto", *PRECISIONS):
            raise ConfigError(f"precision must be auto or one of {PRECISIONS}, got {self.precision!r}")
        for name in ("batch_size", "workers", "cpus_per_worker", "feature_batch", "max_tiles", "part_rows",
                     "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
        if self.gpus is not None and self.gpus <= 0:
            raise ConfigError(f"gpus must be > 0 (GPUs per scoring actor), got {self.gpus}")

    def validate(self) -> None:
        """Checks that need the whole config (a default-constructed one is only a template)."""
        missing = [name for name in ("weights", "input", "output") if not getattr(self, name)]
        if missing:
            raise ConfigError(f"scoring needs {', '.join(missing)} (--weights, --input, --output)")
        if not self.output.lower().endswith((".parquet", ".csv")):
            raise ConfigError(f"--output {self.output!r} must end with .parquet or .csv")
        if self.official_csv and not self.output.lower().endswith(".csv"):
            raise ConfigError("--official-csv writes a CSV: give an --output ending with .csv")
        if self.gpus is not None and self.device == "cpu":
            raise ConfigError("--gpus asks for GPUs but --device is cpu; drop one of them")

    def options(self, precision: str) -> dict[str, Any]:
        """Every option that changes scores (with the resolved precision); what a resume must match."""
        return {"precision": precision, "max_tiles": self.max_tiles, "seed": self.seed, "max_pixels": self.max_pixels,
                **dataclasses.asdict(self.transform)}


@dataclasses.dataclass(frozen=True)
class ActorPlan:
    """Where and how the scoring actors run, resolved from the config and the cluster's resources."""

    device: str
    precision: str
    workers: int
    num_cpus: float  # CPUs each actor reserves (fractional on CPU so decode tasks keep a slot)
    num_gpus: float
    threads: int  # torch threads per actor

    @property
    def batches_in_flight(self) -> int | None:
        """Batches queued on one actor (None: Ray Data's default, 4). A CPU actor takes one at a time: a batch there
        is seconds to minutes of work, and with a queue the first actor to load its model took every batch of a small
        job while the others idled (14 images on 2 one-thread workers ran as long as on one). A GPU actor keeps a
        queue, so the next batch is fetched while the GPU works."""
        return 1 if self.device == "cpu" else None


def plan_actors(cfg: ScoreConfig, resources: Mapping[str, float], node_cpus: Sequence[float] | None = None
                ) -> ActorPlan:
    """One actor per GPU (or ``workers`` x ``gpus``) on GPU clusters, else ``workers`` CPU actors sharing the CPUs.

    ``node_cpus`` (CPUs of each alive node; default: one node with all of ``resources``) sizes CPU actors per node:
    actors are spread over the nodes that have CPUs, and each node keeps one CPU unreserved for decode tasks.
    ``cpus_per_worker`` fixes each CPU actor's torch threads instead (e.g. to measure scaling at a fixed size).
    """
    gpus_total = float(resources.get("GPU", 0.0))
    # --gpus means GPU actors even while an autoscaling cluster has no GPU node yet (see runtime.check_gpus)
    device = "cuda" if cfg.device == "cuda" or cfg.gpus or (cfg.device == "auto" and gpus_total > 0) else "cpu"
    precision = resolve_precision(cfg.precision, torch.device(device))
    if device == "cuda":
        gpus = cfg.gpus or 1.0
        workers = cfg.workers or max(1, int(gpus_total // gpus))
        return ActorPlan(device, precision, workers, 1.0, gpus, GPU_ACTOR_THREADS)
    workers = cfg.workers or 1
    cpu_nodes = [c for c in (node_cpus or [float(resources.get("CPU", 1.0))]) if c >= 1] or [1.0]
    per_node = math.ceil(workers / len(cpu_nodes))  # actors sharing the smallest node in the worst case
    smallest = min(cpu_nodes)
    threads = cfg.cpus_per_worker or max(1, int(smallest // per_node))
    # Actors use all their cores through torch threads but reserve less, so Ray can still schedule decode tasks.
    num_cpus = min(float(threads), max(smallest - 1.0, 1.0) / per_node)
    return ActorPlan(device, precision, workers, num_cpus, 0.0, threads)


# ---------------------------------------------------------------------------------------------------------------
# Inputs and weights


def row_ids(uris: Sequence[str]) -> list[str]:
    """Stable ids: hash of the uri and its occurrence number (a uri listed twice is two rows), order-independent."""
    seen: collections.Counter[str] = collections.Counter()
    ids = []
    for uri in uris:
        ids.append(hashlib.sha256(f"{uri}\n{seen[uri]}".encode()).hexdigest()[:32])
        seen[uri] += 1
    return ids


def _clash_free(name: str) -> str:
    """The name an input column gets in the output: result column names are taken, so clashes get a prefix."""
    return f"input_{name}" if name in RESULT_COLUMNS else name


def input_columns(table: pa.Table) -> pa.Table:
    """The table with every clashing column renamed (see :func:`_clash_free`)."""
    return table.rename_columns([_clash_free(name) for name in table.column_names])


def input_table(cfg: ScoreConfig, options: StorageOptions) -> tuple[pa.Table, dict[str, Any]]:
    """Manifest rows of the input (one split if asked), clashing names prefixed, plus a ``row_id`` column; and what
    the listing skipped (a folder's files that are not images by name or content), so the summary can say so."""
    table = resolve_input(cfg.input, root=cfg.root, options=options, recursive=cfg.recursive)
    skipped = json.loads((table.schema.metadata or {}).get(NOTES_KEY, b"{}")).get("skipped", {})
    if cfg.split is not None:
        present = sorted(set(table.column("split").to_pylist()) - {None})
        table = table.filter(pc.equal(table.column("split"), cfg.split))
        if table.num_rows == 0:
            raise ScoreError(f"{cfg.input} has no rows of split {cfg.split!r} (it has {present}); fix --split")
    ids = pa.array(row_ids(table.column("uri").to_pylist()), pa.string())
    return input_columns(table).append_column("row_id", ids), skipped


def check_weights(uri: str, options: StorageOptions) -> tuple[str, dict[str, Any]]:
    """Load the weights once on the driver, the way every actor will; return their hash (``Detector.model_id``) and
    their provenance (our checkpoints name their training run and epoch).

    A wrong, corrupt or incompatible file then stops the job with its own message before Ray starts, instead of
    killing each actor with a traceback after the job (and its resumable work folder) has begun.
    """
    files = Files(options)
    kind = files.info(uri).type
    if kind == pafs.FileType.Directory:
        raise ScoreError(f"--weights {uri} is a folder; give the weights file in it (an official spai.pth or our "
                         ".safetensors)")
    if kind != pafs.FileType.File:
        raise files.missing(uri)
    with local_weights(uri, options) as path:
        detector = Detector.from_pretrained(path, "cpu", "fp32")
    return detector.model_id, detector.provenance


@contextlib.contextmanager
def local_weights(uri: str, options: StorageOptions) -> Iterator[str]:
    """A local path to the weights: the file itself, or a temporary copy of an ``s3://`` object."""
    if not is_s3(uri):
        yield uri
        return
    fs, path = filesystem(uri, options)
    with tempfile.TemporaryDirectory(prefix="spai-weights-") as tmp:
        local = os.path.join(tmp, basename(uri))
        with fs.open_input_stream(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield local


# ---------------------------------------------------------------------------------------------------------------
# The scoring actor


class Scorer:
    """Ray Data actor: loads the Detector once, then turns decoded rows into ``row_id, logit, tiles, error``."""

    def __init__(self, weights: str, model_id: str, plan: ActorPlan, max_tiles: int | None,
                 feature_batch: int | None, options: StorageOptions):
        torch.set_num_threads(plan.threads)
        with local_weights(weights, options) as path:
            self.detector = Detector.from_pretrained(path, plan.device, plan.precision, feature_batch=feature_batch,
                                                     max_tiles=max_tiles)
        if self.detector.model_id != model_id:
            raise ScoreError(f"the weights at {weights} on this node (hash {self.detector.model_id}) differ from "
                             f"the driver's (hash {model_id}); put one copy on shared storage or s3://")

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = list(batch["error"])
        good = [i for i, error in enumerate(errors) if error is None]
        images = [batch["image"][i] for i in good]
        logits: list[float | None] = [None] * len(errors)
        tiles: list[int | None] = [None] * len(errors)
        for i, image, (logit, error) in zip(good, images, self._logits(images)):
            logits[i], errors[i] = logit, error
            tiles[i] = None if error else self.detector.num_tiles(*image.shape[:2])
        return pa.Table.from_arrays([pa.array(list(batch["row_id"]), pa.string()), pa.array(logits, pa.float32()),
                                     pa.array(tiles, pa.int32()), pa.array(errors, pa.string())], schema=PART_SCHEMA)

    def _logits(self, images: list[np.ndarray]) -> list[tuple[float | None, str | None]]:
        """(logit, error) per image: the batch at once, or one by one when the batch fails (so one image cannot
        sink the others, e.g. a huge one running out of memory)."""
        try:
            return [(float(v), None) for v in self.detector.logits(images)]
        except Exception as exc:  # noqa: BLE001 - recorded per row below
            if len(images) == 1:
                return [(None, f"model_failed: {type(exc).__name__}: {exc}")]
        if self.detector.device.type == "cuda":
            torch.cuda.empty_cache()
        return [result for image in images for result in self._logits([image])]


# ---------------------------------------------------------------------------------------------------------------
# The work directory


def write_atomic(files: Files, uri: str, data: bytes) -> None:
    """Write a whole file or nothing: locally through a temporary name and a rename; an S3 PUT already is atomic."""
    if is_s3(uri):
        files.write(uri, data)
        return
    tmp = uri + ".tmp"
    files.write(tmp, data)
    os.replace(files.resolve(tmp)[1], files.resolve(uri)[1])


class WorkDir:
    """The resumable state of one job beside its output: ``job.json`` and Parquet parts of finished rows."""

    def __init__(self, output: str, files: Files):
        self.uri = output.rstrip("/") + ".parts"
        self.files = files
        self._token = uuid.uuid4().hex[:8]  # part names never collide across restarts
        self._written = 0

    def exists(self) -> bool:
        return self.files.info(join(self.uri, JOB_FILE)).type == pafs.FileType.File

    def start(self, job: Mapping[str, Any]) -> None:
        """Record the job, or refuse to resume one started with other weights, options or input."""
        job_uri = join(self.uri, JOB_FILE)
        if not self.exists():
            write_atomic(self.files, job_uri, json.dumps(job, indent=2, sort_keys=True).encode())
            return
        recorded = json.loads(self.files.read(job_uri))
        keys = sorted(set(job) | set(recorded))
        changed = [f"{k}: {recorded.get(k)!r} before, {job.get(k)!r} now" for k in keys
                   if recorded.get(k) != job.get(k)]
        if changed:
            raise ScoreError(f"{self.uri} holds an unfinished run with other weights, options or input ("
                             + "; ".join(changed) + "). Re-run with the same options to finish it, or delete "
                             f"{self.uri} (or choose another --output) to start over")

    def write_part(self, table: pa.Table) -> None:
        write_atomic(self.files, join(self.uri, f"part-{self._token}-{self._written:06d}.parquet"),
                     parquet_bytes(table))
        self._written += 1

    def read_parts(self) -> pa.Table:
        """All finished rows so far (a row id may repeat if two runs raced; the first one is used)."""
        if self.files.info(self.uri).type != pafs.FileType.Directory:
            return PART_SCHEMA.empty_table()
        uris = self.files.list(self.uri, recursive=False, suffixes=(".parquet",))
        self.files.resolve(self.uri)  # build the file system once, before the threads share it
        with ThreadPoolExecutor(max_workers=16) as pool:
            tables = [t for t in pool.map(self._read_part, uris) if t is not None]
        return pa.concat_tables([PART_SCHEMA.empty_table(), *tables])

    def _read_part(self, uri: str) -> pa.Table | None:
        try:
            return table_from_parquet(self.files.read(uri)).select(PART_SCHEMA.names).cast(PART_SCHEMA)
        except pa.ArrowInvalid as exc:  # cut short by a file system without atomic writes: its rows are redone
            print(f"warning: ignoring unreadable part {uri} ({exc}); its rows will be scored again", file=sys.stderr)
            self.files.remove(uri)
            return None

    def remove(self) -> None:
        fs, path = self.files.resolve(self.uri)
        fs.delete_dir(path)


class PartBuffer:
    """Collects finished rows on the driver; writes a part every ``rows`` rows or :data:`PART_SECONDS` seconds."""

    def __init__(self, work: WorkDir, rows: int):
        self.work = work
        self.rows = rows
        self._tables: list[pa.Table] = []
        self._count = 0
        self._since = time.monotonic()

    def add(self, table: pa.Table) -> None:
        self._tables.append(table.select(PART_SCHEMA.names).cast(PART_SCHEMA))
        self._count += table.num_rows
        if self._count >= self.rows or time.monotonic() - self._since >= PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._count:
            self.work.write_part(pa.concat_tables(self._tables))
        self._tables, self._count, self._since = [], 0, time.monotonic()


# ---------------------------------------------------------------------------------------------------------------
# The job


def score_rows(todo: pa.Table, cfg: ScoreConfig, plan: ActorPlan, model_id: str, options: StorageOptions,
               work: WorkDir, bar: tqdm) -> tuple[float, int] | None:
    """Stream ``todo`` through decode and the actor pool; finished rows go to the work directory as they come.

    Returns when (``time.monotonic()``) the first results came and how many rows they held, if any came."""
    # width/height of a validated manifest let the input blocks be sized by pixels (see pipelines.data.dataset.block_bounds)
    ds = read_manifest_dataset(todo.select([c for c in (*CORE_COLUMNS, "row_id", "width", "height")
                                            if c in todo.column_names]))
    ds = decode_images(ds, make_score_transform(cfg.transform), cfg.seed, options, cfg.max_pixels)
    # Blocks of one model batch each; the repartition boundary also keeps Ray from fusing decoding into the actors,
    # so decode tasks run beside scoring instead of stalling it (and a GPU never waits on JPEG decoding).
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    ds = ds.map_batches(Scorer, batch_size=cfg.batch_size, batch_format="numpy",
                        # "true multi-threading" with one call at a time runs calls on the actor's main thread, where
                        # the model was built. Ray Data's default hands them to a helper thread: a second OpenMP pool,
                        # and with more OpenMP threads than CPUs libgomp stops spin-waiting, so small ops slow ~2x and
                        # a CPU model pass ~5%
                        compute=ray.data.ActorPoolStrategy(size=plan.workers, enable_true_multi_threading=True,
                                                           max_tasks_in_flight_per_actor=plan.batches_in_flight),
                        num_cpus=plan.num_cpus,
                        num_gpus=plan.num_gpus or None,
                        # absolute: actors on a running cluster (RAY_ADDRESS) work in another folder than the driver
                        fn_constructor_kwargs={"weights": absolute(cfg.weights), "model_id": model_id, "plan": plan,
                                               "max_tiles": cfg.max_tiles, "feature_batch": cfg.feature_batch,
                                               "options": options})
    # Ray Data's own bars count only this run's rows; the driver's bar counts the whole corpus instead. (The dataset's
    # context, shared by its whole chain, is a copy made when it was read: changing the global one now does nothing.)
    ds.context.enable_progress_bars = False
    buffer, first = PartBuffer(work, cfg.part_rows), None
    try:
        # No prefetch: with one, each batch reached the driver only when the next was done, so the progress bar and
        # the resumable parts lagged a whole batch (minutes on CPU)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            buffer.add(batch)
            bar.update(batch.num_rows)
            first = first or (time.monotonic(), batch.num_rows)
    finally:  # on Ctrl-C too: rows already scored are kept
        buffer.flush()
    return first


def assemble(table: pa.Table, parts: pa.Table, model_id: str, options: Mapping[str, Any]) -> pa.Table:
    """Input rows joined with their results (first result per row id), in input order; every row must have one."""
    index = pc.index_in(table.column("row_id"), value_set=parts.column("row_id"))
    if index.null_count:
        raise ScoreError(f"{index.null_count} of {table.num_rows} rows have no result; re-run the same command to "
                         "score them")
    found = parts.take(index)
    logit = found.column("logit")
    score = pc.divide(1.0, pc.add(1.0, pc.exp(pc.negate(logit.cast(pa.float64())))))
    n = table.num_rows
    results = {"score": score, "logit": logit, "tiles": found.column("tiles"), "error": found.column("error"),
               "model_id": pa.repeat(pa.scalar(model_id), n),
               "precision": pa.repeat(pa.scalar(options["precision"]), n),
               "options": pa.repeat(pa.scalar(json.dumps(options, sort_keys=True)), n)}
    out = table
    for name, column in results.items():
        out = out.append_column(name, column)
    return out


def official_table(table: pa.Table, cfg: ScoreConfig, files: Files) -> pa.Table:
    """The official output layout: the input CSV's columns in its order (``image, split, class`` for other inputs)
    plus the score in a column named ``cfg.tag``. Unknown labels stay empty rather than the official dummy 1."""
    if cfg.input.lower().endswith(".csv"):
        header = next(csv.reader(io.StringIO(files.read(cfg.input).decode("utf-8-sig"))))
    else:
        header = ["image", "split", "class"]

    def column(name: str) -> pa.ChunkedArray:
        if name == "class":
            return table.column("label").cast(pa.string())
        if name == "image" and "image" not in table.column_names:
            return table.column("uri")
        return table.column(_clash_free(name))

    columns = {name: column(name) for name in header}
    columns[cfg.tag] = table.column("score")  # replaces an existing column of that name, as the official code does
    return pa.table(columns)


def table_bytes(table: pa.Table, uri: str) -> bytes:
    """A table as CSV or Parquet, by the suffix of ``uri``."""
    if not uri.lower().endswith(".csv"):
        return parquet_bytes(table)
    sink = io.BytesIO()
    pacsv.write_csv(table, sink, pacsv.WriteOptions(quoting_style="needed"))
    return sink.getvalue()


@dataclasses.dataclass
class ScoreResult:
    """What a scoring job did: the output table (our layout), and counts for the summary."""

    output: str
    table: pa.Table
    scored_now: int  # rows scored by this invocation (the rest came from an interrupted run)
    seconds: float
    skipped: dict[str, Any]  # files the input listing left out: {"count", "why", "examples"}, or empty
    first: tuple[float, int] | None = None  # seconds to the first results and their rows: start-up apart from speed
    tracking_uri: str | None = None  # the MLflow store of the job's run, when tracked
    run_id: str | None = None

    @property
    def errors(self) -> list[str]:
        return [e for e in self.table.column("error").to_pylist() if e is not None]

    @staticmethod
    def reasons(errors: list[str]) -> collections.Counter[str]:
        """Failed rows per reason (the part of an error before its colon)."""
        return collections.Counter(e.split(":", 1)[0] for e in errors)

    def metrics(self) -> dict[str, float]:
        """Counts and speed for MLflow: rows, scored, failed (and per reason), this invocation's images/s."""
        errors = self.errors
        reasons = self.reasons(errors)
        return {"rows": self.table.num_rows, "scored": self.table.num_rows - len(errors), "failed": len(errors),
                "scored_now": self.scored_now, "seconds": self.seconds,
                "images_per_s": self.scored_now / self.seconds if self.seconds else 0.0,
                **({"first_results_s": self.first[0]} if self.first else {}),
                **{f"failed_{reason}": count for reason, count in reasons.items()}}

    def summary(self) -> str:
        errors = self.errors
        reasons = self.reasons(errors)
        rate = f"{self.scored_now / self.seconds if self.seconds else 0.0:.2f} img/s"
        # The rate since the first results says something only if they came early (else it is a burst of last rows).
        if self.first and self.scored_now > self.first[1] and self.first[0] <= self.seconds / 2:
            since = (self.scored_now - self.first[1]) / (self.seconds - self.first[0])
            rate += f"; first results after {self.first[0]:.1f} s, {since:.2f} img/s since"
        lines = [f"scored {self.scored_now} images in {self.seconds:.1f} s ({rate}); output has "
                 f"{self.table.num_rows} rows: {self.table.num_rows - len(errors)} scored, {len(errors)} failed"
                 + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) + ")" if reasons else "")]
        if self.skipped:
            lines.append(f"not in the output: {self.skipped['count']} input file(s) {self.skipped['why']}, e.g. "
                         + ", ".join(self.skipped["examples"][:3]))
        lines.append(f"wrote {self.output}")
        if self.all_failed:
            lines.append(f"error: none of the {len(errors)} rows could be scored, e.g. {errors[0]}; check the input's "
                         "paths (--root for a CSV), the storage settings and the weights")
        return "\n".join(lines)

    @property
    def all_failed(self) -> bool:
        """Every row failed: an exit status for scripts, though the output (each row's reason) is written."""
        return self.table.num_rows > 0 and self.table.column("error").null_count == 0


def write_outputs(out: pa.Table, cfg: ScoreConfig, files: Files) -> None:
    """The output file, the config beside it, and (official layout) the failed rows beside it."""
    if cfg.official_csv:
        write_atomic(files, cfg.output, table_bytes(official_table(out, cfg, files), cfg.output))
        errors_uri = cfg.output + ".errors.csv"
        failed = out.filter(pc.is_valid(out.column("error"))).select(["uri", "error"])
        if failed.num_rows:
            write_atomic(files, errors_uri, table_bytes(failed, errors_uri))
        elif files.info(errors_uri).type == pafs.FileType.File:
            files.remove(errors_uri)  # left by an earlier run into the same output
    else:
        write_atomic(files, cfg.output, table_bytes(out, cfg.output))
    files.write(cfg.output + ".config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


def score(cfg: ScoreConfig, options: StorageOptions | None = None, progress: bool = True) -> ScoreResult:
    """Run (or resume) a scoring job, write its output and record it in MLflow; see the module docstring."""
    cfg.validate()
    options = options or StorageOptions.from_env()
    files = Files(options)
    work = WorkDir(cfg.output, files)
    if not cfg.overwrite and not work.exists() and files.info(cfg.output).type != pafs.FileType.NotFound:
        raise ScoreError(f"{cfg.output} already exists (a finished run); pass --overwrite to score again and replace "
                         "it, or choose another --output")
    tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow_uri) if cfg.track else None  # an unreachable one fails now
    table, skipped = input_table(cfg, options)
    model_id, provenance = check_weights(cfg.weights, options)
    init_ray()
    plan = plan_actors(cfg, ray.cluster_resources(), node_cpus())
    if plan.device == "cuda":
        asked = [f"--device {cfg.device}", *([f"--workers {cfg.workers}"] if cfg.workers else []),
                 *([f"--gpus {cfg.gpus:g}"] if cfg.gpus else [])]
        check_gpus(plan.workers * plan.num_gpus, " ".join(asked))
    scoring_options = cfg.options(plan.precision)
    ids = table.column("row_id")
    work.start({"model_id": model_id, "rows": table.num_rows, **scoring_options,
                "input_digest": hashlib.sha256("\n".join(sorted(ids.to_pylist())).encode()).hexdigest()})
    todo = table.filter(pc.invert(pc.is_in(ids, value_set=work.read_parts().column("row_id"))))
    if todo.num_rows < table.num_rows:
        print(f"resuming {work.uri}: {table.num_rows - todo.num_rows} of {table.num_rows} rows were scored before",
              file=sys.stderr, flush=True)
    run_id = start_tracking(cfg, tracking_uri, model_id, provenance, plan, resumed=table.num_rows - todo.num_rows)
    with tracking.ended_on_error(tracking_uri, run_id) if run_id else contextlib.nullcontext():
        started, first = time.monotonic(), None
        if todo.num_rows:
            with progress_bar(progress, total=table.num_rows, initial=table.num_rows - todo.num_rows, unit="img",
                              desc="scoring", smoothing=0.05) as bar:
                first = score_rows(todo, cfg, plan, model_id, options, work, bar)
        seconds = time.monotonic() - started
        out = assemble(table, work.read_parts(), model_id, scoring_options)
        write_outputs(out, cfg, files)
        work.remove()
    result = ScoreResult(cfg.output, out, todo.num_rows, seconds, skipped, first and (first[0] - started, first[1]),
                         tracking_uri, run_id)
    if run_id:
        finish_tracking(result)
    return result


def start_tracking(cfg: ScoreConfig, tracking_uri: str | None, model_id: str, provenance: Mapping[str, Any],
                   plan: ActorPlan, resumed: int) -> str | None:
    """The job's MLflow run (None when not tracked): every option, the model hash and where the actors run, tagged
    with the training run that made the weights when they say (``train_run_id``, ``train_run``, ``train_epoch``)."""
    if tracking_uri is None:
        return None
    origin = {f"train_{key}": str(provenance[source]) for key, source in
              (("run_id", "mlflow_run_id"), ("run", "run"), ("epoch", "epoch")) if provenance.get(source) is not None}
    name = basename(cfg.output).rsplit(".", 1)[0]
    # absolute, as train records its paths: a run is looked up later from anywhere
    paths = {k: absolute(getattr(cfg, k)) for k in ("weights", "input", "output", "root") if getattr(cfg, k)}
    params = {**to_dict(dataclasses.replace(cfg, **paths)), "model_id": model_id, "plan": dataclasses.asdict(plan),
              "resumed_rows": resumed}
    try:
        return tracking.start_run(tracking_uri, cfg.experiment, name, params, {"output": paths["output"], **origin})
    except Exception as exc:  # noqa: BLE001 - MLflow's own error type varies with the store
        raise tracking.TrackingError(f"MLflow at {tracking_uri} did not take the scoring run ({type(exc).__name__}: "
                                     f"{str(exc)[:300]}); fix --mlflow-uri (or MLFLOW_TRACKING_URI), or pass "
                                     "--no-mlflow") from exc


def finish_tracking(result: ScoreResult) -> None:
    """Log the counts and speed and end the run (FAILED when no row could be scored, as the exit status says). The
    output is written by then, so an MLflow that fails now costs a warning, not the job."""
    try:
        tracking.log_metrics(result.tracking_uri, result.run_id, result.metrics(), step=0)
        tracking.finish_run(result.tracking_uri, result.run_id, "FAILED" if result.all_failed else "FINISHED")
    except Exception as exc:  # noqa: BLE001 - as above
        print(f"warning: {result.output} is written, but MLflow at {result.tracking_uri} did not record its counts "
              f"({type(exc).__name__}: {str(exc)[:300]})", file=sys.stderr, flush=True)


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    """The :class:`ScoreConfig` of ``spai score`` flags."""
    transform = ScoreTransformConfig(resize_to=args.resize_to, jpeg_quality=args.jpeg_quality,
                                     blur_sigma=args.blur_sigma, noise_sigma=args.noise_sigma, scale=args.scale)
    return ScoreConfig(weights=args.weights, input=args.input, output=args.output, device=args.device,
                       precision=args.precision, batch_size=args.batch_size, workers=args.workers, gpus=args.gpus,
                       cpus_per_worker=args.cpus_per_worker, feature_batch=args.feature_batch,
                       max_tiles=args.max_tiles, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                       transform=transform, root=args.root, split=args.split, tag=args.tag,
                       official_csv=args.official_csv, part_rows=args.part_rows, recursive=args.recursive,
                       overwrite=args.overwrite, track=not args.no_mlflow, mlflow_uri=args.mlflow_uri,
                       experiment=args.experiment)


def main(args: argparse.Namespace) -> int:
    """``spai score``: score and print a summary; exit status 1 when no row could be scored."""
    result = score(config_from_args(args))
    print(result.summary())
    if result.run_id:
        print(f"tracked as MLflow run {result.run_id} (experiment {args.experiment})")
        print(tracking.ui_hint(result.tracking_uri))
    return 1 if result.all_failed else 0
