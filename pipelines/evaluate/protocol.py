"""The evaluation protocol of the SPAI paper on score tables: metrics per generator, ``overall`` (all fakes) and
``real`` (the reals alone: its accuracy is the true-negative rate), each against the real images.

Two protocols: ``paired`` judges each generator's fakes against each real source (the ``source`` column of the real
rows) apart and reports the mean over sources per metric, as the paper's numbers are (the per-pair values stay in
:attr:`EvalReport.pairs`); ``pooled`` judges them against all reals at once (:func:`spai_core.metrics.generator_sets`,
which training's validation uses too). ``auto`` picks paired where the reals come from two or more sources. With a
single real source both give the same numbers. Generators seen in training are listed apart from unseen ones, each
group with its mean. Rows that failed to score or have no label are left out and counted
(:mod:`~pipelines.evaluate.tables`); a sweep table (``spai score --perturb``) is one run per perturbation setting.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from pipelines.evaluate.bootstrap import auc_ap_intervals, row_rng
from pipelines.evaluate.config import EvaluateError, threshold_problem
from pipelines.evaluate.tables import (CLEAN, UsableRows, Variant, label_runs, named_tables, select_split,
                                       table_options, usable_rows, variant_parts)
from spai_core.metrics import binary_metrics, decision_metrics, generator_sets, roc_points

METRICS = ("auc", "ap", "eer", "tpr_at_fpr_1", "tpr_at_fpr_5", "accuracy", "balanced_accuracy", "oracle_accuracy",
           "log_loss", "ece")
INTERVALS = ("auc_lo", "auc_hi", "ap_lo", "ap_hi")  # bootstrap 95% bounds, on per-generator rows
CALIBRATED = ("cal_accuracy", "cal_balanced_accuracy")  # at the checkpoint's calibrated threshold, where it has one
SWEEP = ("table", "variant", "perturbation", "strength")  # on the rows of sweep tables
REAL = "real"
OVERALL = "overall"
ALL_REALS = "all reals"  # the one real set of the pooled protocol


@dataclasses.dataclass
class Settings:
    """How every run is evaluated."""

    threshold: float
    seen: set[str] | None
    paired: bool
    bootstrap: int
    seed: int


@dataclasses.dataclass
class EvalReport:
    """Metrics per (run, generator), per (run, generator, real source) under the paired protocol, ROC curves, and
    what each run's evaluation rests on."""

    rows: list[dict]  # run, generator, group (seen/unseen/""), METRICS..., INTERVALS..., n_fake, n_real [, ...]
    curves: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]  # (run, generator, real set) -> (fpr, tpr)
    excluded: dict[str, dict[str, int]]  # run -> {"errors": n, "unlabelled": n}
    threshold: float
    pooled: dict[str, list[str]]  # run -> the splits its metrics pool, for runs that pool several
    protocol: str = "pooled"
    pairs: list[dict] = dataclasses.field(default_factory=list)  # paired: run, generator, real_set, METRICS...
    real_sets: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # run -> {real set: images}
    calibrated: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)  # run -> its thresholds
    variants: dict[str, tuple[str, Variant]] = dataclasses.field(default_factory=dict)  # sweep run -> (table, setting)
    options: dict[str, dict] = dataclasses.field(default_factory=dict)  # table label -> its `spai score` options
    bootstrap: int = 0
    seed: int = 0

    @property
    def runs(self) -> list[str]:
        return list(self.excluded)

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows)

    def markdown(self) -> str:
        from pipelines.evaluate.render import markdown  # render formats an EvalReport: imported late, no cycle

        return markdown(self)


def _mean(rows: Sequence[dict], keys: Sequence[str]) -> dict[str, float]:
    """Unweighted mean of each key over rows (the paper's average), ignoring undefined values."""
    def mean(key: str) -> float:
        values = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        return float(np.mean(values)) if values else math.nan

    return {key: mean(key) for key in keys}


