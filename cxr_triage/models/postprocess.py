"""Detector post-processing, pure numpy (no torch): decode, NMS, box scaling, classifier gating, WBF.

Detections are ``(K, 5)`` float32 arrays ``x0, y0, x1, y1, score`` sorted by descending score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from cxr_triage.models.preprocess import Transform

# Global (image-level) classes of the detector's extra head, RSNA "detailed class info" names.
GLOBAL_CLASSES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")

# torchvision.models.detection._utils.BoxCoder clamps dw/dh to this before exp().
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class DetectionParams:
    score_threshold: float = 0.2
    nms_threshold: float = 0.45
    box_scale: float = 0.875
    max_detections: int = 10
    gate_weight: float = 0.5

    def __post_init__(self) -> None:
        for name in ("score_threshold", "nms_threshold", "gate_weight"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {v}")
        if self.box_scale <= 0:
            raise ValueError(f"box_scale: must be > 0, got {self.box_scale}")
        if self.max_detections < 0:
            raise ValueError(f"max_detections: must be >= 0, got {self.max_detections}")


def _empty() -> np.ndarray:
    return np.zeros((0, 5), dtype=np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def decode_boxes(deltas: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """torchvision ``BoxCoder(weights=(1, 1, 1, 1)).decode_single`` in numpy: (A,4) deltas + anchors -> xyxy."""
    deltas = np.asarray(deltas, dtype=np.float32).reshape(-1, 4)
    anchors = np.asarray(anchors, dtype=np.float32).reshape(-1, 4)
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    ctr_x = anchors[:, 0] + 0.5 * widths
    ctr_y = anchors[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw = np.minimum(deltas[:, 2], BBOX_XFORM_CLIP)
    dh = np.minimum(deltas[:, 3], BBOX_XFORM_CLIP)
    pcx = dx * widths + ctr_x
    pcy = dy * heights + ctr_y
    pw = np.exp(dw) * widths
    ph = np.exp(dh) * heights
    return np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=1).astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes (M,4) x (N,4) -> (M,N) (continuous coordinates, no +1)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _sorted(dets: np.ndarray) -> np.ndarray:
    dets = np.asarray(dets, dtype=np.float32).reshape(-1, 5)
    return dets[np.argsort(-dets[:, 4], kind="stable")]


def nms(dets: np.ndarray, iou_threshold: float, *, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS: keep the highest score, drop boxes with IoU > ``iou_threshold`` with a kept box
    (same rule as torchvision.ops.nms). Returns the kept detections sorted by descending score.
    ``max_keep`` stops after that many kept boxes (greedy NMS keeps the same first boxes either way)."""
    dets = _sorted(dets)
    if len(dets) == 0:
        return _empty()
    boxes = dets[:, :4].astype(np.float64)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    alive = np.ones(len(dets), dtype=bool)
    keep: list[int] = []
    limit = len(dets) if max_keep is None else max_keep
    i = 0
    while i < len(dets) and len(keep) < limit:
        if not alive[i]:
            i += 1
            continue
        keep.append(i)
        rest = np.nonzero(alive[i + 1 :])[0] + i + 1
        if len(rest):
            b = boxes[i]
            w = np.clip(np.minimum(boxes[rest, 2], b[2]) - np.maximum(boxes[rest, 0], b[0]), 0, None)
            h = np.clip(np.minimum(boxes[rest, 3], b[3]) - np.maximum(boxes[rest, 1], b[1]), 0, None)
            inter = w * h
            union = areas[i] + areas[rest] - inter
            iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
            alive[rest[iou > iou_threshold]] = False
        i += 1
    return dets[keep]


def scale_boxes(dets: np.ndarray, factor: float) -> np.ndarray:
    """Scale each box's width and height by ``factor`` about its centre (scores unchanged)."""
    dets = np.asarray(dets, dtype=np.float32).reshape(-1, 5).copy()
    if len(dets) == 0 or factor == 1.0:
        return dets
    cx = (dets[:, 0] + dets[:, 2]) / 2
    cy = (dets[:, 1] + dets[:, 3]) / 2
    hw = (dets[:, 2] - dets[:, 0]) * factor / 2
    hh = (dets[:, 3] - dets[:, 1]) * factor / 2
    dets[:, 0], dets[:, 2] = cx - hw, cx + hw
    dets[:, 1], dets[:, 3] = cy - hh, cy + hh
    return dets


