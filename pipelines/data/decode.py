"""Bytes -> RGB uint8 array, with every way an image file can be bad turned into a named, recordable reason.

Decoding follows the official reader (PIL ``open`` then ``convert("RGB")``, no EXIF rotation) through
:func:`spai_core.images.to_rgb_array`. Bad files never raise anything but :class:`DecodeError`, whose ``reason`` is
one of :data:`REASONS`, so a pipeline can keep the row and record why it failed instead of dying or dropping it.
"""
from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.data.config import DEFAULT_MAX_PIXELS  # Pillow's own limit yields to it (see _pixel_limit)
from pipelines.infra.storage import Files, StorageError
from spai_core.images import to_rgb_array


REASONS = ("missing", "zero_byte", "not_an_image", "truncated", "decompression_bomb", "unreadable")

# (format, offset, magic bytes): what counts as an image file by content, like the official `filetype.is_image`.
_MAGIC: tuple[tuple[str, int, bytes], ...] = (
    ("JPEG", 0, b"\xff\xd8\xff"),
    ("PNG", 0, b"\x89PNG\r\n\x1a\n"),
    ("GIF", 0, b"GIF87a"),
    ("GIF", 0, b"GIF89a"),
    ("WEBP", 8, b"WEBP"),
    ("TIFF", 0, b"II*\x00"),
    ("TIFF", 0, b"MM\x00*"),
    ("BMP", 0, b"BM"),
    ("JPEG2000", 0, b"\x00\x00\x00\x0cjP  \r\n\x87\n"),
    ("JPEG2000", 0, b"\xff\x4f\xff\x51"),
    ("ICO", 0, b"\x00\x00\x01\x00"),
    ("PSD", 0, b"8BPS"),
    ("HEIF", 4, b"ftypheic"),
    ("HEIF", 4, b"ftypheix"),
    ("HEIF", 4, b"ftypmif1"),
    ("AVIF", 4, b"ftypavif"),
    ("JXL", 0, b"\xff\x0a"),
    ("JXL", 0, b"\x00\x00\x00\x0cJXL \r\n\x87\n"),
)
SNIFF_BYTES = 16


class DecodeError(Exception):
    """An image that cannot be used; ``reason`` names the failure (one of :data:`REASONS`), the message the fix."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown decode failure reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # pickle with the constructor's arguments (see StorageError.__reduce__)
        return type(self), (self.reason, self.message)


def sniff_image_format(head: bytes) -> str | None:
    """The image format named by a file's first :data:`SNIFF_BYTES` bytes, or None when it is not an image."""
    for name, offset, magic in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


def read_image_bytes(uri: str, files: Files) -> bytes:
    """The bytes of an image file; a missing or unreadable file becomes a :class:`DecodeError` with its reason."""
    try:
        return files.read(uri)
    except StorageError as exc:
        reason = "missing" if exc.reason in ("not_found", "missing_bucket") else "unreadable"
        raise DecodeError(reason, str(exc)) from exc


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Let ``max_pixels`` govern instead of Pillow's own bomb check, which reads the global
    ``PIL.Image.MAX_IMAGE_PIXELS``: it warns above that (on the console of every decode worker) and refuses twice that
    (179 M pixels), whatever ``--max-pixels`` says. The warning is silenced and the refusal moved up to ``max_pixels``
    while the image is opened and decoded, then both globals are restored."""
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if before is not None and max_pixels > 2 * before:
            Image.MAX_IMAGE_PIXELS = -(-max_pixels // 2)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


def _bomb(size: str, max_pixels: int) -> DecodeError:
    return DecodeError("decompression_bomb", f"{size} exceeds max_pixels={max_pixels}; raise it with --max-pixels "
                       "if the image is genuine")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """PIL's lazy open (header only), with its failures named."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # beyond what _pixel_limit lets Pillow take, so beyond max_pixels
        claimed = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow's message quotes its own limit, not ours
        raise _bomb(f"{claimed.group(1)} pixels" if claimed else "the image's size", max_pixels) from exc
    except UnidentifiedImageError as exc:
        sniffed = sniff_image_format(data[:SNIFF_BYTES])
        if sniffed is None:
            raise DecodeError("not_an_image", f"the content is not an image ({len(data)} bytes starting with "
                              f"{data[:8]!r}); remove it from the manifest or fix the path") from exc
        raise DecodeError("unreadable", f"looks like {sniffed} by its first bytes but Pillow cannot read it "
                          "(corrupt, truncated header, or a format needing a Pillow plugin); re-encode it as PNG or "
                          "JPEG") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError("truncated" if "truncated" in str(exc).lower() else "unreadable",
                          f"Pillow could not read the header: {exc}") from exc


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 allocate: Callable[[tuple[int, int, int]], np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    """Decode image bytes into an ``H x W x 3`` uint8 RGB array plus ``info`` (width, height, format, mode, bytes).

    The size limit ``max_pixels`` is checked on the header before any pixel is decoded, per call; Pillow's own
    global limit yields to it for the call (see :func:`_pixel_limit`). Truncated files are errors, never silently
    padded with grey.
    Raises :class:`DecodeError` for every kind of bad input. ``allocate(shape)``, when given, returns the array to
    write the pixels into (e.g. the next row of a block being filled); it is called once the image has decoded.
    """
    if not data:
        raise DecodeError("zero_byte", "the file is empty (0 bytes); re-download or re-export it")
    with _pixel_limit(max_pixels), _open(data, max_pixels) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise _bomb(f"{width} x {height} = {width * height} pixels", max_pixels)
        info = {"width": width, "height": height, "format": img.format, "mode": img.mode, "bytes": len(data)}
        try:
            img.load()
            array = to_rgb_array(img, None if allocate is None else allocate((height, width, 3)))
        except (OSError, EOFError) as exc:
            kind = "truncated" if isinstance(exc, EOFError) or "truncated" in str(exc).lower() else "unreadable"
            raise DecodeError(kind, f"{info['format']} data is incomplete or corrupt ({exc}); re-download or "
                              "re-export the file") from exc
        except (SyntaxError, ValueError, TypeError, MemoryError) as exc:
            raise DecodeError("unreadable", f"Pillow could not decode this {info['format']} ({exc}); re-encode "
                              "it as PNG or JPEG") from exc
    return array, info
