"""Model cards: weights + preprocessing + labels + thresholds + version travel as one object.

Layout of a models directory::

    <models_dir>/<name>.card.json           one card per model (JSON, schema below)
    <models_dir>/blobs/<sha256>.<ext>       weights and ONNX files, named by their content hash
    <models_dir>/downloads/<sha256(url)>.part   resumable partial downloads
    <models_dir>/engines/<cache key>.plan   TensorRT engines (see export.py)

Card schema (``schema: "cxr-triage-model-card/1"``)::

    {"name", "version", "task": "classification"|"detection", "architecture", "display_name",
     "weights": {"source", "sha256", "format", "file"},
     "onnx": {"file", "sha256", "opset", "output_names"} | null,
     "input": {"size", "channels", "normalisation", "resize"},
     "labels": [...], "positive_label": "Pneumonia", "operating_thresholds": {"Pneumonia": 0.5},
     "postprocess": {...}, "architecture_params": {...}, "demo": false, "notes": "",
     "tensorrt": {"precision", "max_batch", "calibration_sha256", "calibration_dir", "calibration_count",
                  "plan", "tensorrt_version", "gpu_name", "compute_capability"} | null}

``tensorrt`` records what ``cxr-triage models build`` built: the worker looks its plan up (or rebuilds it after
a TensorRT / GPU / ONNX change) with exactly these settings.

No torch import here: the worker only needs cards, hashes and ONNX files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclasses_fields
from pathlib import Path
from collections.abc import Collection, Mapping
from typing import Any, Callable

from .preprocess import InputSpec

__all__ = [
    "CARD_SCHEMA",
    "ModelCard",
    "WeightsInfo",
    "OnnxInfo",
    "TensorRTBuild",
    "TENSORRT_PRECISIONS",
    "WeightsError",
    "load_card",
    "save_card",
    "list_cards",
    "find_card",
    "card_path",
    "import_weights",
    "thresholds_from_checkpoint",
    "adopt_detector_checkpoint_config",
    "fetch_weights",
    "verify_weights",
    "verify_onnx",
    "sha256_file",
    "store_blob",
    "models_dir_from_env",
    "model_sources_from_env",
    "ModelSource",
    "SOURCES_FILE",
    "load_sources",
    "apply_card_options",
]

CARD_SCHEMA = "cxr-triage-model-card/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WEIGHT_FORMATS = ("xrv", "chexnet", "torchvision", "detector", "onnx")


class WeightsError(RuntimeError):
    """Weights are missing, corrupted or do not match the card's sha256."""


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # where they came from (path or URL) -- informational
    sha256: str
    format: str  # xrv | chexnet | torchvision | detector | onnx
    file: str | None = None  # relative to models_dir (blobs/<sha>.<ext>); None = not fetched yet
    allow_pickle: bool = False


@dataclass(frozen=True)
class OnnxInfo:
    file: str  # relative to models_dir
    sha256: str
    opset: int = 17
    output_names: tuple[str, ...] = ()


