"""The cross-generator matrix: a row per training set, a column per test generator, AUC and accuracy in each cell,
with row and column means; written as CSV, Markdown and a heat map.

A cell is what ``spai evaluate --split test`` reports for that generator on the row's model's test scores (its
protocol: each generator's AI-generated images against the real ones). Cells whose generator the row trained on are
*seen* (the diagonal of a one-generator-per-row matrix); the others, the generalisation the benchmark measures, are
*unseen*.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from matplotlib import colormaps
from matplotlib.figure import Figure

from pipelines.evaluate.protocol import evaluate
from tune.benchmark.sets import TrainingSet

METRICS = {"auc": "AUC", "accuracy": "accuracy"}
MEAN = "mean"


@dataclass
class CrossGeneratorMatrix:
    """Rows (training sets) x columns (test generators) per metric; NaN where a row's model has no scores."""

    rows: list[TrainingSet]
    columns: list[str]
    values: dict[str, np.ndarray]  # metric -> rows x columns
    threshold: float
    protocol: str = "pooled"  # how the evaluation judged each generator against the reals
    notes: list[str] = field(default_factory=list)  # failed trials, rows left out, what the means skip

    @property
    def seen(self) -> np.ndarray:
        """rows x columns: whether the row's model trained on the column's generator."""
        return np.array([[c in r.generators for c in self.columns] for r in self.rows], dtype=bool)

    def row_means(self, metric: str) -> np.ndarray:
        return _nanmean(self.values[metric], axis=1)

    def column_means(self, metric: str) -> np.ndarray:
        return _nanmean(self.values[metric], axis=0)

    def mean(self, metric: str, seen: bool | None = None) -> float:
        """The mean over every cell, or over the seen (``True``) or unseen (``False``) ones only."""
        values = self.values[metric]
        cells = values if seen is None else values[self.seen == seen]
        return float(_nanmean(cells.reshape(-1), axis=0)) if cells.size else math.nan

    def summary(self) -> dict[str, float]:
        """Means over all, seen and unseen cells per metric: the numbers to compare across benchmarks."""
        return {f"{metric}_{part}_mean": self.mean(metric, seen) for metric in METRICS
                for part, seen in (("all", None), ("seen", True), ("unseen", False))}

    def csv(self, metric: str) -> str:
        """The matrix of ``metric`` with a mean column and a mean row."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["train_on", *self.columns, MEAN])
        for row, values, mean in zip(self.rows, self.values[metric], self.row_means(metric)):
            writer.writerow([row.name, *map(_csv_number, values), _csv_number(mean)])
        writer.writerow([MEAN, *map(_csv_number, self.column_means(metric)), _csv_number(self.mean(metric))])
        return out.getvalue()

    def markdown(self, title: str) -> str:
        """Both matrices (seen cells in bold) with their means, and the notes."""
        parts = [f"# {title}", "",
                 f"Rows: the training set of each model; columns: the test split's generators. A cell is that "
                 f"generator's AI-generated test images against the real ones ({self.protocol} protocol of `spai "
                 f"evaluate`); accuracy at threshold {self.threshold:g}. **Bold**: generators the row trained on."]
        for metric, title_text in METRICS.items():
            parts += ["", f"## {title_text}", "", self.markdown_table(metric), "",
                      f"Mean over seen cells {_number(self.mean(metric, True), 3)}, over unseen cells "
                      f"{_number(self.mean(metric, False), 3)}, over all {_number(self.mean(metric), 3)}."]
        if self.notes:
            parts += ["", "## Notes", "", *(f"- {note}" for note in self.notes)]
        return "\n".join(parts) + "\n"

    def markdown_table(self, metric: str) -> str:
        """The matrix of ``metric`` as a Markdown table with its means; seen cells in bold."""
        seen = self.seen
        lines = ["| train on \\ test on | " + " | ".join([*self.columns, MEAN]) + " |",
                 "|---" * (len(self.columns) + 2) + "|"]
        for i, (row, values, mean) in enumerate(zip(self.rows, self.values[metric], self.row_means(metric))):
            cells = [f"**{_number(v, 3)}**" if seen[i, j] else _number(v, 3) for j, v in enumerate(values)]
            lines.append(f"| {row.name} | " + " | ".join([*cells, _number(mean, 3)]) + " |")
        means = [*map(lambda v: _number(v, 3), self.column_means(metric)), _number(self.mean(metric), 3)]
        lines.append(f"| {MEAN} | " + " | ".join(means) + " |")
        return "\n".join(lines)

    def heatmap_png(self, title: str) -> bytes:
        """One heat map per metric side by side, each with its mean column and row beyond a white gap; seen cells
        framed."""
        width = 2.5 + 0.8 * (len(self.columns) + 1)
        fig = Figure(figsize=(2 * width, 2.2 + 0.6 * (len(self.rows) + 1)), dpi=100)  # no pyplot state
        for ax, metric in zip(fig.subplots(1, len(METRICS)), METRICS):
            self._draw(ax, metric)
        fig.suptitle(f"{title}\n(framed: generators the row trained on)")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()

    def _draw(self, ax, metric: str) -> None:
        values = self.values[metric]
        grid = np.full((len(self.rows) + 1, len(self.columns) + 1), np.nan)
        grid[:-1, :-1], grid[:-1, -1], grid[-1, :-1] = values, self.row_means(metric), self.column_means(metric)
        grid[-1, -1] = self.mean(metric)
        ax.imshow(np.ma.masked_invalid(grid), cmap=colormaps["RdYlGn"].with_extremes(bad="lightgrey"), vmin=0.0,
                  vmax=1.0, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, _number(value, 2), ha="center", va="center", fontsize="small")
        for i, j in zip(*np.nonzero(self.seen)):
            ax.add_patch(_frame(ax, i, j))
        ax.axhline(len(self.rows) - 0.5, color="white", linewidth=4)
        ax.axvline(len(self.columns) - 0.5, color="white", linewidth=4)
        ax.set_xticks(range(len(self.columns) + 1), [*self.columns, MEAN], rotation=40, ha="right")
        ax.set_yticks(range(len(self.rows) + 1), [*(r.name for r in self.rows), MEAN])
        ax.set(xlabel="tested on", ylabel="trained on", title=METRICS[metric])


def build_matrix(rows: list[TrainingSet], columns: list[str], scores: dict[str, pa.Table | None], threshold: float,
                 failures: dict[str, str] | None = None) -> CrossGeneratorMatrix:
    """The matrix from each row's test scores (``scores``: row slug -> scored table, None where its trial failed,
    with the reason in ``failures``)."""
    values = {metric: np.full((len(rows), len(columns)), np.nan) for metric in METRICS}
    notes, protocols = [], set()
    for i, row in enumerate(rows):
        table = scores.get(row.slug)
        if table is None:
            reason = (failures or {}).get(row.slug, "it has no test scores")
            notes.append(f"{row.name}: no model to test ({reason}); its cells are empty and left out of the means")
            continue
        report = evaluate({row.slug: table}, threshold=threshold, split="test", bootstrap=0)
        protocols.add(report.protocol)
        cells = {r["generator"]: r for r in report.rows}
        for j, column in enumerate(columns):
            for metric in METRICS:
                values[metric][i, j] = cells[column][metric] if column in cells else math.nan
        missing = [c for c in columns if c not in cells]
        if missing:
            notes.append(f"{row.name}: no scored test image of {', '.join(missing)} (every one failed to score)")
        left_out = sum(counts["errors"] for counts in report.excluded.values())
        if left_out:
            notes.append(f"{row.name}: {left_out} test image(s) failed to score and are left out (their reasons "
                         "are in the error column of its test scores)")
    return CrossGeneratorMatrix(rows, columns, values, threshold, " and ".join(sorted(protocols)) or "pooled", notes)


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """The mean that skips empty cells (a failed row), NaN where nothing is left, without numpy's warning."""
    counts = np.sum(~np.isnan(values), axis=axis)
    sums = np.nansum(values, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _frame(ax, i: int, j: int):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="black", linewidth=1.5, zorder=3)


def _number(value: float, digits: int = 4) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _csv_number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"  # empty: what CSV readers take for a missing value


