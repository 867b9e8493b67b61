"""Derivative images, the social-media edits SPAI is weak on: meme captions, post screenshots, collages and stickers.

Everything is drawn with Pillow (``ImageDraw``, the committed DejaVu Sans Bold font in ``assets/`` with its licence)
from the image and the seeded generator only: captions and user names come from ``assets/words.txt``, avatars and
stickers are procedural shapes, so a variant is reproducible anywhere.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipelines.perturb.degrade import jpeg_roundtrip
from pipelines.perturb.registry import register

ASSETS = Path(__file__).resolve().parent / "assets"
FONT = ASSETS / "DejaVuSans-Bold.ttf"
PHONE_WIDTH = 720  # a phone screen's width in pixels (360 pt at 2x)
SCREENSHOT_QUALITY = 85


@functools.lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    lines = (ASSETS / "words.txt").read_text().splitlines()
    return tuple(w.strip() for w in lines if w.strip() and not w.startswith("#"))


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT), max(6, int(size)))


def phrase(rng: np.random.Generator, low: int, high: int) -> str:
    """``low`` to ``high`` random words of the bundled list."""
    return " ".join(rng.choice(words(), size=int(rng.integers(low, high + 1))))


def fit_caption(draw: ImageDraw.ImageDraw, text: str, width: float, size: int) -> tuple[str, ImageFont.FreeTypeFont]:
    """``text`` on one line, else two, at the largest size up to ``size`` whose lines fit ``width``."""
    half = text.split()
    two_lines = " ".join(half[:len(half) // 2]) + "\n" + " ".join(half[len(half) // 2:])
    while True:
        face = font(size)
        for candidate in (text, two_lines):
            if max(draw.textlength(line, font=face) for line in candidate.split("\n")) <= width or size <= 6:
                return candidate, face
        size = int(size * 0.9)


@register("meme")
def meme(image: np.ndarray, rng: np.random.Generator, strength: None) -> np.ndarray:
    """Meme captions: white upper-case words with a black outline at the top and the bottom (DejaVu Sans Bold)."""
    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    width, height = img.size
    margin = max(2, height // 40)
    for anchor, y in (("ma", margin), ("md", height - margin)):
        text, face = fit_caption(draw, phrase(rng, 2, 5).upper(), width * 0.94, max(8, min(height // 8, width // 6)))
        draw.multiline_text((width / 2, y), text, font=face, fill="white", anchor=anchor, align="center",
                            stroke_width=max(1, face.size // 12), stroke_fill="black")
    return np.asarray(img)


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(30, 230, size=3))


def avatar(rng: np.random.Generator, size: int, initial: str) -> Image.Image:
    """A round avatar: a two-colour diagonal gradient with the user's initial."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    t = (ramp[:, None] + ramp[None, :])[..., None] / 2
    first, second = np.array(random_colour(rng)), np.array(random_colour(rng))
    face = Image.fromarray((first * (1 - t) + second * t).astype(np.uint8))
    ImageDraw.Draw(face).text((size / 2, size / 2), initial.upper(), font=font(size // 2), fill="white", anchor="mm")
    mask = Image.new("L", (size, size))
    ImageDraw.Draw(mask).ellipse((0, 0, size - 1, size - 1), fill=255)
    out = Image.new("RGBA", (size, size))
    out.paste(face, mask=mask)
    return out


def like_bar(draw: ImageDraw.ImageDraw, top: int, ink: str) -> None:
    """Heart, comment, share and bookmark icons, drawn as outlines."""
    s, y = 36, top + 22
    draw.polygon([(24, y + 8), (24 + s // 2, y + s), (24 + s, y + 8), (24 + s * 3 // 4, y), (24 + s // 2, y + 6),
                  (24 + s // 4, y)], outline=ink, width=3)
    draw.ellipse((84, y, 84 + s, y + s), outline=ink, width=3)
    draw.polygon([(144, y), (144 + s, y + s // 2), (144, y + s)], outline=ink, width=3)
    draw.polygon([(PHONE_WIDTH - 56, y), (PHONE_WIDTH - 28, y), (PHONE_WIDTH - 28, y + s),
                  (PHONE_WIDTH - 42, y + s - 12), (PHONE_WIDTH - 56, y + s)], outline=ink, width=3)


def post_photo(image: np.ndarray) -> Image.Image:
    """The photo at the screen's width, cropped to Instagram's aspect range (1.91:1 to 4:5)."""
    img = Image.fromarray(image)
    aspect = min(max(img.height / img.width, 1 / 1.91), 5 / 4)
    return ImageOps.fit(img, (PHONE_WIDTH, round(PHONE_WIDTH * aspect)), Image.Resampling.BICUBIC)


@register("screenshot")
def screenshot(image: np.ndarray, rng: np.random.Generator, strength: None) -> np.ndarray:
    """A phone screenshot of a social post: status bar, avatar and user name, the photo, like bar, caption; JPEG 85."""
    dark = bool(rng.random() < 0.5)
    paper, ink, grey = ("black", "white", (160, 160, 160)) if dark else ("white", "black", (120, 120, 120))
    photo = post_photo(image)
    user = "_".join(rng.choice(words(), size=2)) + str(int(rng.integers(1, 99)))
    header, footer = 48 + 104, 88 + 190
    frame = Image.new("RGB", (PHONE_WIDTH, header + photo.height + footer), paper)
    draw = ImageDraw.Draw(frame)
    draw.text((28, 24), f"{int(rng.integers(0, 24))}:{int(rng.integers(0, 60)):02d}", font=font(24), fill=ink,
              anchor="lm")
    draw.rounded_rectangle((PHONE_WIDTH - 76, 12, PHONE_WIDTH - 28, 36), 6, outline=ink, width=2)
    frame.paste(face := avatar(rng, 72, user[0]), (24, 64), face)
    draw.text((112, 100), user, font=font(26), fill=ink, anchor="lm")
    draw.text((PHONE_WIDTH - 28, 100), "...", font=font(28), fill=ink, anchor="rm")
    frame.paste(photo, (0, header))
    top = header + photo.height
    like_bar(draw, top, ink)
    draw.text((24, top + 100), f"{int(rng.integers(12, 99999)):,} likes", font=font(24), fill=ink, anchor="lm")
    draw.text((24, top + 140), f"{user} {phrase(rng, 3, 6)}", font=font(22), fill=ink, anchor="lm")
    draw.text((24, top + 176), f"View all {int(rng.integers(2, 400))} comments", font=font(20), fill=grey,
              anchor="lm")
    return jpeg_roundtrip(np.asarray(frame), SCREENSHOT_QUALITY)


@register("collage")
def collage(image: np.ndarray, rng: np.random.Generator, strength: None) -> np.ndarray:
    """A 2x2 collage at the image's size, white gutters: the whole image and three random zoomed or mirrored crops."""
    img = Image.fromarray(image)
    width, height = img.size
    gutter = max(1, min(width, height) // 50)
    cell_w, cell_h = max(1, (width - 3 * gutter) // 2), max(1, (height - 3 * gutter) // 2)
    canvas = Image.new("RGB", (width, height), "white")
    for i in range(4):
        tile = img
        if i:
            fraction = rng.uniform(0.4, 0.7)
            crop_w, crop_h = max(1, round(width * fraction)), max(1, round(height * fraction))
            left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
            tile = img.crop((left, top, left + crop_w, top + crop_h))
            tile = ImageOps.mirror(tile) if rng.random() < 0.5 else tile
        tile = ImageOps.fit(tile, (cell_w, cell_h), Image.Resampling.BICUBIC)
        canvas.paste(tile, (gutter + (i % 2) * (cell_w + gutter), gutter + (i // 2) * (cell_h + gutter)))
    return np.asarray(canvas)


def draw_sticker(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple[int, int, int], fill: tuple) -> None:
    """One sticker in the square ``(x, y, size)``: a star, a heart, a smiley or a word badge, white-outlined."""
    x, y, s = box
    outline = {"outline": "white", "width": max(2, s // 16)}
    kind = int(rng.integers(0, 4))
    if kind == 0:
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2, s * 0.2, s * 0.5)
        draw.polygon(list(zip(x + s / 2 + radii * np.cos(angles), y + s / 2 - radii * np.sin(angles))), fill=fill,
                     **outline)
    elif kind == 1:
        draw.polygon([(x, y + s * 0.3), (x + s / 2, y + s), (x + s, y + s * 0.3), (x + s * 0.75, y),
                      (x + s / 2, y + s * 0.2), (x + s * 0.25, y)], fill=fill, **outline)
    elif kind == 2:
        draw.ellipse((x, y, x + s, y + s), fill=(250, 210, 40), **outline)
        for eye in (0.33, 0.6):
            draw.ellipse((x + s * eye, y + s * 0.3, x + s * (eye + 0.08), y + s * 0.42), fill="black")
        draw.arc((x + s * 0.25, y + s * 0.35, x + s * 0.75, y + s * 0.8), 20, 160, fill="black", width=max(1, s // 20))
    else:
        draw.rounded_rectangle((x, y + s * 0.25, x + s, y + s * 0.75), s // 8, fill=fill, **outline)
        draw.text((x + s / 2, y + s / 2), str(rng.choice(("LOL", "OMG", "WOW", "YES"))), font=font(s // 4),
                  fill="white", anchor="mm")


@register("sticker", unit="stickers", bounds=(0, 50), integer=True, default=(3,), identity=0.0)
def sticker(image: np.ndarray, rng: np.random.Generator, count: float) -> np.ndarray:
    """Sticker overlay: a number of stars, hearts, smileys and word badges, each 15-25% of the shorter side."""
    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    short = min(img.size)
    for _ in range(int(count)):
        size = max(4, int(short * rng.uniform(0.15, 0.25)))
        x, y = (int(rng.integers(0, max(1, side - size))) for side in img.size)
        draw_sticker(draw, rng, (x, y, size), random_colour(rng))
    return np.asarray(img)
