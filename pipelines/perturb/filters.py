"""Instagram-like photo filters, each a documented recipe of a colour matrix, tone curves, Pillow enhancements, a
tint and a vignette (the recipes approximate the looks the CSSgram project rebuilt from each app filter; none is the
app's exact look-up table, which is not public).

Steps run in that order: matrix (``Image.convert`` with a 3x3 matrix), per-channel curves (a look-up table through
``Image.point``, linear between control points), brightness, contrast and saturation (``PIL.ImageEnhance``), a blend
towards a flat tint colour, then a radial vignette that darkens towards the corners (Pillow has no vignette).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance

from pipelines.perturb.degrade import to_uint8
from pipelines.perturb.registry import register

Curve = tuple[tuple[int, int], ...]  # (input, output) control points on 0..255
IDENTITY: Curve = ((0, 0), (255, 255))


@dataclasses.dataclass(frozen=True)
class FilterRecipe:
    """One filter. Enhancement factors are Pillow's (1 = unchanged); ``tint`` is ``(r, g, b, alpha)``; ``vignette``
    is the darkening at the corners (0..1)."""

    description: str
    matrix: tuple[float, ...] | None = None  # 3x3, row-major: output (R, G, B) from input (R, G, B)
    curves: tuple[Curve, Curve, Curve] = (IDENTITY, IDENTITY, IDENTITY)
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    tint: tuple[int, int, int, float] | None = None
    vignette: float = 0.0


SEPIA = (0.393, 0.769, 0.189, 0.349, 0.686, 0.168, 0.272, 0.534, 0.131)  # the classic sepia-tone matrix
GREY = (0.299, 0.587, 0.114) * 3  # ITU-R 601 luma in every channel

FILTERS: dict[str, FilterRecipe] = {
    "clarendon": FilterRecipe("cool shadows, warm highlights, punchy contrast and colour",
                              curves=(((0, 0), (128, 134), (255, 255)), IDENTITY, ((0, 24), (128, 128), (255, 240))),
                              contrast=1.2, saturation=1.35),
    "gingham": FilterRecipe("faded, low-contrast, lavender-washed", brightness=1.05, contrast=0.85, saturation=0.8,
                            tint=(230, 230, 250, 0.18)),
    "juno": FilterRecipe("warm, saturated, bright reds and yellows",
                         curves=(((0, 0), (128, 142), (255, 255)), ((0, 0), (128, 132), (255, 255)),
                                 ((0, 0), (128, 116), (255, 235))), contrast=1.15, saturation=1.35),
    "lark": FilterRecipe("bright, lifted shadows, muted colour",
                         curves=(((0, 30), (255, 255)), ((0, 30), (255, 255)), ((0, 36), (255, 255))),
                         brightness=1.1, contrast=0.9, saturation=0.85),
    "moon": FilterRecipe("black and white with lifted blacks and extra contrast", matrix=GREY,
                         curves=(((0, 18), (255, 245)),) * 3, brightness=1.1, contrast=1.15),
    "nashville": FilterRecipe("pink-peach cast, lifted blue shadows",
                              curves=(IDENTITY, ((0, 8), (255, 240)), ((0, 60), (255, 210))),
                              contrast=1.2, saturation=1.2, tint=(247, 176, 153, 0.2)),
    "toaster": FilterRecipe("burnt orange centre, dark corners", contrast=1.3, brightness=0.9,
                            tint=(240, 140, 60, 0.22), vignette=0.6),
    "sepia": FilterRecipe("old-photo brown tone with a soft vignette", matrix=SEPIA, contrast=1.05, vignette=0.3),
}


def curve_lut(curve: Curve) -> list[int]:
    """The 256-entry look-up table of a curve, linear between its control points."""
    xs, ys = zip(*curve)
    return to_uint8(np.interp(np.arange(256), xs, ys)).tolist()


def vignette(image: np.ndarray, strength: float) -> np.ndarray:
    """Darken by ``strength`` times the squared distance from the centre (0 at the centre, 1 at the corners)."""
    height, width = image.shape[:2]
    ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    gain = 1.0 - strength * (xs * xs + ys * ys) / 2.0
    return to_uint8(image * gain[..., None])


def apply_recipe(image: np.ndarray, recipe: FilterRecipe) -> np.ndarray:
    """``image`` through ``recipe``'s steps, in the order of the module docstring."""
    img = Image.fromarray(image)
    if recipe.matrix is not None:
        r, g, b = (recipe.matrix[i:i + 3] for i in (0, 3, 6))
        img = img.convert("RGB", (*r, 0, *g, 0, *b, 0))
    if recipe.curves != (IDENTITY,) * 3:
        img = img.point([v for curve in recipe.curves for v in curve_lut(curve)])
    for enhance, factor in ((ImageEnhance.Brightness, recipe.brightness), (ImageEnhance.Contrast, recipe.contrast),
                            (ImageEnhance.Color, recipe.saturation)):
        if factor != 1.0:
            img = enhance(img).enhance(factor)
    if recipe.tint is not None:
        img = Image.blend(img, Image.new("RGB", img.size, recipe.tint[:3]), recipe.tint[3])
    out = np.asarray(img)
    return vignette(out, recipe.vignette) if recipe.vignette else out


@register("filter", choices=tuple(FILTERS), default=tuple(FILTERS))
def photo_filter(image: np.ndarray, rng: np.random.Generator, name: str) -> np.ndarray:
    """An Instagram-like filter by name: clarendon, gingham, juno, lark, moon, nashville, toaster, sepia."""
    return apply_recipe(image, FILTERS[name])
