"""Chest radiograph classifiers: DenseNet-121 (torchxrayvision- and CheXNet-compatible) and ResNet-50.

Every classifier's ``forward(x)`` returns ``(probabilities, features)``:

* ``probabilities`` (N, L): per-label sigmoid probabilities (no torchxrayvision ``op_norm`` calibration: the
  operating points travel in the model card's ``operating_thresholds``, taken from ``op_threshs`` at import);
* ``features`` (N, C, h, w): the final feature map (after the last ReLU), so that a class activation map can
  be computed by any engine, ONNX included: ``CAM_k = relu(sum_c W[k, c] * features[c])``, exact because the
  head is ``Linear(global_avg_pool(features))`` (see :func:`class_activation_map`).

Checkpoint formats understood by :func:`load_classifier_weights` / :func:`normalise_state_dict`:

``xrv``
    torchxrayvision ``xrv.models.DenseNet`` / ``xrv.models.ResNet`` state dicts: the module structure and key
    names here are identical (``features.conv0.weight`` ... ``features.norm5.*``, ``classifier.weight/bias``,
    optional ``op_threshs`` buffer; ResNet: ``model.*``), so such a state dict loads with ``strict=True``.
    torchxrayvision's released ``.pt`` files are *pickled whole modules* that need torchxrayvision to
    unpickle; load them with ``allow_pickle=True`` (they are unpickled with the xrv classes replaced by inert
    stand-ins: only the tensors are kept) or convert once with ``torch.save(model.state_dict(), path)``.
``chexnet``
    arnoweng/CheXNet: ``{"state_dict": ...}`` saved from ``DataParallel(DenseNet121)`` -> keys
    ``module.densenet121.features.denseblock1.denselayer1.norm.1.weight`` (old torchvision "norm.1" style) and
    ``module.densenet121.classifier.0.weight`` (``Sequential(Linear, Sigmoid)``). jrzech/reproduce-chexnet:
    ``{"model": <pickled torchvision DenseNet>}`` (needs ``allow_pickle=True``) or its state dict
    (``classifier.0.*``). Plain torchvision ``densenet121`` state dicts with ``classifier = Linear`` also load.
    ``module.`` prefixes, ``densenet121.`` wrappers, old ``norm.1``/``conv.1``/``relu.1`` names and
    ``classifier.0.`` are all normalised.
``torchvision``
    A torchvision ResNet-50 state dict (``conv1``, ``layer1..4``, ``fc``), with or without a ``model.`` prefix.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "XRV_PATHOLOGIES",
    "CHESTXRAY14_LABELS",
    "CLASSIFIER_OUTPUT_NAMES",
    "DenseNetClassifier",
    "ResNetClassifier",
    "build_classifier",
    "normalise_state_dict",
    "read_checkpoint",
    "load_classifier_weights",
    "class_activation_map",
    "CheckpointError",
]

from .registry import CHESTXRAY14_LABELS, CLASSIFIER_OUTPUT_NAMES, XRV_PATHOLOGIES  # noqa: E402


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated or does not fit the architecture."""


class DenseNetClassifier(nn.Module):
    """DenseNet-121 with torchxrayvision's module structure (``features`` + ``classifier`` + ``op_threshs``).

    ``in_channels=1, num_classes=18`` is xrv's DenseNet; ``in_channels=3, num_classes=14`` is CheXNet.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 18,
        op_threshs: torch.Tensor | None = None,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
    ) -> None:
        super().__init__()
        from torchvision.models.densenet import DenseNet as _TVDenseNet

        tv = _TVDenseNet(
            growth_rate=growth_rate, block_config=block_config, num_init_features=num_init_features, num_classes=1
        )
        features = tv.features
        if in_channels != 3:
            features.conv0 = nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(features.conv0.weight)
        self.features = features
        num_features = tv.classifier.in_features
        self.classifier = nn.Linear(num_features, num_classes)
        nn.init.constant_(self.classifier.bias, 0)
        self.register_buffer("op_threshs", op_threshs)
        self.in_channels = in_channels
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = F.relu(self.features(x))
        pooled = torch.flatten(F.adaptive_avg_pool2d(feats, (1, 1)), 1)
        return torch.sigmoid(self.classifier(pooled)), feats

    @property
    def head_weight(self) -> torch.Tensor:
        return self.classifier.weight


class ResNetClassifier(nn.Module):
    """ResNet-50 with torchxrayvision's ``xrv.models.ResNet`` structure (``model`` = torchvision resnet50)."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 18, op_threshs: torch.Tensor | None = None) -> None:
        super().__init__()
        from torchvision.models import resnet50

        self.model = resnet50(num_classes=num_classes)
        if in_channels != 3:
            self.model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.register_buffer("op_threshs", op_threshs)
        self.in_channels = in_channels
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        feats = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        pooled = torch.flatten(F.adaptive_avg_pool2d(feats, (1, 1)), 1)
        return torch.sigmoid(m.fc(pooled)), feats

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.fc.weight


ARCHITECTURES = ("densenet121-xrv", "densenet121-chexnet", "resnet50-xrv", "resnet50")


