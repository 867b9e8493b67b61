"""A resumable Ray Data job over manifest rows whose rows and results never pass through the driver.

``spai score``, ``spai validate`` and feature extraction are all this one job with another actor::

    shards (file x row group) -> read + row ids + skip done rows (tasks) -> decode (+ expand) (tasks)
        -> <actor> (actor pool) -> Parquet parts written by the workers -> streaming compaction

The driver plans shards from Parquet footers only (for a small input listed on the driver, a folder, a CSV, one
image, slices of that table) and reads back nothing but file names and the row count of each part written (which
feeds its progress bar).

Row ids (:func:`row_ids`): ``sha256(file name, row index within that file, uri)[:32]``, computed in the read task,
so no task needs the rest of the manifest; the same manifest gives the same ids in any run, which is what resume
needs. A result is keyed by ``(row_id, label)``: a plain job has one label per row, a ``--perturb`` sweep one per
variant.

Resume is worker-side rather than Ray Data's ``CheckpointConfig`` (Ray 2.60): that one filters rows right after the
read by an id column the files must already hold (ours is computed in the read task), keys by row while a sweep
result is a (row, variant) pair, and names its part files itself. Here a Ray task reads the keys of the parts done
(two columns) into a sorted array in the object store (16 bytes a result, never on the driver), and each read task
drops the pairs found there. A part (``part_rows`` results, written by a Ray Data task) appears under its name only
when whole; one cut short anyway (a file system without atomic moves) is unreadable, deleted, and its rows redone. Exactly once is checked by the compaction, which sorts the
parts by input position in the cluster and streams them to the driver: the first result of a key wins, and the job
fails when any key is missing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.block import BlockAccessor

from pipelines.data.dataset import DECODED_COLUMNS, block_bounds, decode_images
from pipelines.data.decode import DEFAULT_MAX_PIXELS
from pipelines.data.manifest import MANIFEST_SCHEMA, ManifestError, conform, manifest_files, split_rows
from pipelines.infra.console import progress_bar
from pipelines.infra.storage import Files, StorageOptions, is_s3

logger = logging.getLogger(__name__)

ORDER = "_order"  # input position of a result's row (global, in shard order): what the compaction sorts by
LABEL_INDEX = "_label"  # index of a result's label in the job's labels (sweep order)
KEY_COLUMNS = ("row_id", "variant")
PART_PREFIX = "part-"
INPUT_PREFIX = "_input_"  # what an input column named like a decoded one is called between reading and writing
SHARD_ROWS = 2048  # rows per shard of a table listed on the driver
COMPACT_ROWS = 250_000  # input positions per partition of the compaction's sort
# The job's own small tasks (done keys, counts) run on the cluster's CPUs like Ray Data's tasks, not inside the
# placement group of a caller such as a Tune trial, whose bundle (a hundredth of a CPU) they could never fit
OUTSIDE_ANY_PLACEMENT_GROUP = "DEFAULT"


@dataclasses.dataclass(frozen=True)
class Shard:
    """One read task's rows: a row group of a manifest file, or a slice of a table listed on the driver."""

    uri: str | None  # the Parquet file; None for a slice of the driver's table
    name: str  # what row ids name the file by (its path inside the manifest; "" for the driver's table)
    row_group: int | None
    offset: int  # index of the first row within its file (or the table)
    rows: int
    base: int  # global input position of the first row


def plan_shards(source: str | pa.Table, options: StorageOptions, split: str | None = None) -> list[Shard]:
    """The shards of a manifest (Parquet footers only, one per file) or of a small table."""
    if isinstance(source, pa.Table):
        return [Shard(None, "", None, start, min(SHARD_ROWS, source.num_rows - start), start)
                for start in range(0, source.num_rows, SHARD_ROWS)]
    files, shards, base = Files(options), [], 0
    root = source.rstrip("/")
    for uri in manifest_files(source, options, split):
        fs, path = files.resolve(uri)
        try:
            meta = pq.ParquetFile(fs.open_input_file(path)).metadata
        except (pa.ArrowInvalid, OSError) as exc:
            raise ManifestError(f"{uri} is not a readable Parquet file ({exc}); rebuild the manifest") from exc
        name = uri[len(root) + 1:] if uri.startswith(root + "/") else uri.rsplit("/", 1)[-1]
        offset = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            shards.append(Shard(uri, name, group, offset, rows, base))
            offset, base = offset + rows, base + rows
    return shards


