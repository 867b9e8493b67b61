"""Robustness perturbations: every registered kind is seeded, keeps uint8 RGB, takes odd sizes and read-only arrays,
is the identity at its identity strength, and does what its name says; the sweep and augment specs parse or fail
with one clear error; training draws from the same registry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.transforms import AugmentConfig, train_views
from pipelines.perturb import RandomPerturb, Variant, parse_augment, parse_variants, perturbations
from pipelines.perturb.degrade import gaussian_blur
from pipelines.perturb.filters import FILTERS
from spai_core.config import ConfigError, check_config

EVERY = parse_variants([name for name in perturbations() if name != "none"])  # each kind at its default strengths
RANDOM = ("noise", "random_crop", "meme", "screenshot", "collage", "sticker")
OFF = dict.fromkeys(("hflip_p", "vflip_p", "rotate_p", "blur_p", "noise_p", "jpeg_p"), 0.0)  # the views: crops only


@pytest.fixture(scope="module")
def photo(photos: list[Path]) -> np.ndarray:
    """A real photo at about 240 px (JPEG draft decoding), read-only like the arrays Ray hands out."""
    with Image.open(photos[1]) as img:
        img.draft("RGB", (240, 240))
        return np.asarray(img.convert("RGB").resize((240, 180)))


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("variant", EVERY, ids=lambda v: v.label)
def test_every_variant_is_seeded_and_keeps_uint8_rgb(variant: Variant, photo: np.ndarray) -> None:
    first = variant.apply(photo, rng(3))
    assert first.dtype == np.uint8 and first.ndim == 3 and first.shape[2] == 3 and min(first.shape[:2]) >= 1
    assert np.array_equal(first, variant.apply(photo, rng(3)))
    if variant.perturbation in RANDOM:
        assert not np.array_equal(first, variant.apply(photo, rng(4))), "the seed must drive it"
    for shape in ((9, 7), (31, 200), (200, 31)):  # tiny, wide and tall images
        small = np.ascontiguousarray(photo[:shape[0], :shape[1]])
        out = variant.apply(small, rng())
        assert out.dtype == np.uint8 and out.shape[2] == 3 and min(out.shape[:2]) >= 1


@pytest.mark.parametrize("kind", [k for k in perturbations().values() if k.identity is not None], ids=lambda k: k.name)
def test_identity_strength_returns_the_image(kind, photo: np.ndarray) -> None:
    assert np.array_equal(Variant(kind.name, kind.identity).apply(photo, rng()), photo)


def test_registry_documents_every_kind() -> None:
    kinds = perturbations()
    assert {"jpeg", "webp", "resize", "short_side", "blur", "noise", "center_crop", "random_crop", "recompress",
            "filter", "meme", "screenshot", "collage", "sticker"} <= set(kinds)
    assert all(kind.doc for kind in kinds.values())
    assert len(FILTERS) >= 6 and all(recipe.description for recipe in FILTERS.values())


def error(image: np.ndarray, out: np.ndarray) -> float:
    return float(np.abs(image.astype(np.int16) - out).mean())


@pytest.mark.parametrize("name", ["jpeg", "webp"])
def test_lower_quality_loses_more(name: str, photo: np.ndarray) -> None:
    errors = [error(photo, Variant(name, q).apply(photo, rng())) for q in (95.0, 50.0, 10.0)]
    assert 0 < errors[0] < errors[1] < errors[2]


def test_resampling_sizes(photo: np.ndarray) -> None:
    height, width = photo.shape[:2]
    assert Variant("resize", 0.5).apply(photo, rng()).shape[:2] == (round(height / 2), round(width / 2))
    assert min(Variant("short_side", 64.0).apply(photo, rng()).shape[:2]) == 64
    assert Variant("center_crop", 0.5).apply(photo, rng()).shape[:2] == (round(height / 2), round(width / 2))
    top, left = (height - round(height / 2)) // 2, (width - round(width / 2)) // 2
    np.testing.assert_array_equal(Variant("center_crop", 0.5).apply(photo, rng()),
                                  photo[top:top + round(height / 2), left:left + round(width / 2)])


def test_random_crop_is_a_piece_of_the_image(photo: np.ndarray) -> None:
    crop = Variant("random_crop", 0.5).apply(photo, rng(1))
    h, w = crop.shape[:2]
    corners = np.argwhere(np.all(photo[:photo.shape[0] - h + 1, :photo.shape[1] - w + 1] == crop[0, 0], axis=2))
    assert any(np.array_equal(photo[y:y + h, x:x + w], crop) for y, x in corners)


def reference_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian over +-3 sigma, reflect-101 borders (OpenCV's GaussianBlur), in float64."""
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    rows = sum(w * padded[i:i + image.shape[0]] for i, w in enumerate(taps))
    return np.rint(sum(w * rows[:, i:i + image.shape[1]] for i, w in enumerate(taps)))


def test_blur_is_opencv_gaussian_and_stronger_with_sigma(photo: np.ndarray) -> None:
    out = Variant("blur", 1.5).apply(photo, rng())
    assert np.abs(out - reference_blur(photo, 1.5)).max() <= 1
    weaker, stronger = (Variant("blur", sigma).apply(photo, rng()) for sigma in (1.0, 3.0))
    assert error(photo, weaker) < error(photo, stronger)
    assert np.array_equal(gaussian_blur(photo, 1, 1.0), photo)  # a one-tap kernel


def test_noise_statistics_and_seeding() -> None:
    flat = np.full((300, 300, 3), 128, np.uint8)
    residual = Variant("noise", 5.0).apply(flat, rng()).astype(np.float64) - 128
    assert abs(residual.mean()) < 0.1 and abs(residual.std() - 5.0) < 0.1
    assert np.abs(np.corrcoef(residual.reshape(-1, 3).T)[np.triu_indices(3, 1)]).max() < 0.02


