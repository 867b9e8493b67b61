"""The row-job runner: rows read in tasks, results written by the workers, resumed from the parts, compacted in input
order exactly once."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import rowjob
from pipelines.data.manifest import read_manifest, rows_to_table, write_manifest
from pipelines.infra.storage import StorageOptions

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]
SCHEMA = pa.schema([("height", pa.int64()), ("error", pa.string())])


class Heights:
    """A stand-in for a model: each decoded image's height times ``scale``."""

    def __init__(self, scale: int):
        self.scale = scale

    def __call__(self, batch):
        heights = [None if e is not None else img.shape[0] * self.scale for img, e in zip(batch["image"],
                                                                                           batch["error"])]
        return {"height": pa.array(heights, pa.int64()), "error": pa.array(list(batch["error"]), pa.string())}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> tuple[str, pa.Table]:
    folder = tmp_path_factory.mktemp("rows")
    for i in range(9):
        Image.new("RGB", (20, 10 + i)).save(folder / f"i{i}.png")
    (folder / "bad.png").write_bytes(b"not an image")
    table = rows_to_table([{"uri": str(p), "label": 0, "split": "test"} for p in sorted(folder.iterdir())] * 2)
    uri = str(folder / "manifest")
    write_manifest(table, uri, {"builder": "test"})
    return uri, read_manifest(uri)  # in the manifest's own order


def compact(job: rowjob.RowJob, progress: rowjob.Progress) -> pa.Table:
    return pa.concat_tables(rowjob.compacted(job.work, job.options, progress))


def test_every_row_once_in_input_order_and_a_lost_part_is_redone(manifest, tmp_path, monkeypatch):
    uri, table = manifest
    job = rowjob.RowJob(rowjob.Rows(uri), str(tmp_path / "work"), Heights, {"scale": 2}, SCHEMA,
                        options=StorageOptions())
    compute = rowjob.Compute(batch_size=3, part_rows=5)
    first = rowjob.run(job, compute, show_progress=False)
    assert (first.expected, first.done_before) == (20, 0)
    out = compact(job, first)
    # a uri listed twice is two rows with two ids
    assert out.column("uri").to_pylist() == table.column("uri").to_pylist()
    assert len(set(out.column("row_id").to_pylist())) == 20
    heights = {f"i{i}.png": 2 * (10 + i) for i in range(9)}
    assert out.column("height").to_pylist() == [heights.get(Path(u).name) for u in out.column("uri").to_pylist()]
    assert [e.split(":")[0] for e in out.column("error").drop_null().to_pylist()] == ["not_an_image"] * 2
    parts = sorted(Path(job.work).glob("part-*.parquet"))
    lost = pq.read_table(parts[0]).num_rows
    assert len(parts) > 1 and 0 < lost < 20
    parts[0].unlink()
    with pytest.raises(rowjob.MissingResults, match=f"{lost} of 20 results are missing"):
        compact(job, first)
    again = rowjob.run(job, compute, show_progress=False)
    assert again.done_before == 20 - lost
    assert compact(job, again).equals(out)
    # a job over COMPACT_ROWS results is sorted in the cluster, by ranges of input positions: the same table
    monkeypatch.setattr(rowjob, "COMPACT_ROWS", 6)
    assert compact(job, again).equals(out)