TENSORRT_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class TensorRTBuild:
    """The settings ``models build`` built a TensorRT plan with, recorded in the card.

    ``precision``, ``max_batch`` and ``calibration_sha256`` (the identity of the INT8 calibration set: sha256
    over the preprocessed images) are the card's part of the plan cache key; the rest of the key (ONNX sha256,
    TensorRT version, GPU) comes from the card's ONNX and the machine at load time, so an upgrade still means a
    rebuild. ``calibration_dir`` / ``calibration_count`` say where the calibration images came from, so that an
    INT8 rebuild can use them again. ``plan``, ``tensorrt_version``, ``gpu_name`` and ``compute_capability``
    describe the last build (informational: never used to find a plan)."""

    precision: str = "fp16"
    max_batch: int = 8
    calibration_sha256: str | None = None
    calibration_dir: str | None = None
    calibration_count: int = 0
    plan: str | None = None
    tensorrt_version: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in TENSORRT_PRECISIONS:
            raise ValueError(f"tensorrt.precision must be one of {TENSORRT_PRECISIONS}, got {self.precision!r}")
        if int(self.max_batch) < 1:
            raise ValueError(f"tensorrt.max_batch must be >= 1, got {self.max_batch}")
        if self.precision == "int8" and not self.calibration_sha256:
            raise ValueError("tensorrt: an int8 build needs its calibration set (calibration_sha256)")


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    task: str  # classification | detection
    architecture: str
    weights: WeightsInfo
    input: InputSpec
    labels: tuple[str, ...]
    operating_thresholds: dict[str, float] = field(default_factory=dict)
    positive_label: str = "Pneumonia"
    postprocess: dict[str, Any] = field(default_factory=dict)
    architecture_params: dict[str, Any] = field(default_factory=dict)
    onnx: OnnxInfo | None = None
    demo: bool = False
    display_name: str = ""
    notes: str = ""
    tensorrt: TensorRTBuild | None = None
    models_dir: Path | None = field(default=None, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def weights_path(self) -> Path | None:
        if self.weights.file is None or self.models_dir is None:
            return None
        return self.models_dir / self.weights.file

    @property
    def onnx_path(self) -> Path | None:
        if self.onnx is None or self.models_dir is None:
            return None
        return self.models_dir / self.onnx.file

    @property
    def threshold(self) -> float:
        return float(self.operating_thresholds.get(self.positive_label, 0.5))

    def to_json(self) -> dict[str, Any]:
        d = {
            "schema": CARD_SCHEMA,
            "name": self.name,
            "version": self.version,
            "display_name": self.display_name or self.name,
            "task": self.task,
            "architecture": self.architecture,
            "architecture_params": self.architecture_params,
            "weights": asdict(self.weights),
            "onnx": None if self.onnx is None else {**asdict(self.onnx), "output_names": list(self.onnx.output_names)},
            "input": self.input.to_dict(),
            "labels": list(self.labels),
            "positive_label": self.positive_label,
            "operating_thresholds": self.operating_thresholds,
            "postprocess": self.postprocess,
            "demo": self.demo,
            "notes": self.notes,
            "tensorrt": None if self.tensorrt is None else asdict(self.tensorrt),
        }
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], *, models_dir: Path | None = None) -> "ModelCard":
        if d.get("schema") != CARD_SCHEMA:
            raise ValueError(f"unsupported card schema {d.get('schema')!r}, expected {CARD_SCHEMA}")
        onnx = d.get("onnx")
        return cls(
            name=d["name"],
            version=str(d["version"]),
            task=d["task"],
            architecture=d["architecture"],
            architecture_params=dict(d.get("architecture_params") or {}),
            weights=WeightsInfo(**d["weights"]),
            onnx=None
            if not onnx
            else OnnxInfo(
                file=onnx["file"],
                sha256=onnx["sha256"],
                opset=int(onnx.get("opset", 17)),
                output_names=tuple(onnx.get("output_names") or ()),
            ),
            input=InputSpec(**d["input"]),
            labels=tuple(d["labels"]),
            positive_label=d.get("positive_label", "Pneumonia"),
            operating_thresholds={k: float(v) for k, v in (d.get("operating_thresholds") or {}).items()},
            postprocess=dict(d.get("postprocess") or {}),
            demo=bool(d.get("demo", False)),
            display_name=d.get("display_name") or d["name"],
            notes=d.get("notes", ""),
            # absent in cards written before `models build` recorded its settings: the worker's defaults apply
            tensorrt=TensorRTBuild(**d["tensorrt"]) if d.get("tensorrt") else None,
            models_dir=models_dir,
        )


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError("model name must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    return name


def models_dir_from_env() -> Path:
    """The models directory the worker reads (``CXR_MODELS_DIR``, else ``$CXR_DATA_DIR/models``), from the same
    settings object, so that what ``models import``/``fetch`` write without ``--models-dir`` is what it serves."""
    from cxr_triage.core.settings import load_settings

    return load_settings().models_path


def model_sources_from_env() -> Path | None:
    """``CXR_MODEL_SOURCES``: an extra model catalogue file (see :func:`load_sources`), or None."""
    from cxr_triage.core.settings import load_settings

    return load_settings().model_sources


def card_path(models_dir: Path, name: str) -> Path:
    return Path(models_dir) / f"{validate_name(name)}.card.json"


def load_card(path: str | Path) -> ModelCard:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read model card {path.name}: {exc}") from None
    return ModelCard.from_json(data, models_dir=path.parent)


def save_card(card: ModelCard, models_dir: str | Path) -> Path:
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    path = card_path(models_dir, card.name)
    _atomic_write_bytes(path, (json.dumps(card.to_json(), indent=2, sort_keys=False) + "\n").encode())
    return path


def list_cards(models_dir: str | Path) -> list[ModelCard]:
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    return [load_card(p) for p in sorted(models_dir.glob("*.card.json"))]


def find_card(models_dir: str | Path, name: str) -> ModelCard:
    path = card_path(Path(models_dir), name)
    if not path.is_file():
        raise KeyError(f"no model card named {name!r} in {models_dir}")
    return load_card(path)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def store_blob(src: str | Path, models_dir: str | Path, *, ext: str, move: bool = False) -> tuple[str, str]:
    """Copy (or move) ``src`` into ``<models_dir>/blobs/<sha256>.<ext>``; returns (relative path, sha256)."""
    models_dir = Path(models_dir)
    blobs = models_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    digest = sha256_file(src)
    rel = f"blobs/{digest}.{ext.lstrip('.')}"
    dest = models_dir / rel
    if not dest.exists() or sha256_file(dest) != digest:
        fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".tmp-")
        os.close(fd)
        try:
            if move:
                shutil.move(str(src), tmp)
            else:
                shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
            _fsync_dir(blobs)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    elif move:
        Path(src).unlink(missing_ok=True)
    return rel, digest


