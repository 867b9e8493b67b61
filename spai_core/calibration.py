"""Decision thresholds chosen on a calibration split: a target false-positive rate on real images, or the best
balanced accuracy.

Predictions follow :mod:`spai_core.metrics`: AI-generated iff ``score > threshold`` (strictly). For a target FPR the
threshold is the split-conformal order statistic of the real scores: with ``n`` reals it is the
``ceil((n + 1) * (1 - fpr))``-th smallest, so that a new real image (exchangeable with the calibration ones) scores
above it with probability at most ``fpr``, and on average close to it. That needs ``n >= (1 - fpr) / fpr`` reals (19
for 5%); with fewer the highest real score is the best there is, and the FPR it gives is ``1 / (n + 1)`` on average.
The FPR realised on new images spreads around that by :func:`fpr_spread`.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

# A threshold is a probability strictly inside (0, 1); float64 sigmoids saturate at 1.0 only for logits above ~37.
_HIGHEST = float(np.nextafter(1.0, 0.0))
_LOWEST = float(np.nextafter(0.0, 1.0))


def _sorted(scores: ArrayLike, what: str) -> np.ndarray:
    values = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    if values.size == 0:
        raise ValueError(f"no {what} scores to calibrate on")
    if not np.isfinite(values).all():
        raise ValueError(f"{what} scores contain NaN or infinity")
    return values


def _inside(threshold: float) -> float:
    return float(min(max(threshold, _LOWEST), _HIGHEST))


def fpr_rank(n_real: int, target_fpr: float) -> int:
    """The 1-based rank (ascending) of the real score that is the threshold for ``target_fpr``; ``n_real + 1``
    when there are too few reals for the target (no real score guarantees it)."""
    if not 0 < target_fpr < 1:
        raise ValueError(f"target FPR must be strictly between 0 and 1, got {target_fpr}")
    # the small tolerance keeps e.g. 20 * 0.95 = 19.000000000000004 at 19
    return math.ceil((n_real + 1) * (1 - target_fpr) - 1e-9)


def enough_reals(target_fpr: float) -> int:
    """The fewest reals whose order statistic bounds the FPR at ``target_fpr`` (19 for 5%)."""
    return math.ceil((1 - target_fpr) / target_fpr - 1e-9)


def fpr_spread(n_real: int, target_fpr: float) -> float:
    """The standard deviation of the FPR on new reals around ``target_fpr`` for a threshold from ``n_real`` reals
    (the realised FPR is Beta-distributed: variance ``fpr (1 - fpr) / (n + 2)``)."""
    return math.sqrt(target_fpr * (1 - target_fpr) / (n_real + 2))


def reals_for_spread(target_fpr: float, spread: float) -> int:
    """The fewest reals for which :func:`fpr_spread` is at most ``spread``."""
    return max(enough_reals(target_fpr), math.ceil(target_fpr * (1 - target_fpr) / spread ** 2 - 2 - 1e-9))


def fpr_threshold(real_scores: ArrayLike, target_fpr: float) -> float:
    """The lowest threshold that keeps the FPR on new real images at most ``target_fpr`` (the module docstring says
    how); the highest real score when there are too few reals for that."""
    real = _sorted(real_scores, "real")
    rank = min(fpr_rank(real.size, target_fpr), real.size)
    return _inside(real[rank - 1])


def balanced_threshold(real_scores: ArrayLike, fake_scores: ArrayLike) -> float:
    """The threshold of the highest balanced accuracy ``(TPR + TNR) / 2`` on these scores.

    Every threshold between two neighbouring scores predicts the same, so the midpoint of the best such interval is
    returned: it sits as far as the data allow from the images on either side."""
    real, fake = _sorted(real_scores, "real"), _sorted(fake_scores, "fake")
    candidates = np.unique(np.concatenate([real, fake]))
    tnr = np.searchsorted(real, candidates, side="right") / real.size
    tpr = 1.0 - np.searchsorted(fake, candidates, side="right") / fake.size
    best = int(np.argmax(tnr + tpr))
    upper = candidates[best + 1] if best + 1 < candidates.size else candidates[best]
    return _inside((candidates[best] + upper) / 2)


def rates(real_scores: ArrayLike, fake_scores: ArrayLike, threshold: float) -> dict[str, float]:
    """FPR, TPR, real and balanced accuracy at ``threshold`` (AI-generated iff ``score > threshold``)."""
    real, fake = _sorted(real_scores, "real"), _sorted(fake_scores, "fake")
    fpr, tpr = float(np.mean(real > threshold)), float(np.mean(fake > threshold))
    return {"fpr": fpr, "tpr": tpr, "real_accuracy": 1.0 - fpr, "balanced_accuracy": (tpr + 1.0 - fpr) / 2}
