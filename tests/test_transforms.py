"""Training augmentation and scoring transforms: shapes, seeding, each operation, geometry and statistics."""
from __future__ import annotations

import dataclasses
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.transforms import (
    AugmentConfig,
    ScoreTransformConfig,
    largest_inscribed_rect,
    make_score_transform,
    make_train_transform,
    rotate_crop,
    row_rng,
    score_transform,
    train_views,
)
from pipelines.perturb.degrade import resize_bilinear
from spai_core.config import ConfigError, load_config
from spai_core.tiling import reflect101

OFF = dict(hflip_p=0.0, vflip_p=0.0, rotate_p=0.0, blur_p=0.0, noise_p=0.0, jpeg_p=0.0)


@pytest.fixture(scope="module")
def photo(photos: list[Path]) -> np.ndarray:
    """A real photo reduced to <= 512 px so the tests stay fast (JPEG draft mode decodes at reduced size)."""
    with Image.open(photos[0]) as img:
        img.draft("RGB", (512, 512))
        img = img.convert("RGB")
        img.thumbnail((512, 512), Image.Resampling.BILINEAR)
        return np.asarray(img)


def one_view(image: np.ndarray, seed: int = 0, **overrides: float) -> np.ndarray:
    cfg = AugmentConfig(views=1, **{**OFF, **overrides})
    return train_views(image, cfg, np.random.default_rng(seed))[0]


def test_train_views_shape_and_dtype(photo: np.ndarray) -> None:
    views = train_views(photo, AugmentConfig(), np.random.default_rng(0))
    assert views.shape == (4, 224, 224, 3) and views.dtype == np.uint8
    assert not np.array_equal(views[0], views[1]), "views must be augmented independently"


def test_images_smaller_than_the_crop_are_upscaled() -> None:
    tiny = np.random.default_rng(1).integers(0, 256, size=(40, 25, 3), dtype=np.uint8)
    views = train_views(tiny, AugmentConfig(views=2, size=64), np.random.default_rng(0))
    assert views.shape == (2, 64, 64, 3)


def test_seeded_reproducibility(photo: np.ndarray) -> None:
    transform = make_train_transform(AugmentConfig())
    first = transform(photo, np.random.default_rng(123))
    assert np.array_equal(first, transform(photo, np.random.default_rng(123)))
    assert not np.array_equal(first, transform(photo, np.random.default_rng(124)))


def test_transforms_pickle_for_ray_workers(photo: np.ndarray) -> None:
    train = make_train_transform(AugmentConfig(views=2))
    restored = pickle.loads(pickle.dumps(train))
    assert np.array_equal(train(photo, np.random.default_rng(5)), restored(photo, np.random.default_rng(5)))
    score = make_score_transform(ScoreTransformConfig(resize_to=300))
    assert score is not None
    restored_score = pickle.loads(pickle.dumps(score))
    assert np.array_equal(score(photo, row_rng(0, "a.jpg")), restored_score(photo, row_rng(0, "a.jpg")))


def test_flips_mirror_the_same_crop(photo: np.ndarray) -> None:
    base = one_view(photo)
    # Coins are drawn whether or not an op is enabled, so the crop is the same and the flip is exact.
    assert np.array_equal(one_view(photo, hflip_p=1.0), base[:, ::-1])
    assert np.array_equal(one_view(photo, vflip_p=1.0), base[::-1])


@pytest.mark.parametrize("op", ["rotate_p", "blur_p", "noise_p", "jpeg_p"])
def test_each_operation_changes_pixels_only_when_enabled(photo: np.ndarray, op: str) -> None:
    base = one_view(photo, seed=3)
    assert np.array_equal(one_view(photo, seed=3, **{op: 0.0}), base)
    changed = one_view(photo, seed=3, **{op: 1.0})
    assert changed.shape == base.shape and changed.dtype == np.uint8
    assert not np.array_equal(changed, base)


