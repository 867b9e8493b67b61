"""The Ray Data image pipeline on disk and on S3 (moto): exact pixels, per-row errors, layout-free randomness."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
from PIL import Image

from pipelines.data import manifest as m
from pipelines.data.dataset import (MAX_ROWS_PER_BLOCK, ImageColumnBuilder, block_bounds, decode_block, decode_images,
                            read_manifest_dataset, row_rng)
from pipelines.data.decode import DEFAULT_MAX_PIXELS
from pipelines.infra.storage import StorageOptions
from pipelines.train.data import iter_image_batches
from pipelines.data.validate import validate_manifest
from s3server import upload_folder
from spai_core.images import to_rgb_array
from test_manifest import make_photos


pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos) -> Path:
    """real/ with 6 photos of two sizes and a grayscale PNG, fake/ with 4, and a text file posing as a JPEG."""
    root = tmp_path_factory.mktemp("corpus")
    make_photos(photos, [root / "real" / f"r{i}.jpg" for i in range(3)], size=(64, 48))
    make_photos(photos[3:], [root / "real" / f"r{i}.png" for i in range(3, 6)], size=(40, 56))
    Image.open(root / "real" / "r0.jpg").convert("L").save(root / "real" / "gray.png")
    make_photos(photos[6:], [root / "fake" / f"r{i}_fake.png" for i in range(4)], size=(48, 48))
    (root / "fake" / "broken.jpg").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def manifest_uri(corpus, tmp_path_factory) -> str:
    table = m.from_folders([str(corpus / "real")], {"gan": str(corpus / "fake")}, fractions=(0.5, 0.25, 0.25))
    rows = table.to_pylist() + [{**table.to_pylist()[0], "uri": str(corpus / "gone.jpg"), "group": "gone"}]
    return m.write_manifest(rows, str(tmp_path_factory.mktemp("m") / "man"), {"builder": "test"})


def _by_uri(rows: list[dict]) -> dict[str, dict]:
    return {r["uri"]: r for r in rows}


def _collect(ds: ray.data.Dataset) -> pa.Table:
    return pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))


def test_read_manifest_dataset_types_splits_and_blocks(manifest_uri):
    table = m.read_manifest(manifest_uri)
    read = _collect(read_manifest_dataset(manifest_uri))
    assert read.schema.equals(m.MANIFEST_SCHEMA) and read.num_rows == table.num_rows == 13
    val = _collect(read_manifest_dataset(manifest_uri, split="val")).column("uri").to_pylist()
    assert sorted(val) == sorted(r["uri"] for r in table.to_pylist() if r["split"] == "val") and val
    assert read_manifest_dataset(manifest_uri, override_num_blocks=6).materialize().num_blocks() == 6
    from_table = read_manifest_dataset(table, split="train", override_num_blocks=3).materialize()
    assert from_table.num_blocks() == 3
    assert from_table.count() == table.column("split").to_pylist().count("train")


def test_decode_matches_pillow_and_keeps_failed_rows(manifest_uri, corpus):
    rows = _by_uri(decode_images(read_manifest_dataset(manifest_uri)).take_all())
    assert len(rows) == 13
    for uri, row in rows.items():
        if Path(uri).name in ("broken.jpg", "gone.jpg"):
            assert row["image"].size == 0 and row["height"] is None
            continue
        assert row["error"] is None
        with Image.open(uri) as img:
            expected = np.asarray(img.convert("RGB"))
        np.testing.assert_array_equal(row["image"], expected)
        assert (row["height"], row["width"]) == expected.shape[:2]
        assert row["label"] in (0, 1) and row["split"] in m.SPLITS and row["group"]
    assert rows[str(corpus / "fake" / "broken.jpg")]["error"].startswith("not_an_image: ")
    assert rows[str(corpus / "gone.jpg")]["error"].startswith("missing: ")


def _two_views(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two random 16x16 crops, stacked: the shape of the training transform's output (V x h x w x 3)."""
    views = []
    for _ in range(2):
        y, x = rng.integers(0, image.shape[0] - 16), rng.integers(0, image.shape[1] - 16)
        views.append(image[y:y + 16, x:x + 16])
    return np.stack(views)


