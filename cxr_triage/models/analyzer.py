"""The worker-facing API: ``build_analyzer(...)`` once per process, then ``prepare`` (thread pool, GIL-free
codecs) and ``infer`` (one engine call per model per micro-batch).

Scores: ``pneumonia_probability`` is the classifier's probability of its card's ``positive_label``
("Pneumonia"); ``flagged`` is ``probability >= card.operating_thresholds[positive_label]``. Detector boxes are
decoded and NMS'd by :mod:`cxr_triage.models.postprocess`, gated by the classifier probability, and mapped to
ORIGINAL pixel coordinates (x = column, y = row) with the preprocessing :class:`Transform`.
``label_probabilities`` holds every classifier label plus ``"detector:<global class>"`` probabilities when a
detector runs. ``heatmap`` is a 16x16 float32 class activation map of the positive label in [0, 1] whose grid
spans the original image extent (row-major, top-left first).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cxr_triage.core.contracts import Box

from .preprocess import ImageError, Transform, load_image, prepare as prepare_input, DEFAULT_MAX_BYTES
from .registry import ModelCard, WeightsError, list_cards, verify_onnx

__all__ = [
    "PreparedImage",
    "Box",
    "ImageResult",
    "NotAnalysable",
    "ModelsUnavailable",
    "Analyzer",
    "build_analyzer",
    "HEATMAP_SIZE",
]

HEATMAP_SIZE = 16
ALGORITHM_NAME = "cxr-triage pneumonia classifier + opacity detector"


def algorithm_identity(model_version: str, demo: bool) -> tuple[str, str]:
    """(name, version) of the algorithm as an SR names it: the demo mark in the name, the version cut to the
    DICOM LO limit (64) with a digest of the rest so distinct versions stay distinct."""
    name = ("UNTRAINED DEMO MODEL - " if demo else "") + ALGORITHM_NAME
    version = model_version
    if len(version) > 64:
        version = version[:47] + "~" + hashlib.sha256(version.encode()).hexdigest()[:16]
    return name, version


@dataclass(frozen=True)
class PreparedImage:
    key: str
    classifier_input: np.ndarray
    detector_input: np.ndarray | None
    classifier_transform: Transform
    detector_transform: Transform | None
    original_shape: tuple[int, int]




@dataclass(frozen=True)
class ImageResult:
    key: str
    pneumonia_probability: float
    flagged: bool
    boxes: tuple[Box, ...]
    label_probabilities: dict[str, float]
    heatmap: np.ndarray | None


class NotAnalysable(Exception):
    """The image cannot be analysed (permanent). ``reason``: image-too-large, multi-frame, no-pixel-data,
    decode-failed, not-dicom, unsupported-format, missing-attributes, unreadable, image-too-small."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or reason)


class ModelsUnavailable(RuntimeError):
    """No usable model cards / files in the models directory."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _head_weight_from_onnx(path: Path, num_labels: int, channels: int | None = None) -> np.ndarray | None:
    """The classifier head weight (L, C) from the ONNX initialisers (engine-agnostic CAM)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    candidates = []
    for init in model.graph.initializer:
        dims = tuple(init.dims)
        if len(dims) == 2 and dims[0] == num_labels and (channels is None or dims[1] == channels):
            candidates.append(init)
    if not candidates:
        return None
    # prefer the last one (the head is the final Gemm)
    return numpy_helper.to_array(candidates[-1]).astype(np.float32)