def verify_weights(card: ModelCard) -> Path:
    """Check the weights file exists and matches the card's sha256. Returns its path; raises WeightsError."""
    path = card.weights_path
    if path is None:
        raise WeightsError(
            f"model {card.ref}: weights not present locally; run `cxr-triage models fetch {card.name}`"
        )
    if not path.is_file():
        raise WeightsError(f"model {card.ref}: weights file {path} is missing")
    digest = sha256_file(path)
    if digest != card.weights.sha256:
        raise WeightsError(
            f"model {card.ref}: weights file {path.name} is corrupted or was replaced: sha256 {digest[:16]}... "
            f"does not match the card's {card.weights.sha256[:16]}..."
        )
    return path


def verify_onnx(card: ModelCard) -> Path:
    path = card.onnx_path
    if path is None or card.onnx is None:
        raise WeightsError(f"model {card.ref}: no ONNX export; run `cxr-triage models export {card.name}`")
    if not path.is_file():
        raise WeightsError(f"model {card.ref}: ONNX file {path} is missing")
    digest = sha256_file(path)
    if digest != card.onnx.sha256:
        raise WeightsError(
            f"model {card.ref}: ONNX file {path.name} is corrupted: sha256 {digest[:16]}... does not match "
            f"the card's {card.onnx.sha256[:16]}..."
        )
    return path


# ----------------------------------------------------------------------------------------------------------
# Import / fetch
# ----------------------------------------------------------------------------------------------------------


# torchxrayvision default_pathologies (order of the 18 outputs of its DenseNet/ResNet)
XRV_PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion",
    "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)
