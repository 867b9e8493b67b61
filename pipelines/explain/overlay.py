"""An explanation drawn on its image: the tile-attention heat map as a colour map, the tile grid, each tile's weight.

The PNG carries the numbers too (a ``spai:tiles`` text chunk: score, tile size, offsets and weights), so an overlay
can be checked or re-plotted without the model (:func:`read_tiles`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from spai_core.detector import Explanation

TILES_KEY = "spai:tiles"
# Diverging maps: a tile's weight is shown against the mean weight 1/L, so uniform attention is neutral, not "hot".
COLORMAPS = ("coolwarm", "RdBu_r", "bwr", "seismic")
RATIO_RANGE = 4.0  # the ends of the colour map: 4x below and 4x above the mean tile weight
_BANNER = 28  # px of caption strip above the image


def heat_colors(heat: np.ndarray, tiles: int, colormap: str) -> np.ndarray:
    """``H x W`` heat (tile weights) -> ``H x W x 3`` colours in [0, 1]: log of the weight over the mean weight, the
    middle of the map at the mean and its ends at :data:`RATIO_RANGE` times below or above."""
    ratio = np.log(np.maximum(heat * tiles, 1e-12)) / np.log(RATIO_RANGE)
    return matplotlib.colormaps[colormap](0.5 + 0.5 * np.clip(ratio, -1, 1))[..., :3]


def _grid(draw: ImageDraw.ImageDraw, explanation: Explanation, tile_size: int, pad: tuple[int, int],
          top: int, font: ImageFont.ImageFont) -> None:
    """Tile outlines and weights (in %), in the original image's coordinates (below the caption strip)."""
    for (row, col), weight in zip(explanation.offsets, explanation.weights):
        y, x = row - pad[0] + top, col - pad[1]
        draw.rectangle([x, y, x + tile_size - 1, y + tile_size - 1], outline=(255, 255, 255), width=2)
        draw.text((x + 5, y + 4), f"{100 * weight:.1f}%", fill=(255, 255, 255), font=font, stroke_width=2,
                  stroke_fill=(0, 0, 0))


def render_overlay(image: np.ndarray, explanation: Explanation, tile_size: int, alpha: float = 0.5,
                   colormap: str = "coolwarm", caption: str | None = None) -> Image.Image:
    """``H x W x 3`` uint8 image + its explanation -> the overlay (pixels no tile covers are dimmed, not coloured)."""
    height, width = image.shape[:2]
    covered = (explanation.heatmap > 0)[..., None]
    base = image.astype(np.float32) / 255
    colors = heat_colors(explanation.heatmap, len(explanation.weights), colormap)
    blend = np.where(covered, (1 - alpha) * base + alpha * colors, 0.35 * base)
    canvas = Image.new("RGB", (width, height + _BANNER), (0, 0, 0))
    canvas.paste(Image.fromarray(np.round(blend * 255).astype(np.uint8)), (0, _BANNER))
    draw = ImageDraw.Draw(canvas)
    # The explanation's offsets are in the padded image: sides under a tile were padded, centred.
    pad = (max(tile_size - height, 0) // 2, max(tile_size - width, 0) // 2)
    _grid(draw, explanation, tile_size, pad, _BANNER, ImageFont.load_default(size=12))
    tiles = len(explanation.weights)
    text = caption or (f"score {explanation.score:.3f}   logit {explanation.logit:+.3f}   {tiles} tiles   "
                       f"red: above the mean weight, blue: below")
    draw.text((6, 6), text, fill=(255, 255, 255), font=ImageFont.load_default(size=15))
    return canvas


def save_overlay(overlay: Image.Image, path: str | Path, explanation: Explanation, tile_size: int) -> None:
    """Write the overlay PNG with its numbers in a ``spai:tiles`` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(TILES_KEY, json.dumps({
        "score": explanation.score, "logit": explanation.logit, "tile_size": tile_size,
        "offsets": [list(o) for o in explanation.offsets], "weights": [float(w) for w in explanation.weights]}))
    overlay.save(path, pnginfo=info)


def read_tiles(path: str | Path) -> dict[str, Any]:
    """The numbers an overlay PNG was drawn from (score, logit, tile_size, offsets, weights)."""
    with Image.open(path) as png:
        return json.loads(png.text[TILES_KEY])
