"""spai_core model behaviour on the tiny config: tiling, chunking, modes, precision, explain."""
from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from spai_core.detector import Detector
from spai_core.images import PACK_CHUNK_BYTES, to_rgb_array
from spai_core.spai import _mean_std, build_model, get_model_config
from spai_core.tiling import five_crop_offsets, pad_to_min_size, spread_indices, tile_offsets


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return Detector(build_model("spai_tiny"), device="cpu", precision="fp32")


def _rand_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape,count", [((224, 224), 5), ((300, 600), 5), ((512, 512), 4), ((224, 1000), 4),
                                         ((1000, 1000), 16), ((460, 700), 6)])
def test_tile_counts(shape, count):
    assert len(tile_offsets(*shape)) == count


def test_grid_drops_remainders_and_is_row_major():
    assert tile_offsets(500, 700) == [(0, 0), (0, 224), (0, 448), (224, 0), (224, 224), (224, 448)]


def test_five_crop_order_and_centre_rounding():
    assert five_crop_offsets(300, 600, 224) == [(0, 0), (0, 376), (76, 0), (76, 376), (38, 188)]
    assert five_crop_offsets(225, 227, 224)[-1] == (0, 2)  # round(0.5) = 0, round(1.5) = 2 (Python rounding)


def test_max_tiles_caps_a_five_crop_centre_first():
    crops = tile_offsets(224, 300)
    assert len(crops) == 5 and tile_offsets(224, 300, max_tiles=9) == crops
    assert tile_offsets(224, 300, max_tiles=1) == [crops[4]]
    assert tile_offsets(224, 300, max_tiles=2) == [crops[4], crops[0]]


def test_max_tiles_is_deterministic_and_spread():
    offsets = tile_offsets(2240, 2240, max_tiles=7)
    assert len(offsets) == 7 and offsets[0] == (0, 0) and offsets[-1] == (2016, 2016)
    assert offsets == tile_offsets(2240, 2240, max_tiles=7)
    assert spread_indices(10, 3) == [0, 4, 9]


def test_padding_is_centred_reflect101():
    img = torch.arange(180 * 300, dtype=torch.float32).view(1, 180, 300)
    padded, pad = pad_to_min_size(img, 224)
    assert padded.shape[-2:] == (224, 300) and pad == (22, 22, 0, 0)
    torch.testing.assert_close(padded[0, 21], img[0, 1])  # reflect-101: the edge row is not repeated
    torch.testing.assert_close(padded[0, 22], img[0, 0])
    tiny, _ = pad_to_min_size(torch.arange(5.).view(1, 1, 5), 224)  # pad far wider than the image
    assert tiny.shape[-2:] == (224, 224) and set(tiny.unique().tolist()) <= set(range(5))


def test_chunk_size_does_not_change_logits(detector):
    images = [_rand_image(300, 500, 1), _rand_image(700, 460, 2), _rand_image(224, 224, 3)]
    detector.feature_batch = 3
    small = detector.logits(images)
    detector.feature_batch = 400
    big = detector.logits(images)
    np.testing.assert_allclose(small, big, rtol=1e-4, atol=1e-5)


def test_batch_equals_one_by_one(detector):
    images = [_rand_image(256, 256, 4), _rand_image(500, 900, 5)]
    together = detector.logits(images)
    alone = np.concatenate([detector.logits([img]) for img in images])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_224_image_encodes_one_tile_for_five_crops(detector, monkeypatch):
    calls = []
    original = detector.model.mfvit.forward
    monkeypatch.setattr(detector.model.mfvit, "forward", lambda t: calls.append(t.shape[0]) or original(t))
    detector.logits([_rand_image(224, 224)])
    assert calls == [1]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_modes_are_converted_like_pil_convert_rgb(detector, mode, photos):
    img = Image.open(photos[0]).convert("RGB").resize((240, 260))
    converted = img.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 200)
    reference = converted.convert("RGB")
    np.testing.assert_array_equal(detector.logits([converted]), detector.logits([reference]))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK", "1"])