def decode_detections(
    cls_logits: np.ndarray,
    bbox_regression: np.ndarray,
    anchors: np.ndarray,
    params: DetectionParams,
    *,
    image_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Raw head outputs of ONE image -> detections (K,5) in model pixels.

    sigmoid -> keep scores >= score_threshold -> BoxCoder(1,1,1,1) decode -> clip to ``image_size``
    ((height, width), optional) -> NMS(nms_threshold) -> scale about the centre by box_scale ->
    top ``max_detections``.
    """
    logits = np.asarray(cls_logits, dtype=np.float32)
    if logits.ndim == 3:  # tolerate a batch of one
        if logits.shape[0] != 1:
            raise ValueError("decode_detections: pass one image at a time")
        logits, bbox_regression = logits[0], np.asarray(bbox_regression)[0]
    scores = sigmoid(logits.reshape(-1)).astype(np.float32)
    deltas = np.asarray(bbox_regression, dtype=np.float32).reshape(-1, 4)
    anchors = np.asarray(anchors, dtype=np.float32).reshape(-1, 4)
    if not (len(scores) == len(deltas) == len(anchors)):
        raise ValueError(f"decode_detections: {len(scores)} logits, {len(deltas)} deltas, {len(anchors)} anchors")
    keep = np.nonzero(scores >= params.score_threshold)[0]
    if len(keep) == 0:
        return _empty()
    # Bound the NMS input like torchvision (topk_candidates=1000).
    if len(keep) > 1000:
        keep = keep[np.argsort(-scores[keep], kind="stable")[:1000]]
    boxes = decode_boxes(deltas[keep], anchors[keep])
    if image_size is not None:
        h, w = image_size
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    dets = np.concatenate([boxes, scores[keep, None]], axis=1)
    ok = (dets[:, 2] > dets[:, 0]) & (dets[:, 3] > dets[:, 1])
    dets = nms(dets[ok], params.nms_threshold, max_keep=params.max_detections)
    dets = scale_boxes(dets, params.box_scale)
    return dets[: params.max_detections].astype(np.float32)


def gate_with_classifier(dets: np.ndarray, pneumonia_probability: float, params: DetectionParams) -> np.ndarray:
    """Blend each box confidence with the image-level pneumonia probability ``p``:

        score' = (1 - w) * score + w * p,    w = params.gate_weight

    then drop boxes with ``score' < params.score_threshold``. With w=0 boxes are unchanged; with w=1 every
    box takes the classifier's probability (pure classifier gating). Result sorted by descending score'.
    """
    p = float(pneumonia_probability)
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"pneumonia_probability: must be in [0, 1], got {pneumonia_probability}")
    dets = np.asarray(dets, dtype=np.float32).reshape(-1, 5).copy()
    w = params.gate_weight
    dets[:, 4] = (1.0 - w) * dets[:, 4] + w * p
    dets = dets[dets[:, 4] >= params.score_threshold]
    return _sorted(dets)


def drop_padding_boxes(dets: np.ndarray, tf: "Transform") -> np.ndarray:
    """Drop boxes that lie mostly on the letterbox padding (not on the radiograph): a detector can fire on the
    black border, and clipping such a box to the image would put a thin false box along the image edge."""
    if len(dets) == 0:
        return dets
    ch, cw = tf.content_shape
    x0 = np.clip(dets[:, 0], tf.offset_x, tf.offset_x + cw)
    x1 = np.clip(dets[:, 2], tf.offset_x, tf.offset_x + cw)
    y0 = np.clip(dets[:, 1], tf.offset_y, tf.offset_y + ch)
    y1 = np.clip(dets[:, 3], tf.offset_y, tf.offset_y + ch)
    inside = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    area = np.maximum(dets[:, 2] - dets[:, 0], 1e-6) * np.maximum(dets[:, 3] - dets[:, 1], 1e-6)
    return dets[inside >= 0.5 * area]


def served_detections(
    cls_logits: np.ndarray,
    bbox_regression: np.ndarray,
    anchors: np.ndarray,
    params: DetectionParams,
    tf: "Transform",
    *,
    pneumonia_probability: float | None,
) -> np.ndarray:
    """One detector's raw head outputs -> the boxes we serve, (K, 5) xyxy+score in ORIGINAL pixels.

    decode + NMS + box shrink (:func:`decode_detections`), classifier gating, padding boxes dropped, mapped back
    through the letterbox. The analyzer and the evaluation both call this, so what is measured is what is served.
    """
    dets = decode_detections(cls_logits, bbox_regression, anchors, params, image_size=tf.model_shape)
    if pneumonia_probability is not None:
        dets = gate_with_classifier(dets, pneumonia_probability, params)
    dets = drop_padding_boxes(dets, tf)
    if len(dets) == 0:
        return np.zeros((0, 5), dtype=np.float32)
    return np.concatenate([tf.to_original(dets[:, :4]), dets[:, 4:5]], axis=1).astype(np.float32)


def fuse_ensemble(
    predictions: Sequence[np.ndarray],
    *,
    image_size: tuple[int, int],
    weights: Sequence[float] | None = None,
    iou_threshold: float = 0.5,
    skip_threshold: float = 0.0,
    conf_type: str = "avg",
) -> np.ndarray:
    """Merge detections of several models / checkpoints / TTA passes of ONE image by weighted boxes
    fusion (``ensemble_boxes.weighted_boxes_fusion``). ``image_size`` is (height, width) of the frame the
    boxes are in (used to normalise to [0,1], as ensemble_boxes requires). Boxes found by only some
    members get their confidence lowered in proportion (WBF's default "avg" rescaling)."""
    from ensemble_boxes import weighted_boxes_fusion

    h, w = image_size
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size: must be positive, got {image_size}")
    if len(predictions) == 0:
        return _empty()
    scale = np.array([w, h, w, h], dtype=np.float64)
    boxes_list, scores_list, labels_list = [], [], []
    for p in predictions:
        p = np.asarray(p, dtype=np.float64).reshape(-1, 5)
        boxes_list.append(np.clip(p[:, :4] / scale, 0.0, 1.0).tolist())
        scores_list.append(p[:, 4].tolist())
        labels_list.append([0] * len(p))
    if sum(len(b) for b in boxes_list) == 0:
        return _empty()
    boxes, scores, _ = weighted_boxes_fusion(
        boxes_list, scores_list, labels_list, weights=None if weights is None else list(weights),
        iou_thr=iou_threshold, skip_box_thr=skip_threshold, conf_type=conf_type,
    )
    if len(boxes) == 0:
        return _empty()
    out = np.concatenate([np.asarray(boxes) * scale, np.asarray(scores)[:, None]], axis=1)
    return _sorted(out)
