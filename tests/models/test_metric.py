"""RSNA challenge metric against hand-computed cases (see cxr_triage.models.evaluate for the definition)."""

import math

import numpy as np
import pytest

from cxr_triage.models.evaluate import (
    RSNA_IOU_THRESHOLDS,
    classification_metrics,
    rsna_image_score,
    rsna_metric,
    rsna_metric_details,
)

A = [0.0, 0.0, 10.0, 10.0]


def P(*rows):
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def G(*rows):
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def test_thresholds_are_the_challenge_ones():
    assert RSNA_IOU_THRESHOLDS == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


def test_perfect_match_is_one():
    assert rsna_image_score(P(A + [0.9]), G(A)) == 1.0
    two = G(A, [20, 20, 40, 50])
    assert rsna_image_score(P(A + [0.9], [20, 20, 40, 50, 0.3]), two) == 1.0


def test_one_tp_one_fp_is_half():
    # second box far away: TP=1, FP=1, FN=0 at every threshold -> 1/2
    assert rsna_image_score(P(A + [0.9], [50, 50, 60, 60, 0.8]), G(A)) == pytest.approx(0.5)


def test_iou_between_thresholds():
    # IoU = 62/100 = 0.62: TP at 0.40..0.60 (5 thresholds, score 1 each); at 0.65, 0.70, 0.75 the box is an
    # FP and the GT an FN -> 0/(0+1+1) = 0.  Mean = 5/8.
    assert rsna_image_score(P([0, 0, 10, 6.2, 0.9]), G(A)) == pytest.approx(5 / 8)


def test_iou_exactly_on_a_threshold_is_not_a_hit():
    # IoU = 60/100 = 0.6 exactly. Kaggle: hit iff IoU > t -> TP only at 0.40..0.55 -> 4/8.
    assert rsna_image_score(P([0, 0, 10, 6, 0.9]), G(A)) == pytest.approx(4 / 8)
    # Chen's public kernel (>=) counts it at 0.60 too -> 5/8.
    assert rsna_image_score(P([0, 0, 10, 6, 0.9]), G(A), inclusive=True) == pytest.approx(5 / 8)


def test_empty_gt_and_empty_predictions_is_excluded():
    assert rsna_image_score(P(), G()) is None
    res = rsna_metric_details({"a": P(A + [0.9])}, {"a": G(A), "b": G()})
    assert res.per_image == {"a": 1.0, "b": None}
    assert res.score == 1.0 and res.n_counted == 1


def test_empty_gt_with_predictions_scores_zero_and_counts():
    assert rsna_image_score(P([1, 1, 5, 5, 0.1]), G()) == 0.0
    assert rsna_metric({"a": P(A + [0.9]), "b": P([1, 1, 5, 5, 0.1])}, {"a": G(A), "b": G()}) == pytest.approx(0.5)


def test_gt_without_predictions_scores_zero():
    assert rsna_image_score(P(), G(A)) == 0.0
    assert rsna_metric({}, {"a": G(A)}) == 0.0


def test_duplicate_prediction_is_a_false_positive():
    assert rsna_image_score(P(A + [0.9], A + [0.8]), G(A)) == pytest.approx(0.5)


def test_confidence_order_matters():
    # GT A=[0,0,10,10], B=[8,0,18,10].  Px=[3.8,0,13.8,10]: IoU(A)=62/138=0.449, IoU(B)=58/142=0.408.
    # Py=A exactly (IoU(B)=20/180).
    # t=0.40: Px first -> Px takes A, Py has nothing left (FP), B is FN: 1/3.  Py first -> Py:A, Px:B: 1.
    # t>=0.45: Px hits nothing; Py:A, Px FP, B FN: 1/3 in both orders.
    gt = G(A, [8, 0, 18, 10])
    px, py = [3.8, 0, 13.8, 10], A
    px_first = rsna_image_score(P(px + [0.9], py + [0.5]), gt)
    py_first = rsna_image_score(P(px + [0.5], py + [0.9]), gt)
    assert px_first == pytest.approx(1 / 3)
    assert py_first == pytest.approx((1 + 7 * (1 / 3)) / 8)


def test_all_excluded_is_nan_and_unknown_images_rejected():
    assert math.isnan(rsna_metric({}, {"a": G()}))
    with pytest.raises(KeyError):
        rsna_metric({"zzz": P(A + [0.5])}, {"a": G(A)})
    with pytest.raises(ValueError):
        rsna_image_score(np.zeros((1, 4)), G(A))


def test_classification_metrics_hand_case():
    m = classification_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], threshold=0.5)
    assert m.auc == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered correctly
    assert (m.sensitivity, m.specificity) == (0.5, 1.0)
    assert (m.n_positive, m.n_negative) == (2, 2)
    youden = classification_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert youden.sensitivity + youden.specificity - 1 >= 0.5