def _pair_row(usable: UsableRows, mask: np.ndarray, threshold: float) -> dict:
    """Every metric of the rows in ``mask``, with the calibrated ones where the table has predictions."""
    labels = usable.labels[mask]
    m = binary_metrics(labels, usable.scores[mask], threshold)
    row = {**{k: m[k] for k in METRICS}, "n_fake": m["n_pos"], "n_real": m["n_neg"]}
    if usable.predicted is not None:
        calibrated = decision_metrics(labels, usable.predicted[mask])
        row.update({f"cal_{k}": v for k, v in calibrated.items()})
    return row


def _set_rows(run: str, name: str, group: str, fakes: np.ndarray, real_sets: Mapping[str, np.ndarray],
              usable: UsableRows, settings: Settings) -> tuple[dict, list[dict], dict]:
    """The row of one set of fakes (a generator's, all of them, or none for the reals alone): the mean over the real
    sets of its metrics against each, with bootstrap intervals; the per-pair rows; the ROC curve of each pair."""
    masks = {s: fakes | reals for s, reals in real_sets.items()} or {ALL_REALS: fakes}
    pairs = [{"run": run, "generator": name, "real_set": s, **_pair_row(usable, mask, settings.threshold)}
             for s, mask in masks.items()]
    keys = [k for k in pairs[0] if k not in ("run", "generator", "real_set", "n_fake", "n_real")]
    scores = usable.scores
    bounds = auc_ap_intervals(scores[fakes], [scores[m] for m in real_sets.values()], settings.bootstrap,
                              row_rng(settings.seed, run, name))
    row = {"run": run, "generator": name, "group": group, **_mean(pairs, keys),
           **{f"{m}_{end}": bounds[m][i] for m in ("auc", "ap") for i, end in enumerate(("lo", "hi"))},
           "n_fake": int(fakes.sum()), "n_real": sum(p["n_real"] for p in pairs)}
    curves = {(run, name, s): roc_points(usable.labels[mask], scores[mask])[:2] for s, mask in masks.items()
              if fakes[mask].any() and not fakes[mask].all()}
    return row, pairs, curves


def _real_sets(usable: UsableRows, paired: bool) -> dict[str, np.ndarray]:
    """Masks of the real sets: one per source under the paired protocol, all reals under the pooled one."""
    real = usable.labels == 0
    if not real.any():
        return {}
    if not paired:
        return {ALL_REALS: real}
    return {source: real & (usable.sources == source) for source in sorted(set(usable.sources[real].tolist()))}


def _evaluate_run(run: str, usable: UsableRows, settings: Settings) -> tuple[list[dict], list[dict], dict]:
    """Rows (generators, group means, reals, overall), per-pair rows and ROC curves of one run."""
    fake = usable.labels == 1
    real_sets = _real_sets(usable, settings.paired)
    generators = list(generator_sets(usable.labels, usable.generators))
    groups = [("", generators)] if settings.seen is None else [
        ("seen", [g for g in generators if g in settings.seen]),
        ("unseen", [g for g in generators if g not in settings.seen])]
    rows, pairs, curves = [], [], {}

    def add(name: str, group: str, fakes: np.ndarray) -> dict:
        row, set_pairs, set_curves = _set_rows(run, name, group, fakes, real_sets, usable, settings)
        rows.append(row)
        pairs.extend(set_pairs)
        curves.update(set_curves)
        return row

    for group, names in groups:
        group_rows = [add(name, group, fake & (usable.generators == name)) for name in names]
        if len(group_rows) > 1:
            rows.append({"run": run, "generator": f"mean ({group})" if group else "mean", "group": group,
                         **_mean(group_rows, [k for k in group_rows[0] if k in METRICS or k in CALIBRATED]),
                         "n_fake": sum(r["n_fake"] for r in group_rows), "n_real": group_rows[0]["n_real"]})
    if real_sets:
        add(REAL, "", np.zeros_like(fake))
    add(OVERALL, "", fake)
    return rows, pairs, curves


def _check_seen(seen: Sequence[str] | None, runs: Mapping[str, UsableRows]) -> None:
    """Refuse seen generators absent from every table: a typo would silently file all generators as unseen."""
    present = set().union(*(generator_sets(u.labels, u.generators) for u in runs.values()))
    unknown = sorted(set(seen or ()) - present)
    if unknown:
        raise EvaluateError(f"seen generator(s) {unknown} have no scored AI-generated rows; the generators present "
                            f"are {', '.join(sorted(present)) or 'none'}")