# ChestX-ray14 order used by CheXNet (arnoweng) and reproduce-chexnet
CHESTXRAY14_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
CLASSIFIER_OUTPUT_NAMES = ("probabilities", "features")
DETECTOR_GLOBAL_CLASSES = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
DEFAULT_DETECTION_PARAMS = {
    "score_threshold": 0.2, "nms_threshold": 0.45, "box_scale": 0.875, "max_detections": 10, "gate_weight": 0.5,
}
CLASSIFIER_ARCHITECTURES = ("densenet121-xrv", "densenet121-chexnet", "resnet50-xrv", "resnet50")
DETECTOR_ARCHITECTURES = ("retinanet-resnet50", "retinanet-resnet18", "retinanet-resnext101", "retinanet-tiny")


def default_card_fields(architecture: str, fmt: str) -> dict[str, Any]:
    """Task, input spec, labels and thresholds implied by an architecture (override with ``card_overrides``)."""
    if fmt == "detector" or architecture.startswith("retinanet"):
        if architecture not in DETECTOR_ARCHITECTURES:
            raise ValueError(f"unknown detector architecture {architecture!r}; expected {DETECTOR_ARCHITECTURES}")
        return {
            "task": "detection",
            "input": InputSpec(size=512, channels=3, normalisation="imagenet", resize="letterbox"),
            "labels": ("Lung Opacity",),
            "positive_label": "Lung Opacity",
            "operating_thresholds": {"Lung Opacity": 0.5},
            "postprocess": dict(DEFAULT_DETECTION_PARAMS),
            "architecture_params": {
                "backbone": architecture.split("-", 1)[1], "image_size": 512, "in_channels": 3,
                "num_global_classes": 3, "small_anchors": True, "global_classes": list(DETECTOR_GLOBAL_CLASSES),
                "output_names": ["cls_logits", "bbox_regression", "global_logits"],
            },
        }
    if architecture in ("densenet121-xrv", "resnet50-xrv"):
        size = 224 if architecture.startswith("densenet") else 512
        return {
            "task": "classification",
            "input": InputSpec(size=size, channels=1, normalisation="xrv", resize="letterbox"),
            "labels": XRV_PATHOLOGIES,
            "positive_label": "Pneumonia",
            "operating_thresholds": {"Pneumonia": 0.5},
            "architecture_params": {"output_names": list(CLASSIFIER_OUTPUT_NAMES)},
        }
    if architecture in ("densenet121-chexnet", "resnet50"):
        return {
            "task": "classification",
            "input": InputSpec(size=224, channels=3, normalisation="imagenet", resize="stretch"),
            "labels": CHESTXRAY14_LABELS,
            "positive_label": "Pneumonia",
            "operating_thresholds": {"Pneumonia": 0.5},
            "architecture_params": {"output_names": list(CLASSIFIER_OUTPUT_NAMES)},
        }
    raise ValueError(
        f"unknown architecture {architecture!r}; expected one of {CLASSIFIER_ARCHITECTURES + DETECTOR_ARCHITECTURES}"
    )


def import_weights(
    src_file: str | Path,
    *,
    models_dir: str | Path,
    name: str,
    version: str,
    architecture: str,
    format: str,  # noqa: A002 - CLI-facing name
    source: str | None = None,
    allow_pickle: bool = False,
    export: bool = True,
    card_overrides: dict[str, Any] | None = None,
) -> ModelCard:
    """Copy a checkpoint into the models dir (content-hash name), validate it loads into ``architecture``,
    write the card and (``export=True``) export the ONNX file next to it. Returns the card."""
    validate_name(name)
    if format not in WEIGHT_FORMATS:
        raise ValueError(f"format must be one of {WEIGHT_FORMATS}")
    src_file = Path(src_file)
    if not src_file.is_file():
        raise WeightsError(f"weights file {src_file} does not exist")
    models_dir = Path(models_dir)
    ext = "onnx" if format == "onnx" else "pt"
    rel, digest = store_blob(src_file, models_dir, ext=ext)
    fields = default_card_fields(architecture, format)
    fields.update(card_overrides or {})
    card = ModelCard(
        name=name,
        version=version,
        architecture=architecture,
        weights=WeightsInfo(
            source=source or src_file.name, sha256=digest, format=format, file=rel, allow_pickle=allow_pickle
        ),
        models_dir=models_dir,
        **fields,
    )
    if format == "onnx":
        card = replace(card, onnx=OnnxInfo(file=rel, sha256=digest, output_names=tuple(fields.get("output_names", ()))))
    overrides = card_overrides or {}
    explicit = set(overrides.get("operating_thresholds") or {})
    keep = set(overrides.get("architecture_params") or {}) | ({"input"} if "input" in overrides else set())
    return _finish_card(card, models_dir, export=export, explicit_thresholds=explicit, keep=keep)


