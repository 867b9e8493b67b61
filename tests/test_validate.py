"""``spai validate`` as a Ray Data job: planted bad files get the right reason, good rows all survive, leakage shows."""
from __future__ import annotations

import hashlib
import logging
import shutil
import struct
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from pipelines import manifest as m
from pipelines.decode import DecodeError, decode_image
from pipelines.validate import validate_manifest
from spai_cli.main import main as spai
from test_manifest import make_photos

MAX_PIXELS = 100_000  # the 400x300 photo (120k pixels) is over it, the 64x48 ones are far below


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield
    ray.shutdown()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG whose header claims ``width x height`` RGB pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos) -> tuple[Path, dict[str, str]]:
    """Good photos, one of them copied into train and test, plus one file per kind of failure.

    Returns the folder and {uri: expected reject reason}.
    """
    root = tmp_path_factory.mktemp("corpus")
    good = make_photos(photos, [root / f"good{i}.{'png' if i % 2 else 'jpg'}" for i in range(6)])
    large = make_photos(photos[-1:], [root / "large.jpg"], size=(400, 300))[0]
    jpeg, png = good[0].read_bytes(), good[1].read_bytes()
    bad = {"zero.jpg": b"", "truncated.jpg": jpeg[: len(jpeg) // 2], "truncated.png": png[: len(png) // 2],
           "text.jpg": b"this is a text file with a .jpg name\n", "bomb.png": bomb_png()}
    for name, data in bad.items():
        (root / name).write_bytes(data)
    shutil.copy(good[0], root / "copy_of_good0.jpg")
    expected = {str(root / "zero.jpg"): "zero_byte", str(root / "truncated.jpg"): "truncated",
                str(root / "truncated.png"): "truncated", str(root / "text.jpg"): "not_an_image",
                str(root / "bomb.png"): "decompression_bomb", str(large): "decompression_bomb",
                str(root / "missing.jpg"): "missing"}
    return root, expected


@pytest.fixture(scope="module")
def manifest_uri(corpus, tmp_path_factory) -> str:
    root, expected = corpus
    uris = sorted(str(p) for p in root.iterdir()) + [str(root / "missing.jpg")]
    rows = [{"uri": u, "label": 0, "split": "test" if "copy_of" in u else "train", "generator": "real",
             "source": "photos", "group": Path(u).stem, "note": f"row {i}"} for i, u in enumerate(uris)]
    return m.write_manifest(m.rows_to_table(rows, extras=["note"]), str(tmp_path_factory.mktemp("m") / "man"),
                            {"builder": "test"})


@pytest.fixture(scope="module")
def report(manifest_uri):
    return validate_manifest(manifest_uri, max_pixels=MAX_PIXELS)


def test_decode_reasons_for_each_bad_kind(corpus):
    root, expected = corpus
    for uri, reason in expected.items():
        if reason == "missing":
            continue
        with pytest.raises(DecodeError) as caught:
            decode_image(Path(uri).read_bytes(), MAX_PIXELS)
        assert caught.value.reason == reason, (uri, caught.value)
        assert caught.value.message
    array, info = decode_image((root / "good0.jpg").read_bytes())
    assert array.shape == (48, 64, 3) and array.dtype.name == "uint8"
    size = (root / "good0.jpg").stat().st_size
    assert info == {"width": 64, "height": 48, "format": "JPEG", "mode": "RGB", "bytes": size}


def test_every_row_accounted_for_with_the_right_reason(report, corpus, manifest_uri):
    root, expected = corpus
    assert report.total == m.read_manifest(manifest_uri).num_rows == 14
    assert report.accepted + report.rejected == report.total
    rejects = pq.read_table(report.rejects_uri)
    assert dict(zip(rejects.column("uri").to_pylist(), rejects.column("reason").to_pylist())) == expected
    assert rejects.column_names[:6] == list(m.CORE_COLUMNS)
    assert {"note", "reason", "message"} <= set(rejects.column_names)
    assert all(rejects.column("message").to_pylist())
    assert report.reasons == {"zero_byte": 1, "truncated": 2, "not_an_image": 1, "decompression_bomb": 2, "missing": 1}


def test_validated_manifest_keeps_all_good_rows_with_metadata(report, corpus):
    root, _ = corpus
    validated = m.read_manifest(report.output_uri).to_pylist()
    good = sorted([*(str(root / f"good{i}.{'png' if i % 2 else 'jpg'}") for i in range(6)),
                   str(root / "copy_of_good0.jpg")])
    assert sorted(r["uri"] for r in validated) == good
    for row in validated:
        data = Path(row["uri"]).read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["bytes"] == len(data)
        assert (row["width"], row["height"]) == (64, 48) and row["format"] in ("JPEG", "PNG")
        assert row["note"].startswith("row ")


def test_leakage_across_splits_is_reported(report, corpus):
    root, _ = corpus
    assert report.leakage.num_rows == 1
    leak = report.leakage.to_pylist()[0]
    assert sorted(leak["uris"]) == [str(root / "copy_of_good0.jpg"), str(root / "good0.jpg")]
    assert leak["splits"] == ["test", "train"]
    assert leak["sha256"] == hashlib.sha256((root / "good0.jpg").read_bytes()).hexdigest()
    assert pq.read_table(report.leakage_uri).num_rows == 1
    summary = report.summary()
    assert "14 rows -> 7 accepted, 7 rejected" in summary and "leakage: 1" in summary


def test_cli_prints_summary(manifest_uri, tmp_path, capsys):
    assert spai(["validate", manifest_uri, "--output", str(tmp_path / "v"), "--max-pixels", str(MAX_PIXELS)]) == 0
    out = capsys.readouterr().out
    assert "decompression_bomb" in out and "leakage: 1" in out
    assert spai(["validate", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_default_pixel_limit_accepts_the_large_photo(manifest_uri, tmp_path):
    report = validate_manifest(manifest_uri, str(tmp_path / "v"))
    assert report.reasons.get("decompression_bomb") == 1  # only the forged 10-gigapixel header
    assert report.accepted == 8
