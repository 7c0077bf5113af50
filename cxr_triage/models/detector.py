"""Lung-opacity detector: RetinaNet (torchvision parts) with an extra global classification head.

The recipe follows the 2nd-place RSNA Pneumonia Detection Challenge solution (Dmytro Poplavskiy,
"pneumonia-detection"): a RetinaNet with a ResNet-FPN backbone at 512 px, one object class (lung opacity),
smaller anchors than the COCO default (the challenge has many small boxes), and a global 3-class head
(Normal / No Lung Opacity - Not Normal / Lung Opacity) on the top backbone feature, trained jointly.

``forward`` returns the *raw* head outputs only (no torchvision post-processing, no data-dependent
shapes), so the module exports to ONNX with fixed output shapes:

* ``cls_logits``      (N, A, 1)  one logit per anchor
* ``bbox_regression`` (N, A, 4)  BoxCoder(1, 1, 1, 1) deltas per anchor (dx, dy, dw, dh)
* ``global_logits``   (N, 3)     logits over :data:`GLOBAL_CLASSES`

Anchors are a pure function of the configuration (:func:`detector_anchors`); their order matches ``A``
(level-major, then grid position row-major, then the anchor shapes of one cell), exactly as torchvision's
``AnchorGenerator`` and ``RetinaNetHead`` lay them out. Decoding lives in :mod:`cxr_triage.models.postprocess`.

Backbones: ``"resnet50"`` (the recipe), ``"resnext101"`` (optional, heavier), ``"resnet18"`` (light) and
``"tiny"`` (a few conv layers, for tests that train a detector in seconds on a CPU).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DETECTOR_OUTPUT_NAMES = ("cls_logits", "bbox_regression", "global_logits")
from cxr_triage.models.postprocess import GLOBAL_CLASSES  # noqa: E402  (re-exported; defined torch-free)
CHECKPOINT_FORMAT = "cxr-triage-detector/1"

ASPECT_RATIOS = (0.5, 1.0, 2.0)
_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))

# Per backbone: the strides of the feature levels fed to the heads, and the base anchor size per level
# (COCO default and the smaller "small_anchors" variant).
_BACKBONES: dict[str, dict[str, Any]] = {
    "resnet50": {"strides": (8, 16, 32, 64, 128), "base": (32, 64, 128, 256, 512), "small": (16, 32, 64, 128, 256)},
    "resnet18": {"strides": (8, 16, 32, 64, 128), "base": (32, 64, 128, 256, 512), "small": (16, 32, 64, 128, 256)},
    "resnext101": {"strides": (8, 16, 32, 64, 128), "base": (32, 64, 128, 256, 512), "small": (16, 32, 64, 128, 256)},
    "tiny": {"strides": (8, 16, 32), "base": (32, 64, 128), "small": (16, 32, 64)},
}


@dataclass(frozen=True)
class DetectorConfig:
    backbone: str = "resnet50"
    image_size: int = 512
    in_channels: int = 3
    num_global_classes: int = 3
    small_anchors: bool = True

    def __post_init__(self) -> None:
        if self.backbone not in _BACKBONES:
            raise ValueError(f"backbone: unknown {self.backbone!r}; choose from {sorted(_BACKBONES)}")
        stride_max = max(_BACKBONES[self.backbone]["strides"])
        if self.image_size <= 0 or self.image_size % stride_max:
            raise ValueError(f"image_size: must be a positive multiple of {stride_max} for {self.backbone}")
        if self.in_channels not in (1, 3):
            raise ValueError("in_channels: must be 1 or 3")
        if self.num_global_classes < 1:
            raise ValueError("num_global_classes: must be >= 1")

    def anchor_sizes(self) -> tuple[tuple[float, ...], ...]:
        spec = _BACKBONES[self.backbone]
        base = spec["small"] if self.small_anchors else spec["base"]
        return tuple(tuple(float(int(b * s)) for s in _SCALES) for b in base)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(_BACKBONES[self.backbone]["strides"])

    @property
    def num_anchors_per_location(self) -> int:
        return len(_SCALES) * len(ASPECT_RATIOS)


def _cell_anchors(sizes: tuple[float, ...]) -> np.ndarray:
    """torchvision AnchorGenerator.generate_anchors, in numpy (ratio-major, then scale)."""
    scales = np.asarray(sizes, dtype=np.float32)
    ratios = np.asarray(ASPECT_RATIOS, dtype=np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = 1.0 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.stack([-ws, -hs, ws, hs], axis=1) / 2.0
    return np.round(base).astype(np.float32)


def detector_anchors(*, image_size: int = 512, small_anchors: bool = True, backbone: str = "resnet50") -> np.ndarray:
    """All anchors (A, 4) float32 xyxy in model pixels, in the order of ``forward``'s A axis."""
    cfg = DetectorConfig(backbone=backbone, image_size=image_size, small_anchors=small_anchors)
    out = []
    for stride, sizes in zip(cfg.strides, cfg.anchor_sizes()):
        n = math.ceil(image_size / stride)
        shifts_1d = np.arange(n, dtype=np.float32) * stride
        sy, sx = np.meshgrid(shifts_1d, shifts_1d, indexing="ij")
        sx, sy = sx.reshape(-1), sy.reshape(-1)
        shifts = np.stack([sx, sy, sx, sy], axis=1)
        out.append((shifts[:, None, :] + _cell_anchors(sizes)[None, :, :]).reshape(-1, 4))
    return np.concatenate(out, axis=0).astype(np.float32)


