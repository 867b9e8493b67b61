"""``spai validate`` as a Ray Data job: planted bad files get the right reason, good rows all survive, leakage, label
conflicts and duplicates show, and a validated manifest validates again."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data import manifest as m
from pipelines.data.decode import DecodeError, decode_image
from pipelines.data.validate import DUPLICATES_SCHEMA, LEAKAGE_SCHEMA, ValidationReport, validate_manifest
from spai_cli.main import main as spai
from test_manifest import make_photos

MAX_PIXELS = 100_000  # the 400x300 photo (120k pixels) is over it, the 64x48 ones are far below


pytestmark = pytest.mark.usefixtures("ray_session")


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
    assert pq.read_schema(report.leakage_uri).remove_metadata() == LEAKAGE_SCHEMA
    summary = report.summary()
    assert "14 rows -> 7 accepted, 7 rejected" in summary and "leakage: 1" in summary
    assert "label conflicts: 0" in summary and report.duplicates_uri in summary


def test_cli_prints_summary(manifest_uri, tmp_path, capsys):
    assert spai(["validate", manifest_uri, "--output", str(tmp_path / "v"), "--max-pixels", str(MAX_PIXELS)]) == 0
    out = capsys.readouterr().out
    assert "decompression_bomb" in out and "leakage: 1" in out
    assert spai(["validate", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _by_hash(findings: pa.Table) -> dict[str, tuple[list[str], list[str], list[int]]]:
    """{sha256: (sorted uris, splits, labels)}: Ray does not keep row order, so uris are compared sorted."""
    return {row["sha256"]: (sorted(row["uris"]), row["splits"], row["labels"]) for row in findings.to_pylist()}


@pytest.fixture(scope="module")
def copies(corpus, tmp_path_factory) -> tuple[dict[str, Path], ValidationReport]:
    """Byte copies under both labels and in one split; returns {name: path} and the validation report.

    ``a`` is real in train and also a train fake (label conflict, one extra copy in train); ``b`` is real twice in
    train (a plain duplicate); ``c`` is a real test photo and a val fake (conflict and leakage); ``d`` is unique.
    """
    root, _ = corpus
    folder = tmp_path_factory.mktemp("copies")
    sources = {"a": "good0.jpg", "a_fake": "good0.jpg", "b": "good1.png", "b_again": "good1.png", "c": "good2.jpg",
               "c_fake": "good2.jpg", "d": "good3.png"}
    paths = {name: Path(shutil.copy(root / source, folder / f"{name}{Path(source).suffix}"))
             for name, source in sources.items()}
    splits = {"c": "test", "c_fake": "val"}
    rows = [{"uri": str(path), "label": int(name.endswith("_fake")), "split": splits.get(name, "train"),
             "generator": "sdxl" if name.endswith("_fake") else "real", "source": "copies", "group": name}
            for name, path in paths.items()]
    manifest = m.write_manifest(rows, str(folder / "man"), {"builder": "test"})
    return paths, validate_manifest(manifest, str(folder / "validated"))


def test_label_conflicts_and_all_duplicates_are_listed(copies):
    paths, report = copies
    assert report.accepted == 7 and report.duplicates == 2 and report.duplicated == 3
    expected = {_sha(paths[name]): (sorted([str(paths[name]), str(paths[copy])]), splits, labels)
                for name, copy, splits, labels in (("a", "a_fake", ["train"], [0, 1]), ("b", "b_again", ["train"], [0]),
                                                   ("c", "c_fake", ["test", "val"], [0, 1]))}
    duplicates = pq.read_table(report.duplicates_uri)
    assert duplicates.schema.remove_metadata() == DUPLICATES_SCHEMA
    assert _by_hash(duplicates) == expected
    assert _by_hash(report.conflicts) == {h: expected[h] for h in (_sha(paths["a"]), _sha(paths["c"]))}
    assert [row["sha256"] for row in report.leakage.to_pylist()] == [_sha(paths["c"])]
    # its reports stay out of the validated manifest read as a plain Parquet dataset
    assert pq.read_table(report.output_uri).num_rows == report.accepted
    notes = json.loads((Path(report.output_uri) / m.SIDECAR).read_text())["build"]["notes"]
    assert notes == {"rejected": {}, "leakage_hashes": 1, "duplicates_within_split": 2, "label_conflict_hashes": 2,
                     "duplicated_hashes": 3}
    summary = report.summary()
    assert "label conflicts: 2 content hash(es)" in summary
    assert f"  {_sha(paths['a'])[:12]}  0,1  " in summary and f"  {_sha(paths['c'])[:12]}  0,1  " in summary
    assert "duplicates: 3 content hash(es) on more than one row, 2 extra copies within a split" in summary


def test_a_validated_manifest_validates_again_with_the_same_result(report, tmp_path):
    again = validate_manifest(report.output_uri, str(tmp_path / "again"), max_pixels=MAX_PIXELS)
    assert (again.total, again.accepted, again.rejected) == (report.accepted, report.accepted, 0)
    assert again.leakage.equals(report.leakage) and again.duplicates == report.duplicates
    first, second = m.read_manifest(report.output_uri), m.read_manifest(again.output_uri)
    assert second.column_names == first.column_names  # check columns replaced, not appended
    assert second.sort_by("uri").equals(first.sort_by("uri"))


def test_revalidation_checks_each_file_afresh(corpus, tmp_path):
    root, _ = corpus
    kept, cut = (Path(shutil.copy(root / name, tmp_path / name)) for name in ("good0.jpg", "good2.jpg"))
    rows = [{"uri": str(p), "label": 0, "split": "train", "generator": "real", "source": "s", "group": p.stem}
            for p in (kept, cut)]
    first = validate_manifest(m.write_manifest(rows, str(tmp_path / "man"), {"builder": "test"}))
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # damaged after the first validation
    again = validate_manifest(first.output_uri, str(tmp_path / "again"))
    assert again.reasons == {"truncated": 1} and again.accepted == 1
    rejected = pq.read_table(again.rejects_uri).to_pylist()[0]
    assert rejected["uri"] == str(cut) and rejected["bytes"] == len(data) // 2 and rejected["sha256"] == _sha(cut)
    assert m.read_manifest(again.output_uri).column("sha256").to_pylist() == [_sha(kept)]


def test_default_pixel_limit_accepts_the_large_photo(manifest_uri, tmp_path):
    report = validate_manifest(manifest_uri, str(tmp_path / "v"))
    assert report.reasons.get("decompression_bomb") == 1  # only the forged 10-gigapixel header
    assert report.accepted == 8


def test_max_pixels_governs_instead_of_pillows_global_limit(corpus, monkeypatch, recwarn):
    """Pillow warns above PIL.Image.MAX_IMAGE_PIXELS and refuses twice that (179 M pixels) whatever --max-pixels says;
    here its limit is lowered to 100 pixels so that a real photo plays a giant one."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = (corpus[0] / "good0.jpg").read_bytes()
    array, info = decode_image(data, max_pixels=10**8)
    assert array.shape == (info["height"], info["width"], 3) and info["width"] * info["height"] > 200
    assert Image.MAX_IMAGE_PIXELS == 100 and not [w for w in recwarn if "DecompressionBomb" in str(w.category)]
    with pytest.raises(DecodeError) as error:
        decode_image(data, max_pixels=150)
    assert error.value.reason == "decompression_bomb" and "--max-pixels" in str(error.value)


def test_a_saved_config_reruns_the_same_validation_and_a_bad_value_names_its_flag(report, tmp_path, capsys):
    saved = Path(report.output_uri) / m.CONFIG_FILE
    assert spai(["validate", "--config", str(saved), "--output", str(tmp_path / "again")]) == 0
    again, first = m.read_manifest(str(tmp_path / "again")), m.read_manifest(report.output_uri)
    assert again.sort_by("uri").equals(first.sort_by("uri"))
    capsys.readouterr()
    assert spai(["validate", "--config", str(saved), "--max-pixels", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-pixels (max_pixels): must be a positive number")


def test_a_bomb_beyond_pillows_limit_quotes_only_max_pixels():
    """Pillow refuses a 10-gigapixel header itself, with its own limit (178956970) in the message; the user's knob is
    max_pixels, so that is the limit to quote."""
    with pytest.raises(DecodeError) as error:
        decode_image(bomb_png())
    assert error.value.reason == "decompression_bomb"
    assert str(error.value).endswith("10000000000 pixels exceeds max_pixels=134217728; raise it with --max-pixels "
                                     "if the image is genuine")