def high_frequency_energy(image: np.ndarray) -> float:
    gray = image.astype(np.float64).mean(axis=2)
    return float(np.mean(np.diff(gray, axis=0) ** 2) + np.mean(np.diff(gray, axis=1) ** 2))


def test_blur_removes_high_frequencies(photo: np.ndarray) -> None:
    cfg = dict(blur_sigma=(0.5, 0.5))
    assert high_frequency_energy(one_view(photo, blur_p=1.0, **cfg)) < high_frequency_energy(one_view(photo, **cfg))


def test_training_noise_variance_is_in_range() -> None:
    flat = np.full((400, 400, 3), 128, np.uint8)
    for seed in range(5):
        residual = one_view(flat, seed=seed, noise_p=1.0).astype(np.float64) - 128
        assert math.sqrt(10) * 0.95 < residual.std() < math.sqrt(50) * 1.05


def test_inscribed_rectangle_known_cases() -> None:
    assert largest_inscribed_rect(224, 224, 0.0) == (0, 224, 0, 224)
    # A square rotated by 45 degrees holds a square of side s / sqrt(2) = 158.39 centred at 112.
    assert largest_inscribed_rect(224, 224, 45.0) == (32, 191, 32, 191)
    # For a square, the inscribed side is s / (|cos| + |sin|).
    y0, y1, x0, x1 = largest_inscribed_rect(224, 224, 30.0)
    side = 224 / (math.cos(math.radians(30)) + math.sin(math.radians(30)))
    assert abs((y1 - y0) - side) <= 1 and abs((x1 - x0) - side) <= 1
    # A 100 x 200 image turned by 90 degrees is 200 x 100; clipped to the canvas that leaves the middle 100 x 100.
    assert largest_inscribed_rect(100, 200, 90.0) == (0, 100, 50, 150)


@pytest.mark.parametrize("angle", [-83.0, -45.0, -12.5, 7.0, 33.0, 61.0])
@pytest.mark.parametrize("shape", [(224, 224), (120, 300), (300, 120)])
def test_inscribed_rectangle_lies_inside_the_rotated_image(shape: tuple[int, int], angle: float) -> None:
    height, width = shape
    y0, y1, x0, x1 = largest_inscribed_rect(height, width, angle)
    assert y1 > y0 and x1 > x0
    cos_a, sin_a = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    for y, x in ((y0, x0), (y0, x1), (y1, x0), (y1, x1)):
        dx, dy = x - width / 2, y - height / 2
        # Rotated back into the source frame the corner is inside the original image; truncating the corner to whole
        # pixels moves it by < 1 px per axis, i.e. < sqrt(2) px.
        sx, sy = cos_a * dx - sin_a * dy, sin_a * dx + cos_a * dy
        assert abs(sx) <= width / 2 + math.sqrt(2) and abs(sy) <= height / 2 + math.sqrt(2)


@pytest.mark.parametrize("angle", [-90.0, -45.0, -20.0, 13.0, 45.0, 89.0])
def test_rotation_leaves_no_border_fill(angle: float) -> None:
    white = np.full((224, 224, 3), 255, np.uint8)
    rotated = rotate_crop(white, angle)
    assert rotated.min() == 255, "a fill colour or black corner leaked into the rotated crop"


def test_rotation_in_the_augmentation_keeps_size_and_has_no_zero_corners() -> None:
    white = np.full((300, 400, 3), 255, np.uint8)
    for seed in range(8):
        view = one_view(white, seed=seed, rotate_p=1.0)
        assert view.shape == (224, 224, 3)
        assert all(view[y, x].min() > 0 for y in (0, -1) for x in (0, -1))
        assert view.min() == 255


def test_rotation_by_zero_is_identity(photo: np.ndarray) -> None:
    crop = photo[:224, :224]
    assert np.array_equal(rotate_crop(crop, 0.0), crop)


