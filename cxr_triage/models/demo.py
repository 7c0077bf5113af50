"""Deterministic UNTRAINED demo models (``CXR_DEMO_MODELS=1``).

The real architectures (xrv-layout DenseNet-121 classifier; RetinaNet-ResNet50-FPN opacity detector from
:func:`cxr_triage.models.detector.build_detector`) with weights drawn from a fixed ``torch.manual_seed``.
BatchNorm running statistics are set by a few forward passes over fixed synthetic images so the outputs are
finite and not saturated, and the detector's class prior is raised so that it emits some boxes: the scores
are meaningless but repeatable, and every card says so (``demo: true``, version ``0.0.0-demo``,
``display_name`` containing "UNTRAINED DEMO MODEL").

Built once per models directory and reused while the card's recipe, weights and ONNX hashes match (a file
lock serialises concurrent builders).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from .registry import (
    ModelCard,
    WeightsError,
    WeightsInfo,
    card_path,
    default_card_fields,
    load_card,
    save_card,
    store_blob,
    verify_onnx,
    verify_weights,
)

__all__ = ["ensure_demo_models", "DEMO_VERSION", "DEMO_CLASSIFIER", "DEMO_DETECTOR", "DEMO_LABEL", "demo_enabled"]

DEMO_VERSION = "0.0.0-demo"
DEMO_LABEL = "UNTRAINED DEMO MODEL"
DEMO_CLASSIFIER = "demo-classifier"
DEMO_DETECTOR = "demo-detector"
DEMO_RECIPE = "demo-recipe/5"  # bump when the recipe below changes: cached demo models are rebuilt
SEED = 20240611


def demo_enabled() -> bool:
    return os.environ.get("CXR_DEMO_MODELS", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _lock(models_dir: Path) -> Iterator[None]:
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".demo.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _cached(models_dir: Path, name: str) -> ModelCard | None:
    path = card_path(models_dir, name)
    if not path.is_file():
        return None
    try:
        card = load_card(path)
        if not card.demo or card.architecture_params.get("demo_recipe") != DEMO_RECIPE:
            return None
        verify_weights(card)
        verify_onnx(card)
        return card
    except (WeightsError, ValueError, KeyError):
        return None


def _synthetic_images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth, radiograph-like synthetic images in [0, 1] (no real data needed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(n):
        img = 0.5 + 0.25 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0, 1)))
        img *= 0.75 + 0.25 * np.cos(2 * np.pi * (rng.uniform(0.5, 2) * yy))
        img += 0.05 * rng.standard_normal((size, size)).astype(np.float32)
        out.append(np.clip(img, 0, 1))
    return np.stack(out).astype(np.float32)


def _chest_phantoms(n: int, size: int, seed: int) -> np.ndarray:
    """Crude frontal chest phantoms in [0, 1]: soft tissue, two dark lung fields, ribs, a bright mediastinum,
    sometimes a soft opacity, dark collimation borders. Calibrating on these instead of abstract patterns keeps the
    untrained classifier's scores on real radiographs spread over (0, 1) rather than pinned near 0, so the demo
    worklist shows some studies flagged (scores remain meaningless)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(n):
        img = np.full((size, size), 0.75 + 0.05 * rng.standard_normal(), np.float32)
        for cx in (0.3 + 0.03 * rng.standard_normal(), 0.7 + 0.03 * rng.standard_normal()):
            r = ((xx - cx) / 0.17) ** 2 + ((yy - 0.5) / 0.3) ** 2
            img -= 0.45 * np.clip(1 - r, 0, 1) ** 0.5
        img += 0.08 * np.sin(2 * np.pi * yy * rng.uniform(8, 12)) * (np.abs(xx - 0.5) > 0.1)
        img += 0.3 * np.exp(-(((xx - 0.5) / 0.06) ** 2))
        if rng.random() < 0.5:
            ox, oy = rng.uniform(0.2, 0.8), rng.uniform(0.35, 0.7)
            img += 0.25 * np.exp(-(((xx - ox) / 0.08) ** 2 + ((yy - oy) / 0.08) ** 2))
        img += 0.03 * rng.standard_normal((size, size)).astype(np.float32)
        border = max(1, int(size * 0.05))
        img[:, :border] = 0
        img[:, -border:] = 0
        out.append(np.clip(img, 0, 1))
    return np.stack(out).astype(np.float32)


def _calibrate_batchnorm(module, batch) -> None:  # type: ignore[no-untyped-def]
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    module.train()
    with torch.no_grad():
        module(batch)
    module.eval()


def _standardise_linear(linear, inputs, *, scale: float, shift: float) -> None:  # type: ignore[no-untyped-def]
    """Rescale a Linear layer so its outputs on ``inputs`` have std ``scale`` and mean ``shift`` per unit."""
    import torch

    mu = inputs.mean(dim=0)
    out = (inputs - mu) @ linear.weight.T
    # one scalar for the whole layer (per-feature scaling would over-fit the synthetic calibration images)
    w = linear.weight * (scale / float(out.std().clamp_min(1e-6))) * 0.05
    linear.weight.copy_(w)
    linear.bias.copy_(torch.full_like(linear.bias, shift) - w @ mu)


