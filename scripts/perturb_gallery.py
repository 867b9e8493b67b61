"""Draw every registered perturbation (each at its default strengths, every filter) on one committed photo, as one
labelled PNG grid: ``python scripts/perturb_gallery.py [--photo P] [--output docs/perturbations.png]``."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.perturb import parse_variants, perturbations
from pipelines.perturb.derivatives import font

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "pipelines" / "assets" / "photos" / "skimage__astronaut.jpg"
TILE = 200  # px, each variant fitted inside
LABEL = 24  # px of caption under each tile
COLUMNS = 7


def gallery(photo: Path, size: int = 400, seed: int = 0) -> Image.Image:
    """The grid: one tile per variant of ``photo`` (shrunk to ``size`` px first, the scale a post would have)."""
    with Image.open(photo) as img:
        img = img.convert("RGB")
        img.thumbnail((size, size))
        image = np.asarray(img)
    variants = parse_variants([name for name in perturbations() if name != "none"])
    rows = math.ceil(len(variants) / COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * TILE, rows * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, variant in enumerate(variants):
        tile = Image.fromarray(variant.apply(image, np.random.default_rng(seed)))
        tile.thumbnail((TILE - 8, TILE - 8))
        x, y = (i % COLUMNS) * TILE, (i // COLUMNS) * (TILE + LABEL)
        sheet.paste(tile, (x + (TILE - tile.width) // 2, y + (TILE - tile.height) // 2))
        draw.text((x + TILE // 2, y + TILE + LABEL // 2), variant.label, font=font(14), fill="black", anchor="mm")
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photo", type=Path, default=PHOTO)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "perturbations.png")
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # a 256-colour palette keeps the file small (about a third of true colour) at no visible cost in a thumbnail grid
    gallery(args.photo).quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(args.output, optimize=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
