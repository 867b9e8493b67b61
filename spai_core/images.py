"""Image input conversion: any PIL mode or uint8 array to the RGB uint8 array the official model sees."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

ImageLike = Image.Image | np.ndarray | torch.Tensor

# Pillow packs its pixels out in chunks of this many bytes (at least one row); each chunk is still in cache when it is
# copied into the output array.
PACK_CHUNK_BYTES = 1 << 18


def to_rgb_array(image: ImageLike, out: np.ndarray | None = None) -> np.ndarray:
    """Return an ``H x W x 3`` uint8 RGB array, converting the way the official reader does.

    PIL images go through ``Image.convert("RGB")`` exactly as the official pipeline does: L/P are
    expanded, alpha is dropped without compositing (compositing changes scores a lot), CMYK and
    16-bit modes use Pillow's own conversion. Arrays must already be uint8 ``HxW`` or ``HxWxC``
    (C = 1, 3 or 4; a fourth channel is treated as alpha and dropped). With ``out``, a C-contiguous
    ``H x W x 3`` uint8 array (such as one row of a preallocated batch), the pixels go there and ``out``
    is returned, so a batch is filled without a temporary array per image.
    """
    if isinstance(image, Image.Image):
        # convert("RGB") of an RGB image is a plain copy: skip it (same pixels, one image-sized allocation less).
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        rgb.load()
        target = _checked_out(out, (rgb.height, rgb.width, 3))
        _pack_rgb(rgb, target)
        return target
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (0..255), got {array.dtype}; convert or pass a PIL image")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 uint8 array, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if out is None:
        return np.ascontiguousarray(array[:, :, :3])
    target = _checked_out(out, (array.shape[0], array.shape[1], 3))
    target[...] = array[:, :, :3]
    return target


def _checked_out(out: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray:
    """``out`` if it can hold an image of ``shape``, a new array when None."""
    if out is None:
        return np.empty(shape, np.uint8)
    if out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous uint8 array of shape {shape}, got {out.dtype} "
                         f"{out.shape}{'' if out.flags.c_contiguous else ' (not C-contiguous)'}")
    return out


def _pack_rgb(image: Image.Image, out: np.ndarray) -> None:
    """Write a loaded RGB image's pixels into ``out`` with Pillow's raw packer, a chunk at a time.

    ``np.asarray(image)`` goes through ``Image.tobytes``, which packs the same chunks and then joins them into one
    bytes object: a second pass over the whole image. Copying each chunk straight into ``out`` saves that pass and,
    for a batch, the copy of the joined array into it (together ~10% of a 512-px JPEG's decode time).
    """
    if out.size == 0:
        return
    flat = memoryview(out).cast("B")
    encoder = Image._getencoder("RGB", "raw", "RGB")  # what tobytes() uses; Pillow has no public packer into a buffer
    try:
        encoder.setimage(image.im, (0, 0, *image.size))
        chunk_bytes = max(PACK_CHUNK_BYTES, image.width * 4)  # the raw encoder packs whole rows (see RawEncode.c)
        written, status = 0, 0
        while status == 0:
            _, status, chunk = encoder.encode(chunk_bytes)
            flat[written:written + len(chunk)] = chunk
            written += len(chunk)
    finally:
        encoder.cleanup()
    if status < 0 or written != out.nbytes:
        raise OSError(f"Pillow's raw packer failed (status {status}, {written} of {out.nbytes} bytes)")
