"""Degradations: re-encoding (JPEG, WebP), resampling, blur, noise, crops and platform-like recompression chains.

These are the one implementation of each operation in the project: the training augmentation
(:mod:`pipelines.data.transforms`) calls the same functions. Encoders are Pillow's (libjpeg, libwebp); blur is
torchvision's (an odd kernel over +-3 sigma, reflect-101 borders, as OpenCV's); resizing is OpenCV-style bilinear
(half-pixel centres, no antialiasing), the resampling of the official SPAI test transform, which Pillow (it always
antialiases when reducing) and torchvision (float output) do not offer on uint8 arrays; noise draws from the numpy
generator passed in, which torchvision's (global torch RNG) cannot.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvf

from pipelines.perturb.registry import register

PLATFORM_LONG_SIDE = 1080  # what Instagram, X and Facebook serve a photo at (long side, px)
PLATFORM_QUALITY = 85  # the JPEG quality their re-encodes measure at


def to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source indices and weights for one axis, OpenCV style (half-pixel centres, clamped at edges)."""
    coords = (np.arange(target, dtype=np.float64) + 0.5) * (source / target) - 0.5
    coords = np.clip(coords, 0.0, source - 1)
    low = np.floor(coords).astype(np.intp)
    high = np.minimum(low + 1, source - 1)
    return low, high, (coords - low).astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to ``height x width`` with OpenCV ``INTER_LINEAR`` semantics (the official resampling)."""
    if image.shape[:2] == (height, width):
        return image
    top, bottom, wy = _linear_taps(image.shape[0], height)
    left, right, wx = _linear_taps(image.shape[1], width)
    rows = image[top].astype(np.float32) * (1 - wy)[:, None, None] + image[bottom] * wy[:, None, None]
    out = rows[:, left] * (1 - wx)[None, :, None] + rows[:, right] * wx[None, :, None]
    return to_uint8(out)


def resize_by(image: np.ndarray, factor: float) -> np.ndarray:
    """Both sides times ``factor`` (at least 1 px each)."""
    height, width = image.shape[:2]
    return resize_bilinear(image, max(1, round(height * factor)), max(1, round(width * factor)))


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is exactly ``size`` (up or down), keeping the aspect ratio (``SmallestMaxSize``)."""
    return resize_by(image, size / min(image.shape[:2]))


def gaussian_blur(image: np.ndarray, kernel: int, sigma: float) -> np.ndarray:
    """Gaussian blur with an odd ``kernel``-tap kernel and reflect-101 borders (torchvision; OpenCV's result). The
    kernel is cut to twice the shorter side less one: a reflection cannot reach further (torch refuses)."""
    kernel = min(kernel, 2 * min(image.shape[:2]) - 1)
    pixels = np.ascontiguousarray(image)
    if not pixels.flags.writeable:  # Ray hands out read-only arrays, which torch warns about sharing
        pixels = pixels.copy()
    blurred = tvf.gaussian_blur(torch.from_numpy(pixels).permute(2, 0, 1), [kernel, kernel], [sigma, sigma])
    return np.ascontiguousarray(blurred.permute(1, 2, 0).numpy())


def add_gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add zero-mean Gaussian noise of standard deviation ``sigma`` (0..255 scale), independently per channel."""
    noise = rng.standard_normal(image.shape, dtype=np.float32)  # float32 draws: half the time of float64 on big images
    noise *= sigma
    noise += image
    return to_uint8(noise)


def encode_roundtrip(image: np.ndarray, fmt: str, quality: int) -> np.ndarray:
    """Encode with Pillow as ``fmt`` (JPEG: libjpeg defaults, 4:2:0 chroma; WEBP: lossy) and decode, in memory."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG at ``quality`` and decode again, in memory."""
    return encode_roundtrip(image, "JPEG", quality)


