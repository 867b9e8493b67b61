"""``spai explain``: score images one by one and draw where each score comes from (:mod:`.overlay`), with an index.

Writes into the output folder ``overlays/<name>.png`` per image, ``explain.csv`` (image, score, logit, tiles, the
most attended tile, overlay, error) and ``index.md`` (the same as a table with the overlays inline), and saves its
config as ``explain.config.yaml``. An image that cannot be read or scored is a row with its error, not a crash.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import re
from pathlib import Path
from typing import Iterable

import pyarrow.fs as pafs

from pipelines.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, read_image_bytes
from pipelines.data.manifest import resolve_input
from pipelines.explain.overlay import COLORMAPS, render_overlay, save_overlay
from pipelines.infra.console import progress_bar
from pipelines.infra.storage import Files, StorageOptions, basename
from spai_core.config import ConfigError, dump_config, option
from spai_core.detector import PRECISIONS, Detector

logger = logging.getLogger(__name__)

CONFIG_FILE = "explain.config.yaml"
INDEX_CSV = "explain.csv"
INDEX_MD = "index.md"
OVERLAYS = "overlays"
COLUMNS = ("image", "score", "logit", "tiles", "top_tile", "top_weight", "overlay", "error")


@dataclasses.dataclass
class ExplainConfig:
    """What ``spai explain`` draws; saved in the output folder as ``explain.config.yaml``."""

    images: list[str] = option(default_factory=list, flag="IMAGES", help="image files, folders of images (their "
                               "top level) or s3:// prefixes")
    output: str = option("", flag="--output", short="-o", help="folder for overlays/, explain.csv and index.md")
    weights: str = option("", flag="--weights", short="-w", help="official spai.pth or our .safetensors")
    device: str = option("auto", flag="--device", choices=("auto", "cpu", "cuda"), help="where the model runs")
    precision: str = option("auto", flag="--precision", choices=("auto", *PRECISIONS),
                            help="fp32 reproduces the official scores (auto: bf16 on GPU, fp32 on CPU)")
    max_tiles: int | None = option(None, flag="--max-tiles", help="cap on 224-px tiles per image (huge images)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, flag="--max-pixels", help="larger images are rows with a "
                             "decompression_bomb error")
    alpha: float = option(0.5, flag="--alpha", help="opacity of the heat map over the image, 0 to 1")
    colormap: str = option("coolwarm", flag="--colormap", choices=COLORMAPS, help="matplotlib colour map of a "
                           "tile's weight over the mean weight (neutral at the mean, ends at 4x below/above)")

    def validate(self) -> None:
        for name in ("images", "output", "weights"):
            if not getattr(self, name):
                raise ConfigError("is required", name)
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"must be between 0 and 1, got {self.alpha}", "alpha")
        for name in ("max_tiles", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"must be a positive number, got {value}", name)


def list_images(inputs: Iterable[str], files: Files) -> list[str]:
    """Every image to explain: files as given (a missing one becomes a row with its error), folders listed."""
    uris = []
    for uri in inputs:
        if files.info(uri).type == pafs.FileType.Directory:
            uris.extend(resolve_input(uri, options=files.options).column("uri").to_pylist())
        else:
            uris.append(uri)
    return uris


def _overlay_names(uris: list[str]) -> list[str]:
    """A PNG name per image, from its file name; repeated names get their position, so no overlay is overwritten."""
    stems = [re.sub(r"[^\w.-]+", "_", basename(uri).rsplit(".", 1)[0]) or "image" for uri in uris]
    return [f"{stem}.png" if stems.count(stem) == 1 else f"{stem}_{n}.png" for n, stem in enumerate(stems)]


def explain_image(detector: Detector, uri: str, files: Files, overlay_path: Path, cfg: ExplainConfig) -> dict:
    """One index row: the image explained and its overlay written, or the reason it could not be."""
    row = dict.fromkeys(COLUMNS)
    row["image"] = uri
    try:
        image, _ = decode_image(read_image_bytes(uri, files), cfg.max_pixels)
    except DecodeError as exc:
        return {**row, "error": str(exc)}
    try:
        explanation = detector.explain(image)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory on a huge image: recorded, the others go on
        return {**row, "error": f"model_failed: {type(exc).__name__}: {exc}"}
    size = detector.config.img_size
    save_overlay(render_overlay(image, explanation, size, cfg.alpha, cfg.colormap), overlay_path, explanation, size)
    top = int(explanation.weights.argmax())
    return {**row, "score": explanation.score, "logit": explanation.logit, "tiles": len(explanation.weights),
            "top_tile": "{},{}".format(*explanation.offsets[top]), "top_weight": float(explanation.weights[top]),
            "overlay": f"{OVERLAYS}/{overlay_path.name}"}


def write_index(rows: list[dict], out: Path) -> None:
    """``explain.csv`` and ``index.md`` (highest score first; failed rows last, with their errors)."""
    with open(out / INDEX_CSV, "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    ranked = sorted(rows, key=lambda r: (r["score"] is None, -(r["score"] or 0.0)))
    lines = ["# spai explain", "", "Score = P(AI-generated). Overlay: the attention of the model's pooling per tile, "
             "red above the mean tile weight, blue below (dimmed pixels are in no tile); each tile shows its weight.",
             "",
             "| image | score | tiles | overlay |", "|---|---:|---:|---|"]
    for r in ranked:
        if r["error"]:
            lines.append(f"| {r['image']} | - | - | error: {r['error']} |")
        else:
            lines.append(f"| {r['image']} | {r['score']:.4f} | {r['tiles']} | "
                         f"<img src=\"{r['overlay']}\" width=\"320\"> |")
    (out / INDEX_MD).write_text("\n".join(lines) + "\n")


def explain(cfg: ExplainConfig) -> list[dict]:
    """Explain every image of ``cfg.images`` into ``cfg.output``; returns the index rows."""
    files = Files(StorageOptions.from_env())
    uris = list_images(cfg.images, files)
    detector = Detector.from_pretrained(cfg.weights, cfg.device, cfg.precision, max_tiles=cfg.max_tiles)
    out = Path(cfg.output)
    (out / OVERLAYS).mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(dump_config(cfg))
    rows = [explain_image(detector, uri, files, out / OVERLAYS / name, cfg)
            for uri, name in zip(progress_bar(iterable=uris, desc="explain", unit="image"), _overlay_names(uris))]
    write_index(rows, out)
    failed = sum(1 for r in rows if r["error"])
    logger.info("explained %d of %d images into %s (%s)%s", len(rows) - failed, len(rows), out, INDEX_MD,
                f"; {failed} failed, their errors are in {INDEX_CSV}" if failed else "")
    return rows