def test_recompression_chain_caps_the_long_side_and_compounds(photo: np.ndarray) -> None:
    big = np.asarray(Image.fromarray(photo).resize((1200, 900)))
    once, twice = (Variant("recompress", n).apply(big, rng()) for n in (1.0, 2.0))
    assert once.shape == twice.shape == (810, 1080, 3)
    assert not np.array_equal(once, twice)
    assert Variant("recompress", 1.0).apply(photo, rng()).shape == photo.shape  # never upscaled


def test_filters_are_distinct_looks(photo: np.ndarray) -> None:
    looks = {name: Variant("filter", name).apply(photo, rng()).astype(np.int16) for name in FILTERS}
    assert all(error(photo, look) > 2 for look in looks.values())
    names = list(looks)
    assert all(error(looks[a], looks[b]) > 1 for i, a in enumerate(names) for b in names[i + 1:])
    moon = looks["moon"]
    assert np.array_equal(moon[..., 0], moon[..., 1]) and np.array_equal(moon[..., 1], moon[..., 2])  # black and white
    toaster = looks["toaster"]  # a vignette: corners darker relative to the photo than the centre
    h, w = photo.shape[:2]
    assert (toaster[:h // 8, :w // 8].mean() - photo[:h // 8, :w // 8].mean()
            < toaster[3 * h // 8:5 * h // 8, 3 * w // 8:5 * w // 8].mean()
            - photo[3 * h // 8:5 * h // 8, 3 * w // 8:5 * w // 8].mean())


def test_meme_writes_outlined_captions_at_top_and_bottom(photo: np.ndarray) -> None:
    out = Variant("meme").apply(photo, rng())
    changed = np.abs(out.astype(np.int16) - photo).max(axis=2) > 40
    band = photo.shape[0] // 5
    assert changed[:band].mean() > 0.03 and changed[-band:].mean() > 0.03 and changed[2 * band:3 * band].mean() == 0
    top = out[:band].reshape(-1, 3)
    assert (top.min(axis=1) > 245).any() and (top.max(axis=1) < 10).any()  # white letters, black outline


def test_screenshot_is_a_phone_frame_around_the_photo(photo: np.ndarray) -> None:
    out = Variant("screenshot").apply(photo, rng())
    assert out.shape[1] == 720 and out.shape[0] > 720 * photo.shape[0] / photo.shape[1] + 200
    for seed in range(4):  # light or dark themed frame: its top rows are flat paper colour with a little text
        top = Variant("screenshot").apply(photo, rng(seed))[:8].astype(np.int16)
        assert np.median(top) in range(0, 16) or np.median(top) in range(240, 256)


def test_sweep_spec_labels_and_expansion() -> None:
    labels = [v.label for v in parse_variants(["jpeg=95,75", "blur", "filter=all", "meme", "jpeg=75"])]
    assert labels[:5] == ["none", "jpeg=95", "jpeg=75", "blur=1", "blur=3"] and labels[-1] == "meme"
    assert labels.count("jpeg=75") == 1 and sum(label.startswith("filter=") for label in labels) == len(FILTERS)
    assert [v.label for v in parse_variants(["resize=0.50"], original=False)] == ["resize=0.5"]
    assert Variant("jpeg", 75.0).numeric_strength == 75.0 and Variant("filter", "moon").numeric_strength is None


@pytest.mark.parametrize("spec, message", [
    ("jpg=75", "unknown perturbation 'jpg'; did you mean jpeg"),
    ("jpeg=101", "jpeg=101: the JPEG quality must be a whole number in [1, 100]"),
    ("jpeg=7.5", "jpeg=7.5: the JPEG quality must be a whole number"),
    ("blur=x", "blur=x: the strength (Gaussian sigma (px)) must be a number"),
    ("meme=3", "meme takes no strength"),
    ("filter=vintage", "filter=vintage: choose from all, clarendon"),
])
def test_bad_specs_are_one_clear_error(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_variants([spec])


def test_augment_spec_grammar() -> None:
    assert parse_augment("jpeg=30:95@0.3", 0.5) == RandomPerturb("jpeg", span=(30.0, 95.0), p=0.3, integer=True)
    assert parse_augment("filter=moon,sepia", 0.2) == RandomPerturb("filter", ("moon", "sepia"), p=0.2)
    assert parse_augment("meme", 0.5) == RandomPerturb("meme", (None,), p=0.5)
    drawn = {parse_augment("jpeg=30:95@1", 0.5).draw(rng(s)).strength for s in range(40)}
    assert all(30 <= q <= 95 and float(q).is_integer() for q in drawn) and len(drawn) > 10
    for bad in ("jpeg=95:30", "meme@2", "meme@x"):
        with pytest.raises(ConfigError):
            parse_augment(bad, 0.5)


def test_training_draws_from_the_registry(photo: np.ndarray) -> None:
    def views(**kw) -> np.ndarray:
        return train_views(photo, AugmentConfig(views=2, size=96, **OFF, **kw), rng(5))

    grey = views(perturb=["filter=moon@1"])
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey, views(perturb=["filter=moon@1"]))
    # a perturbation whose coin never comes up changes nothing, the random stream included
    assert np.array_equal(views(perturb=["meme@0"]), views(perturb=["sticker@0"]))
    assert not np.array_equal(views(perturb=["meme@0"]), views(perturb=["meme@1"]))
    with pytest.raises(ConfigError, match="^perturb: unknown perturbation"):
        check_config(AugmentConfig(perturb=["nope"]))
