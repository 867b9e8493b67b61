"""Image transforms for training (the official SPAI augmentation, plus registry perturbations) and scoring (resize).

Every transform is a plain function ``f(image, rng) -> image`` on ``H x W x 3`` uint8 RGB arrays, built from a typed
dataclass config with :func:`make_train_transform` / :func:`make_score_transform`. The built transforms are
``functools.partial`` objects of module-level functions, so they pickle and Ray can ship them to workers. All
randomness comes from the ``numpy.random.Generator`` passed in, so a seeded generator reproduces a result exactly.

The official code uses albumentations/OpenCV; this is a re-implementation of the same operations, probabilities and
ranges (spec 1.9) on the one implementation of each pixel operation, :mod:`pipelines.perturb.degrade` (the robustness
perturbations use it too). Resampling is OpenCV-style bilinear, so it may differ from OpenCV's fixed-point arithmetic
by one grey level. Robustness perturbations of the registry (``augment.perturb``) join the augmentation: see
:class:`AugmentConfig`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Callable

import numpy as np

from pipelines.perturb import RandomPerturb, parse_augment
from pipelines.perturb.degrade import (add_gaussian_noise, gaussian_blur, jpeg_roundtrip, resize_bilinear,
                                       resize_shorter_side, to_uint8)
from spai_core.config import ConfigError, check_config, option
from spai_core.tiling import reflect101

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"must be a probability in [0, 1], got {value}", name)


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float) -> None:
    if len(bounds) != 2 or not low <= bounds[0] <= bounds[1] <= high:
        raise ConfigError(f"must be two values (min, max) with {low} <= min <= max <= {high}, got {bounds}", name)


@dataclasses.dataclass
class AugmentConfig:
    """The official training augmentation (spec 1.9); each probability and range is configurable.

    Per view, in order: random resized crop to ``size``, horizontal flip, vertical flip, rotation with crop to the
    largest inscribed rectangle then resize back to ``size``, Gaussian blur, Gaussian noise, JPEG re-encoding.

    Before the views are cut, each ``perturb`` entry (``NAME[=S1,S2,...|=LOW:HIGH][@P]``, a perturbation of
    :mod:`pipelines.perturb`) is applied to the whole image with probability ``P`` (default ``perturb_p``), in the
    order listed, at a strength drawn from the listed ones or uniformly from the range: e.g. ``["jpeg=30:95@0.3",
    "recompress=1,2@0.2", "filter=all@0.2", "meme@0.1"]``. Whole-image, because that is what a platform or an editor
    does: a meme caption or a 1080-px re-encode happens before anyone crops. Off by default (the official recipe).
    """

    views: int = 4
    size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)  # fraction of the image area; equal bounds: native-scale crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rotate_p: float = 0.5
    rotate_limit: float = 90.0  # degrees, angle uniform in [-limit, limit]
    blur_p: float = 0.5
    blur_kernel: tuple[int, int] = (3, 9)  # odd kernel sizes in this range, uniformly
    blur_sigma: tuple[float, float] = (0.01, 0.5)
    noise_p: float = 0.5
    noise_var: tuple[float, float] = (10.0, 50.0)  # variance on the 0..255 scale, independent per channel
    jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (50, 100)
    perturb: list[str] = dataclasses.field(default_factory=list)
    perturb_p: float = 0.5  # probability of a perturb entry without @P

    def validate(self) -> None:
        for name in ("views", "size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", name)
        for name in ("hflip_p", "vflip_p", "rotate_p", "blur_p", "noise_p", "jpeg_p", "perturb_p"):
            _check_probability(name, getattr(self, name))
        self.perturbations()  # each entry parses
        _check_range("crop_scale", self.crop_scale, 1e-6, 1.0)
        _check_range("crop_ratio", self.crop_ratio, 1e-6, math.inf)
        _check_range("blur_kernel", self.blur_kernel, 1, math.inf)
        if (self.blur_kernel[0] | 1) > self.blur_kernel[1]:
            raise ConfigError(f"{self.blur_kernel} contains no odd kernel size; widen it, e.g. (3, 9)", "blur_kernel")
        _check_range("blur_sigma", self.blur_sigma, 1e-6, math.inf)
        _check_range("noise_var", self.noise_var, 0.0, math.inf)
        _check_range("jpeg_quality", self.jpeg_quality, 1, 100)
        if not 0.0 <= self.rotate_limit <= 180.0:
            raise ConfigError(f"must be in [0, 180] degrees, got {self.rotate_limit}", "rotate_limit")

    def perturbations(self) -> list[RandomPerturb]:
        return [parse_augment(spec, self.perturb_p) for spec in self.perturb]


@dataclasses.dataclass
class ScoreTransformConfig:
    """Preprocessing before scoring, after any robustness perturbation (``spai score --perturb``): an optional resize.

    The result keeps its resolution otherwise (no crop, no pad: the model pads sides < 224 itself).
    """

    resize_to: int | None = option(None, flag="--resize-to", help="resize so the SHORTER side is N, up or down "
                                   "(official behaviour)")

    def validate(self) -> None:
        if self.resize_to is not None and self.resize_to < 1:
            raise ConfigError(f"must be a positive number of pixels or null, got {self.resize_to}", "resize_to")


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(
            f"expected an H x W x 3 uint8 RGB array, got {image.dtype} {image.shape}; "
            "convert inputs with spai_core.images.to_rgb_array"
        )


def random_resized_crop(
    image: np.ndarray, size: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """Crop a random area fraction / aspect ratio and resize it to ``size x size``.

    Ten tries to fit a crop inside the image, then a centre crop clamped to the ratio range (the torchvision /
    albumentations algorithm), so images smaller than ``size`` work too: the crop is upscaled.
    """
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return resize_bilinear(image[top : top + crop_h, left : left + crop_w], size, size)
    crop_h, crop_w = height, width
    if width / height < ratio[0]:
        crop_h = max(1, round(width / ratio[0]))
    elif width / height > ratio[1]:
        crop_w = max(1, round(height * ratio[1]))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return resize_bilinear(image[top : top + crop_h, left : left + crop_w], size, size)


def largest_inscribed_rect(height: int, width: int, angle: float) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the largest axis-aligned rectangle inside a ``height x width`` image rotated by
    ``angle`` degrees about its centre, clipped to the canvas (the crop of albumentations ``Rotate(crop_border)``).
    """
    sin_a, cos_a = abs(math.sin(math.radians(angle))), abs(math.cos(math.radians(angle)))
    long_side, short_side = max(height, width), min(height, width)
    if short_side <= 2.0 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        # Two corners of the rectangle touch the long sides of the rotated image.
        half = 0.5 * short_side
        rect_w, rect_h = (half / sin_a, half / cos_a) if width >= height else (half / cos_a, half / sin_a)
    else:
        # All four corners touch the rotated image's sides.
        cos_2a = cos_a * cos_a - sin_a * sin_a
        rect_w = (width * cos_a - height * sin_a) / cos_2a
        rect_h = (height * cos_a - width * sin_a) / cos_2a
    x0, x1 = max(0, int(width / 2 - rect_w / 2)), min(width, int(width / 2 + rect_w / 2))
    y0, y1 = max(0, int(height / 2 - rect_h / 2)), min(height, int(height / 2 + rect_h / 2))
    return y0, y1, x0, x1