def _save_torch(obj, models_dir: Path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    import torch

    fd, tmp = tempfile.mkstemp(dir=models_dir, prefix=".demo-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        return store_blob(tmp, models_dir, ext="pt", move=True)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _build_classifier(models_dir: Path) -> ModelCard:
    import torch

    from .classifier import build_classifier
    from .export import export_card_onnx
    from .preprocess import normalise

    fields = default_card_fields("densenet121-xrv", "xrv")
    spec = fields["input"]
    torch.manual_seed(SEED)
    model = build_classifier("densenet121-xrv")
    imgs = _chest_phantoms(16, spec.size, SEED)
    batch = torch.from_numpy(np.stack([normalise(i, spec) for i in imgs]))
    _calibrate_batchnorm(model, batch)
    with torch.no_grad():  # standardise the head so logits are O(1) on the calibration images
        feats = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(model(batch)[1], 1), 1)
        _standardise_linear(model.classifier, feats, scale=8.0, shift=0.0)
    rel, digest = _save_torch(model.state_dict(), models_dir)
    fields["architecture_params"] = {**fields["architecture_params"], "demo_recipe": DEMO_RECIPE, "seed": SEED}
    card = ModelCard(
        name=DEMO_CLASSIFIER,
        version=DEMO_VERSION,
        architecture="densenet121-xrv",
        weights=WeightsInfo(source="generated:cxr_triage.models.demo", sha256=digest, format="xrv", file=rel),
        demo=True,
        display_name=f"{DEMO_LABEL} - DenseNet-121 classifier (torchxrayvision layout), random weights",
        notes="Untrained deterministic weights for demonstration and tests. Scores are meaningless.",
        models_dir=models_dir,
        **fields,
    )
    card = export_card_onnx(card, module=model)
    save_card(card, models_dir)
    return card


def _build_detector(models_dir: Path) -> ModelCard:
    import torch

    from .detector import build_detector
    from .export import export_card_onnx
    from .preprocess import normalise

    fields = default_card_fields("retinanet-resnet50", "detector")
    spec = fields["input"]
    params = fields["architecture_params"]
    cfg = {k: params[k] for k in ("backbone", "image_size", "in_channels", "num_global_classes", "small_anchors")}
    torch.manual_seed(SEED + 1)
    model = build_detector(**cfg)
    imgs = _synthetic_images(2, spec.size, SEED + 1)
    batch = torch.from_numpy(np.stack([normalise(i, spec) for i in imgs]))
    _calibrate_batchnorm(model, batch)
    with torch.no_grad():  # raise the class prior so the demo emits a few (meaningless) boxes
        model.head.classification_head.cls_logits.bias.fill_(float(np.log(0.3 / 0.7)))
        top = model.features(batch)[2]
        pooled = torch.cat([top.mean(dim=(2, 3)), top.amax(dim=(2, 3))], dim=1)
        _standardise_linear(model.global_head[-1], pooled, scale=0.5, shift=0.0)
    rel, digest = _save_torch({"model": model.state_dict(), "config": cfg}, models_dir)
    fields["architecture_params"] = {**params, "demo_recipe": DEMO_RECIPE, "seed": SEED + 1}
    fields["postprocess"] = {**fields["postprocess"], "score_threshold": 0.25, "gate_weight": 0.0}
    card = ModelCard(
        name=DEMO_DETECTOR,
        version=DEMO_VERSION,
        architecture="retinanet-resnet50",
        weights=WeightsInfo(source="generated:cxr_triage.models.demo", sha256=digest, format="detector", file=rel),
        demo=True,
        display_name=f"{DEMO_LABEL} - RetinaNet-ResNet50-FPN opacity detector, random weights",
        notes="Untrained deterministic weights for demonstration and tests. Boxes are meaningless.",
        models_dir=models_dir,
        **fields,
    )
    card = export_card_onnx(card, module=model)
    save_card(card, models_dir)
    return card


def ensure_demo_models(models_dir: str | Path, *, detector: bool = True) -> tuple[ModelCard, ...]:
    """Build (or reuse) the demo classifier (+ detector) in ``models_dir``; returns their cards."""
    models_dir = Path(models_dir)
    with _lock(models_dir):
        import torch

        threads = torch.get_num_threads()
        try:
            cls_card = _cached(models_dir, DEMO_CLASSIFIER) or _build_classifier(models_dir)
            cards: list[ModelCard] = [cls_card]
            if detector:
                cards.append(_cached(models_dir, DEMO_DETECTOR) or _build_detector(models_dir))
        finally:
            torch.set_num_threads(threads)
    return tuple(replace(c, models_dir=models_dir) for c in cards)