def test_transform_randomness_depends_on_seed_and_uri_not_blocks(manifest_uri):
    table = m.read_manifest(manifest_uri)
    one = _by_uri(decode_images(read_manifest_dataset(table, override_num_blocks=1), _two_views, seed=5).take_all())
    many = _by_uri(decode_images(read_manifest_dataset(table, override_num_blocks=7), _two_views, seed=5,
                                 max_bytes=1).take_all())
    other = _by_uri(decode_images(read_manifest_dataset(table), _two_views, seed=6).take_all())
    good = [u for u, r in one.items() if r["error"] is None]
    assert len(good) == 11
    for uri in good:
        assert one[uri]["image"].shape == (2, 16, 16, 3)
        np.testing.assert_array_equal(one[uri]["image"], many[uri]["image"])
    assert any(not np.array_equal(one[u]["image"], other[u]["image"]) for u in good)
    assert row_rng(5, good[0]).integers(1 << 30) == row_rng(5, good[0]).integers(1 << 30)


def test_transform_failure_is_a_row_error(manifest_uri):
    def picky(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if image.shape[0] == 56:
            raise ValueError("too tall")
        return image[:8, :8]

    rows = decode_images(read_manifest_dataset(manifest_uri), picky).take_all()
    failed = [r for r in rows if r["error"] and r["error"].startswith("transform_failed")]
    assert len(failed) == 3 and all("too tall" in r["error"] and r["height"] == 56 for r in failed)
    assert sum(r["error"] is None for r in rows) == 8


def test_decoded_columns_replace_same_named_inputs(manifest_uri):
    table = m.read_manifest(manifest_uri)
    table = table.take([i for i, u in enumerate(table.column("uri").to_pylist()) if "/real/" in u][:2])
    table = table.append_column("width", pa.array([1, 1], pa.int32())).append_column("image", pa.array(["a", "b"]))
    decoded = _collect(decode_images(read_manifest_dataset(table)))
    assert decoded.column_names == [*m.CORE_COLUMNS, "image", "height", "width", "error"]
    assert all(w > 1 for w in decoded.column("width").to_pylist())


def test_training_batches_come_in_table_order(manifest_uri):
    """Seeded training needs a fixed batch order; without preserve_order Ray Data's prefetch threads reorder batches."""
    table = m.read_manifest(manifest_uri)
    for _ in range(3):
        batches = iter_image_batches(table, _two_views, 5, 1, StorageOptions(), drop_last=False)
        assert [u for batch in batches for u in batch["uri"]] == table.column("uri").to_pylist()


def _column(images: list[np.ndarray | None], max_bytes: int = 1 << 20) -> tuple[pa.Array, bool]:
    builder = ImageColumnBuilder(len(images), max_bytes)
    for image in images:
        builder.append(image)
    return builder.finish(), builder.full()


def test_image_column_stacks_same_shapes_and_keeps_ragged_rows():
    same, full = _column([np.zeros((2, 3, 3), np.uint8), np.ones((2, 3, 3), np.uint8)])
    assert full and same.to_numpy().shape == (2, 2, 3, 3) and same.to_numpy()[1].min() == 1
    ragged, _ = _column([np.zeros((2, 3, 3), np.uint8), np.zeros((4, 1, 3), np.uint8), None])
    assert [a.shape for a in ragged.to_numpy(zero_copy_only=False)] == [(2, 3, 3), (4, 1, 3), (0, 0, 3)]
    failed_first, _ = _column([None, np.ones((1, 2, 4, 3), np.uint8)])
    assert [a.shape for a in failed_first.to_numpy(zero_copy_only=False)] == [(0, 0, 0, 3), (1, 2, 4, 3)]


def test_image_column_slots_are_its_rows_until_shapes_differ():
    """Images written into slots are the column's own memory (no copy); an image of a new shape gets its own array."""
    stacked = ImageColumnBuilder(2, max_bytes=1 << 20)
    slots = []
    for value in (4, 5):
        slots.append(stacked.slot((2, 3, 3)))
        slots[-1][...] = value
        stacked.append(slots[-1])
    column = stacked.finish().to_numpy()
    assert stacked.full() and column[:, 0, 0, 0].tolist() == [4, 5]
    assert all(np.shares_memory(column, slot) for slot in slots)
    ragged = ImageColumnBuilder(4, max_bytes=1 << 20)
    for value, shape in ((1, (2, 3, 3)), (2, (4, 1, 3))):
        slot = ragged.slot(shape)
        slot[...] = value
        ragged.append(slot)
    assert [(a.shape, a.max()) for a in ragged.finish().to_numpy(zero_copy_only=False)] == [((2, 3, 3), 1),
                                                                                          ((4, 1, 3), 2)]


def test_image_column_is_full_at_its_byte_budget():
    image = np.zeros((4, 4, 3), np.uint8)
    builder = ImageColumnBuilder(10, max_bytes=2 * image.nbytes)
    builder.append(image)
    assert not builder.full()
    builder.append(image)
    assert builder.full() and builder.rows == 2


def test_decode_block_emits_tables_within_max_bytes_and_keeps_every_row(manifest_uri):
    table = m.read_manifest(manifest_uri)
    view_bytes = 2 * 16 * 16 * 3
    parts = list(decode_block(table, _two_views, 5, StorageOptions(), DEFAULT_MAX_PIXELS, max_bytes=3 * view_bytes))
    assert len(parts) >= 4 and all(p.column("error").null_count <= 3 for p in parts)  # 11 good rows, 3 per table
    assert [u for p in parts for u in p.column("uri").to_pylist()] == table.column("uri").to_pylist()


def test_s3_corpus_gives_the_same_rows_as_disk(s3_server, corpus):
    """Manifest from the s3:// prefix -> validate on S3 -> stream: same rows, hashes and pixels as the files on disk."""
    prefix = upload_folder(s3_server, corpus, "images", "corpus")
    local = m.from_folders([str(corpus / "real")], {"gan": str(corpus / "fake")})
    remote = m.from_folders([f"{prefix}/real"], {"gan": f"{prefix}/fake"})
    assert remote.drop_columns(["uri"]).equals(local.drop_columns(["uri"]))
    on_disk = {u.replace(prefix, str(corpus)): u for u in remote.column("uri").to_pylist()}
    assert sorted(on_disk) == sorted(local.column("uri").to_pylist())
    remote_uri = m.write_manifest(remote, "s3://images/manifests/remote", {"builder": "test"})

    report = validate_manifest(remote_uri)
    assert report.output_uri == "s3://images/manifests/remote.validated"
    assert (report.accepted, report.reasons) == (11, {"not_an_image": 1})
    hashes = {r["uri"]: r["sha256"] for r in m.read_manifest(report.output_uri).to_pylist()}
    assert hashes == {on_disk[p]: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in on_disk
                      if not p.endswith("broken.jpg")}

    rows = decode_images(read_manifest_dataset(remote_uri)).take_all()
    assert sorted(r["uri"] for r in rows) == sorted(on_disk.values())
    disk_of = {u: p for p, u in on_disk.items()}
    for row in rows:
        if row["uri"].endswith("broken.jpg"):
            assert row["error"].startswith("not_an_image: ")
            continue
        with Image.open(disk_of[row["uri"]]) as img:
            np.testing.assert_array_equal(row["image"], to_rgb_array(img))


def test_blocks_follow_decoded_pixels_when_the_manifest_knows_sizes():
    rows = [{"uri": f"/x/{i}.jpg", "label": 0, "split": "test", "generator": "real", "source": "t", "group": str(i)}
            for i in range(2500)]
    table = m.rows_to_table(rows)
    assert block_bounds(table) == [i * 2500 // 40 for i in range(41)]  # sizes unknown: ~64 rows per block

    def sized(sides: list[int]) -> pa.Table:
        return table.slice(0, len(sides)).append_column("width", pa.array(sides, pa.int32())).append_column(
            "height", pa.array(sides, pa.int32()))

    small = block_bounds(sized([512] * 2100))  # 0.25 MP each: 1024 rows fill the 256 MP budget
    assert small == [0, 1024, 2048, 2100]
    large = block_bounds(sized([2048] * 150))  # 4 MP each: 64 rows per block
    assert large == [0, 64, 128, 150]
    tiny = block_bounds(sized([64] * 2500))  # the row cap bounds a block of thumbnails
    assert tiny == [0, MAX_ROWS_PER_BLOCK, 2500]
    assert block_bounds(sized([16384, 256, 256, 16384])) == [0, 1, 4]  # two 256 MP images never share a block
    assert block_bounds(sized([512] * 300), num_blocks=3) == [0, 100, 200, 300]
    unknown = table.slice(0, 2).append_column("width", pa.array(["512", None])).append_column(
        "height", pa.array(["512", "512"]))
    assert block_bounds(unknown) == [0, 2]  # one unknown size: row counts, as without the columns