def test_resize_bilinear_matches_opencv_half_pixel_semantics() -> None:
    row = np.array([[[0, 0, 0], [100, 100, 100]]], np.uint8)
    assert resize_bilinear(row, 1, 4)[0, :, 0].tolist() == [0, 25, 75, 100]


@pytest.mark.parametrize(("shape", "expected"), [((300, 500), (224, 373)), ((500, 300), (373, 224)),
                                                 ((100, 150), (224, 336))])
def test_resize_to_sets_the_shorter_side(shape: tuple[int, int], expected: tuple[int, int]) -> None:
    image = np.zeros((*shape, 3), np.uint8)
    assert score_transform(image, ScoreTransformConfig(resize_to=224), np.random.default_rng(0)).shape[:2] == expected


def test_resize_to_on_a_real_photo(photo: np.ndarray) -> None:
    for image in (photo, photo.transpose(1, 0, 2)):
        out = score_transform(np.ascontiguousarray(image), ScoreTransformConfig(resize_to=300), row_rng(0, "x"))
        assert min(out.shape[:2]) == 300
        assert abs(out.shape[0] / out.shape[1] - image.shape[0] / image.shape[1]) < 0.01


def test_make_score_transform_is_none_when_nothing_to_do() -> None:
    assert make_score_transform(ScoreTransformConfig()) is None
    assert make_score_transform(ScoreTransformConfig(resize_to=512)) is not None


def test_configs_load_from_overrides_and_reject_bad_values() -> None:
    cfg = load_config(AugmentConfig, overrides=["crop_scale=[0.3, 1.0]", "jpeg_p=0"])
    assert cfg.crop_scale == (0.3, 1.0) and cfg.jpeg_p == 0.0
    assert dataclasses.asdict(load_config(ScoreTransformConfig, overrides=["resize_to=512"]))["resize_to"] == 512
    with pytest.raises(ConfigError, match="^hflip_p: must be a probability"):
        load_config(AugmentConfig, overrides=["hflip_p=1.5"])
    with pytest.raises(ConfigError, match="^crop_scale: must be two values"):
        make_train_transform(AugmentConfig(crop_scale=(0.9, 0.2)))  # a config built in Python is checked too
    with pytest.raises(ConfigError, match=r"^--resize-to \(resize_to\): must be a positive number"):
        make_score_transform(ScoreTransformConfig(resize_to=0))
    with pytest.raises(ConfigError):
        load_config(AugmentConfig, overrides=["views=2.5"])


def test_reflect101_matches_numpy_reflect_for_pads_wider_than_the_image() -> None:
    row = np.arange(3)
    for before, after in ((0, 0), (2, 1), (7, 9)):
        indices = reflect101(np.arange(-before, row.size + after), row.size)
        assert indices.tolist() == np.pad(row, (before, after), mode="reflect").tolist()
    assert reflect101(np.arange(-2, 3), 1).tolist() == [0] * 5


def test_rejects_non_rgb_uint8_input() -> None:
    with pytest.raises(ValueError, match="to_rgb_array"):
        train_views(np.zeros((10, 10), np.uint8), AugmentConfig(), np.random.default_rng(0))


def test_equal_crop_bounds_crop_at_native_scale(photos):
    """Equal crop-area bounds switch to pad-if-needed + random crop (official), with no resampling."""
    image = np.asarray(Image.open(photos[0]).convert("RGB"))[:300, :400]
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), hflip_p=0, vflip_p=0, rotate_p=0, blur_p=0, noise_p=0, jpeg_p=0)
    view = train_views(image, cfg, np.random.default_rng(3))[0]
    windows = np.lib.stride_tricks.sliding_window_view(image, (224, 224, 3))[:, :, 0]
    assert (windows == view).all(axis=(2, 3, 4)).any()  # the view is an exact window of the image
    small = image[:100, :150]
    padded = train_views(small, cfg, np.random.default_rng(0))[0]
    assert padded.shape == (224, 224, 3)
    np.testing.assert_array_equal(padded[62:162, 37:187], small)  # centred, reflect-padded around the image
