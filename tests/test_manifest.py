"""Manifest builders on every supported layout, made of real (down-scaled) photos, on disk and under s3://."""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data import manifest as m
from pipelines.infra.storage import StorageError
from s3server import upload_folder
from spai_cli.main import main as spai

GENIMAGE_FOLDERS = {
    "imagenet_ai_0419_sdv4": "sdv4", "imagenet_ai_0424_wukong": "wukong", "imagenet_ai_0508_adm": "adm",
    "imagenet_ai_0419_vqdm": "vqdm", "imagenet_ai_0424_sdv5": "sdv5", "imagenet_glide": "glide",
    "imagenet_midjourney": "midjourney", "imagenet_biggan": "biggan",
}
# The mini_gen fork (seed 000): seven generators, BigGAN under its dated name, same train|val / ai|nature layout.
MINI_GEN_FOLDERS = ["imagenet_ai_0419_biggan", "imagenet_ai_0419_vqdm", "imagenet_ai_0424_sdv5",
                    "imagenet_ai_0424_wukong", "imagenet_ai_0508_adm", "imagenet_glide", "imagenet_midjourney"]


def make_photos(photos: Sequence[Path], paths: Sequence[Path], size: tuple[int, int] = (64, 48)) -> list[Path]:
    """Write small copies of distinct real photos to ``paths`` (format from the suffix); return the paths."""
    sources = sorted(photos, key=lambda p: p.stat().st_size)
    for i, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(sources[i % len(sources)]) as img:
            img.draft("RGB", (size[0] * 2, size[1] * 2))  # fast JPEG down-scaled decode; content stays distinct
            img.convert("RGB").resize(size).save(path)
    return list(paths)


def _genimage_tree(root: Path, folders: Sequence[str], photos: Sequence[Path]) -> None:
    paths = []
    for folder in folders:
        gen = m.genimage_generator(folder)
        for split in ("train", "val"):
            for k in range(2):
                paths.append(root / folder / split / "ai" / f"{k:03d}_{gen}_{k:05d}.png")
                paths.append(root / folder / split / "nature" / f"n0144076{k}_{k}.JPEG")
    make_photos(photos, paths)


@pytest.fixture(scope="module")
def genimage(tmp_path_factory, photos) -> Path:
    root = tmp_path_factory.mktemp("genimage")
    _genimage_tree(root, list(GENIMAGE_FOLDERS), photos)
    (root / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory, photos) -> Path:
    """real/ (nested) with 8 photos and fakes named after 3 of them: waifu2x/<stem>_waifu2x.png, cugan/..."""
    root = tmp_path_factory.mktemp("folders")
    reals = make_photos(photos, [root / "real" / ("a" if i % 2 else "b") / f"photo{i}.jpg" for i in range(8)])
    fakes = [root / gen / f"{reals[i].stem}_{gen}.png" for gen in ("waifu2x", "cugan") for i in range(3)]
    make_photos(photos, fakes)
    return root


def test_genimage_all_eight_generators(genimage):
    table = m.from_genimage(str(genimage))
    assert table.schema.equals(m.MANIFEST_SCHEMA)
    rows = table.to_pylist()
    assert len(rows) == 8 * 2 * 2 * 2
    assert {r["generator"] for r in rows if r["label"] == 1} == set(GENIMAGE_FOLDERS.values())
    nature = [r for r in rows if "/nature/" in r["uri"]]
    assert all(r["label"] == 0 and r["generator"] == "real" for r in nature)
    assert {r["source"] for r in nature} == {f"genimage/{f}" for f in GENIMAGE_FOLDERS}
    assert {r["split"] for r in rows if "/val/" in r["uri"]} == {"test"}
    assert {r["split"] for r in rows if "/train/" in r["uri"]} == {"train"}
    assert all(Path(r["uri"]).is_absolute() and Path(r["uri"]).is_file() for r in rows)
    glide = next(r for r in rows if r["uri"].endswith("imagenet_glide/train/ai/001_glide_00001.png"))
    assert glide["group"] == "imagenet_glide/001"


