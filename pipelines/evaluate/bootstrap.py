"""Seeded bootstrap intervals of AUC and AP for one evaluation row: the mean over its real sets (one under the pooled
protocol, one per real source under the paired one) of each set's AUC and AP against the same fakes."""
from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from spai_core.metrics import weighted_auc_ap

LEVEL = 0.95
CHUNK_ELEMENTS = 1 << 22  # draws x rows per pass: about 32 MB of float64 weights, whatever the table's size


def row_rng(seed: int, *names: str) -> np.random.Generator:
    """The generator of one report row: seeded by ``seed`` and the row's names, so a row's interval does not move
    when other tables or generators join the evaluation."""
    return np.random.default_rng([seed, *(zlib.crc32(name.encode()) for name in names)])


def _counts(n: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of ``n`` rows is drawn in each of ``draws`` resamples of size ``n`` (with replacement)."""
    return rng.multinomial(n, np.full(n, 1 / n), size=draws).astype(np.float64)


def auc_ap_intervals(fakes: np.ndarray, real_sets: Sequence[np.ndarray], draws: int,
                     rng: np.random.Generator) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of the mean AUC and AP of ``fakes`` (their scores) against each of ``real_sets``.

    Each resample draws the fakes once, shared by every pair as the point estimate shares them, and each real set
    apart, each keeping its size (a stratified bootstrap: no resample lacks a class). NaN bounds without draws.
    """
    if draws == 0 or not fakes.size or not real_sets:
        return {"auc": (np.nan, np.nan), "ap": (np.nan, np.nan)}
    largest = fakes.size + max(r.size for r in real_sets)
    chunk = max(1, CHUNK_ELEMENTS // largest)
    auc, ap = [], []
    for start in range(0, draws, chunk):
        size = min(chunk, draws - start)
        fake_counts = _counts(fakes.size, size, rng)
        pair_auc, pair_ap = zip(*(
            weighted_auc_ap(np.r_[np.ones(fakes.size), np.zeros(reals.size)], np.r_[fakes, reals],
                            np.hstack([fake_counts, _counts(reals.size, size, rng)]))
            for reals in real_sets))
        auc.append(np.mean(pair_auc, axis=0))
        ap.append(np.mean(pair_ap, axis=0))
    tails = [50 * (1 - LEVEL), 100 - 50 * (1 - LEVEL)]
    return {name: tuple(float(v) for v in np.percentile(np.concatenate(values), tails))
            for name, values in (("auc", auc), ("ap", ap))}