def row_ids(name: str, offset: int, uris: Sequence[str]) -> list[str]:
    """Stable ids of rows ``offset...`` of the file ``name``: computable in any task, distinct within a job."""
    return [hashlib.sha256(f"{name}\n{offset + i}\n{uri}".encode()).hexdigest()[:32] for i, uri in enumerate(uris)]


def _keys(row_ids: Sequence[str], labels: Sequence[int]) -> np.ndarray:
    """16-byte keys of (row, label index) results: 15 bytes of the row id's hash, then the label's index, so the
    results of one row sort together."""
    return np.array([hashlib.blake2b(r.encode(), digest_size=15).digest() + bytes([i])
                     for r, i in zip(row_ids, labels)], dtype="S16")


@dataclasses.dataclass(frozen=True)
class Rows:
    """What to read: the source, one split of it, and how input names are changed (clashes with result columns)."""

    source: str | pa.Table
    split: str | None = None
    rename: Callable[[str], str] | None = None


def _read_shard(batch: pa.Table, rows: Rows, shards: Sequence[Shard], table: pa.Table | None,
                options: StorageOptions, labels: Sequence[str], done: Any) -> Iterator[pa.Table]:
    """Manifest rows of the shards in ``batch`` with ``row_id``, ``_order`` and the ``variants`` (labels) still to
    do; rows with none left are dropped. Blocks sized by :func:`~pipelines.data.dataset.block_bounds`: one decode
    task each."""
    done_keys = ray.get(done) if done is not None else None
    for index in batch.column("shard").to_pylist():
        shard = shards[index]
        if shard.uri is None:
            part = table.slice(shard.offset, shard.rows)
        else:
            fs, path = Files(options).resolve(shard.uri)
            part = conform(pq.ParquetFile(fs.open_input_file(path)).read_row_group(shard.row_group), where=shard.uri)
        ids = row_ids(shard.name, shard.offset, part.column("uri").to_pylist())
        order = np.arange(shard.base, shard.base + shard.rows)
        if rows.split is not None:
            keep = split_rows(pa.table({"split": part.column("split"), "i": order - shard.base}), rows.split)
            keep = keep.column("i").to_numpy()
            part, ids, order = part.take(pa.array(keep)), [ids[i] for i in keep], order[keep]
        if rows.rename is not None:
            part = part.rename_columns([rows.rename(name) for name in part.column_names])
        part = (part.append_column("row_id", pa.array(ids, pa.string()))
                .append_column(ORDER, pa.array(order, pa.int64())))
        left = [list(labels) for _ in ids]
        if done_keys is not None and len(done_keys):
            found = [np.isin(_keys(ids, [i] * len(ids)), done_keys) for i in range(len(labels))]
            left = [[label for label, hit in zip(labels, hits) if not hit] for hits in zip(*found)]
        keep = [i for i, todo in enumerate(left) if todo]
        if not keep:
            continue
        part = part.take(pa.array(keep)).append_column(
            "variants", pa.array([left[i] for i in keep], pa.list_(pa.string())))
        bounds = block_bounds(part)  # by pixels when the manifest knows image sizes
        # input columns named like those decoding adds (a CSV's image path, a validated manifest's sizes) keep
        # their values under another name until the results are written
        part = part.rename_columns([f"{INPUT_PREFIX}{name}" if name in DECODED_COLUMNS else name
                                    for name in part.column_names])
        for start, end in zip(bounds, bounds[1:]):
            yield part.slice(start, end - start)


def one_label(batch: pa.Table, **_: Any) -> pa.Table:
    """The expand stage of a job with one label per row: each decoded row as it is, with its ``variant``."""
    labels = pc.list_element(batch.column("variants"), 0)
    return batch.drop_columns(["variants"]).append_column("variant", labels)


class _Apply:
    """Runs the job's actor on a batch and keeps the input columns, keys and input position beside its results."""

    def __init__(self, actor: type, kwargs: Mapping[str, Any], schema: pa.Schema, labels: Sequence[str],
                 columns: Sequence[str]):
        self.actor = actor(**kwargs)
        self.schema = schema
        self.labels = {label: i for i, label in enumerate(labels)}
        self.columns = [name for name in columns if name not in set(schema.names) | {"row_id", "variant", ORDER}]

    def __call__(self, batch: pa.Table) -> pa.Table:
        result = self.actor(BlockAccessor.for_block(batch).to_batch_format("numpy"))
        if not isinstance(result, pa.Table):
            result = pa.table(result)
        if result.num_rows != batch.num_rows:
            raise RuntimeError(f"{type(self.actor).__name__} returned {result.num_rows} rows for a batch of "
                               f"{batch.num_rows}; an actor must return one result row per input row, in order")
        out = pa.table({name: batch.column(f"{INPUT_PREFIX}{name}" if name in DECODED_COLUMNS else name)
                        for name in self.columns})
        for name in KEY_COLUMNS:
            out = out.append_column(name, batch.column(name).cast(pa.string()))
        for field in self.schema:
            if field.name not in KEY_COLUMNS:
                out = out.append_column(field, result.column(field.name).cast(field.type))
        index = [self.labels[label] for label in batch.column("variant").to_pylist()]
        return (out.append_column(ORDER, batch.column(ORDER))
                .append_column(LABEL_INDEX, pa.array(index, pa.int32())))


