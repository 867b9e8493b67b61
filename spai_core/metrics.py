"""Binary detection metrics shared by training validation, evaluation and tuning.

Label convention as in SPAI: 1 = AI-generated (positive), 0 = real; scores are P(AI-generated), i.e.
:func:`sigmoid` of the logit. AUC and AP are exact (scikit-learn), matching the official torchmetrics
``BinaryAUROC`` / ``BinaryAveragePrecision``; accuracy predicts positive iff ``score > threshold`` (strictly), as the
official code does. EER, TPR at a low FPR and the oracle accuracy are read off the ROC curve at every threshold;
:func:`weighted_auc_ap` computes AUC and AP for many bootstrap resamples at once. The paper's protocol pairs each generator's fakes with all the reals (:func:`generator_sets`,
:func:`per_generator_metrics`), so that AUC and AP are defined per generator.

scikit-learn is imported by the functions that use it: it takes about a second, which users of :func:`sigmoid` alone
(the Detector) should not pay.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

ECE_BINS = 15


def sigmoid(logits: ArrayLike) -> np.ndarray:
    """P(AI-generated) of logits, in float64; exact for large magnitudes (no overflow, unlike ``1 / (1 + exp(-x))``)."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(logits, dtype=np.float64)))


def _validated(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {s.size}")
    if y.size == 0:
        raise ValueError("no samples to evaluate: labels and scores are empty")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (real) or 1 (AI-generated), got values {np.unique(y)[:10].tolist()}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity; check the model output for this batch")
    return y.astype(np.int64), s


def _roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` at every distinct threshold, from (0, 0) to (1, 1)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return fpr, tpr


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, fpr_target: float) -> float:
    unique_fpr, starts = np.unique(fpr, return_index=True)
    # fpr is non-decreasing and tpr is non-decreasing along it, so the top of each step is its maximum.
    top_tpr = np.maximum.reduceat(tpr, starts)
    return float(np.interp(fpr_target, unique_fpr, top_tpr))


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr_target: float) -> float:
    """TPR at false-positive rate ``fpr_target``, linearly interpolated on the ROC curve.

    Where several ROC points share an FPR (a vertical step) the highest TPR reached at that FPR is used; between
    points the curve is linear, which for tied scores equals the expected TPR under random tie-breaking.
    """
    return _tpr_at(*_roc(labels, scores), fpr_target)


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    # fnr - fpr falls from 1 at (0, 0) to -1 at (1, 1); the EER is where it crosses 0, on the segment between
    # the ROC points around the crossing (linear, as for tpr_at_fpr).
    gap = (1 - tpr) - fpr
    i = int(np.argmax(gap <= 0))
    if gap[i] == 0:
        return float(fpr[i])
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def equal_error_rate(labels: np.ndarray, scores: np.ndarray) -> float:
    """The error rate where the false-positive rate (reals called fake) equals the false-negative rate (fakes
    missed), interpolated between ROC points."""
    return _eer(*_roc(labels, scores))


def _oracle_accuracy(fpr: np.ndarray, tpr: np.ndarray, n_pos: int, n_neg: int) -> float:
    return float(np.max(tpr * n_pos + (1 - fpr) * n_neg) / (n_pos + n_neg))


def log_loss(labels: np.ndarray, scores: np.ndarray, eps: float = 1e-15) -> float:
    """Mean binary cross-entropy of the scores as probabilities of class 1 (clipped to [eps, 1 - eps], so a
    confident mistake costs about 34 rather than infinity); NaN when scores are not probabilities."""
    if scores.min() < 0.0 or scores.max() > 1.0:
        return float("nan")
    p = np.clip(scores, eps, 1 - eps)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


def decision_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy and balanced accuracy (mean of the true-positive and true-negative rates; NaN with one class) of
    0/1 predictions."""
    right = predicted == labels
    rates = [float(np.mean(right[labels == c])) for c in (0, 1) if (labels == c).any()]
    return {"accuracy": float(np.mean(right)), "balanced_accuracy": float(np.mean(rates)) if len(rates) == 2
            else float("nan")}


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the scores as probabilities of class 1.

    ``bins`` equal-width bins on [0, 1] (the last one closed, so a score of 1.0 counts); ECE is the sample-weighted
    mean over non-empty bins of |fraction of positives - mean score|. NaN when scores are not probabilities (e.g. raw
    logits outside [0, 1]).
    """
    if scores.min() < 0.0 or scores.max() > 1.0:
        return float("nan")
    index = np.minimum((scores * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    label_sums = np.bincount(index, weights=labels, minlength=bins)
    gap = np.abs(label_sums - np.bincount(index, weights=scores, minlength=bins))
    # Per bin: count * |mean label - mean score| = |sum labels - sum scores|, so empty bins contribute 0.
    return float(gap.sum() / counts.sum())


def binary_metrics(labels: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Ranking metrics (AUC, AP, EER, TPR at 1% / 5% FPR), decisions at ``threshold`` (accuracy, balanced accuracy),
    accuracy at the oracle threshold (the best any threshold gets on this set, as SIDBench reports), log-loss, ECE and
    class counts for one evaluation set.

    With a single class present the ranking metrics, balanced and oracle accuracy are NaN (they need both classes)
    while accuracy, log-loss and ECE are still reported, so single-class CSVs (e.g. one generator) can be evaluated
    like the official ``test`` does.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, s = _validated(labels, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    nan = float("nan")
    ranking = dict.fromkeys(("auc", "ap", "eer", "tpr_at_fpr_1", "tpr_at_fpr_5", "oracle_accuracy"), nan)
    if n_pos and n_neg:
        fpr, tpr = _roc(y, s)
        ranking = {"auc": float(roc_auc_score(y, s)), "ap": float(average_precision_score(y, s)),
                   "eer": _eer(fpr, tpr), "tpr_at_fpr_1": _tpr_at(fpr, tpr, 0.01),
                   "tpr_at_fpr_5": _tpr_at(fpr, tpr, 0.05), "oracle_accuracy": _oracle_accuracy(fpr, tpr, n_pos, n_neg)}
    return {**ranking, **decision_metrics(y, (s > threshold).astype(np.int64)), "log_loss": log_loss(y, s),
            "ece": expected_calibration_error(y, s), "n": int(y.size), "n_pos": n_pos, "n_neg": n_neg}


def weighted_auc_ap(labels: ArrayLike, scores: ArrayLike, weights: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """AUC and AP of one set of rows under each row of ``weights`` (draws x rows; e.g. the counts of a bootstrap
    resample), in one vectorised pass: the scores are sorted once for every draw. With all weights 1 they equal
    scikit-learn's ``roc_auc_score`` and ``average_precision_score`` (ties count half; AP without interpolation)."""
    y, s = _validated(labels, scores)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(-s, kind="stable")
    ends = np.append(np.flatnonzero(np.diff(s[order])), s.size - 1)  # the last row of each run of tied scores
    w, y = w[:, order], y[order]
    tp = np.cumsum(w * y, axis=1)[:, ends]
    fp = np.cumsum(w * (1 - y), axis=1)[:, ends]
    with np.errstate(invalid="ignore", divide="ignore"):  # a draw without one class: NaN, as scikit-learn refuses
        tpr = np.pad(tp / tp[:, -1:], ((0, 0), (1, 0)))
        fpr = np.pad(fp / fp[:, -1:], ((0, 0), (1, 0)))
        precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    auc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
    ap = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
    return auc, ap


def roc_points(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of the ROC curve for plotting (collinear points dropped)."""
    from sklearn.metrics import roc_curve

    y, s = _validated(labels, scores)
    if y.min() == y.max():
        raise ValueError(
            f"an ROC curve needs both real (0) and AI-generated (1) samples, got only class {int(y[0])}; "
            "evaluate this set together with a set of the other class"
        )
    return roc_curve(y, s)


def generator_sets(labels: ArrayLike, generators: ArrayLike) -> dict[str, np.ndarray]:
    """The evaluation sets of the SPAI protocol: for each generator of AI-generated rows (sorted by name), a boolean
    mask of its fakes together with ALL the real rows. Reals are shared by every set, whatever their ``generators``
    entry says (their source)."""
    y = np.asarray(labels).reshape(-1)
    g = np.asarray(generators, dtype=object).reshape(-1)
    if y.shape != g.shape:
        raise ValueError(f"labels and generators must have the same length, got {y.size} and {g.size}")
    real = y == 0
    return {name: real | ((y == 1) & (g == name)) for name in sorted(set(g[y == 1].tolist()))}


def per_generator_metrics(labels: ArrayLike, scores: ArrayLike, generators: ArrayLike,
                          threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """:func:`binary_metrics` of each generator's fakes against all the reals (:func:`generator_sets`)."""
    y, s = np.asarray(labels).reshape(-1), np.asarray(scores, dtype=np.float64).reshape(-1)
    return {name: binary_metrics(y[mask], s[mask], threshold) for name, mask in generator_sets(y, generators).items()}
