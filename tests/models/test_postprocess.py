"""Post-processing: NMS, box scaling, BoxCoder decode equivalence, gating, WBF."""

import numpy as np
import pytest
import torch

from cxr_triage.models.postprocess import (
    DetectionParams,
    decode_boxes,
    decode_detections,
    fuse_ensemble,
    gate_with_classifier,
    nms,
    scale_boxes,
)


def test_nms_keeps_highest_and_drops_overlaps():
    dets = np.array([
        [0, 0, 10, 10, 0.8],
        [0, 0, 10, 9, 0.9],  # IoU with the first = 0.9 -> suppresses it
        [20, 20, 30, 30, 0.5],  # disjoint: kept
        [0, 0, 10, 4, 0.7],  # IoU with [0,0,10,9] = 40/90 = 0.44 < 0.45: kept
    ], dtype=np.float32)
    kept = nms(dets, 0.45)
    np.testing.assert_allclose(kept[:, 4], [0.9, 0.7, 0.5])
    np.testing.assert_allclose(kept[0, :4], [0, 0, 10, 9])
    # agrees with torchvision
    import torchvision

    tv = torchvision.ops.nms(torch.tensor(dets[:, :4]), torch.tensor(dets[:, 4]), 0.45).numpy()
    np.testing.assert_allclose(np.sort(dets[tv, 4])[::-1], kept[:, 4])
    assert nms(np.zeros((0, 5)), 0.5).shape == (0, 5)


def test_nms_random_agrees_with_torchvision():
    import torchvision

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (200, 2))
    wh = rng.uniform(5, 40, (200, 2))
    dets = np.concatenate([xy, xy + wh, rng.uniform(0, 1, (200, 1))], axis=1).astype(np.float32)
    keep = torchvision.ops.nms(torch.tensor(dets[:, :4]), torch.tensor(dets[:, 4]), 0.3).numpy()
    np.testing.assert_allclose(nms(dets, 0.3), dets[keep], rtol=0, atol=0)
    # stopping after k kept boxes gives the first k of the full result
    np.testing.assert_array_equal(nms(dets, 0.3, max_keep=5), dets[keep[:5]])


def test_scale_boxes_about_centre():
    d = np.array([[10, 20, 50, 100, 0.7]], dtype=np.float32)
    s = scale_boxes(d, 0.875)
    # centre (30, 60); w 40 -> 35, h 80 -> 70
    np.testing.assert_allclose(s[0], [12.5, 25, 47.5, 95, 0.7])
    np.testing.assert_allclose(scale_boxes(d, 1.0), d)


def test_decode_matches_torchvision_boxcoder():
    from torchvision.models.detection._utils import BoxCoder

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 400, (500, 2))
    anchors = np.concatenate([xy, xy + rng.uniform(8, 200, (500, 2))], axis=1).astype(np.float32)
    deltas = rng.normal(0, 1, (500, 4)).astype(np.float32)
    deltas[:5, 2:] = 10.0  # beyond the exp clamp
    tv = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)).decode_single(torch.tensor(deltas), torch.tensor(anchors)).numpy()
    np.testing.assert_allclose(decode_boxes(deltas, anchors), tv, rtol=1e-5, atol=1e-3)


def test_decode_detections_pipeline():
    anchors = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 70, 70], [0, 0, 4, 4]], dtype=np.float32)
    logits = np.array([[3.0], [2.0], [0.0], [-5.0]], dtype=np.float32)  # sigmoid .953 .881 .5 .0067
    deltas = np.zeros((4, 4), dtype=np.float32)
    p = DetectionParams(score_threshold=0.2, nms_threshold=0.45, box_scale=1.0, max_detections=10)
    out = decode_detections(logits, deltas, anchors, p)
    # anchor 1 overlaps anchor 0 (IoU 9/11) -> suppressed; anchor 3 below threshold
    np.testing.assert_allclose(out[:, :4], anchors[[0, 2]])
    np.testing.assert_allclose(out[:, 4], 1 / (1 + np.exp(-np.array([3.0, 0.0]))), rtol=1e-6)
    scaled = decode_detections(logits, deltas, anchors, DetectionParams(box_scale=0.5, max_detections=1))
    np.testing.assert_allclose(scaled[:, :4], [[2.5, 2.5, 7.5, 7.5]])
    assert decode_detections(logits - 20, deltas, anchors, p).shape == (0, 5)
    with pytest.raises(ValueError):
        decode_detections(logits[:3], deltas, anchors, p)


def test_gating_formula_and_drop():
    d = np.array([[0, 0, 1, 1, 0.8], [0, 0, 2, 2, 0.3]], dtype=np.float32)
    p = DetectionParams(score_threshold=0.2, gate_weight=0.5)
    g = gate_with_classifier(d, 0.1, p)
    # 0.5*0.8 + 0.5*0.1 = 0.45 ; 0.5*0.3 + 0.5*0.1 = 0.2 (kept: >= threshold)
    np.testing.assert_allclose(g[:, 4], [0.45, 0.2], rtol=1e-6)
    g2 = gate_with_classifier(d, 0.0, p)
    np.testing.assert_allclose(g2[:, 4], [0.4])  # 0.15 dropped
    np.testing.assert_allclose(gate_with_classifier(d, 0.9, DetectionParams(gate_weight=0.0))[:, 4], [0.8, 0.3])
    with pytest.raises(ValueError):
        gate_with_classifier(d, 1.5, p)


def test_wbf_of_identical_predictions_is_the_same_box():
    d = np.array([[100, 120, 300, 400, 0.9], [600, 600, 700, 800, 0.6]], dtype=np.float32)
    fused = fuse_ensemble([d, d.copy()], image_size=(1024, 1024))
    np.testing.assert_allclose(fused, d, rtol=1e-5, atol=1e-3)
    # a box found by one of two members keeps its place, confidence halved (WBF "avg")
    only_one = fuse_ensemble([d, d[:1]], image_size=(1024, 1024))
    np.testing.assert_allclose(only_one[:, 4], [0.9, 0.3], rtol=1e-5)
    assert fuse_ensemble([np.zeros((0, 5)), np.zeros((0, 5))], image_size=(512, 512)).shape == (0, 5)