def test_genimage_generator_filter_and_val_fraction(genimage):
    table = m.from_genimage(str(genimage), generators=["imagenet_glide", "midjourney"])
    assert set(table.column("source").to_pylist()) == {"genimage/imagenet_glide", "genimage/imagenet_midjourney"}
    with pytest.raises(m.ManifestError, match="--generators midjourny: no such generator folder.*imagenet_glide"):
        m.from_genimage(str(genimage), generators=["imagenet_glide", "midjourny"])
    with pytest.raises(m.ManifestError, match="--val-fraction must be at least 0 and below 1, got 1.5"):
        m.from_genimage(str(genimage / "nowhere"), val_fraction=1.5)  # refused before listing
    carved = m.from_genimage(str(genimage), val_fraction=0.5, seed=3).to_pylist()
    assert {r["split"] for r in carved} == {"train", "val", "test"}
    assert not [r for r in carved if "/val/" in r["uri"] and r["split"] != "test"]
    splits_of_group: dict[str, set] = {}
    for r in carved:
        splits_of_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for g, s in splits_of_group.items() if "test" not in s)
    assert carved == m.from_genimage(str(genimage), val_fraction=0.5, seed=3).to_pylist()


def test_mini_gen_subset_nested_in_download_folders(tmp_path, photos):
    root = tmp_path / "dataset" / "mini_gen"
    _genimage_tree(root, MINI_GEN_FOLDERS, photos)
    shutil.move(root / "imagenet_glide", tmp_path / "glide_download")  # the benchmark ships GLIDE/imagenet_glide/...
    (root / "GLIDE").mkdir()
    shutil.move(tmp_path / "glide_download", root / "GLIDE" / "imagenet_glide")
    table = m.from_genimage(str(root))
    generators = set(table.column("generator").to_pylist())
    assert generators == {"biggan", "vqdm", "sdv5", "wukong", "adm", "glide", "midjourney", "real"}
    assert table.num_rows == 7 * 8


def test_write_read_roundtrip_and_sidecar(genimage, tmp_path):
    table = m.from_genimage(str(genimage))
    uri = m.write_manifest(table, str(tmp_path / "man"), {"builder": "genimage", "arguments": {"root": "x"}})
    back = m.read_manifest(uri)
    assert back.schema.equals(m.MANIFEST_SCHEMA)
    key = ["uri"]
    assert back.sort_by([(k, "ascending") for k in key]).equals(table.sort_by([(k, "ascending") for k in key]))
    sidecar = json.loads((tmp_path / "man" / m.SIDECAR).read_text())
    assert sidecar["schema_version"] == m.SCHEMA_VERSION
    assert sidecar["counts"]["split"] == {"test": 32, "train": 32}
    assert sidecar["counts"]["label"] == {"0": 32, "1": 32}
    assert sidecar["build"]["builder"] == "genimage" and sidecar["build"]["created"]
    assert sidecar["build"]["notes"]["skipped"]["count"] == 1  # README.txt is reported, not silently dropped
    assert len(sidecar["files"]) == 2 * 9  # one file per split and generator (8 generators + real)
    assert all((tmp_path / "man" / f["path"]).is_file() for f in sidecar["files"])
    assert {f["path"].split("/")[0] for f in sidecar["files"]} == {"train", "test"}
    # the folder is a plain Parquet dataset too (pandas.read_parquet and Spark read it the same way): same rows
    assert pq.read_table(uri).sort_by("uri").select(back.column_names).cast(back.schema).equals(back.sort_by("uri"))


