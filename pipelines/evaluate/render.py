"""An :class:`~pipelines.evaluate.protocol.EvalReport` as text: what it rests on (protocol, thresholds, bootstrap),
its tables as :class:`Section` s, and what was left out and why; the Markdown report, and the pieces the HTML one
(:mod:`~pipelines.evaluate.html`) lays out."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from pipelines.evaluate.protocol import ALL_REALS, EvalReport

RANKING = (("auc", "AUC"), ("auc_ci", "AUC 95% CI"), ("ap", "AP"), ("ap_ci", "AP 95% CI"), ("eer", "EER"),
           ("tpr_at_fpr_1", "TPR@1%FPR"), ("tpr_at_fpr_5", "TPR@5%FPR"))
HEAD = (("run", "run"), ("generator", "generator"), ("group", "seen"))
COUNTS = (("n_fake", "fakes"), ("n_real", "reals"))
TAIL = (("oracle_accuracy", "oracle Acc"), ("log_loss", "log-loss"), ("ece", "ECE"))
PAIR = (("auc", "AUC"), ("ap", "AP"), ("eer", "EER"), ("accuracy", "Acc"), ("balanced_accuracy", "bAcc"),
        ("oracle_accuracy", "oracle Acc"))


@dataclasses.dataclass
class Section:
    """One table of the report."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


def cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value)


def _value(row: dict, key: str) -> str:
    """A row's cell; ``<metric>_ci`` is the bootstrap interval of that metric."""
    if key.endswith("_ci"):
        lo, hi = row[f"{key[:-3]}_lo"], row[f"{key[:-3]}_hi"]
        return "-" if math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"
    return cell(row.get(key, math.nan))