def _write_part(batch: pa.Table, work: str, options: StorageOptions) -> pa.Table:
    """Write a batch of results as one part (under a temporary name first, so no reader sees half a part); return its
    row count, all the driver sees of it."""
    files = Files(options)
    name = f"{PART_PREFIX}{uuid.uuid4().hex}.parquet"
    fs, path = files.resolve(f"{work.rstrip('/')}/{name}")
    temporary = path if is_s3(work) else f"{path.rsplit('/', 1)[0]}/.{name}.tmp"  # an S3 PUT is whole or nothing
    if not is_s3(work):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(temporary) as sink:
        pq.write_table(batch, sink)
    if temporary != path:
        fs.move(temporary, path)
    return pa.table({"rows": [batch.num_rows]})


@dataclasses.dataclass(frozen=True)
class Compute:
    """Where the actors run: ``workers`` of them, each with these resources, taking batches of ``batch_size``."""

    workers: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 8
    batches_in_flight: int = 1
    part_rows: int = 1000  # results per part file: what a kill may lose, at most, per writer


def part_uris(work: str, files: Files) -> list[str]:
    if files.info(work).type != pafs.FileType.Directory:
        return []
    return [u for u in files.list(work, recursive=False, suffixes=(".parquet",))
            if u.rsplit("/", 1)[-1].startswith(PART_PREFIX)]


@ray.remote(scheduling_strategy=OUTSIDE_ANY_PLACEMENT_GROUP)
def _done_keys(work: str, options: StorageOptions, labels: Sequence[str]) -> np.ndarray:
    """Sorted keys of the results already in ``work``; unreadable parts (cut by a kill) go."""
    files, keys, index = Files(options), [], {label: i for i, label in enumerate(labels)}
    for uri in part_uris(work, files):
        fs, path = files.resolve(uri)
        try:
            part = pq.read_table(path, filesystem=fs, columns=list(KEY_COLUMNS))
        except (pa.ArrowInvalid, OSError) as exc:
            logger.warning("ignoring unreadable part %s (%s); its rows will be done again", uri, exc)
            files.remove(uri)
            continue
        keys.append(_keys(part.column("row_id").to_pylist(), [index[v] for v in part.column("variant").to_pylist()]))
    return np.unique(np.concatenate(keys)) if keys else np.empty(0, "S16")


@ray.remote(scheduling_strategy=OUTSIDE_ANY_PLACEMENT_GROUP)
def _counts(done: np.ndarray, labels: int) -> tuple[int, int]:
    """(results done, rows with every label done)."""
    rows = np.frombuffer(done.tobytes(), np.uint8).reshape(-1, 16)[:, :15].copy().view("S15").ravel()
    return len(done), int(np.sum(np.unique(rows, return_counts=True)[1] == labels)) if len(done) else 0


@dataclasses.dataclass
class RowJob:
    """A job over ``rows``: ``actor(**actor_kwargs)`` makes results of ``schema`` from decoded batches, one per
    (row, label). ``expand(batch, **expand_kwargs)`` (a decoded block with a ``variants`` list column) yields the
    rows the actor gets, each with its ``variant``; by default each row once, with its one label."""

    rows: Rows
    work: str
    actor: type
    actor_kwargs: Mapping[str, Any]
    schema: pa.Schema
    labels: Sequence[str] = ("none",)
    expand: Callable[..., Any] = one_label
    expand_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    transform: Any = None
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode: bool = True  # False: the actor reads the files itself (validation hashes the bytes)
    options: StorageOptions = dataclasses.field(default_factory=StorageOptions.from_env)


@dataclasses.dataclass
class Progress:
    """What a run found when it started: its shards, rows, labels per row, and the results and rows already done."""

    shards: list[Shard]
    rows: int
    labels: int
    done_before: int
    rows_done: int  # rows with every label done
    columns: list[str]  # the input's columns (after renaming): what the parts carry beside the results

    @property
    def expected(self) -> int:
        return self.rows * self.labels

    @property
    def left(self) -> int:
        return self.expected - self.done_before

    @property
    def rows_left(self) -> int:
        """Rows with a label still to do: what this run reads and decodes."""
        return self.rows - self.rows_done