def test_a_manifest_written_in_batches_in_any_order_holds_every_row_once(genimage, tmp_path, monkeypatch):
    """ManifestWriter (what ``spai validate`` streams into): batches mixing splits and generators go to one file per
    split and generator, each of at most ROWS_PER_FILE rows in the order they came; the counts are the whole's."""
    from pipelines.data.manifest.io import ManifestWriter

    monkeypatch.setattr(m.io, "ROWS_PER_FILE", 3)
    monkeypatch.setattr(m.io, "FLUSH_ROWS", 2)
    table = m.from_genimage(str(genimage))
    shuffled = table.take(list(range(1, table.num_rows, 2)) + list(range(0, table.num_rows, 2)))
    writer = ManifestWriter(str(tmp_path / "man"))
    for start in range(0, shuffled.num_rows, 5):
        writer.write(shuffled.slice(start, 5))
    uri = writer.close({"builder": "test"})
    sidecar = json.loads((tmp_path / "man" / m.SIDECAR).read_text())
    assert sidecar["counts"] == m.count_summary(table)
    written: dict[tuple, list[str]] = {}
    for entry in sidecar["files"]:
        rows = pq.read_table(tmp_path / "man" / entry["path"])
        assert 0 < rows.num_rows == entry["rows"] <= 3
        assert set(rows.column("split").to_pylist()) == {entry["split"]}
        assert set(rows.column("generator").to_pylist()) == {entry["generator"]}
        written.setdefault((entry["split"], entry["generator"]), []).extend(rows.column("uri").to_pylist())
    for (split, generator), uris in written.items():
        assert uris == [r["uri"] for r in shuffled.to_pylist() if (r["split"], r["generator"]) == (split, generator)]
    assert m.read_manifest(uri).sort_by("uri").equals(table.sort_by("uri"))
    assert len(sidecar["files"]) == sum(-(-n // 3) for n in table.group_by(["split", "generator"]).aggregate(
        [("uri", "count")]).column("uri_count").to_pylist())


def test_a_manifest_with_the_old_sidecar_name_is_read_and_rewritten_with_the_new(genimage, tmp_path):
    out = tmp_path / "man"
    m.write_manifest(m.from_genimage(str(genimage)), str(out), {"builder": "a"})
    (out / m.SIDECAR).rename(out / m.LEGACY_SIDECAR)
    assert m.read_sidecar(str(out))["build"]["builder"] == "a" and m.read_manifest(str(out)).num_rows == 64
    m.write_manifest(m.read_manifest(str(out)).slice(0, 3), str(out), {"builder": "b"})
    assert not (out / m.LEGACY_SIDECAR).exists() and m.read_manifest(str(out)).num_rows == 3
    assert len(list(out.rglob("*.parquet"))) == len(m.read_sidecar(str(out))["files"])


