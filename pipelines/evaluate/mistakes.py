"""``spai evaluate --explain``: the most confident mistakes of each run drawn as ``spai explain`` overlays (the
per-tile attention), so an analyst sees where in a wrongly scored image the score comes from.

Per run (a table; of a sweep table only its original images, variant ``none``): the real images scored highest above
the threshold (false positives) and the fakes scored lowest at or below it (false negatives). An image that cannot be
read any more (moved, deleted) is listed with its error instead of an overlay.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.evaluate.tables import label_runs, select_split, usable_rows, variant_parts
from pipelines.explain.job import ExplainConfig, explain_image
from pipelines.infra.storage import Files, StorageOptions, basename
from spai_core.detector import Detector

logger = logging.getLogger(__name__)

FOLDER = "explain"
KINDS = {"fp": "false positive", "fn": "false negative"}


@dataclasses.dataclass(frozen=True)
class Mistake:
    """One wrongly scored image; ``png`` is its overlay once drawn, ``error`` why it could not be."""

    run: str
    kind: str  # "fp" or "fn"
    rank: int  # 1: the most confident mistake of its kind in its run
    uri: str
    generator: str
    score: float
    file: str  # the overlay's path in the report folder
    png: bytes | None = None
    error: str | None = None

    @property
    def title(self) -> str:
        return f"{self.run}: {KINDS[self.kind]} {self.rank}: {self.uri} ({self.generator}, score {self.score:.4f})"


def _stem(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "_"


def pick_mistakes(named: Mapping[str, pa.Table], threshold: float, count: int,
                  split: str | None = None) -> list[Mistake]:
    """The ``count`` most confident false positives and false negatives of each table (a fake iff score >
    threshold), not yet drawn."""
    runs = label_runs(named)
    out = []
    for source, run in runs.items():
        table, _ = select_split(named[source], source, split)
        part = next((p for v, p in variant_parts(table) if v is None or v.label == "none"), None)
        if part is None:  # a sweep without the original images: every image is perturbed
            continue
        rows = usable_rows(part, source)
        folder = f"{FOLDER}/{_stem(run)}" if len(runs) > 1 else FOLDER
        for kind, wrong, order in (("fp", (rows.labels == 0) & (rows.scores > threshold), -rows.scores),
                                   ("fn", (rows.labels == 1) & (rows.scores <= threshold), rows.scores)):
            chosen = np.flatnonzero(wrong)
            chosen = chosen[np.argsort(order[chosen], kind="stable")][:count]
            for rank, i in enumerate(chosen, 1):
                uri = str(rows.uris[i])
                out.append(Mistake(run, kind, rank, uri, str(rows.generators[i]), float(rows.scores[i]),
                                   f"{folder}/{kind}_{rank}_{_stem(basename(uri).rsplit('.', 1)[0])}.png"))
    return out


def draw_mistakes(mistakes: list[Mistake], weights: str, options: StorageOptions | None = None) -> list[Mistake]:
    """Each mistake with its overlay, drawn by a CPU fp32 Detector of ``weights`` (or the error that stopped it)."""
    if not mistakes:
        return []
    detector = Detector.from_pretrained(weights, "cpu", "fp32")
    files = Files(options)
    cfg = ExplainConfig()  # the overlay defaults of `spai explain` (opacity, colour map, pixel cap)
    drawn = []
    with tempfile.TemporaryDirectory(prefix="spai-mistakes-") as tmp:
        for n, mistake in enumerate(mistakes):
            path = Path(tmp) / f"{n}.png"
            row = explain_image(detector, mistake.uri, files, path, cfg)
            if row["error"]:
                logger.warning("could not draw %s: %s", mistake.title, row["error"])
                drawn.append(dataclasses.replace(mistake, error=row["error"]))
            else:
                drawn.append(dataclasses.replace(mistake, png=path.read_bytes()))
    return drawn


def caption(threshold: float) -> str:
    return (f"Per run, the real images scored highest above {threshold:g} (false positives) and the fakes scored "
            "lowest at or below it (false negatives), with the model's attention per tile: red above the mean tile "
            "weight, blue below.")


def markdown(mistakes: list[Mistake], threshold: float) -> str:
    """The Markdown section: one row per mistake with its overlay file (or error)."""
    lines = ["### Most confident mistakes", "", caption(threshold), "",
             "| run | mistake | image | generator | score | overlay |", "|---|---|---|---|---:|---|"]
    lines += [f"| {m.run} | {KINDS[m.kind]} {m.rank} | {m.uri} | {m.generator} | {m.score:.4f} | "
              f"{f'error: {m.error}' if m.error else m.file} |" for m in mistakes]
    return "\n".join(lines if mistakes else lines[:3] + ["No mistakes at this threshold."])