def build_classifier(architecture: str, *, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
    """``densenet121-xrv`` (1 ch, 18 labels), ``densenet121-chexnet`` (3 ch, 14 labels),
    ``resnet50-xrv`` (1 ch, 18 labels), ``resnet50`` (3 ch, 14 labels)."""
    if architecture == "densenet121-xrv":
        return DenseNetClassifier(in_channels=in_channels or 1, num_classes=num_classes or len(XRV_PATHOLOGIES))
    if architecture == "densenet121-chexnet":
        return DenseNetClassifier(in_channels=in_channels or 3, num_classes=num_classes or len(CHESTXRAY14_LABELS))
    if architecture == "resnet50-xrv":
        return ResNetClassifier(in_channels=in_channels or 1, num_classes=num_classes or len(XRV_PATHOLOGIES))
    if architecture == "resnet50":
        return ResNetClassifier(in_channels=in_channels or 3, num_classes=num_classes or len(CHESTXRAY14_LABELS))
    raise ValueError(f"unknown classifier architecture {architecture!r}; expected one of {ARCHITECTURES}")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


class _Inert(nn.Module):
    """Stand-in for a class we do not want to (or cannot) import while unpickling a whole-model checkpoint."""

    def forward(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
        raise RuntimeError("inert stand-in")


class _StandInUnpickler(pickle.Unpickler):
    """Unpickles torch/torchvision/torchxrayvision whole-model checkpoints; foreign nn.Module subclasses
    (torchxrayvision, CheXNet's ``DenseNet121`` wrapper in ``__main__``) become inert modules that keep their
    parameters and buffers."""

    _ALLOWED_PREFIXES = ("torch", "torchvision", "collections", "numpy", "builtins", "__builtin__", "_codecs", "copyreg")

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in self._ALLOWED_PREFIXES:
            return super().find_class(module, name)
        return type(name, (_Inert,), {"__module__": "cxr_triage.models.classifier._standin"})


class _StandInPickleModule:
    Unpickler = _StandInUnpickler
    load = pickle.load
    loads = pickle.loads
    dump = pickle.dump
    dumps = pickle.dumps


def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict.

    Accepts a state dict, ``{"state_dict": sd}``, ``{"model_state_dict": sd}``, ``{"model": sd}`` and -- only with
    ``allow_pickle=True`` (executes pickle code paths; use only on files whose sha256 you trust) -- a pickled
    whole module or ``{"model": module}``. Raises :class:`CheckpointError` with a clear message on truncated or
    unreadable files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.name} does not exist")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        if not allow_pickle:
            kind = _describe_load_error(exc)
            hint = (
                ". If it is a pickled whole model (e.g. a released torchxrayvision .pt or a reproduce-chexnet "
                "checkpoint) and you trust its sha256, import it with --allow-pickle"
                if kind.startswith("it contains pickled")
                else ""
            )
            raise CheckpointError(f"cannot read checkpoint {path.name}: {kind}{hint}") from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_StandInPickleModule)
        except Exception as exc2:  # noqa: BLE001
            raise CheckpointError(f"cannot read checkpoint {path.name}: {_describe_load_error(exc2)}") from None
    return _extract_state_dict(obj, path.name)


def _describe_load_error(exc: Exception) -> str:
    text = str(exc)
    if any(s in text for s in ("central directory", "failed finding", "PytorchStreamReader", "EOF", "truncated")):
        return "the file is truncated or corrupted (not a complete torch zip/pickle archive)"
    if "Weights only load failed" in text or "weights_only" in text:
        return "it contains pickled Python objects, not only tensors"
    return f"{type(exc).__name__}"


def _extract_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if key in obj and (isinstance(obj[key], (dict, nn.Module))):
                return _extract_state_dict(obj[key], name)
        if obj and all(isinstance(k, str) for k in obj) and any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"checkpoint {name} holds no recognisable state dict")


_OLD_STYLE = re.compile(r"\.(norm|relu|conv)\.(\d+)\.")


def normalise_state_dict(sd: dict[str, torch.Tensor], *, architecture: str) -> dict[str, torch.Tensor]:
    """Rename keys of xrv / CheXNet / torchvision checkpoints to this module's names (see module docstring)."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in sd.items():
        k = key
        while k.startswith("module."):
            k = k[len("module.") :]
        for wrapper in ("densenet121.", "densenet."):
            if k.startswith(wrapper):
                k = k[len(wrapper) :]
        k = _OLD_STYLE.sub(lambda m: f".{m.group(1)}{m.group(2)}.", k)
        if architecture.startswith("densenet"):
            k = k.replace("classifier.0.", "classifier.")
        elif architecture.startswith("resnet"):
            if not k.startswith("model.") and k != "op_threshs":
                k = "model." + k
            k = k.replace("model.fc.0.", "model.fc.")
        out[k] = value
    return out


def load_classifier_weights(
    model: nn.Module, path: str | Path, *, architecture: str, allow_pickle: bool = False
) -> nn.Module:
    """Load a checkpoint into ``model`` with strict key checking; clear :class:`CheckpointError` otherwise.

    ``op_threshs`` is optional in the file (released xrv state dicts may lack it); when present it is loaded.
    """
    sd = normalise_state_dict(read_checkpoint(path, allow_pickle=allow_pickle), architecture=architecture)
    op = sd.pop("op_threshs", None)
    missing, unexpected = [], []
    own = {k for k in model.state_dict() if k != "op_threshs"}
    missing = sorted(own - set(sd))
    unexpected = sorted(set(sd) - own)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {Path(path).name} does not match architecture {architecture}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:3]})"
        )
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {Path(path).name} has tensors of the wrong shape for {architecture}: "
            f"{str(exc).splitlines()[-1].strip()[:300]}"
        ) from None
    if op is not None:
        model.op_threshs = op.detach().clone().float()
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Class activation map (numpy, engine-agnostic)
# ----------------------------------------------------------------------------------------------------------


def class_activation_map(features: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """CAM for one image and one label: ``features`` (C, h, w), ``weight`` (C,) -> (h, w) float32 in [0, 1]."""
    cam = np.tensordot(weight.astype(np.float32), features.astype(np.float32), axes=(0, 0))
    cam = np.maximum(cam, 0.0)
    peak = float(cam.max(initial=0.0))
    if peak > 0:
        cam = cam / peak
    return cam.astype(np.float32)
