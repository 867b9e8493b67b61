"""The report's plots as PNG bytes: ROC curves per generator, and for sweep tables AUC and accuracy against the
strength of each perturbation, one line per generator."""
from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from pipelines.evaluate.protocol import ALL_REALS, OVERALL, REAL, EvalReport


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")  # "tight" keeps a legend beside the axes in the picture
    return buffer.getvalue()


def roc_png(report: EvalReport, generator: str) -> bytes:
    """ROC plots of a generator with a curve per run (and per real source under the paired protocol): on a linear
    and on a log false-positive axis, where the low rates that matter for screening (1%, 0.1%) can be read."""
    fig = Figure(figsize=(13, 4.5), dpi=100)  # the object API: no pyplot state, no GUI backend; room for the legend
    linear, log = fig.subplots(1, 2)
    auc = {(r["run"], r["generator"], r.get("real_set", ALL_REALS)): r["auc"] for r in report.pairs or report.rows}
    lowest = 1.0
    for (run, name, real_set), (fpr, tpr) in report.curves.items():
        if name != generator:
            continue
        lowest = min([lowest, *fpr[fpr > 0]])
        label = run if real_set == ALL_REALS else f"{run} vs {real_set}"
        for ax in (linear, log):
            ax.plot(fpr, tpr, label=f"{label} (AUC {auc[(run, name, real_set)]:.3f})")
    chance = np.geomspace(1e-4, 1, 100)  # points along it, or the log axis draws y = x as a straight chord
    for ax in (linear, log):
        ax.plot(chance, chance, linestyle=":", color="grey")
        ax.set(xlabel="false positive rate (reals)", ylabel="true positive rate (fakes)", ylim=(0, 1.01))
    linear.set(title=f"ROC: {generator}", xlim=(0, 1))
    log.set(title="low false-positive rates", xscale="log", xlim=(min(lowest, 0.01) / 2, 1))
    log.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")  # beside: many curves hide one
    return _png(fig)


def sweep_tables(report: EvalReport) -> list[str]:
    """The sweep tables of the report (those scored with ``--perturb``), in order."""
    return list(dict.fromkeys(table for table, _ in report.variants.values()))


def _lines(report: EvalReport, table: str, metric: str) -> dict[str, dict[str, float]]:
    """``{generator: {variant label: value}}`` of one sweep table; the reals only where the metric is defined."""
    lines: dict[str, dict[str, float]] = {}
    for row in report.rows:
        if report.variants.get(row["run"], ("",))[0] == table and row["generator"] != OVERALL \
                and not math.isnan(row[metric]):
            lines.setdefault(row["generator"], {})[row["variant"]] = row[metric]
    return lines


def sweep_png(report: EvalReport, table: str) -> bytes:
    """AUC (top) and accuracy (bottom) of a sweep table against each perturbation's strength, one line per
    generator (group means dashed), each generator's value on the original images dotted; perturbations without
    a strength (a filter, a meme) side by side in a last panel."""
    settings = [v for t, v in report.variants.values() if t == table and v.perturbation != "none"]
    kinds = list(dict.fromkeys(v.perturbation for v in settings if v.strength is not None))
    other = [v.label for v in settings if v.strength is None]
    panels = kinds + (["other"] if other else [])
    fig = Figure(figsize=(4 * max(len(panels), 1) + 1.5, 7), dpi=100)
    axes = np.asarray(fig.subplots(2, max(len(panels), 1), squeeze=False))
    for row_axes, (metric, name) in zip(axes, (("auc", "AUC"), ("accuracy", f"Acc@{report.threshold:g}"))):
        lines = _lines(report, table, metric)
        colours = {g: f"C{i % 10}" for i, g in enumerate(lines)}
        for ax, panel in zip(row_axes, panels):
            for generator, values in lines.items():
                _draw(ax, panel, settings, values, colours[generator], generator)
            ax.set(title=f"{name}: {panel}", ylabel=name, ylim=(-0.02, 1.02),
                   xlabel="perturbation" if panel == "other" else f"{panel} strength")
        if panels:
            row_axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    fig.suptitle(f"{table}: robustness (dotted: the original images)")
    return _png(fig)


def _draw(ax, panel: str, settings: Sequence, values: dict[str, float], colour: str, generator: str) -> None:
    """One generator's line in one panel, and its value on the original images as a dotted level."""
    style = {"color": colour if generator != REAL else "grey", "marker": "o",
             "linestyle": "--" if generator.startswith("mean") else "-", "label": generator}
    if panel == "other":
        labels = [v.label for v in settings if v.strength is None and v.label in values]
        ax.plot(labels, [values[label] for label in labels], **style)
        ax.tick_params(axis="x", labelrotation=20)
    else:
        points = sorted((v.strength, values[v.label]) for v in settings
                        if v.perturbation == panel and v.strength is not None and v.label in values)
        ax.plot([x for x, _ in points], [y for _, y in points], **style)
    if "none" in values:
        ax.axhline(values["none"], color=style["color"], linestyle=":", linewidth=1)
