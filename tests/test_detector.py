"""``Detector``: what it takes as images, and the options ``from_pretrained`` accepts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from spai_core.checkpoint import save_checkpoint
from spai_core.detector import Detector
from spai_core.images import to_rgb_array
from spai_core.spai import build_model


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Detector:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_checkpoint(path, build_model("spai_tiny"))
    return Detector.from_pretrained(path, "cpu", "fp32")


@pytest.fixture(scope="module")
def photo(photos, tmp_path_factory):
    """A small photo as a file, and its pixels as the official reader gives them."""
    path = tmp_path_factory.mktemp("images") / "a.png"
    image = Image.open(photos[0]).convert("RGB")
    image.thumbnail((300, 300))
    image.save(path)
    return path, to_rgb_array(Image.open(path))


def test_a_path_is_an_image(detector, photo):
    """`score("a.jpg")` took the path for a sequence of one-character images and failed with a dtype message."""
    path, pixels = photo
    expected = detector.score([pixels])
    for given in (str(path), path, [str(path)], pixels, Image.open(path)):
        np.testing.assert_array_equal(detector.score(given), expected)
    assert detector.score(np.stack([pixels, pixels])).shape == (2,)  # N x H x W x 3 is a batch
    assert detector.explain(str(path)).score == pytest.approx(float(expected[0]))


def test_options_it_cannot_honour_are_refused_not_ignored(tmp_path):
    """`from_pretrained(resize_to=...)` was accepted and did nothing; resizing belongs to scoring (`--resize-to`)."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "tiny.safetensors", build_model("spai_tiny"))
    with pytest.raises(TypeError, match="resize_to"):
        Detector.from_pretrained(tmp_path / "tiny.safetensors", "cpu", resize_to=512)