def thresholds_from_checkpoint(card: ModelCard, module: Any, *, keep: Collection[str] = ()) -> ModelCard:
    """Take the operating points a torchxrayvision checkpoint carries (its ``op_threshs`` buffer) into the card.

    torchxrayvision calibrates outputs so that ``op_threshs[k]`` maps to 0.5; we serve raw sigmoid probabilities,
    so flagging ``p >= op_threshs[k]`` is exactly xrv's operating point. NaN entries (labels the model was not
    trained on) and labels in ``keep`` (set explicitly by the user) are left as they are.
    """
    op = getattr(module, "op_threshs", None)
    if card.task != "classification" or op is None:
        return card
    values = [float(v) for v in op.detach().float().flatten().tolist()]
    if len(values) != len(card.labels):
        return card
    found = {lab: v for lab, v in zip(card.labels, values) if math.isfinite(v) and 0.0 < v < 1.0 and lab not in keep}
    if not found:
        return card
    return replace(card, operating_thresholds={**card.operating_thresholds, **found})


DETECTOR_BUILD_KEYS = ("backbone", "image_size", "in_channels", "num_global_classes", "small_anchors")


def adopt_detector_checkpoint_config(card: ModelCard, saved: dict[str, Any], *,
                                     keep: Collection[str] = ()) -> ModelCard:
    """Describe a detector checkpoint by what it says about itself (see
    :func:`cxr_triage.models.detector.read_checkpoint_config`): its build config replaces the architecture
    defaults (512 px, small anchors) in ``architecture_params`` and its input size/channels the card's input
    spec, so a model trained with ``--image-size 384`` or ``--default-anchors`` imports as such.

    ``keep``: ``architecture_params`` keys (or ``"input"``) the caller set explicitly; they stay, and a
    contradiction with the checkpoint is then reported when the weights load. A checkpoint whose backbone is
    not the card's architecture is refused here, naming the architecture to import it with."""
    config = {k: v for k, v in (saved.get("config") or {}).items() if k in DETECTOR_BUILD_KEYS}
    backbone = config.get("backbone")
    if backbone is not None and "backbone" not in keep and card.architecture != f"retinanet-{backbone}":
        raise ValueError(
            f"the checkpoint was trained with backbone {backbone!r}, not {card.architecture!r}; import it with "
            f"--architecture retinanet-{backbone}"
        )
    params = {**card.architecture_params, **{k: v for k, v in config.items() if k not in keep}}
    size = int(params.get("image_size", card.input.size))
    channels = int(params.get("in_channels", card.input.channels))
    spec = card.input
    if "input" not in keep:
        saved_input = saved.get("input") or {}
        spec = InputSpec(size=size, channels=channels,
                         normalisation=str(saved_input.get("normalisation", spec.normalisation)),
                         resize=str(saved_input.get("resize", spec.resize)))
    if (spec.size, spec.channels) != (size, channels):
        # The ONNX export and the anchors follow these two numbers; they must agree or every box is wrong.
        raise ValueError(
            f"input spec {spec.size} px x {spec.channels} channels contradicts the detector's image_size {size} / "
            f"in_channels {channels}"
        )
    return replace(card, architecture_params=params, input=spec)


