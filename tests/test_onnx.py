"""ONNX export and the onnxruntime path: the FFT-free split is the official filter, the exported graphs score real
photos as PyTorch fp32 does (tiny model; the full ViT-B/16 against the official parity fixtures), an altered export
is refused, and ``spai export onnx --validate`` reports the errors."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from parity import FIXTURE, expected_rows, write_official_checkpoint
from spai_cli.main import main as spai
from spai_core.checkpoint import save_checkpoint
from spai_core.detector import Detector, file_sha256, image_to_tensor
from spai_core.export import MatrixFrequencySplit, export_checkpoint
from spai_core.filters import frequency_mask, split_frequencies
from spai_core.onnx_runtime import OnnxDetector, OnnxExportError, read_manifest
from spai_core.spai import build_model

THRESHOLD = {"value": 0.25, "target": "test"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, photos):
    """The tiny model exported by ``spai export onnx --validate`` on two real photos: checkpoint, folder, exit status
    and console output."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    checkpoint = root / "tiny.safetensors"
    save_checkpoint(checkpoint, build_model("spai_tiny"), {"threshold": THRESHOLD})
    two = [str(p) for p in photos if p.name in ("skimage__chelsea.jpg", "skimage__astronaut.jpg")]
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        status = spai(["export", "onnx", str(checkpoint), "-o", str(root / "export"), "--validate", "--images", *two])
    return checkpoint, root / "export", status, console.getvalue()


def test_matrix_split_is_the_official_filter():
    """The DFT as matrix products over the kept band gives the official low/high images, for another radius too."""
    ref = np.load(FIXTURE / "filter.npz")
    low, high = MatrixFrequencySplit(frequency_mask())(torch.from_numpy(ref["x"])[None])
    np.testing.assert_allclose(low[0].numpy(), ref["low"], atol=2e-6)
    np.testing.assert_allclose(high[0].numpy(), ref["high"], atol=2e-6)
    x = torch.rand(2, 3, 224, 224)
    wide = frequency_mask(224, 40)
    for got, want in zip(MatrixFrequencySplit(wide)(x), split_frequencies(x, wide)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-6)


def test_cli_exports_and_validates_on_real_photos(exported):
    checkpoint, folder, status, console = exported
    assert status == 0, console
    assert "max |d|" in console and "skimage__chelsea.jpg" in console and "within rtol" in console
    manifest = json.loads((folder / "spai_onnx.json").read_text())
    pre = manifest["preprocessing"]
    assert (pre["tile_size"], pre["mask_radius"], pre["minimum_patches"], pre["max_tiles"]) == (224, 16, 4, None)
    assert pre["normalisation"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert manifest["source"]["sha256"] == file_sha256(checkpoint)
    assert manifest["encoder"]["sha256"] == file_sha256(folder / "tile_encoder.onnx")
    assert (folder / "export.config.yaml").is_file()


def test_onnxruntime_scores_a_mixed_batch_as_pytorch(exported, photos):
    """Padding (a side under 224), five-crop, grid tiles and chunks of tiles that straddle images: same logits,
    descriptors for any tile count, attention that sums to 1, and the checkpoint's threshold carried along."""
    checkpoint, folder, _, _ = exported
    small = Image.open(photos[0]).convert("RGB").resize((300, 180))
    images = [small, *[p for p in photos if p.name in ("skimage__coffee.jpg", "skimage__astronaut.jpg")]]
    reference = Detector.from_pretrained(checkpoint, "cpu", "fp32", fuse_cpu=False)
    onnx = OnnxDetector(folder, "cpu", feature_batch=3)
    np.testing.assert_allclose(onnx.logits(images), reference.logits(images), rtol=1e-4, atol=1e-6)
    tiles = torch.stack([image_to_tensor(photos[1])[:, :224, :224], torch.rand(3, 224, 224)]).repeat(4, 1, 1, 1)[:7]
    with torch.inference_mode():
        want = reference.model.describe(tiles).numpy()
    for count in (1, 7):
        np.testing.assert_allclose(onnx.describe(tiles[:count].numpy()), want[:count], rtol=1e-4, atol=1e-5)
    _, attention = onnx.pool(onnx.describe(tiles.numpy()))
    np.testing.assert_allclose(attention.sum(axis=-1), 1, atol=1e-5)
    assert attention.shape == (reference.config.sca_heads, 7)
    assert onnx.provenance["threshold"] == THRESHOLD and onnx.model_id.startswith("onnx-")
    assert onnx.num_tiles(180, 300) == reference.num_tiles(180, 300) == 5


def test_an_altered_or_incomplete_export_is_refused(exported, tmp_path):
    _, folder, _, _ = exported
    copy = shutil.copytree(folder, tmp_path / "copy")
    with open(copy / "aggregator.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(OnnxExportError, match="differs from the hash"):
        read_manifest(copy)
    (copy / "aggregator.onnx").unlink()
    with pytest.raises(OnnxExportError, match="missing"):
        read_manifest(copy)
    with pytest.raises(OnnxExportError, match="no spai_onnx.json"):
        OnnxDetector(tmp_path)
    with pytest.raises(OnnxExportError, match="fp32"):
        OnnxDetector.from_pretrained(folder, precision="bf16")


def test_vit_b_export_matches_the_official_parity_fixtures(tmp_path):
    """The full ViT-B/16 graph under onnxruntime against the official model's logits (1e-4 relative)."""
    torch.set_num_threads(2)
    checkpoint = write_official_checkpoint(tmp_path / "spai_parity.pth")
    export_checkpoint(checkpoint, tmp_path / "export")
    checkpoint.unlink()
    # One image: its five-crop is one distinct tile, so the check costs three ViT-B passes (tiling is checked above).
    rows = [r for r in expected_rows() if r["image"].startswith("pub01")]
    logits = OnnxDetector(tmp_path / "export", "cpu").logits([FIXTURE / "images" / r["image"] for r in rows])
    np.testing.assert_allclose(logits, [float(r["logit"]) for r in rows], rtol=1e-4, atol=1e-5)