def crop_box(height: int, width: int, fraction: float, rng: np.random.Generator | None) -> tuple[int, int, int, int]:
    """``(top, left, crop_h, crop_w)`` of a crop keeping ``fraction`` of each side: centred, or anywhere (``rng``)."""
    crop_h, crop_w = max(1, round(height * fraction)), max(1, round(width * fraction))
    if rng is None:
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w
    return int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1)), crop_h, crop_w


def _crop(image: np.ndarray, fraction: float, rng: np.random.Generator | None) -> np.ndarray:
    top, left, crop_h, crop_w = crop_box(*image.shape[:2], fraction, rng)
    return image[top:top + crop_h, left:left + crop_w]


@register("jpeg", unit="JPEG quality", bounds=(1, 100), integer=True, default=(75,))
def jpeg(image: np.ndarray, rng: np.random.Generator, quality: float) -> np.ndarray:
    """JPEG re-encoding at a quality (Pillow/libjpeg, 4:2:0 chroma)."""
    return jpeg_roundtrip(image, int(quality))


@register("webp", unit="WebP quality", bounds=(1, 100), integer=True, default=(80,))
def webp(image: np.ndarray, rng: np.random.Generator, quality: float) -> np.ndarray:
    """Lossy WebP re-encoding at a quality (Pillow/libwebp)."""
    return encode_roundtrip(image, "WEBP", int(quality))


@register("resize", unit="scale factor", bounds=(1e-3, 8), default=(0.5,), identity=1.0)
def resize(image: np.ndarray, rng: np.random.Generator, factor: float) -> np.ndarray:
    """Resize both sides by a factor (OpenCV-style bilinear, as the official test transform)."""
    return resize_by(image, factor)


@register("short_side", unit="pixels of the shorter side", bounds=(1, 1 << 15), integer=True, default=(112, 64))
def short_side(image: np.ndarray, rng: np.random.Generator, pixels: float) -> np.ndarray:
    """Resize so the shorter side has a number of pixels (GenImage's low-resolution test: 112, 64)."""
    return resize_shorter_side(image, int(pixels))


@register("blur", unit="Gaussian sigma (px)", bounds=(0, 100), default=(1.0, 3.0), identity=0.0)
def blur(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian blur of a sigma, the kernel covering +-3 sigma (torchvision)."""
    if sigma == 0:
        return image
    return gaussian_blur(image, 2 * math.ceil(3 * sigma) + 1, sigma)


@register("noise", unit="Gaussian sigma (0-255 scale)", bounds=(0, 255), default=(5.0,), identity=0.0)
def noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Additive Gaussian noise of a sigma, independent per pixel and channel, seeded per image."""
    return image if sigma == 0 else add_gaussian_noise(image, sigma, rng)


@register("center_crop", unit="fraction of each side kept", bounds=(1e-3, 1), default=(0.5,), identity=1.0)
def center_crop(image: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Centre crop keeping a fraction of each side (no resampling)."""
    return _crop(image, fraction, None)


@register("random_crop", unit="fraction of each side kept", bounds=(1e-3, 1), default=(0.5,), identity=1.0)
def random_crop(image: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Crop at a seeded random place keeping a fraction of each side (no resampling)."""
    return _crop(image, fraction, rng)


def platform_pass(image: np.ndarray) -> np.ndarray:
    """One upload to a social platform: the long side down to 1080 px (never up), then JPEG 85."""
    long_side = max(image.shape[:2])
    if long_side > PLATFORM_LONG_SIDE:
        image = resize_by(image, PLATFORM_LONG_SIDE / long_side)
    return jpeg_roundtrip(image, PLATFORM_QUALITY)


@register("recompress", unit="uploads", bounds=(0, 10), integer=True, default=(1, 2), identity=0.0)
def recompress(image: np.ndarray, rng: np.random.Generator, uploads: float) -> np.ndarray:
    """Platform recompression chain: a number of uploads, each a resize to a 1080-px long side then JPEG 85."""
    for _ in range(int(uploads)):
        image = platform_pass(image)
    return image