def _finish_card(card: ModelCard, models_dir: Path, *, export: bool, explicit_thresholds: Collection[str] = (),
                 keep: Collection[str] = ()) -> ModelCard:
    if card.weights.format != "onnx":
        from .export import export_card_onnx, load_card_module

        if card.task == "detection" and card.weights_path is not None:
            from .detector import read_checkpoint_config

            saved = read_checkpoint_config(card.weights_path)
            if saved is not None:
                card = adopt_detector_checkpoint_config(card, saved, keep=keep)
        module = load_card_module(card)  # validates the checkpoint: clear CheckpointError otherwise
        card = thresholds_from_checkpoint(card, module, keep=explicit_thresholds)
        if export:
            card = export_card_onnx(card)
    save_card(card, models_dir)
    return card


def apply_card_options(card: ModelCard, models_dir: str | Path, *, threshold: float | None = None,
                       ensemble: str | None = None, ensemble_weight: float = 1.0,
                       display_name: str | None = None, notes: str | None = None) -> ModelCard:
    """The card options of ``models import`` (also taken from a catalogue entry by ``models fetch``): the positive
    label's operating threshold, the detector ensemble group and weight, display name, notes. Saves the card."""
    if ensemble is not None and card.task != "detection":
        raise ValueError("--ensemble applies to detector checkpoints (checkpoint/fold ensembles)")
    if threshold is not None:
        card = replace(card, operating_thresholds={**card.operating_thresholds, card.positive_label: threshold})
    if ensemble is not None:
        card = replace(card, architecture_params={**card.architecture_params, "ensemble": ensemble,
                                                  "ensemble_weight": ensemble_weight})
    if display_name is not None:
        card = replace(card, display_name=display_name)
    if notes is not None:
        card = replace(card, notes=notes)
    save_card(card, models_dir)
    return card


SOURCES_FILE = "sources.json"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelSource:
    """One catalogue entry: where ``models fetch NAME`` downloads from and how it imports what it got."""

    url: str
    sha256: str
    format: str
    architecture: str
    version: str
    allow_pickle: bool = False
    threshold: float | None = None
    ensemble: str | None = None
    ensemble_weight: float = 1.0
    display_name: str | None = None
    notes: str | None = None
    catalogue: str = field(default="", compare=False)  # the file it came from, for messages

    @classmethod
    def parse(cls, name: str, entry: object, *, catalogue: str) -> "ModelSource":
        """Validate one entry, naming the file, the model and the bad key (a typo must not silently drop an
        option such as the threshold)."""
        where = f"{catalogue}: model {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object with url, sha256, format, architecture, version")
        known = {f.name for f in dataclasses_fields(cls)} - {"catalogue"}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        missing = [k for k in ("url", "sha256", "format", "architecture", "version") if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        validate_name(name)
        url, sha = str(entry["url"]), str(entry["sha256"]).lower()
        if urllib.parse.urlparse(url).scheme not in ("http", "https", "file"):
            raise ValueError(f"{where}: url must be http(s):// or file://")
        if not _SHA256_RE.match(sha):
            raise ValueError(f"{where}: sha256 must be 64 hex digits")
        if entry["format"] not in WEIGHT_FORMATS:
            raise ValueError(f"{where}: format must be one of {WEIGHT_FORMATS}")
        try:
            task = default_card_fields(str(entry["architecture"]), str(entry["format"]))["task"]
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if entry.get("ensemble") is not None and task != "detection":
            raise ValueError(f"{where}: ensemble applies to detector checkpoints only")
        threshold = entry.get("threshold")
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0):
            raise ValueError(f"{where}: threshold must be a number in [0, 1]")
        weight = entry.get("ensemble_weight", 1.0)
        if not isinstance(weight, (int, float)) or float(weight) < 0.0:
            raise ValueError(f"{where}: ensemble_weight must be a number >= 0")
        if not isinstance(entry.get("allow_pickle", False), bool):
            raise ValueError(f"{where}: allow_pickle must be true or false")
        opt = {k: (None if entry.get(k) is None else str(entry[k])) for k in ("ensemble", "display_name", "notes")}
        return cls(url=url, sha256=sha, format=str(entry["format"]), architecture=str(entry["architecture"]),
                   version=str(entry["version"]), allow_pickle=bool(entry.get("allow_pickle", False)),
                   threshold=None if threshold is None else float(threshold), ensemble_weight=float(weight),
                   catalogue=catalogue, **opt)


