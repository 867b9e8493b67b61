"""The resumable state of a scoring job beside its output (``<output>.parts/``): ``job.json``, which says what job it
is, and Parquet parts of finished rows, written by the workers (:mod:`pipelines.rowjob`)."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.infra.resume import check_resumable
from pipelines.infra.storage import Files, absolute, is_s3, join
from pipelines.rowjob import remove

# one row per (input row, variant) scored; a plain job's variant is "none"
PART_SCHEMA = pa.schema([("row_id", pa.string()), ("variant", pa.string()), ("logit", pa.float32()),
                         ("tiles", pa.int32()), ("error", pa.string())])
JOB_FILE = "job.json"


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
        # absolute: the workers that write the parts run in another folder than the driver
        self.uri = absolute(output.rstrip("/")) + ".parts"
        self.files = files

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

    def remove(self) -> None:
        remove(self.uri, self.files.options)