def test_overwrite_replaces_old_files_and_refuses_foreign_folder(genimage, tmp_path):
    table = m.from_genimage(str(genimage))
    out = tmp_path / "man"
    m.write_manifest(table, str(out), {"builder": "a"})
    m.write_manifest(table.slice(0, 3), str(out), {"builder": "b"})
    assert m.read_manifest(str(out)).num_rows == 3
    assert len(list(out.rglob("*.parquet"))) == len(json.loads((out / m.SIDECAR).read_text())["files"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("precious")
    with pytest.raises(m.ManifestError, match="not a manifest"):
        m.write_manifest(table, str(tmp_path / "other"), {"builder": "c"})


def test_official_csv_with_extra_column(folders, tmp_path):
    csv_path = folders / "mixed.csv"
    csv_path.write_text("image,class,split,quality\n"
                        "real/a/photo1.jpg,0,train,high\n"
                        "waifu2x/photo1_waifu2x.png,1,test,low\n"
                        f"{folders / 'real' / 'b' / 'photo0.jpg'},0,val,\n")
    rows = m.from_spai_csv(str(csv_path), generator="waifu2x").to_pylist()
    assert [r["uri"] for r in rows] == [str(folders / "real/a/photo1.jpg"), str(folders / "waifu2x/photo1_waifu2x.png"),
                                        str(folders / "real/b/photo0.jpg")]
    assert [r["label"] for r in rows] == [0, 1, 0]
    assert [r["generator"] for r in rows] == ["real", "waifu2x", "real"]
    assert [r["quality"] for r in rows] == ["high", "low", ""]
    assert rows[0]["image"] == "real/a/photo1.jpg" and rows[0]["source"] == "mixed" and rows[0]["group"] == "photo1"
    other_root = m.from_spai_csv(str(csv_path), root="/data").column("uri").to_pylist()
    assert other_root[0] == "/data/real/a/photo1.jpg"


def test_official_csv_errors_name_the_problem(tmp_path):
    (tmp_path / "nocol.csv").write_text("image,split\nx.png,test\n")
    with pytest.raises(m.ManifestError, match=r"\['class'\]"):
        m.from_spai_csv(str(tmp_path / "nocol.csv"))
    (tmp_path / "bad.csv").write_text("image,class,split\nx.png,2,test\ny.png,1,dev\n")
    with pytest.raises(m.ManifestError, match=r"line 2: class '2'.*line 3: split 'dev'"):
        m.from_spai_csv(str(tmp_path / "bad.csv"))


def test_folders_balance_and_group_split(folders):
    table = m.from_folders([str(folders / "real")], {"waifu2x": str(folders / "waifu2x"),
                                                     "cugan": str(folders / "cugan")}, fractions=(0.5, 0.25, 0.25))
    rows = table.to_pylist()
    assert len(rows) == 8 + 6
    by_group: dict[str, set] = {}
    for r in rows:
        by_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_group.values()), by_group
    assert len(by_group["photo0"]) == 1 and sum(r["group"] == "photo0" for r in rows) == 3  # real + 2 fakes
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    balanced = m.from_folders([str(folders / "real")], [str(folders / "waifu2x"), str(folders / "cugan")],
                              balance=True, seed=1)
    assert balanced.column("label").to_pylist().count(0) == 6
    assert set(balanced.column("generator").to_pylist()) == {"real", "waifu2x", "cugan"}
    assert balanced.equals(m.from_folders([str(folders / "real")], [str(folders / "waifu2x"),
                                                                    str(folders / "cugan")], balance=True, seed=1))
    by_folder = m.from_folders([str(folders / "real")], [str(folders / "waifu2x")], group_by="folder").to_pylist()
    assert {r["group"] for r in by_folder if r["label"] == 0} == {"a", "b"}
    with pytest.raises(m.ManifestError, match="summing to 1"):
        m.from_folders([str(folders / "nowhere")], [str(folders / "waifu2x")], fractions=(0.5, 0.5, 0.5))


def test_a_file_labelled_both_real_and_fake_is_refused(folders, tmp_path):
    overlapping = m.from_folders([str(folders)], [str(folders / "waifu2x")])  # the fakes sit inside the real root
    with pytest.raises(m.ManifestError, match=r"3 file\(s\) are labelled both 0 \(real\) and 1 .*waifu2x.*overlap"):
        m.write_manifest(overlapping, str(tmp_path / "m"), {"builder": "test"})


def test_assign_splits_keeps_groups_whole_and_tracks_fractions():
    groups = [f"g{i // 3}" for i in range(300)]
    splits = m.assign_splits(groups, (0.8, 0.1, 0.1), seed=7)
    assert all(len({s for g2, s in zip(groups, splits) if g2 == g}) == 1 for g in set(groups))
    assert abs(splits.count("train") - 240) <= 3 and abs(splits.count("val") - 30) <= 3
    with pytest.raises(m.ManifestError, match="summing to 1"):
        m.assign_splits(groups, (0.8, 0.3, 0.1))


def test_resolve_input_finds_images_by_content(folders, tmp_path, photos):
    folder = tmp_path / "inbox"
    make_photos(photos, [folder / "a.jpg", folder / "b.png"])
    (folder / "b.png").rename(folder / "no_extension")
    (folder / "notes.jpg").write_text("text pretending to be a JPEG")
    (folder / "sub").mkdir()
    make_photos(photos, [folder / "sub" / "deeper.png"])
    (folder / "notes.txt").write_text("neither named nor sniffed as an image")
    table = m.resolve_input(str(folder))
    # named or sniffed as images (a bad one is a row, to fail with its reason); not recursive, as the official code
    assert table.column("image").to_pylist() == ["a.jpg", "no_extension", "notes.jpg"]
    assert table.column("label").null_count == 3 and set(table.column("split").to_pylist()) == {"test"}
    assert m.resolve_input(str(folder), recursive=True).num_rows == 4
    one = m.resolve_input(str(folder / "a.jpg"))  # one image: a folder of one
    assert (one.column("uri").to_pylist(), one.column("image").to_pylist()) == ([str(folder / "a.jpg")], ["a.jpg"])
    with pytest.raises(m.ManifestError, match="none named or sniffed as an image"):
        m.resolve_input(str(folder / "notes.txt"))
    csv_path = folders / "one.csv"
    csv_path.write_text("image,class,split\nreal/a/photo1.jpg,0,test\n")
    assert m.resolve_input(str(csv_path)).column("uri").to_pylist() == [str(folders / "real/a/photo1.jpg")]
    images_only = folders / "images_only.csv"  # scoring needs no labels
    images_only.write_text("image\nreal/a/photo1.jpg\n")
    row = m.resolve_input(str(images_only)).to_pylist()[0]
    assert (row["label"], row["split"], row["generator"]) == (None, "test", None)
    with pytest.raises(m.ManifestError, match="lacks column"):
        m.from_spai_csv(str(images_only))  # a training manifest does
    images_only.write_text("image,class\nreal/a/photo1.jpg,2\n")
    with pytest.raises(m.ManifestError, match="class '2' is not 0"):
        m.resolve_input(str(images_only))
    man = m.write_manifest(m.resolve_input(str(folder)), str(tmp_path / "man"), {"builder": "dir"})
    assert m.resolve_input(man).num_rows == 3
    with pytest.raises(StorageError, match="does not exist"):
        m.resolve_input(str(tmp_path / "missing"))


def test_read_manifest_names_missing_or_mistyped_columns(tmp_path):
    good = m.rows_to_table([{"uri": "/x.png", "label": 1, "split": "test", "generator": "g", "source": "s",
                             "group": "x"}])
    pq.write_table(good.drop_columns(["group"]), tmp_path / "nogroup.parquet")
    with pytest.raises(m.ManifestError, match=r"\['group'\]"):
        m.read_manifest(str(tmp_path / "nogroup.parquet"))
    bad = good.set_column(1, "label", pa.array(["fake"]))
    pq.write_table(bad, tmp_path / "badlabel.parquet")
    with pytest.raises(m.ManifestError, match="column 'label'"):
        m.read_manifest(str(tmp_path / "badlabel.parquet"))
    with pytest.raises(StorageError, match="does not exist"):
        m.read_manifest(str(tmp_path / "nowhere"))
    with pytest.raises(m.ManifestError, match="column 'split'.*'dev'"):
        m.write_manifest(good.set_column(2, "split", pa.array(["dev"])), str(tmp_path / "o"), {})


def test_cli_builds_folders_manifest(folders, tmp_path, capsys):
    out = tmp_path / "cli"
    code = spai(["manifest", "folders", "--real", str(folders / "real"), "--fake", f"w2x={folders / 'waifu2x'}",
                 "--balance", "--split", "0.6,0.2,0.2", "--seed", "5", "--output", str(out)])
    assert code == 0
    assert "wrote 6 rows" in capsys.readouterr().out
    sidecar = json.loads((out / m.SIDECAR).read_text())
    assert sidecar["build"]["builder"] == "folders" and sidecar["build"]["config"]["seed"] == 5
    assert sidecar["build"]["notes"]["balanced"] == {"reals_found": 8, "reals_kept": 3}
    assert spai(["manifest", "csv", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_builders_under_s3_prefix(s3_server, genimage, folders, tmp_path):
    s3_root = upload_folder(s3_server, genimage, "genimage", "bench")
    local = m.from_genimage(str(genimage)).to_pylist()
    remote = m.from_genimage(s3_root).to_pylist()
    assert [r["uri"].replace(s3_root, str(genimage)) for r in remote] == [r["uri"] for r in local]
    assert [{k: v for k, v in r.items() if k != "uri"} for r in remote] == [
        {k: v for k, v in r.items() if k != "uri"} for r in local]
    s3_folders = upload_folder(s3_server, folders, "folders")
    remote_folders = m.from_folders([f"{s3_folders}/real"], [f"{s3_folders}/waifu2x"], balance=True)
    local_folders = m.from_folders([str(folders / "real")], [str(folders / "waifu2x")], balance=True)
    assert remote_folders.column("split").to_pylist() == local_folders.column("split").to_pylist()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "list.csv").write_text("image,class,split\nreal/a/photo1.jpg,0,test\n")
    csv_uri = upload_folder(s3_server, tmp_path / "c", "folders", "csvs")
    assert m.from_spai_csv(f"{csv_uri}/list.csv", root=s3_folders).column("uri").to_pylist() == [
        f"{s3_folders}/real/a/photo1.jpg"]
    uri = m.write_manifest(remote_folders, "s3://folders/manifests/m1", {"builder": "folders"})
    assert m.read_manifest(uri).equals(m.read_manifest(m.write_manifest(remote_folders, str(tmp_path / "m"), {})))
    assert m.resolve_input(f"{s3_folders}/real/a").num_rows == 4


def test_rows_keep_extra_keys_and_name_bad_columns(tmp_path):
    row = {"uri": "/a.png", "label": 1, "split": "test", "generator": "g", "source": "s", "group": "a", "prompt": "cat"}
    back = m.read_manifest(m.write_manifest([row], str(tmp_path / "m"), {"builder": "rows"}))
    assert back.column_names == [*m.CORE_COLUMNS, "prompt"] and back.column("prompt").to_pylist() == ["cat"]
    with pytest.raises(m.ManifestError, match="column 'label'"):
        m.rows_to_table([{**row, "label": "fake"}])


def test_summary_warns_of_a_split_without_both_classes():
    def rows(*split_labels):
        return m.rows_to_table([{"uri": f"/x/{i}.png", "label": label, "split": split, "generator": "g",
                                 "source": "s", "group": str(i)} for i, (split, label) in enumerate(split_labels)])

    assert "warning" not in m.format_summary(rows(("train", 0), ("train", 1), ("val", 0), ("val", 1), ("test", 1)))
    summary = m.format_summary(rows(("train", 0), ("train", 1), ("val", 1), ("test", 1)))
    assert [line for line in summary.splitlines() if line.startswith("warning")] == [
        "warning: split val lacks real or AI-generated images, so training cannot use it fully (val AUC is undefined; "
        "a train split needs both); add images or change --split / --seed"]


def test_summary_notes_when_no_real_image_shares_a_group_with_a_fake():
    def rows(*groups):
        return m.rows_to_table([{"uri": f"/x/{i}.png", "label": i % 2, "split": "train", "generator": "g",
                                 "source": "s", "group": group} for i, group in enumerate(groups)])

    assert "note: 4 groups for 4 images, none shared" in m.format_summary(rows("a", "b", "c", "d"), True)
    assert "note:" not in m.format_summary(rows("a", "a", "b", "b"), True)  # each photo with its fake
    assert "note:" not in m.format_summary(rows("a", "b", "c", "d"))  # a CSV or GenImage layout gives the splits


def test_folders_of_one_generator_name_are_one_generator(folders):
    """e.g. a generator's train/ and val/ folders, or ``--fake up=a/fake up=b/fake``."""
    fakes = m.parse_fakes([f"up={folders / 'waifu2x'}", f"up={folders / 'cugan'}", str(folders / "cugan")])
    assert fakes == {"up": [str(folders / "waifu2x"), str(folders / "cugan")], "cugan": [str(folders / "cugan")]}
    table = m.from_folders([str(folders / "real")], {"up": fakes["up"]})
    assert table.column("generator").to_pylist().count("up") == 6
    assert m.from_folders([str(folders / "real")], [str(folders / "cugan"), str(folders / "cugan")]).equals(
        m.from_folders([str(folders / "real")], {"cugan": [str(folders / "cugan")] * 2}))


def test_overlapping_folders_list_each_file_once_and_hidden_files_are_counted(folders, tmp_path, caplog):
    """A folder given twice, or inside another of its class, lists its images and skipped files once; hidden files
    are skipped and said so (how many, and why)."""
    root = tmp_path / "data"
    shutil.copytree(folders / "real", root / "real")
    shutil.copytree(folders / "waifu2x", root / "waifu2x")
    (root / "real" / "notes.txt").write_text("not an image")
    (root / "real" / ".DS_Store").write_bytes(b"\0")
    (root / "waifu2x" / "._photo0_waifu2x.png").write_bytes(b"\0")
    table = m.from_folders([str(root / "real"), str(root / "real"), str(root / "real" / "a")], [str(root / "waifu2x")])
    assert table.num_rows == 8 + 3 and len(set(table.column("uri").to_pylist())) == table.num_rows
    notes = json.loads(table.schema.metadata[m.NOTES_KEY])
    assert notes["skipped"]["count"] == 1 and notes["skipped"]["examples"] == [str(root / "real" / "notes.txt")]
    assert notes["hidden"]["count"] == 2 and "starts with '.'" in notes["hidden"]["why"]
    assert "skipped 2 file(s) whose name or folder starts with '.'" in caplog.text


def test_an_existing_manifest_is_replaced_only_with_overwrite(folders, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["manifest", "folders", "--real", str(folders / "real"), "--fake", str(folders / "cugan"), "-o", str(out)]
    assert spai(args) == 0
    first = (out / m.SIDECAR).read_text()
    assert spai(args + ["--seed", "3"]) == 2
    assert "already holds a manifest; pass --overwrite" in capsys.readouterr().err
    assert (out / m.SIDECAR).read_text() == first  # left as it was
    assert spai(args + ["--seed", "3", "--overwrite"]) == 0
    assert m.read_sidecar(str(out))["build"]["config"]["seed"] == 3


def test_a_saved_config_rebuilds_the_same_manifest_and_a_bad_value_names_its_flag(folders, tmp_path, capsys):
    out = tmp_path / "first"
    assert spai(["manifest", "folders", "--real", str(folders / "real"), "--fake", f"w2x={folders / 'waifu2x'}",
                 "--split", "0.5,0.25,0.25", "--seed", "4", "--group-by", "folder", "-o", str(out)]) == 0
    saved = out / m.CONFIG_FILE
    assert spai(["manifest", "folders", "--config", str(saved), "-o", str(tmp_path / "again")]) == 0
    assert m.read_manifest(str(tmp_path / "again")).equals(m.read_manifest(str(out)))
    capsys.readouterr()
    assert spai(["manifest", "folders", "--config", str(saved), "--split", "0.5,0.6,0.1", "-o", str(tmp_path / "x")]) \
        == 2
    assert capsys.readouterr().err.startswith("error: --split (split): split fractions must be three non-negative")
    assert spai(["manifest", "genimage", "--output", str(tmp_path / "g")]) == 2
    assert "ROOT (root): give the GenImage root" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "g").exists()