def _metric_section(title: str, caption: str, rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> Section:
    """A table of ``rows`` with ``columns`` as (key, header) pairs."""
    return Section(title, [name for _, name in columns], [[_value(r, key) for key, _ in columns] for r in rows],
                   caption)


def _decisions(report: EvalReport) -> tuple[tuple[str, str], ...]:
    t = f"{report.threshold:g}"
    at_threshold = (("accuracy", f"Acc@{t}"), ("balanced_accuracy", f"bAcc@{t}"))
    calibrated = (("cal_accuracy", "Acc@cal"), ("cal_balanced_accuracy", "bAcc@cal")) if report.calibrated else ()
    return at_threshold + calibrated + TAIL


def _comparisons(report: EvalReport, metric: str, name: str) -> list[Section]:
    """``metric`` per generator with a column per run: the settings of sweep tables (one row per table and
    generator, GenImage's Table 5 layout), and separately the other runs when there are several."""
    plain = [run for run in report.runs if run not in report.variants]
    sections = []
    if report.variants:
        places = {run: (table, variant.label) for run, (table, variant) in report.variants.items()}
        sections.append(_grid(report, metric, places, f"{name} under perturbations",
                              "one column per setting of `spai score --perturb`; none = the original images"))
    if len(plain) > 1:
        sections.append(_grid(report, metric, {run: ("", run) for run in plain}, f"{name} per run", ""))
    return sections


def _grid(report: EvalReport, metric: str, places: dict[str, tuple[str, str]], title: str, caption: str) -> Section:
    """Rows (table, generator), columns as ``places`` maps each run to its (table, column)."""
    values = {(places[r["run"]][0], r["generator"], places[r["run"]][1]): r[metric] for r in report.rows
              if r["run"] in places}
    columns = list(dict.fromkeys(column for _, column in places.values()))
    keys = list(dict.fromkeys((table, generator) for table, generator, _ in values))
    tables = len({table for table, _ in keys}) > 1
    rows = []
    for table, generator in keys:
        cells = [values.get((table, generator, c), math.nan) for c in columns]
        if not all(math.isnan(v) for v in cells):  # e.g. the reals' AUC
            rows.append(([table] if tables else []) + [generator, *(cell(v) for v in cells)])
    return Section(title, (["table"] if tables else []) + ["generator", *columns], rows, caption)


def sections(report: EvalReport) -> list[Section]:
    """The report's tables: ranking metrics, decisions, per-pair values (paired), comparisons across runs."""
    out = [_metric_section("Ranking", "AUC and AP with bootstrap 95% intervals; EER; TPR at a low false-positive "
                           "rate", [r for r in report.rows if r["n_fake"]], HEAD + RANKING + COUNTS),
           _metric_section("Decisions", "accuracy at a threshold, at the best one for this set (oracle), and how "
                           "calibrated the scores are", report.rows, HEAD + _decisions(report))]
    if report.pairs:
        calibrated = (("cal_accuracy", "Acc@cal"),) if report.calibrated else ()
        out.append(_metric_section("Per pair", "each generator's fakes against one real source; the tables above "
                                   "give the mean over sources", report.pairs,
                                   HEAD[:2] + (("real_set", "real source"),) + PAIR + calibrated + COUNTS))
    for metric, name in (("auc", "AUC"), ("accuracy", "Acc")):
        out += _comparisons(report, metric, name)
    return out


def summary(report: EvalReport) -> list[str]:
    """What the numbers rest on: the protocol, the thresholds, the intervals."""
    runs: dict[str, list[str]] = {}  # runs with the same real sets (the settings of a sweep) are named together
    for run, sets in report.real_sets.items():
        shown = ", ".join(f"{s} ({n})" for s, n in sets.items()) if report.protocol == "paired" \
            else str(sets.get(ALL_REALS, 0))
        runs.setdefault(shown, []).append(run)
    sets = "; ".join(f"{', '.join(names)}: {shown}" for shown, names in runs.items())
    if report.protocol == "paired":
        protocol = ("Protocol: paired. Each generator's fakes against each real source apart, then the mean over "
                    f"sources per metric (the SPAI paper's average); real sources (images): {sets}.")
    else:
        protocol = f"Protocol: pooled. Each generator's fakes against all the real images (per run: {sets})."
    lines = [protocol, f"Accuracy at threshold {report.threshold:g} (--threshold): a fake iff score > threshold."]
    for run, values in report.calibrated.items():
        shown = ", ".join(f"{v:.4f}" for v in values) or "not recorded"
        lines.append(f"{run}: also at the calibrated threshold of its checkpoint (Acc@cal): {shown}"
                     + (" (rows scored with different weights)" if len(values) > 1 else "") + ".")
    lines.append(f"AUC and AP intervals: 95% percentile bootstrap of {report.bootstrap} resamples (seed "
                 f"{report.seed}), the fakes and each real set resampled apart." if report.bootstrap else
                 "No bootstrap intervals (--bootstrap 0).")
    return lines


def notes(report: EvalReport) -> list[str]:
    """What was left out and why, and where a number is weaker than it looks; runs with the same note share it."""
    by_run = [(run, f"left out {n['errors']} row(s) that failed to score and {n['unlabelled']} without a label")
              for run, n in report.excluded.items() if n["errors"] or n["unlabelled"]]
    by_run += [(run, f"the metrics pool splits {', '.join(splits)}; `--split test` restricts them to the test rows")
               for run, splits in report.pooled.items()]
    by_run += [(run, note) for run, sets in report.real_sets.items() if (note := _low_fpr_note(sets))]
    runs: dict[str, list[str]] = {}
    for run, note in by_run:
        runs.setdefault(note, []).append(run)
    return [f"{'; '.join(names)}: {note}" for note, names in runs.items()]


def _low_fpr_note(sets: dict[str, int]) -> str | None:
    """Where too few reals make TPR at 1% or 5% FPR an interpolation between ROC points rather than a
    measurement: with n reals the false-positive rate moves in steps of 1/n."""
    if not sets:
        return None
    smallest = min(sets, key=sets.get)
    n = sets[smallest]
    coarse = [fpr for fpr in (0.01, 0.05) if n < 1 / fpr]
    if not coarse:
        return None
    which = {1: f" (real source {smallest})"}.get(len(sets), f" (real source {smallest}, the smallest)")
    return (f"{n} real images{'' if smallest == ALL_REALS else which} put the false-positive rate in steps of "
            f"{1 / n:.1%}, so TPR at {' and '.join(f'{fpr:.0%}' for fpr in coarse)} FPR is interpolated between "
            f"ROC points, not measured ({round(1 / coarse[0])}+ reals measure it)")


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(report: EvalReport) -> str:
    """The report as Markdown: summary, tables, notes."""
    lines = [*summary(report)]
    for s in sections(report):
        lines += ["", f"### {s.title}", *([s.caption, ""] if s.caption else [""]), _md_row(s.columns),
                  _md_row(["---"] * len(s.columns)), *(_md_row(r) for r in s.rows)]
    if left := notes(report):
        lines += ["", "### Left out, and caveats", "", *(f"- {n}" for n in left)]
    return "\n".join(lines)
