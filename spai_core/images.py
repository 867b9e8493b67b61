"""Image input conversion: any PIL mode or uint8 array to the RGB uint8 array the official model sees."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

ImageLike = Image.Image | np.ndarray | torch.Tensor


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Return an ``H x W x 3`` uint8 RGB array, converting the way the official reader does.

    PIL images go through ``Image.convert("RGB")`` exactly as the official pipeline does: L/P are
    expanded, alpha is dropped without compositing (compositing changes scores a lot), CMYK and
    16-bit modes use Pillow's own conversion. Arrays must already be uint8 ``HxW`` or ``HxWxC``
    (C = 1, 3 or 4; a fourth channel is treated as alpha and dropped).
    """
    if isinstance(image, Image.Image):
        # convert("RGB") of an RGB image is a plain copy: skip it (same pixels, one image-sized allocation less).
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (0..255), got {array.dtype}; convert or pass a PIL image")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 uint8 array, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])
