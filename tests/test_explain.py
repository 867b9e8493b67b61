"""``spai explain``: a real photo gets an overlay PNG whose tile weights sum to 1 and match the Detector's
explanation; a bad file is a row with its error; the index lists both."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.explain.overlay import read_tiles
from spai_cli.main import main as spai
from spai_core.checkpoint import save_checkpoint
from spai_core.detector import Detector
from spai_core.spai import build_model


def test_explain_draws_tile_attention_and_records_bad_files(tmp_path, photos):
    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_checkpoint(weights, build_model("spai_tiny"))
    photo = next(p for p in photos if p.name == "skimage__astronaut.jpg")  # 512 x 512: a 2 x 2 grid
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(photo.read_bytes()[:1500])
    out = tmp_path / "explained"
    assert spai(["explain", str(photo), str(bad), "-o", str(out), "--weights", str(weights)]) == 0
    rows = {r["image"]: r for r in csv.DictReader(open(out / "explain.csv"))}
    assert rows[str(bad)]["error"].startswith("truncated") and not rows[str(bad)]["overlay"]
    good = rows[str(photo)]
    assert not good["error"] and good["tiles"] == "4"
    overlay = out / good["overlay"]
    tiles = read_tiles(overlay)
    assert sum(tiles["weights"]) == pytest.approx(1, abs=1e-5)
    assert tiles["offsets"] == [[0, 0], [0, 224], [224, 0], [224, 224]]
    expected = Detector.from_pretrained(weights, "cpu", "fp32").explain(photo)
    np.testing.assert_allclose(tiles["weights"], expected.weights, rtol=1e-4)
    assert float(good["score"]) == pytest.approx(expected.score, rel=1e-5)
    with Image.open(overlay) as png:
        assert png.size[0] == 512 and png.size[1] > 512  # the image under a caption strip
        pixels = np.asarray(png.convert("RGB"))[-40:, -40:]  # bottom-right: outside the 448-px grid, dimmed
    assert pixels.mean() < np.asarray(Image.open(photo).convert("RGB"))[-40:, -40:].mean()
    index = (out / "index.md").read_text()
    assert good["overlay"] in index and "error: truncated" in index
    assert spai(["explain", str(bad), "-o", str(tmp_path / "none"), "--weights", str(weights)]) == 1