def load_sources(models_dir: str | Path, extra: str | Path | None = None) -> dict[str, ModelSource]:
    """The model catalogue: ``<models_dir>/sources.json`` (if present), then ``extra`` (``CXR_MODEL_SOURCES``;
    must exist when configured), whose entries win for names in both. Each file is a JSON object
    ``{NAME: {"url", "sha256", "format", "architecture", "version", optional "allow_pickle", "threshold",
    "ensemble", "ensemble_weight", "display_name", "notes"}}``. Raises ValueError naming the file and entry."""
    files: list[Path] = []
    local = Path(models_dir) / SOURCES_FILE
    if local.is_file():
        files.append(local)
    if extra is not None:
        extra = Path(extra)
        if not extra.is_file():
            raise ValueError(f"model catalogue {extra} (CXR_MODEL_SOURCES) does not exist")
        if not (local.is_file() and extra.resolve() == local.resolve()):
            files.append(extra)
    sources: dict[str, ModelSource] = {}
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read model catalogue {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"model catalogue {path}: expected a JSON object of model name -> source")
        for name, entry in data.items():
            sources[name] = ModelSource.parse(name, entry, catalogue=str(path))
    return sources


def _download(url: str, dest_part: Path, *, timeout: float = 30.0, chunk: int = 1 << 16,
              on_chunk: Callable[[int], None] | None = None) -> None:
    """Download ``url`` into ``dest_part``, resuming from its current size with an HTTP Range request."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        src = Path(urllib.request.url2pathname(parsed.path))
        if not src.is_file():
            raise WeightsError(f"download source {src} does not exist")
        shutil.copyfile(src, dest_part)
        return
    if parsed.scheme not in ("http", "https"):
        raise WeightsError(f"unsupported URL scheme {parsed.scheme!r} (http, https or file)")
    have = dest_part.stat().st_size if dest_part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "cxr-triage"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - scheme checked above
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # already complete
            return
        raise WeightsError(f"download failed: HTTP {exc.code} from {parsed.netloc}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise WeightsError(f"download failed: cannot reach {parsed.netloc}: {exc}") from None
    with resp:
        status = getattr(resp, "status", 200)
        mode = "ab" if (have and status == 206) else "wb"
        with open(dest_part, mode) as fh:
            while True:
                try:
                    block = resp.read(chunk)
                except (OSError, ValueError) as exc:
                    raise WeightsError(
                        f"download interrupted after {fh.tell()} bytes ({type(exc).__name__}); run fetch again to "
                        "resume"
                    ) from None
                if not block:
                    break
                fh.write(block)
                if on_chunk is not None:
                    on_chunk(len(block))
            fh.flush()
            os.fsync(fh.fileno())
        length = resp.headers.get("Content-Length")
        if length is not None and status in (200, 206):
            expected = int(length) + (have if mode == "ab" else 0)
            got = dest_part.stat().st_size
            if got < expected:
                raise WeightsError(
                    f"download interrupted: {got} of {expected} bytes received; run fetch again to resume"
                )


def fetch_weights(
    name: str,
    *,
    models_dir: str | Path,
    url: str | None = None,
    sha256: str | None = None,
    version: str | None = None,
    architecture: str | None = None,
    format: str | None = None,  # noqa: A002
    allow_pickle: bool = False,
    export: bool = True,
    timeout: float = 30.0,
    sources: Mapping[str, ModelSource] | None = None,
) -> ModelCard:
    """Download a model's weights (HTTP(S) with resume, or file://), verify their sha256, import them.

    Where each value comes from, first match wins: the arguments (``--url`` etc.), the catalogue entry
    ``sources[name]`` (:func:`load_sources`), the existing card. With a catalogue entry or explicit
    version/architecture/format, the download is imported exactly as ``models import`` does (validated, ONNX
    exported, card written, the entry's threshold / ensemble / display name applied). Without them, an existing
    card keeps everything but its weights (a re-fetch). A sha256 mismatch deletes the download and raises
    :class:`WeightsError` before any card is written.
    """
    models_dir = Path(models_dir)
    validate_name(name)
    sources = sources or {}
    entry = sources.get(name)
    existing: ModelCard | None = None
    if card_path(models_dir, name).is_file():
        existing = find_card(models_dir, name)
    if entry is None and existing is None and not url:
        known = ", ".join(sorted(sources)) or "none"
        raise WeightsError(
            f"model {name!r} is not in the model catalogue (known: {known}) and has no card. Add it to "
            f"{models_dir / SOURCES_FILE} or the file CXR_MODEL_SOURCES names, or give --url, --sha256, "
            "--version, --architecture and --format"
        )
    url = url or (entry.url if entry else None) or (existing.weights.source if existing else None)
    sha256 = (sha256 or (entry.sha256 if entry else "") or (existing.weights.sha256 if existing else "")).lower()
    if not url or "://" not in url:
        raise WeightsError(f"model {name}: no URL to fetch from (give --url)")
    if not _SHA256_RE.match(sha256):
        raise WeightsError(f"model {name}: a sha256 (64 hex digits) is required to fetch weights (give --sha256)")
    reimport = entry is not None or existing is None or any(v is not None for v in (version, architecture, format))
    version = version or (entry.version if entry else None) or (existing.version if existing else None)
    architecture = architecture or (entry.architecture if entry else None) or (
        existing.architecture if existing else None)
    fmt = format or (entry.format if entry else None) or (existing.weights.format if existing else None)
    if not (version and architecture and fmt):
        raise WeightsError(f"model {name}: no card yet; give version, architecture and format")
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"format must be one of {WEIGHT_FORMATS}")
    default_card_fields(architecture, fmt)  # an unknown architecture fails here, before the download
    allow_pickle = allow_pickle or bool(entry and entry.allow_pickle) or bool(
        existing and existing.weights.allow_pickle)
    downloads = models_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    # Named by the URL, so that the next run for the same URL resumes this file.
    part = downloads / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".part")
    _download(url, part, timeout=timeout)
    digest = sha256_file(part)
    if digest != sha256:
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"model {name}: downloaded file has sha256 {digest}, expected {sha256}; refusing it (deleted the "
            "download). Check the URL and the expected hash."
        )
    ext = "onnx" if fmt == "onnx" else "pt"
    rel, _ = store_blob(part, models_dir, ext=ext, move=True)
    if reimport:
        card = import_weights(models_dir / rel, models_dir=models_dir, name=name, version=version,
                              architecture=architecture, format=fmt, source=url, allow_pickle=allow_pickle,
                              export=export)
        if entry is not None:
            card = apply_card_options(card, models_dir, threshold=entry.threshold, ensemble=entry.ensemble,
                                      ensemble_weight=entry.ensemble_weight, display_name=entry.display_name,
                                      notes=entry.notes)
        return card
    assert existing is not None
    weights = WeightsInfo(source=url, sha256=digest, format=fmt, file=rel, allow_pickle=allow_pickle)
    card = replace(existing, weights=weights, models_dir=models_dir)
    if fmt == "onnx":
        card = replace(card, onnx=OnnxInfo(file=rel, sha256=digest, output_names=card.onnx.output_names if card.onnx else ()))
    return _finish_card(card, models_dir, export=export)