def start(job: RowJob, shards: list[Shard] | None = None) -> tuple[Progress, Any]:
    """Count the results expected (planning the shards unless given) and those done (as an object-store ref for the
    read tasks)."""
    shards = plan_shards(job.rows.source, job.options, job.rows.split) if shards is None else shards
    rows = sum(s.rows for s in shards) if job.rows.split is None else _count_split(job, shards)
    if len(job.labels) > 255:
        raise ValueError(f"a job has at most 255 labels per row, not {len(job.labels)}")
    done_ref, count, full = None, 0, 0
    if part_uris(job.work, Files(job.options)):  # a fresh job starts no task for it (seconds on a busy machine)
        done_ref = _done_keys.remote(job.work, job.options, list(job.labels))
        count, full = ray.get(_counts.remote(done_ref, len(job.labels)))
    columns = input_schema(job.rows.source, shards, job.options).names
    if job.rows.rename is not None:
        columns = [job.rows.rename(name) for name in columns]
    return Progress(shards, rows, len(job.labels), count, full, columns), done_ref if count else None


def input_schema(source: str | pa.Table, shards: Sequence[Shard], options: StorageOptions) -> pa.Schema:
    """The input's columns as the read tasks give them (a manifest's from its first file's footer)."""
    if isinstance(source, pa.Table):
        return conform(source).schema
    if not shards:
        return MANIFEST_SCHEMA
    fs, path = Files(options).resolve(shards[0].uri)
    return conform(pq.read_schema(fs.open_input_file(path)).empty_table(), where=shards[0].uri).schema


@ray.remote(scheduling_strategy=OUTSIDE_ANY_PLACEMENT_GROUP)
def _split_count(uri: str | None, table: pa.Table | None, split: str, options: StorageOptions) -> int:
    if uri is None:
        return split_rows(table, split).num_rows
    fs, path = Files(options).resolve(uri)
    return split_rows(conform(pq.read_table(path, filesystem=fs), where=uri), split).num_rows


def _count_split(job: RowJob, shards: Sequence[Shard]) -> int:
    """Rows of the asked split, counted in tasks (one per file)."""
    source = job.rows.source
    if isinstance(source, pa.Table):
        return split_rows(source, job.rows.split).num_rows
    uris = sorted({s.uri for s in shards})
    return sum(ray.get([_split_count.remote(u, None, job.rows.split, job.options) for u in uris]))


def dataset(job: RowJob, progress: Progress, done_ref: Any, compute: Compute) -> ray.data.Dataset:
    """The job's dataset up to the actors' results (not yet written)."""
    table = job.rows.source if isinstance(job.rows.source, pa.Table) else None
    ds = ray.data.from_items([{"shard": i} for i in range(len(progress.shards))],
                             override_num_blocks=max(1, len(progress.shards)))
    # a fraction of a CPU: reading does not fuse with decoding, so each read block is its own decode task
    ds = ds.map_batches(_read_shard, batch_format="pyarrow", batch_size=1, num_cpus=0.5,
                        fn_kwargs={"rows": job.rows, "shards": progress.shards, "table": table,
                                   "options": job.options, "labels": list(job.labels), "done": done_ref})
    if job.decode:
        ds = decode_images(ds, job.transform, job.seed, job.options, job.max_pixels)
    ds = ds.map_batches(job.expand, batch_format="pyarrow", batch_size=None, fn_kwargs=dict(job.expand_kwargs))
    # Blocks of one actor batch each; the boundary also keeps decoding out of the actors, beside them instead
    ds = ds.repartition(target_num_rows_per_block=compute.batch_size)
    return ds.map_batches(
        _Apply, batch_size=compute.batch_size, batch_format="pyarrow",
        # "true multi-threading" with one call at a time runs calls on the actor's main thread, where the model was
        # built. Ray Data's default hands them to a helper thread: a second OpenMP pool, and with more OpenMP threads
        # than CPUs libgomp stops spin-waiting, so small ops slow ~2x and a CPU model pass ~5%
        compute=ray.data.ActorPoolStrategy(size=compute.workers, enable_true_multi_threading=True,
                                           max_tasks_in_flight_per_actor=compute.batches_in_flight),
        num_cpus=compute.num_cpus, num_gpus=compute.num_gpus or None,
        fn_constructor_kwargs={"actor": job.actor, "kwargs": dict(job.actor_kwargs), "schema": job.schema,
                               "labels": list(job.labels), "columns": progress.columns})