@pytest.mark.parametrize("size", [(1, 1), (97, 61), (PACK_CHUNK_BYTES // 3 + 5, 3)])  # the last: a row > one chunk
def test_to_rgb_array_equals_pil_convert_and_fills_out(mode, size):
    img = Image.fromarray(_rand_image(size[1], size[0], 3)).convert(mode)
    expected = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(to_rgb_array(img), expected)
    batch = np.zeros((2, size[1], size[0], 3), np.uint8)
    assert np.shares_memory(to_rgb_array(img, out=batch[1]), batch)
    np.testing.assert_array_equal(batch[1], expected)
    assert not batch[0].any()


def test_to_rgb_array_out_must_fit():
    img = Image.fromarray(_rand_image(8, 6))
    wrong_shape, wrong_type, strided = np.zeros((6, 8, 3), np.uint8), np.zeros((8, 6, 3), np.float32), np.zeros(
        (8, 12, 3), np.uint8)[:, ::2]
    for bad in (wrong_shape, wrong_type, strided):
        with pytest.raises(ValueError, match="out must be"):
            to_rgb_array(img, out=bad)
    gray = _rand_image(8, 6)[:, :, 0]
    out = np.zeros((8, 6, 3), np.uint8)
    assert to_rgb_array(gray, out=out) is out
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_rgba_alpha_is_dropped_not_composited(detector):
    rgb = _rand_image(240, 240, 6)
    rgba = np.concatenate([rgb, np.zeros((240, 240, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(detector.logits([rgba]), detector.logits([rgb]))


def test_bf16_close_to_fp32(detector):
    images = [_rand_image(448, 448, 7)]
    fp32 = detector.logits(images)
    bf16 = Detector(detector.model, device="cpu", precision="bf16").logits(images)
    assert np.abs(bf16 - fp32).max() < 0.05 + 0.05 * np.abs(fp32).max()


def test_explain_heatmap(detector):
    exp = detector.explain(_rand_image(500, 700, 8))
    assert len(exp.offsets) == 6 and exp.weights.shape == (6,)
    assert abs(exp.weights.sum() - 1) < 1e-5
    assert exp.heatmap.shape == (500, 700)
    assert exp.heatmap[480:, :].max() == 0  # the dropped bottom strip gets no attention
    assert np.isclose(exp.heatmap[0, 0], exp.weights[0])


def test_training_forward_views_shape():
    model = build_model(get_model_config("spai_tiny"))
    out = model(torch.rand(2, 4, 3, 224, 224))
    assert out.shape == (2,)


def test_descriptor_norm_standardises_in_training_and_is_per_image_in_eval():
    torch.manual_seed(0)
    model = build_model(get_model_config("spai_tiny", descriptor_norm=True, dropout=0.0))
    tiles = torch.rand(16, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = model.mfvit(tiles)
        standardised = model.train().describe(tiles)
    # Raw similarity statistics barely vary across tiles; standardised, every column has unit spread.
    assert float((raw[:, :24].std(0) / raw[:, :24].abs().mean(0)).max()) < 0.2
    torch.testing.assert_close(standardised.mean(0), torch.zeros(raw.shape[1]), rtol=0, atol=1e-4)
    torch.testing.assert_close(standardised.std(0, unbiased=False), torch.ones(raw.shape[1]), rtol=0, atol=1e-2)
    detector = Detector(model.eval(), device="cpu", precision="fp32")
    images = [_rand_image(256, 300, 6), _rand_image(480, 500, 7)]
    np.testing.assert_allclose(detector.logits(images), np.concatenate([detector.logits([i]) for i in images]),
                               rtol=1e-4, atol=1e-5)


def test_model_copies_and_pickles_score_identically():
    torch.manual_seed(0)
    model = build_model("spai_tiny").eval()
    images = [torch.rand(3, 256, 240, generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode():
        reference = model.forward_images(images)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # as training's export and Ray's actors do
        with torch.inference_mode():
            torch.testing.assert_close(twin.forward_images(images), reference, atol=0, rtol=0)
    with torch.inference_mode():  # every parameter an inference tensor, loaded in place
        torch.manual_seed(5)
        built = build_model("spai_tiny").eval()
        built.forward_images(images)
        built.load_state_dict(model.state_dict())
        torch.testing.assert_close(built.forward_images(images), reference, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_std_matches_torch_in_float32(dtype):
    x = (torch.randn(3, 196, 40, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(dtype)
    mean, std = _mean_std(x, dim=1)
    assert mean.dtype == std.dtype == torch.float32
    torch.testing.assert_close(mean, x.double().mean(1).float())
    torch.testing.assert_close(std, x.double().std(1).float())


def test_detector_keeps_freed_memory_for_reuse():
    """A Detector on CPU stops glibc from unmapping freed activations, so reallocating them costs no page faults."""
    script = """
import resource, sys, torch
from spai_core.detector import Detector
from spai_core.images import PACK_CHUNK_BYTES, to_rgb_array
from spai_core.spai import build_model
if sys.argv[1] == "detector":
    Detector(build_model("spai_tiny"), device="cpu")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(9):  # 64 MB tensors, above any mmap threshold glibc picks by itself; the first ones grow the heap
    before = faults()
    torch.ones(64 * 2 ** 18)
    counts.append(faults() - before)
print(sorted(counts)[len(counts) // 2])
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc only")
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], check=True, capture_output=True,
                                       text=True).stdout.split()[-1]) for mode in ("plain", "detector")}
    assert faults["plain"] > 10 * faults["detector"], faults  # median per tensor; plain: its pages fault in again