def rotate_crop(image: np.ndarray, angle: float) -> np.ndarray:
    """Rotate counter-clockwise by ``angle`` degrees about the centre (bilinear, reflect-101 border) and crop to the
    largest inscribed rectangle, so the result has no border fill. Only the kept pixels are computed.
    """
    height, width = image.shape[:2]
    y0, y1, x0, x1 = largest_inscribed_rect(height, width, angle)
    cy, cx = height / 2 - 0.5, width / 2 - 0.5  # OpenCV's rotation centre
    cos_a, sin_a = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    ys, xs = np.meshgrid(np.arange(y0, y1) - cy, np.arange(x0, x1) - cx, indexing="ij")
    src_x = cos_a * xs - sin_a * ys + cx  # inverse of the forward rotation: output pixel -> source position
    src_y = sin_a * xs + cos_a * ys + cy
    left, top = np.floor(src_x), np.floor(src_y)
    wx, wy = (src_x - left)[..., None], (src_y - top)[..., None]
    left, top = left.astype(np.intp), top.astype(np.intp)
    x_a, x_b = reflect101(left, width), reflect101(left + 1, width)
    y_a, y_b = reflect101(top, height), reflect101(top + 1, height)
    pixels = image.astype(np.float32)
    upper = pixels[y_a, x_a] * (1 - wx) + pixels[y_a, x_b] * wx
    lower = pixels[y_b, x_a] * (1 - wx) + pixels[y_b, x_b] * wx
    return to_uint8(upper * (1 - wy) + lower * wy)


