"""The resumable state of a scoring job beside its output (``<output>.parts/``): ``job.json``, which says what job it
is, and Parquet parts of finished rows, written by the driver as results come in."""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.data.manifest import parquet_bytes, table_from_parquet
from pipelines.infra.resume import check_resumable
from pipelines.infra.storage import Files, is_s3, join

logger = logging.getLogger(__name__)

# one row per (input row, variant) scored; a plain job's variant is "none"
PART_SCHEMA = pa.schema([("row_id", pa.string()), ("variant", pa.string()), ("logit", pa.float32()),
                         ("tiles", pa.int32()), ("error", pa.string())])
JOB_FILE = "job.json"
PART_SECONDS = 60.0  # a part file is written at least this often, so a kill loses at most a minute of work


def write_atomic(files: Files, uri: str, data: bytes) -> None:
    """Write a whole file or nothing: locally through a temporary name and a rename; an S3 PUT already is atomic."""
    if is_s3(uri):
        files.write(uri, data)
        return
    tmp = uri + ".tmp"
    files.write(tmp, data)
    os.replace(files.resolve(tmp)[1], files.resolve(uri)[1])


class WorkDir:
    """``job.json`` and the parts of one job; :meth:`start` records the job or checks that it is the one recorded."""

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
        check_resumable(json.loads(self.files.read(job_uri)), job, what=f"the unfinished run in {self.uri}",
                        hint=f"Re-run with the same options to finish it, or delete {self.uri} (or choose another "
                        "--output) to start over")

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
            logger.warning("ignoring unreadable part %s (%s); its rows will be scored again", uri, exc)
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
