"""Any-resolution tiling as the official test path does it (spec sections 1.5 and 8.1-8.2).

An image is padded to at least ``size`` on each side (reflect-101, centred), cut into non-overlapping
``size`` tiles anchored top-left in row-major order (right/bottom remainders dropped), and replaced by a
five-crop when that gives fewer than ``minimum_patches`` tiles. Tiles are described by offsets so that
callers can slice them lazily and encode identical offsets (e.g. the five crops of a 224 image) once.
"""
from __future__ import annotations

import numpy as np
import torch

Offset = tuple[int, int]


def reflect101(index: np.ndarray, size: int) -> np.ndarray:
    """Map indices (any distance outside ``0..size-1``) back inside like OpenCV's ``BORDER_REFLECT_101``: the edge
    pixel is not repeated, and reflection repeats for pads wider than the image."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


def pad_to_min_size(image: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad a ``C x H x W`` tensor to at least ``size`` per side, centred (top/left = floor(pad / 2)).

    Returns the padded tensor and the padding ``(top, bottom, left, right)``.
    """
    height, width = image.shape[-2:]
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    top, left = pad_h // 2, pad_w // 2
    padding = (top, pad_h - top, left, pad_w - left)
    if pad_h == 0 and pad_w == 0:
        return image, padding
    rows = torch.from_numpy(reflect101(np.arange(-top, height + pad_h - top), height)).to(image.device)
    cols = torch.from_numpy(reflect101(np.arange(-left, width + pad_w - left), width)).to(image.device)
    return image.index_select(-2, rows).index_select(-1, cols), padding


def five_crop_offsets(height: int, width: int, size: int) -> list[Offset]:
    """torchvision ``five_crop`` order: top-left, top-right, bottom-left, bottom-right, centre."""
    bottom, right = height - size, width - size
    centre = (int(round(bottom / 2.0)), int(round(right / 2.0)))
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), centre]


def spread_indices(count: int, keep: int) -> list[int]:
    """``keep`` indices of ``range(count)`` evenly spread in order (first and last always kept)."""
    if keep >= count:
        return list(range(count))
    if keep == 1:
        return [count // 2]
    return [round(i * (count - 1) / (keep - 1)) for i in range(keep)]


def tile_offsets(height: int, width: int, size: int = 224, minimum_patches: int = 4,
                 max_tiles: int | None = None) -> list[Offset]:
    """Top-left offsets of the tiles the model pools for a (padded) ``height x width`` image.

    ``max_tiles`` bounds the cost of huge images: the grid's tiles are subsampled evenly in row-major
    order (``spread_indices``), which is deterministic and covers the image from its first to last tile. It caps a
    small image's five-crop too, centre first, then the corners in five-crop order.
    """
    if height < size or width < size:
        raise ValueError(f"pad images to at least {size}x{size} before tiling, got {height}x{width}")
    grid = [(r * size, c * size) for r in range(height // size) for c in range(width // size)]
    if len(grid) < minimum_patches:
        crops = five_crop_offsets(height, width, size)
        return crops if max_tiles is None or max_tiles >= len(crops) else [crops[4], *crops[:4]][:max_tiles]
    if max_tiles is not None and len(grid) > max_tiles:
        grid = [grid[i] for i in spread_indices(len(grid), max_tiles)]
    return grid


def plan_tiles(image: torch.Tensor, size: int = 224, minimum_patches: int = 4,
               max_tiles: int | None = None) -> tuple[torch.Tensor, list[Offset]]:
    """Pad a ``C x H x W`` image as the official pipeline does and list the offsets of the tiles to pool."""
    padded, _ = pad_to_min_size(image, size)
    return padded, tile_offsets(*padded.shape[-2:], size, minimum_patches, max_tiles)
