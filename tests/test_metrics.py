"""Binary metrics against small hand-computed cases."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from spai_core.metrics import (binary_metrics, decision_metrics, equal_error_rate, expected_calibration_error,
                               generator_sets, per_generator_metrics, roc_points, sigmoid, weighted_auc_ap)


def assert_metrics(result: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key


def test_perfect_ranking() -> None:
    result = binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    # ECE: each score is alone in its bin -> (0.1 + 0.2 + 0.2 + 0.1) / 4.
    assert_metrics(result, dict(auc=1.0, ap=1.0, accuracy=1.0, tpr_at_fpr_1=1.0, tpr_at_fpr_5=1.0, ece=0.15))
    assert (result["n"], result["n_pos"], result["n_neg"]) == (4, 2, 2)


def test_inverted_ranking() -> None:
    result = binary_metrics([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1])
    # AP: positives at ranks 3 and 4 -> precision 1/3 at recall 1/2, 2/4 at recall 1 -> (1/3 + 1/2) / 2 = 5/12.
    assert_metrics(result, dict(auc=0.0, ap=5 / 12, accuracy=0.0, tpr_at_fpr_1=0.0, tpr_at_fpr_5=0.0, ece=0.85))


def test_partial_ties_are_interpolated() -> None:
    labels = [0, 0, 1, 1, 1]
    scores = [0.1, 0.4, 0.4, 0.8, 0.9]
    result = binary_metrics(labels, scores)
    # AUC: 5 of 6 (pos, neg) pairs ordered right, one tie counts 1/2.
    # ROC points (0,0) (0,1/3) (0,2/3) (0.5,1) (1,1): TPR at FPR f in (0, 0.5) is 2/3 + (f / 0.5) / 3.
    # AP: precision 1, 1, 3/4 at recall 1/3, 2/3, 1.  Accuracy: 0.4 is predicted real -> 4/5 right.
    # ECE bins: {0.1}: 0.1, {0.4, 0.4}: |1 - 0.8|, {0.8}: 0.2, {0.9}: 0.1 -> 0.6 / 5.
    assert_metrics(result, dict(auc=5.5 / 6, ap=(1 + 1 + 0.75) / 3, accuracy=0.8, ece=0.12,
                                tpr_at_fpr_1=2 / 3 + 0.02 / 3, tpr_at_fpr_5=2 / 3 + 0.1 / 3))


def test_all_tied_scores() -> None:
    result = binary_metrics([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])
    # The ROC is the diagonal, so TPR at FPR f is f (random tie-breaking); 0.5 is not > 0.5, so all predicted real.
    assert_metrics(result, dict(auc=0.5, ap=0.5, accuracy=0.5, tpr_at_fpr_1=0.01, tpr_at_fpr_5=0.05, ece=0.0))


def test_accuracy_threshold_is_strict() -> None:
    assert binary_metrics([1, 1], [0.5, 0.5])["accuracy"] == 0.0
    assert binary_metrics([1, 0], [0.5, 0.5], threshold=0.4)["accuracy"] == 0.5
    assert binary_metrics([1, 0], [2.0, -1.0], threshold=0.0)["accuracy"] == 1.0


def test_random_scores_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=2000)
    scores = rng.random(2000)
    result = binary_metrics(labels, scores)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise_auc = np.mean(pos[:, None] > neg[None, :])
    assert result["auc"] == pytest.approx(pairwise_auc, abs=1e-9)
    assert abs(result["auc"] - 0.5) < 0.05
    for key, fpr in (("tpr_at_fpr_1", 0.01), ("tpr_at_fpr_5", 0.05)):
        # Without ties the interpolated value lies between the TPRs of the thresholds just around that FPR.
        threshold = np.sort(neg)[::-1][int(math.floor(fpr * neg.size))]
        assert np.mean(pos > threshold) <= result[key] <= np.mean(pos >= threshold) + 1 / pos.size
    # Labels independent of uniform scores: ECE is about E|0.5 - score| = 0.25.
    assert result["ece"] == pytest.approx(0.25, abs=0.03)


def test_ece_is_small_for_calibrated_scores() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(20000)
    labels = (rng.random(20000) < scores).astype(int)  # P(label = 1 | score) = score
    assert binary_metrics(labels, scores)["ece"] < 0.02


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_nan_not_an_exception(label: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UndefinedMetricWarning from scikit-learn either
        result = binary_metrics([label] * 3, [0.2, 0.7, 0.9])
    for key in ("auc", "ap", "tpr_at_fpr_1", "tpr_at_fpr_5"):
        assert math.isnan(result[key]), key
    assert result["accuracy"] == pytest.approx(2 / 3 if label == 1 else 1 / 3)
    assert (result["n_pos"], result["n_neg"]) == ((3, 0) if label == 1 else (0, 3))


def test_ece_bins_and_out_of_range_scores() -> None:
    # 1.0 falls in the last bin (closed on the right); a perfectly calibrated extreme gives 0.
    assert expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0
    assert math.isnan(binary_metrics([0, 1], [-2.0, 3.0], threshold=0.0)["ece"]), "logits are not probabilities"


def test_roc_points() -> None:
    fpr, tpr, thresholds = roc_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and len(thresholds) == len(fpr)
    with pytest.raises(ValueError, match="both real"):
        roc_points([1, 1], [0.2, 0.3])


@pytest.mark.parametrize(("labels", "scores", "match"), [
    ([0, 2], [0.1, 0.2], "labels must be 0"),
    ([0, 1], [0.1], "same length"),
    ([], [], "no samples"),
    ([0, 1], [0.1, float("nan")], "NaN"),
])
def test_invalid_inputs_explain_the_problem(labels: list, scores: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        binary_metrics(labels, scores)


def test_each_generator_is_judged_against_all_the_reals() -> None:
    labels = [0, 0, 1, 1, 1, 0]
    generators = ["coco", "raise", "sd", "gan", "sd", "raise"]
    sets = generator_sets(labels, generators)
    assert list(sets) == ["gan", "sd"]  # reals' sources are no generators of their own
    assert sets["sd"].tolist() == [True, True, True, False, True, True]
    assert sets["gan"].tolist() == [True, True, False, True, False, True]
    scores = [0.1, 0.2, 0.9, 0.15, 0.8, 0.3]
    metrics = per_generator_metrics(labels, scores, generators)
    assert metrics["sd"]["auc"] == 1.0 and metrics["gan"]["auc"] == pytest.approx(1 / 3)  # 0.15 beats one real of three
    assert (metrics["gan"]["n_pos"], metrics["gan"]["n_neg"]) == (1, 3)
    assert per_generator_metrics([0, 0], [0.1, 0.2], ["a", "b"]) == {}  # no fakes, no generator sets
    with pytest.raises(ValueError, match="same length"):
        generator_sets([0, 1], ["a"])


def test_sigmoid_is_exact_and_does_not_overflow() -> None:
    logits = np.array([-3.0, 0.0, 2.5])
    np.testing.assert_allclose(sigmoid(logits), 1 / (1 + np.exp(-logits)), rtol=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1 / (1 + exp(800)) warns about the overflow
        assert sigmoid([-800.0, 800.0]).tolist() == [0.0, 1.0]
    assert sigmoid(np.float32(1.0)).dtype == np.float64


def test_equal_error_rate_on_hand_made_cases() -> None:
    # ROC (0,0) (0,.5) (.5,.5) (.5,1) (1,1): at threshold 0.6 one real of two is above and one fake of two below.
    assert equal_error_rate(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9])) == 0.5
    # ROC (0,0) (0,1/3) (0,2/3) (1,2/3) (1,1): FNR - FPR goes 1/3 -> -2/3 along the segment from (0, 2/3) to
    # (1, 2/3), crossing a third of the way, where FPR = FNR = 1/3.
    assert equal_error_rate(np.array([0, 1, 1, 1]), np.array([0.5, 0.2, 0.7, 0.9])) == pytest.approx(1 / 3)
    assert binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])["eer"] == 0.0
    assert binary_metrics([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1])["eer"] == 1.0


def test_oracle_and_balanced_accuracy_and_log_loss() -> None:
    from sklearn.metrics import log_loss as sk_log_loss

    labels, scores = [0, 0, 0, 1], [0.6, 0.1, 0.2, 0.9]
    result = binary_metrics(labels, scores)
    # at 0.5 the real 0.6 is called fake: TNR 2/3, TPR 1; a threshold in [0.6, 0.9) gets all four right
    assert_metrics(result, dict(accuracy=0.75, balanced_accuracy=(2 / 3 + 1) / 2, oracle_accuracy=1.0))
    assert result["log_loss"] == pytest.approx(sk_log_loss(labels, scores))
    # the oracle may also be "everything real": 3 reals of 4 beat any split of these inverted scores
    assert binary_metrics([0, 0, 0, 1], [0.9, 0.8, 0.7, 0.1])["oracle_accuracy"] == 0.75
    single = binary_metrics([0, 0], [0.1, 0.7])
    assert math.isnan(single["balanced_accuracy"]) and math.isnan(single["oracle_accuracy"])
    assert single["accuracy"] == 0.5 and single["log_loss"] == pytest.approx(sk_log_loss([0, 0], [0.1, 0.7],
                                                                                        labels=[0, 1]))
    assert math.isnan(binary_metrics([0, 1], [-2.0, 3.0], threshold=0.0)["log_loss"]), "logits are no probabilities"
    assert decision_metrics(np.array([0, 1, 1]), np.array([1, 1, 0])) == {"accuracy": 1 / 3,
                                                                          "balanced_accuracy": 0.25}


def test_weighted_auc_ap_equal_scikit_learn_on_repeated_rows() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=60)
    scores = rng.integers(0, 12, size=60) / 11  # many ties
    weights = np.vstack([np.ones(60), rng.integers(0, 4, size=(5, 60))])
    auc, ap = weighted_auc_ap(labels, scores, weights)
    for draw, w in enumerate(weights.astype(int)):  # a weight of k is the row k times over
        y, s = np.repeat(labels, w), np.repeat(scores, w)
        assert auc[draw] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert ap[draw] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    auc, ap = weighted_auc_ap([0, 1, 1], [0.1, 0.5, 0.9], [[0, 1, 1]])  # no real in the draw: no AUC
    assert math.isnan(auc[0]) and ap[0] == 1.0  # every fake ranks above every real, of which there are none