def random_native_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size x size`` crop at the image's own scale, reflect-101 padded (centred) where a side is shorter.

    The official recipe switches to this (PadIfNeeded + RandomCrop) when the crop-area bounds are equal. No
    resampling, so up-sampling lattices keep their exact period: what small models trained from scratch need.
    """
    height, width = image.shape[:2]
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    if pad_h or pad_w:
        pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
        image = np.pad(image, pads, mode="reflect" if min(height, width) > 1 else "edge")
        height, width = image.shape[:2]
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def augment_view(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One augmented ``size x size`` view. Every coin is drawn even for p = 0 or 1, so the random stream (and thus
    the other views of a seeded run) does not depend on which operations are enabled.
    """
    if cfg.crop_scale[0] == cfg.crop_scale[1]:
        view = random_native_crop(image, cfg.size, rng)
    else:
        view = random_resized_crop(image, cfg.size, cfg.crop_scale, cfg.crop_ratio, rng)
    if rng.random() < cfg.hflip_p:
        view = view[:, ::-1]
    if rng.random() < cfg.vflip_p:
        view = view[::-1]
    if rng.random() < cfg.rotate_p:
        view = resize_bilinear(rotate_crop(view, rng.uniform(-cfg.rotate_limit, cfg.rotate_limit)), cfg.size, cfg.size)
    if rng.random() < cfg.blur_p:
        # Uniform over odd sizes (albumentations bumps even draws up instead); with sigma <= 0.5 the taps beyond
        # +-1 pixel weigh < 1e-3, so the size distribution barely matters.
        odd_sizes = np.arange(cfg.blur_kernel[0] | 1, cfg.blur_kernel[1] + 1, 2)
        view = gaussian_blur(view, int(rng.choice(odd_sizes)), rng.uniform(*cfg.blur_sigma))
    if rng.random() < cfg.noise_p:
        view = add_gaussian_noise(view, math.sqrt(rng.uniform(*cfg.noise_var)), rng)
    if rng.random() < cfg.jpeg_p:
        view = jpeg_roundtrip(view, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
    return np.ascontiguousarray(view)


def perturb_image(image: np.ndarray, steps: list[RandomPerturb], rng: np.random.Generator) -> np.ndarray:
    """``image`` through each training perturbation whose coin comes up, in order (see :class:`AugmentConfig`)."""
    for step in steps:
        variant = step.draw(rng)
        if variant is not None:
            image = variant.apply(image, rng)
    return image


def train_views(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """``cfg.views`` independently augmented views of one (perturbed) image, shape ``(views, size, size, 3)`` uint8."""
    _check_image(image)
    image = perturb_image(image, cfg.perturbations(), rng)
    return np.stack([augment_view(image, cfg, rng) for _ in range(cfg.views)])


def score_transform(image: np.ndarray, cfg: ScoreTransformConfig, rng: np.random.Generator) -> np.ndarray:
    """``image`` resized as ``cfg`` says (perturbations come before, from the sweep)."""
    _check_image(image)
    if cfg.resize_to is not None:
        image = resize_shorter_side(image, cfg.resize_to)
    return image


def row_rng(seed: int, key: str) -> np.random.Generator:
    """The random generator of one image: a function of ``seed`` and its key (its uri) only, so results ignore block
    layout, worker count and order, and stay the same across processes and machines (unlike ``hash()``, which Python
    salts per process)."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def _call_with_config(fn: Callable, cfg: object, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # A module-level adapter so ``partial`` can bind the config in the middle argument and still pickle.
    return fn(image, cfg, rng)


def make_train_transform(cfg: AugmentConfig) -> Transform:
    """``f(image, rng) -> (views, size, size, 3)`` uint8 for training; picklable for Ray workers."""
    return functools.partial(_call_with_config, train_views, check_config(cfg))


def make_score_transform(cfg: ScoreTransformConfig) -> Transform | None:
    """``f(image, rng) -> image`` for scoring, or None when ``cfg`` enables nothing so callers can skip the work."""
    if all(value is None for value in dataclasses.asdict(check_config(cfg)).values()):
        return None
    return functools.partial(_call_with_config, score_transform, cfg)