class TinyBackbone(nn.Module):
    """A few strided conv layers giving features at strides 8, 16, 32 (for fast tests)."""

    def __init__(self, in_channels: int, out_channels: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU(inplace=True),
            )

        self.stem = nn.Sequential(block(in_channels, 16), block(16, 24))  # stride 4
        self.c3 = block(24, out_channels)  # 8
        self.c4 = block(out_channels, out_channels)  # 16
        self.c5 = block(out_channels, out_channels)  # 32
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.stem(x)
        p3 = self.c3(x)
        p4 = self.c4(p3)
        p5 = self.c5(p4)
        return OrderedDict([("0", p3), ("1", p4), ("2", p5)])


def _resnet_fpn_backbone(name: str, in_channels: int) -> nn.Module:
    from torchvision.models import resnet18, resnet50, resnext101_32x8d
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    factory = {"resnet50": resnet50, "resnet18": resnet18, "resnext101": resnext101_32x8d}[name]
    body = factory(weights=None)
    if in_channels != 3:
        body.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # As torchvision.models.detection.retinanet_resnet50_fpn (v1): C3..C5 + P6/P7 from P5, all trainable.
    return _resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))


class OpacityDetector(nn.Module):
    """RetinaNet heads + global classification head. Submodule names match torchvision's RetinaNet
    (``backbone``, ``head``) so torchvision RetinaNet state dicts load into it."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        from torchvision.models.detection.retinanet import RetinaNetHead

        self.config = config
        if config.backbone == "tiny":
            self.backbone = TinyBackbone(config.in_channels)
        else:
            self.backbone = _resnet_fpn_backbone(config.backbone, config.in_channels)
        ch = self.backbone.out_channels
        self.head = RetinaNetHead(ch, config.num_anchors_per_location, 1)
        self.global_head = nn.Sequential(nn.Dropout(0.5), nn.Linear(2 * ch, config.num_global_classes))
        # index of the feature level used for the global head: the last backbone level before P6/P7
        self._global_level = 2

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(x).values())

    def heads(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cls_logits = self.head.classification_head(feats)
        bbox_regression = self.head.regression_head(feats)
        top = feats[self._global_level]
        pooled = torch.cat([top.mean(dim=(2, 3)), top.amax(dim=(2, 3))], dim=1)
        return cls_logits, bbox_regression, self.global_head(pooled)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(self.features(x))

    def anchors(self) -> np.ndarray:
        c = self.config
        return detector_anchors(image_size=c.image_size, small_anchors=c.small_anchors, backbone=c.backbone)


def build_detector(
    *,
    backbone: str = "resnet50",
    image_size: int = 512,
    in_channels: int = 3,
    num_global_classes: int = 3,
    small_anchors: bool = True,
) -> OpacityDetector:
    """Build an untrained detector (no weights are downloaded)."""
    cfg = DetectorConfig(
        backbone=backbone, image_size=image_size, in_channels=in_channels,
        num_global_classes=num_global_classes, small_anchors=small_anchors,
    )
    return OpacityDetector(cfg)


def config_dict(model: OpacityDetector) -> dict[str, Any]:
    return asdict(model.config)


_BUILD_KEYS = ("backbone", "image_size", "in_channels", "num_global_classes", "small_anchors")


def read_checkpoint_config(path: str | Path) -> dict[str, Any] | None:
    """What a checkpoint in our format says about itself: ``{"config": build kwargs, "input": {...} | None}``
    (as :func:`cxr_triage.models.train.save_checkpoint` writes them); ``None`` for a torchvision state dict,
    which carries no configuration. Raises ``CheckpointError`` for a file that is not a loadable checkpoint.

    The import path reads this *before* building the model so that a checkpoint trained with
    ``--image-size 384`` or ``--default-anchors`` gets a card describing it, instead of the 512 px /
    small-anchor defaults that would then contradict it."""
    try:
        # mmap: only the small config is needed; tensors are not read into memory (torch >= 2.1, zip format).
        obj = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be mmapped; try a plain load
        try:
            obj = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises several types for corrupt/unsafe files
            from cxr_triage.models.classifier import CheckpointError

            raise CheckpointError(
                f"cannot load detector weights {Path(path).name}: not a loadable checkpoint ({type(exc).__name__})"
            ) from None
    if not (isinstance(obj, dict) and "model" in obj and isinstance(obj.get("config"), dict)):
        return None
    config = {k: v for k, v in obj["config"].items() if k in _BUILD_KEYS}
    saved_input = obj.get("input")
    return {"config": config, "input": dict(saved_input) if isinstance(saved_input, dict) else None}


def load_detector_checkpoint(path: str | Path, **build_kwargs: Any) -> OpacityDetector:
    """Load a detector from our checkpoint format or a torchvision RetinaNet state dict.

    * Our format (written by :mod:`cxr_triage.models.train`): a dict with ``"model"`` (state dict) and
      ``"config"`` (the :func:`build_detector` keyword arguments); ``build_kwargs`` that contradict the saved
      config raise ``ValueError`` (e.g. a card saying 512 px for a 128 px checkpoint). Model-card extras
      (``global_classes`` -- checked --, ``output_names``) are accepted and ignored.
    * A torchvision ``retinanet_resnet50_fpn`` state dict (or a dict holding one under ``"state_dict"``):
      backbone, FPN and head weights are loaded where the shapes match (the COCO 91-class logits layer does
      not; it stays at its initialisation); the global head stays untrained.
    """
    build_kwargs = dict(build_kwargs)
    gc = build_kwargs.pop("global_classes", None)
    if gc is not None and tuple(gc)[: len(GLOBAL_CLASSES)] != GLOBAL_CLASSES[: len(tuple(gc))]:
        raise ValueError(f"global_classes {gc!r} do not match {GLOBAL_CLASSES}")
    build_kwargs = {k: v for k, v in build_kwargs.items() if k in _BUILD_KEYS}  # card extras (output_names...)
    try:
        # weights_only: a checkpoint is data; never execute pickled code from a file a user configured.
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for corrupt/unsafe files
        raise ValueError(f"{Path(path).name}: not a loadable detector checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a checkpoint dict")
    if "model" in obj and "config" in obj:
        saved = {k: v for k, v in obj["config"].items() if k in _BUILD_KEYS}
        conflicts = {k: (v, saved[k]) for k, v in build_kwargs.items() if k in saved and saved[k] != v}
        if conflicts:
            # The conflict first and no directory: callers cut long messages to one short line.
            raise ValueError(f"conflicting arguments {conflicts} (argument, checkpoint): {Path(path).name} was "
                             f"trained with {saved}")
        model = build_detector(**{**saved, **build_kwargs})
        model.load_state_dict(obj["model"])
    else:
        state = obj.get("state_dict", obj)
        if not any(k.startswith("backbone.") for k in state):
            raise ValueError(f"{path}: neither a cxr-triage detector checkpoint nor a RetinaNet state dict")
        model = build_detector(**build_kwargs)
        own = model.state_dict()
        compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if len(compatible) < len([k for k in own if k.startswith("backbone.")]) // 2:
            raise ValueError(f"{path}: state dict does not match backbone {model.config.backbone!r}")
        model.load_state_dict(compatible, strict=False)
    model.eval()
    return model