def run(job: RowJob, compute: Compute, show_progress: bool = True, desc: str = "rows") -> Progress:
    """Do the results not done yet and write them as parts under ``job.work`` (by the workers), with a progress bar
    over the whole job fed by the parts' row counts."""
    progress, done_ref = start(job)
    if progress.done_before:
        logger.info("resuming %s: %d of %d results were done before", job.work, progress.done_before,
                    progress.expected)
    with progress_bar(show_progress, total=progress.expected, initial=progress.done_before, desc=desc,
                      smoothing=0.05) as bar:
        for rows in execute(job, progress, done_ref, compute):
            bar.update(rows)
    return progress


def execute(job: RowJob, progress: Progress, done_ref: Any, compute: Compute) -> Iterator[int]:
    """The run after :func:`start`: the results left, written as parts by the workers; yields each part's row count
    as it is written (nothing else of the results reaches the driver)."""
    if progress.left <= 0:
        return
    ds = dataset(job, progress, done_ref, compute).map_batches(
        _write_part, batch_size=compute.part_rows, batch_format="pyarrow",
        fn_kwargs={"work": job.work, "options": job.options})
    # Ray Data's bars count this run's blocks per stage; the caller's bar counts the job's results
    ds.context.enable_progress_bars = False
    # no prefetch: each count reaches the driver as its part is written, not when the next one is
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        yield from batch.column("rows").to_pylist()


def compacted(work: str, options: StorageOptions, expected: Progress, batch_rows: int = 4096) -> Iterator[pa.Table]:
    """The parts in input order (a row's labels in job order), each key once, in batches streamed to the caller
    (:func:`_sorted_parts`). Raises :class:`MissingResults` at the end when fewer than ``expected`` keys came."""
    positions = sum(s.rows for s in expected.shards)
    files = Files(options)
    uris = part_uris(work, files)
    seen = 0
    if uris:
        fs, _ = files.resolve(work)
        paths = [files.resolve(u)[1] for u in uris]
        last = None
        for batch in _sorted_parts(paths, fs, positions, expected.expected, batch_rows):
            pos = np.stack([np.asarray(batch.column(ORDER)), np.asarray(batch.column(LABEL_INDEX))], axis=1)
            new = np.ones(len(pos), bool)
            new[1:] = np.any(pos[1:] != pos[:-1], axis=1)
            if last is not None and len(pos):
                new[0] = tuple(pos[0]) != last
            if len(pos):
                last = tuple(pos[-1])
            batch = batch.filter(pa.array(new)).drop_columns([ORDER, LABEL_INDEX])
            seen += batch.num_rows
            if batch.num_rows:
                yield batch
    if seen != expected.expected:
        raise MissingResults(expected.expected - seen, expected.expected)


def _sorted_parts(paths: list[str], fs: pafs.FileSystem, positions: int, results: int,
                  batch_rows: int) -> Iterator[pa.Table]:
    """The parts' rows by input position and label, in batches of ``batch_rows``.

    A job of at most :data:`COMPACT_ROWS` results is sorted where the caller runs: a Ray Data sort costs seconds of
    task start-up, and inside a Tune trial its shuffle tasks would be held to the trial's placement group, which they
    cannot fit. A larger one is sorted in the cluster, partitioned by ranges of input positions, which are known (no
    sampling pass)."""
    if results <= COMPACT_ROWS:
        table = pa.concat_tables([pq.read_table(path, filesystem=fs) for path in paths], promote_options="permissive")
        yield from (pa.Table.from_batches([b]) for b in
                    table.sort_by([(ORDER, "ascending"), (LABEL_INDEX, "ascending")]).to_batches(batch_rows))
        return
    step = COMPACT_ROWS
    ds = ray.data.read_parquet(paths, filesystem=fs).sort(
        [ORDER, LABEL_INDEX], boundaries=list(range(step, positions, step)) or [positions])
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    yield from ds.iter_batches(batch_size=batch_rows, batch_format="pyarrow")


class MissingResults(RuntimeError):
    """Results missing when the job ended (an earlier run stopped mid-way and this one did not finish them)."""

    def __init__(self, missing: int, expected: int):
        super().__init__(f"{missing} of {expected} results are missing; re-run the same command to do them")
        self.missing, self.expected = missing, expected


def remove(work: str, options: StorageOptions) -> None:
    files = Files(options)
    if files.info(work).type == pafs.FileType.Directory:
        fs, path = files.resolve(work)
        fs.delete_dir(path)
