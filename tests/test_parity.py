"""Parity with the official SPAI model on the fixture images (full ViT-B/16, official-layout loader)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from parity import FIXTURE, RECIPE_SHA256, expected_rows, recipe_sha256, recipe_state_dict, write_official_checkpoint
from spai_core.checkpoint import load_model
from spai_core.detector import Detector, image_to_tensor
from spai_core.filters import frequency_mask, split_frequencies


@pytest.fixture(scope="module")
def official_model(tmp_path_factory):
    torch.set_num_threads(2)
    path = write_official_checkpoint(tmp_path_factory.mktemp("w") / "spai_parity.pth")
    model, ckpt = load_model(path)
    return model, path


def test_recipe_matches_fixture_checksum():
    assert recipe_sha256(recipe_state_dict()) == RECIPE_SHA256


def test_filter_is_bit_exact():
    ref = np.load(FIXTURE / "filter.npz")
    np.testing.assert_array_equal(frequency_mask().numpy(), ref["mask"])
    assert int(frequency_mask().sum()) == 856
    x = image_to_tensor(Image.open(FIXTURE / "images" / "pub03_512x512_rgb.png"))[:, :224, :224]
    np.testing.assert_array_equal(x.numpy(), ref["x"])  # uint8 * float32(1/255), not division
    low, high = split_frequencies(x[None], frequency_mask())
    np.testing.assert_allclose(low[0].numpy(), ref["low"], atol=1e-6)
    np.testing.assert_allclose(high[0].numpy(), ref["high"], atol=1e-6)


def test_descriptors_and_logits_match_official(official_model):
    model, path = official_model
    descriptors = np.load(FIXTURE / "descriptors.npz")
    rows = expected_rows()
    images = [image_to_tensor(Image.open(FIXTURE / "images" / r["image"])) for r in rows]
    with torch.inference_mode():
        logits, _, plans = model.forward_images(images, return_attention=True)
        for row, (padded, offsets) in zip(rows, plans):
            assert len(offsets) == int(row["n_patches"])
            tiles = torch.stack([padded[:, r:r + 224, c:c + 224] for r, c in offsets])
            desc = model.mfvit(tiles).numpy()
            np.testing.assert_allclose(desc, descriptors[row["image"]], atol=1e-5, rtol=0)
            np.testing.assert_allclose(desc[:, :72], descriptors[row["image"] + ":sims"], atol=1e-5, rtol=0)
    expected = np.array([float(r["logit"]) for r in rows], dtype=np.float32)
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_detector_scores_match_expected(official_model):
    _, path = official_model
    rows = expected_rows()[:3]
    det = Detector.from_pretrained(path, device="cpu", precision="fp32")
    scores = det.score([Image.open(FIXTURE / "images" / r["image"]) for r in rows])
    np.testing.assert_allclose(scores, [float(r["score"]) for r in rows], rtol=1e-4)