def _heatmap(features: np.ndarray, weight: np.ndarray, transform: Transform) -> np.ndarray:
    """CAM (h, w) over the model image -> HEATMAP_SIZE^2 over the original image extent, in [0, 1]."""
    from PIL import Image

    cam = np.maximum(np.tensordot(weight, features, axes=(0, 0)), 0.0).astype(np.float32)
    mh, mw = transform.model_shape
    up = np.asarray(Image.fromarray(cam, mode="F").resize((mw, mh), Image.Resampling.BILINEAR), dtype=np.float32)
    ch, cw = transform.content_shape
    oy, ox = int(round(transform.offset_y)), int(round(transform.offset_x))
    content = up[oy : oy + max(ch, 1), ox : ox + max(cw, 1)]
    small = np.asarray(
        Image.fromarray(np.ascontiguousarray(content), mode="F").resize(
            (HEATMAP_SIZE, HEATMAP_SIZE), Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    )
    small = np.maximum(small, 0.0)
    peak = float(small.max(initial=0.0))
    return (small / peak if peak > 0 else small).astype(np.float32)


class Analyzer:
    """Holds the model cards, engines and post-processing parameters. Build with :func:`build_analyzer`."""

    def __init__(
        self,
        *,
        classifier_card: ModelCard,
        classifier_engine: Any,
        detector_card: ModelCard | None = None,
        detector_engine: Any = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ensemble_members: Sequence[tuple[ModelCard, Any]] = (),
    ) -> None:
        self.classifier_card = classifier_card
        self.detector_card = detector_card
        self.classifier_engine = classifier_engine
        self.detector_engine = detector_engine
        self.max_bytes = max_bytes
        # Further checkpoints/folds of the detector: every member runs on the same input and their boxes, in
        # original pixels, are merged by weighted box fusion (the RSNA challenge's ensembling).
        self.ensemble_members: tuple[tuple[ModelCard, Any], ...] = tuple(ensemble_members)
        for card, _ in self.ensemble_members:
            if detector_card is None or card.input != detector_card.input:
                raise ModelsUnavailable(f"ensemble member {card.ref} must share the detector's input spec")
        self.cards: tuple[ModelCard, ...] = tuple(
            c for c in (classifier_card, detector_card, *(m for m, _ in self.ensemble_members)) if c is not None
        )
        self.demo: bool = any(c.demo for c in self.cards)
        self.model_version: str = "+".join(c.ref for c in self.cards)
        self.algorithm_name, self.algorithm_version = algorithm_identity(self.model_version, self.demo)
        self.display_names: tuple[str, ...] = tuple(c.display_name or c.name for c in self.cards)
        self.engine_name: str = getattr(classifier_engine, "name", "?")
        labels = classifier_card.labels
        if classifier_card.positive_label not in labels:
            raise ModelsUnavailable(
                f"classifier {classifier_card.ref} has no label {classifier_card.positive_label!r}"
            )
        self._pos_index = labels.index(classifier_card.positive_label)
        self._threshold = classifier_card.threshold
        self._head: np.ndarray | None = None
        onnx_path = classifier_card.onnx_path
        if onnx_path is not None and onnx_path.is_file():
            self._head = _head_weight_from_onnx(onnx_path, len(labels))
        self._det_params = None
        self._anchors = None
        self._global_classes: tuple[str, ...] = ()
        self._members: list[tuple[Any, Any, np.ndarray, float]] = []  # (engine, params, anchors, weight)
        if detector_card is not None:
            for card, eng in ((detector_card, detector_engine), *self.ensemble_members):
                params, anchors = _detector_post(card)
                self._members.append((eng, params, anchors, float(card.architecture_params.get("ensemble_weight", 1.0))))
            _, self._det_params, self._anchors, _ = self._members[0]
            p = detector_card.architecture_params
            self._global_classes = tuple(p.get("global_classes", ("Normal", "No Lung Opacity / Not Normal",
                                                                   "Lung Opacity")))

    # -- preparation (thread-safe: pure functions only) ------------------------------------------------
    def prepare(self, path: Path, *, key: str) -> PreparedImage:
        try:
            image = load_image(path, max_bytes=self.max_bytes)
        except ImageError as exc:
            raise NotAnalysable(exc.reason, str(exc)) from None
        if image.shape[0] < 8 or image.shape[1] < 8:
            raise NotAnalysable("image-too-small", "image-too-small")
        cls_in, cls_tf = prepare_input(image, self.classifier_card.input)
        det_in = det_tf = None
        if self.detector_card is not None:
            det_in, det_tf = prepare_input(image, self.detector_card.input)
        return PreparedImage(
            key=key,
            classifier_input=cls_in,
            detector_input=det_in,
            classifier_transform=cls_tf,
            detector_transform=det_tf,
            original_shape=(int(image.shape[0]), int(image.shape[1])),
        )

    # -- inference ---------------------------------------------------------------------------------------
    def infer(self, batch: Sequence[PreparedImage]) -> list[ImageResult]:
        if not batch:
            return []
        cls_out = self.classifier_engine.run(np.stack([b.classifier_input for b in batch]))
        probs = cls_out["probabilities"]
        feats = cls_out.get("features")
        det_out = None
        member_outs: list[dict[str, np.ndarray]] = []
        if self.detector_engine is not None and all(b.detector_input is not None for b in batch):
            det_batch = np.stack([b.detector_input for b in batch])  # type: ignore[misc]
            det_out = self.detector_engine.run(det_batch)
            member_outs = [det_out] + [eng.run(det_batch) for _, eng in self.ensemble_members]
        results = []
        labels = self.classifier_card.labels
        for i, item in enumerate(batch):
            p = float(np.clip(probs[i, self._pos_index], 0.0, 1.0))
            if not math.isfinite(p):
                raise RuntimeError("classifier produced a non-finite probability")
            label_probs = {lab: float(probs[i, j]) for j, lab in enumerate(labels)}
            heatmap = None
            if feats is not None and self._head is not None and self._head.shape[1] == feats.shape[1]:
                heatmap = _heatmap(feats[i], self._head[self._pos_index], item.classifier_transform)
            boxes: tuple[Box, ...] = ()
            if det_out is not None and item.detector_transform is not None:
                if len(member_outs) > 1:
                    boxes = self._fused_boxes(member_outs, i, p, item.detector_transform, item.original_shape)
                else:
                    boxes = self._boxes(det_out, i, p, item.detector_transform)
                if "global_logits" in det_out:
                    g = _softmax(det_out["global_logits"][i])
                    for name, v in zip(self._global_classes, g):
                        label_probs[f"detector:{name}"] = float(v)
            results.append(
                ImageResult(
                    key=item.key,
                    pneumonia_probability=p,
                    flagged=bool(p >= self._threshold),
                    boxes=boxes,
                    label_probabilities=label_probs,
                    heatmap=heatmap,
                )
            )
        return results

    def _boxes(self, det_out: dict[str, np.ndarray], i: int, p: float, tf: Transform,
               member: int = 0) -> tuple[Box, ...]:
        return _to_boxes(self._original_dets(det_out, i, p, tf, member))

    def _original_dets(self, det_out: dict[str, np.ndarray], i: int, p: float, tf: Transform,
                       member: int = 0) -> np.ndarray:
        """One member's served boxes in ORIGINAL pixels, (K, 5) (see :func:`served_detections`)."""
        from .postprocess import served_detections

        _, params, anchors, _ = self._members[member]
        return served_detections(det_out["cls_logits"][i], det_out["bbox_regression"][i], anchors, params, tf,
                                 pneumonia_probability=p)

    def _fused_boxes(self, outs: list[dict[str, np.ndarray]], i: int, p: float, tf: Transform,
                     shape: tuple[int, int]) -> tuple[Box, ...]:
        from .postprocess import fuse_ensemble

        per_member = [self._original_dets(out, i, p, tf, m) for m, out in enumerate(outs)]
        fused = fuse_ensemble(per_member, image_size=shape, weights=[m[3] for m in self._members],
                              iou_threshold=self._det_params.nms_threshold if self._det_params else 0.5,
                              skip_threshold=self._det_params.score_threshold if self._det_params else 0.0)
        fused = fused[fused[:, 4] >= (self._det_params.score_threshold if self._det_params else 0.0)]
        return _to_boxes(fused[: self._det_params.max_detections if self._det_params else None])


def _to_boxes(dets: np.ndarray) -> tuple[Box, ...]:
    out = []
    for (x0, y0, x1, y1), s in zip(dets[:, :4].tolist(), dets[:, 4].tolist()):
        if x1 - x0 >= 1.0 and y1 - y0 >= 1.0:
            out.append(Box(float(x0), float(y0), float(x1), float(y1), float(s)))
    return tuple(out)


def _detector_post(card: ModelCard) -> tuple[Any, np.ndarray]:
    from .detector import detector_anchors
    from .postprocess import DetectionParams

    p = card.architecture_params
    known = {"score_threshold", "nms_threshold", "box_scale", "max_detections", "gate_weight"}
    params = DetectionParams(**{k: v for k, v in card.postprocess.items() if k in known})
    anchors = detector_anchors(
        image_size=int(p.get("image_size", card.input.size)),
        small_anchors=bool(p.get("small_anchors", True)),
        backbone=str(p.get("backbone", "resnet50")),
    )
    return params, anchors


def _pick(cards: list[ModelCard], task: str, name: str | None, *, demo: bool) -> ModelCard | None:
    cands = [c for c in cards if c.task == task]
    if name is not None:
        for c in cands:
            if c.name == name:
                return c
        raise ModelsUnavailable(f"no {task} model card named {name!r}")
    real = [c for c in cands if not c.demo]
    pool = (sorted(real, key=lambda c: c.name) or [c for c in cands if c.demo]) if not demo else (
        [c for c in cands if c.demo] or sorted(real, key=lambda c: c.name))
    if not demo:
        pool = [c for c in pool if not c.demo]
    return pool[0] if pool else None


def tensorrt_or_fallback(kind: str, model_ref: str, attempt: Callable[[], Any]) -> Any | None:
    """Run ``attempt`` (create a TensorRT engine). Engine ``tensorrt``: its failure is the worker's failure, as
    :class:`EngineUnavailable` naming the model. Engine ``auto``: any failure (a plan TensorRT refuses twice, an
    INT8 plan without its calibration images, a build error) means ONNX Runtime instead, with the reason logged."""
    from .engines import EngineUnavailable

    try:
        return attempt()
    except Exception as exc:  # noqa: BLE001 - TensorRT and its builder raise many types; auto must not die of any
        text = str(exc).splitlines()[0][:300] if str(exc) else ""
        reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        if kind == "tensorrt":
            raise EngineUnavailable(f"model {model_ref}: TensorRT engine unavailable: {reason}") from exc
        from cxr_triage.core.logging import get_logger

        get_logger(__name__).warning("tensorrt_unavailable_using_onnxruntime", model=model_ref, reason=reason)
        return None


def _trt_fp16(card: ModelCard) -> bool:
    """FP16 for ONNX Runtime's TensorRT provider: the card's recorded precision (INT8 there needs a calibration
    table ONNX Runtime does not have, so it runs FP16, the nearest); FP16 when nothing is recorded."""
    precision = card.tensorrt.precision if card.tensorrt else str(card.architecture_params.get("tensorrt_precision",
                                                                                                  "fp16"))
    return precision != "fp32"


def _engine_for(card: ModelCard, kind: str, intra_op_threads: int | None) -> Any:
    from .engines import EngineUnavailable, TensorRTEngine, select_engine

    if kind == "torch":
        from .export import load_card_module, output_names_for

        return select_engine("torch", module=load_card_module(card), output_names=output_names_for(card),
                             intra_op_threads=intra_op_threads)
    try:
        onnx_path = verify_onnx(card)
    except WeightsError as exc:
        raise ModelsUnavailable(str(exc)) from None
    engines_dir = (card.models_dir or onnx_path.parent) / "engines"
    if kind in ("tensorrt", "auto"):
        from .export import open_tensorrt_engine, tensorrt_available, tensorrt_environment

        if tensorrt_available():
            def attempt() -> Any:
                # The plan `models build` recorded in the card (precision, max batch, calibration set), found
                # under the same cache key; built here when missing, rebuilt when TensorRT refuses it.
                engine, _ = open_tensorrt_engine(
                    card, onnx_path=onnx_path, cache_dir=engines_dir, environment=tensorrt_environment(),
                    load=TensorRTEngine,
                    default_precision=str(card.architecture_params.get("tensorrt_precision", "fp16")))
                return engine

            engine = tensorrt_or_fallback(kind, card.ref, attempt)
            if engine is not None:
                return engine
        elif kind == "tensorrt":
            raise EngineUnavailable("tensorrt engine requested but TensorRT/CUDA are not available")
    return select_engine(kind, onnx_path=onnx_path, intra_op_threads=intra_op_threads,
                         trt_cache_dir=engines_dir / "onnxruntime-trt", trt_fp16=_trt_fp16(card),
                         input_shape=(card.input.channels, card.input.size, card.input.size),
                         max_batch=card.tensorrt.max_batch if card.tensorrt else 8)


def build_analyzer(
    *,
    models_dir: Path,
    demo: bool = False,
    engine: str = "auto",
    classifier: str | None = None,
    detector: str | None = None,
    intra_op_threads: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Analyzer:
    """Pick the cards, verify their ONNX files and create the engines.

    Without ``demo``, demo cards are ignored; if no real classifier card exists, raises :class:`ModelsUnavailable`.
    With ``demo=True`` the deterministic untrained demo models are built (or reused) first and preferred.
    ``detector="none"`` disables the detector.
    """
    models_dir = Path(models_dir)
    if demo:
        from .demo import ensure_demo_models

        ensure_demo_models(models_dir)
    cards = list_cards(models_dir)
    cls_card = _pick(cards, "classification", classifier, demo=demo)
    if cls_card is None:
        raise ModelsUnavailable(
            f"no classifier model in {models_dir}: import real weights with `cxr-triage models import PATH "
            "--name NAME --version VERSION --architecture densenet121-xrv --format xrv` (or `models fetch`), "
            "or set CXR_DEMO_MODELS=1 to run with UNTRAINED DEMO MODELS"
        )
    # `detector` may name one card (that checkpoint alone) or an ensemble group (all of its members).
    group_members = sorted((c for c in cards if c.task == "detection" and detector is not None
                            and c.architecture_params.get("ensemble") == detector and c.name != detector),
                           key=lambda c: c.name)
    use_group = detector is None or bool(group_members)
    det_card = None if detector == "none" else (
        group_members[0] if group_members else _pick(cards, "detection", detector, demo=demo))
    cls_engine = _engine_for(cls_card, engine, intra_op_threads)
    det_engine = _engine_for(det_card, engine, intra_op_threads) if det_card is not None else None
    members: list[tuple[ModelCard, Any]] = []
    group = det_card.architecture_params.get("ensemble") if det_card is not None and use_group else None
    if group:
        for card in sorted(cards, key=lambda c: c.name):
            if (card.task == "detection" and card.name != det_card.name  # type: ignore[union-attr]
                    and card.architecture_params.get("ensemble") == group and card.demo == det_card.demo):  # type: ignore[union-attr]
                members.append((card, _engine_for(card, engine, intra_op_threads)))
    return Analyzer(
        classifier_card=cls_card,
        classifier_engine=cls_engine,
        detector_card=det_card,
        detector_engine=det_engine,
        max_bytes=max_bytes,
        ensemble_members=members,
    )