def _uniform(rows: list[dict]) -> list[dict]:
    """Rows with the same columns (a CSV table), in first-seen order: NaN for missing metrics, None for labels."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    missing = {k: math.nan if k in METRICS or k in INTERVALS or k in CALIBRATED else None for k in keys}
    return [{k: r.get(k, missing[k]) for k in keys} for r in rows]


def _sweep_label(table: str, variant: Variant | None) -> str:
    """A run's label: its table's, or for one setting of a sweep the setting's (``jpeg=75``), after the table's
    where that says more than ``clean``."""
    if variant is None:
        return table
    return variant.label if table == CLEAN else f"{table} / {variant.label}"


def _units(named: Mapping[str, pa.Table], split: str | None) -> tuple[dict, dict, dict, dict]:
    """Each run's usable rows (a table, or a setting of a sweep table), the splits it pools, its sweep setting, and
    each table's options."""
    runs, pooled, variants, options = {}, {}, {}, {}
    for source, table_label in label_runs(named).items():
        table, splits = select_split(named[source], source, split)
        options[table_label] = table_options(table) or {}
        for variant, part in variant_parts(table):
            run = _sweep_label(table_label, variant)
            runs[run] = usable_rows(part, source)
            if splits:
                pooled[run] = splits
            if variant is not None:
                variants[run] = (table_label, variant)
    return runs, pooled, variants, options


def resolve_protocol(protocol: str, runs: Mapping[str, UsableRows]) -> str:
    """``paired`` or ``pooled``; ``auto`` is paired when some run's reals come from two or more sources."""
    if protocol != "auto":
        return protocol
    several = any(len(set(u.sources[u.labels == 0].tolist())) > 1 for u in runs.values())
    return "paired" if several else "pooled"


def evaluate(score_tables: Mapping[str, pa.Table] | Sequence[pa.Table] | pa.Table, threshold: float = 0.5,
             seen: Sequence[str] | None = None, split: str | None = None, protocol: str = "auto",
             bootstrap: int = 1000, seed: int = 0) -> EvalReport:
    """Metrics per fake generator, per real set and overall, for each score table (each setting of a sweep table).

    ``score_tables``: one table, a list, or ``{source: table}`` (sources, e.g. file names, name a table in errors and
    break ties between tables with the same options). Each table is a run, labelled by the options it was scored
    with (``resize_to=512``, ``clean`` when none was set; a sweep table's settings by its variant column).
    ``seen``: generators seen in training, reported as their own group.
    ``split``: evaluate only the rows of this split; by default all rows, pooling splits (noted in the report).
    ``protocol``: ``paired``, ``pooled`` or ``auto`` (see the module); ``bootstrap`` resamples (0: none) seeded by
    ``seed`` give the 95% intervals of AUC and AP.
    """
    if problem := threshold_problem(threshold):
        raise EvaluateError(f"threshold {problem}")
    runs, pooled, variants, options = _units(named_tables(score_tables), split)
    _check_seen(seen, runs)
    used = resolve_protocol(protocol, runs)
    settings = Settings(threshold, None if seen is None else set(seen), used == "paired", bootstrap, seed)
    rows, pairs, curves = [], [], {}
    for run, usable in runs.items():
        run_rows, run_pairs, run_curves = _evaluate_run(run, usable, settings)
        if run in variants:
            table, variant = variants[run]
            sweep = dict(zip(SWEEP, (table, variant.label, variant.perturbation, variant.strength)))
            run_rows = [{**r, **sweep} for r in run_rows]
        rows += run_rows
        pairs += run_pairs
        curves.update(run_curves)
    real_sets = {run: {s: int(m.sum()) for s, m in _real_sets(u, settings.paired).items()} for run, u in runs.items()}
    return EvalReport(_uniform(rows), curves, {run: u.excluded for run, u in runs.items()}, threshold, pooled, used,
                      _uniform(pairs) if settings.paired else [], real_sets,
                      {run: u.thresholds for run, u in runs.items() if u.predicted is not None}, variants, options,
                      bootstrap, seed)
