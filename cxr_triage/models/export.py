"""ONNX export (verified by onnx.checker) and TensorRT engine build with a content-keyed cache.

* :func:`export_onnx` -- any module whose forward returns a tuple of tensors; one input named ``input``,
  dynamic batch axis; legacy TorchScript exporter (``dynamo=False``: no onnxscript dependency, stable names).
* :func:`load_card_module` / :func:`export_card_onnx` -- torch module for a model card (weights verified by
  sha256 first) and its ONNX file, stored as ``blobs/<sha256>.onnx`` and recorded in the card.
* :func:`build_tensorrt_engine` -- TensorRT 10.x Python API: ONNX parser, one optimisation profile for batch
  1..max_batch, FP32/FP16/INT8 (IInt8EntropyCalibrator2 fed by sample images), serialised plan cached under
  ``cache_dir/<key>.plan`` where the key (:func:`engine_cache_key`) is sha256 over the ONNX file's sha256,
  TensorRT version, GPU name, compute capability, precision, max batch and calibration set; a mismatch in
  any of them means a different file name, hence a rebuild.
* :func:`tensorrt_build_record` / :func:`plan_path_for` -- what ``models build`` records in the card
  (:class:`~cxr_triage.models.registry.TensorRTBuild`) and where the plan for that record lives on this machine,
  so the worker loads the plan ``models build`` made instead of building another one with default settings.
* :func:`open_tensorrt_engine` -- the worker's decision: load the recorded plan; build it when missing; when
  TensorRT refuses a cached plan (truncated, or built elsewhere), delete it and build once more; an INT8 rebuild
  uses the recorded calibration images or refuses with a message saying how to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import numpy as np

from .engines import EngineUnavailable
from .registry import TENSORRT_PRECISIONS, ModelCard, OnnxInfo, TensorRTBuild, save_card, store_blob, verify_weights

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "export_onnx",
    "load_card_module",
    "export_card_onnx",
    "engine_cache_key",
    "build_tensorrt_engine",
    "tensorrt_available",
    "tensorrt_environment",
    "TensorRTEnvironment",
    "tensorrt_plan_path",
    "plan_path_for",
    "tensorrt_build_record",
    "load_calibration_images",
    "calibration_digest",
    "open_tensorrt_engine",
    "CALIBRATION_LIMIT",
    "PRECISIONS",
    "ExportError",
]

PRECISIONS = TENSORRT_PRECISIONS
INPUT_NAME = "input"
CALIBRATION_LIMIT = 256  # images taken from a calibration folder (sorted by name)


class ExportError(RuntimeError):
    pass


def export_onnx(
    module: "torch.nn.Module",
    path: str | Path,
    *,
    input_shape: Sequence[int],
    output_names: Sequence[str],
    dynamic_batch: bool = True,
    opset: int = 17,
) -> Path:
    """Export ``module`` (eval mode, CPU, float32) to ``path`` and check it with ``onnx.checker``."""
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    dummy = torch.zeros(tuple(input_shape), dtype=torch.float32)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in output_names}}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    got = [o.name for o in model.graph.output]
    if got != list(output_names):
        raise ExportError(f"exported outputs {got} != expected {list(output_names)}")
    return path


def load_card_module(card: ModelCard) -> "torch.nn.Module":
    """Build the card's architecture and load its weights (sha256-verified). Clear errors on bad files."""
    from .classifier import CheckpointError, build_classifier, load_classifier_weights

    path = verify_weights(card)
    if card.task == "classification":
        model = build_classifier(
            card.architecture, num_classes=len(card.labels), in_channels=card.input.channels
        )
        return load_classifier_weights(
            model, path, architecture=card.architecture, allow_pickle=card.weights.allow_pickle
        )
    if card.task == "detection":
        from .detector import load_detector_checkpoint

        params = card.architecture_params
        kwargs = {k: params[k] for k in ("backbone", "image_size", "in_channels", "num_global_classes", "small_anchors")
                  if k in params}
        try:
            return load_detector_checkpoint(path, **kwargs).eval()
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch internals: turn into one clear line
            raise CheckpointError(
                f"cannot load detector weights {path.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            ) from None
    raise ValueError(f"unknown task {card.task!r}")


def output_names_for(card: ModelCard) -> tuple[str, ...]:
    names = card.architecture_params.get("output_names")
    if names:
        return tuple(names)
    return ("probabilities", "features") if card.task == "classification" else (
        "cls_logits", "bbox_regression", "global_logits")


def export_card_onnx(card: ModelCard, *, module: "torch.nn.Module | None" = None, opset: int = 17,
                     save: bool = False) -> ModelCard:
    """Export the card's model to ``blobs/<sha256>.onnx`` in its models dir; returns the updated card."""
    if card.models_dir is None:
        raise ValueError("card has no models_dir")
    module = module if module is not None else load_card_module(card)
    names = output_names_for(card)
    spec = card.input
    blobs = card.models_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".export-", suffix=".onnx")
    os.close(fd)
    try:
        export_onnx(module, tmp, input_shape=(1, spec.channels, spec.size, spec.size), output_names=names,
                    opset=opset)
        rel, digest = store_blob(tmp, card.models_dir, ext="onnx", move=True)
    finally:
        Path(tmp).unlink(missing_ok=True)
    card = replace(card, onnx=OnnxInfo(file=rel, sha256=digest, opset=opset, output_names=names))
    if save:
        save_card(card, card.models_dir)
    return card


# ----------------------------------------------------------------------------------------------------------
# TensorRT
# ----------------------------------------------------------------------------------------------------------


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class TensorRTEnvironment:
    """The machine's part of a plan's cache key: a plan only loads under the TensorRT and GPU it was built for."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]


def tensorrt_environment(device: int | None = None) -> TensorRTEnvironment:
    """TensorRT version and GPU of this process. Raises :class:`ExportError` without TensorRT or CUDA."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError("TensorRT is not installed (pip install 'cxr-triage[gpu]' on a CUDA machine)") from exc
    import torch

    if not torch.cuda.is_available():
        raise ExportError("TensorRT needs a CUDA GPU")
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    return TensorRTEnvironment(tensorrt_version=str(trt.__version__), gpu_name=str(props.name),
                               compute_capability=(int(props.major), int(props.minor)))


def engine_cache_key(
    *,
    onnx_sha256: str,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int] | str,
    precision: str,
    max_batch: int,
    calibration_sha256: str | None = None,
) -> str:
    """Deterministic key of a TensorRT plan: anything that makes a plan invalid or different changes it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    cc = compute_capability if isinstance(compute_capability, str) else f"{compute_capability[0]}.{compute_capability[1]}"
    payload = {
        "onnx": onnx_sha256,
        "trt": tensorrt_version,
        "gpu": gpu_name,
        "cc": cc,
        "precision": precision,
        "max_batch": int(max_batch),
        "calibration": calibration_sha256 if precision == "int8" else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:40]


def calibration_digest(images: Sequence[np.ndarray] | None) -> str | None:
    """Identity of a calibration set: sha256 over the preprocessed images (shape and float32 bytes, in order)."""
    if not images:
        return None
    h = hashlib.sha256()
    for im in images:
        a = np.ascontiguousarray(im, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_calibration_images(directory: str | Path, spec: Any, *, limit: int = CALIBRATION_LIMIT) -> list[np.ndarray]:
    """The INT8 calibration set of a folder: its first ``limit`` readable images (DICOM, PNG, JPEG) in file-name
    order, prepared per the card's input spec. ``models build`` and an INT8 rebuild in the worker both take the set
    from here, so one folder always gives the same images, hence the same digest, hence the same plan."""
    from .preprocess import ImageError, load_image, prepare

    folder = Path(directory)
    if not folder.is_dir():
        raise ExportError(f"calibration folder {folder} does not exist")
    images: list[np.ndarray] = []
    for path in sorted(folder.iterdir()):
        if len(images) >= limit:
            break
        if not path.is_file():
            continue
        try:
            images.append(prepare(load_image(path), spec)[0])
        except ImageError:
            continue  # not an image: a README or label file next to the images
    return images


def tensorrt_plan_path(
    *,
    cache_dir: str | Path,
    onnx_sha256: str,
    environment: TensorRTEnvironment,
    precision: str,
    max_batch: int,
    calibration_sha256: str | None,
) -> Path:
    """The one place a plan's file name is computed, for the build and for the lookup alike."""
    key = engine_cache_key(
        onnx_sha256=onnx_sha256, tensorrt_version=environment.tensorrt_version, gpu_name=environment.gpu_name,
        compute_capability=environment.compute_capability, precision=precision, max_batch=max_batch,
        calibration_sha256=calibration_sha256,
    )
    return Path(cache_dir) / f"{key}.plan"


def tensorrt_build_record(
    *,
    precision: str,
    max_batch: int,
    calibration_dir: str | Path | None = None,
    calibration_images: Sequence[np.ndarray] | None = None,
) -> TensorRTBuild:
    """What ``models build`` writes into the card for a build with these settings (no TensorRT needed).

    The calibration set is recorded for ``int8`` only: FP32/FP16 plans do not depend on it (nor does their key)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if precision != "int8":
        return TensorRTBuild(precision=precision, max_batch=int(max_batch))
    if not calibration_images:
        raise ValueError("int8 needs calibration images: give --calibration-dir with sample images the model reads")
    return TensorRTBuild(
        precision=precision, max_batch=int(max_batch), calibration_sha256=calibration_digest(calibration_images),
        calibration_dir=str(Path(calibration_dir).resolve()) if calibration_dir is not None else None,
        calibration_count=len(calibration_images),
    )


def _make_calibrator(trt: Any, images: Sequence[np.ndarray], batch_size: int, cache_file: Path) -> Any:
    """IInt8EntropyCalibrator2 feeding preprocessed CxHxW float32 images from torch CUDA tensors."""
    import torch

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._images = [np.ascontiguousarray(i, dtype=np.float32) for i in images]
            self._batch = max(1, min(batch_size, len(self._images)))
            self._pos = 0
            self._device = torch.empty((self._batch, *self._images[0].shape), dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return self._batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._pos + self._batch > len(self._images):
                return None
            host = np.stack(self._images[self._pos : self._pos + self._batch])
            self._device.copy_(torch.from_numpy(host))
            torch.cuda.synchronize()
            self._pos += self._batch
            return [int(self._device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            cache_file.write_bytes(bytes(cache))

    return _EntropyCalibrator()


def build_tensorrt_engine(
    onnx_path: str | Path,
    *,
    precision: str = "fp16",
    calibration_images: Sequence[np.ndarray] | None = None,
    max_batch: int = 8,
    opt_batch: int | None = None,
    cache_dir: str | Path,
    workspace_bytes: int = 2 << 30,
    onnx_sha256: str | None = None,
    environment: TensorRTEnvironment | None = None,
) -> Path:
    """Build (or reuse from ``cache_dir``) a TensorRT plan for ``onnx_path``. Returns the plan path.

    ``calibration_images``: preprocessed CxHxW float32 arrays (required for ``int8``). ``environment``: this
    machine's TensorRT/GPU (detected when not given).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if precision == "int8" and not calibration_images:
        raise ValueError("int8 needs calibration_images (preprocessed sample images)")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError("TensorRT is not installed (pip install 'cxr-triage[gpu]' on a CUDA machine)") from exc
    import torch

    if not torch.cuda.is_available():
        raise ExportError("TensorRT engine build needs a CUDA GPU")
    from .registry import sha256_file

    onnx_path = Path(onnx_path)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan_path = tensorrt_plan_path(
        cache_dir=cache_dir, onnx_sha256=onnx_sha256 or sha256_file(onnx_path),
        environment=environment or tensorrt_environment(), precision=precision, max_batch=max_batch,
        calibration_sha256=calibration_digest(calibration_images),
    )
    key = plan_path.stem
    if plan_path.is_file() and plan_path.stat().st_size > 0:
        return plan_path

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    inp = network.get_input(0)
    chw = tuple(inp.shape)[1:]
    profile = builder.create_optimization_profile()
    opt = opt_batch or max(1, min(max_batch, 8))
    profile.set_shape(inp.name, (1, *chw), (opt, *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)
    # platform_has_fast_fp16 is deprecated since TensorRT 10.5 (may go): without it, ask for FP16 anyway
    if precision in ("fp16", "int8") and getattr(builder, "platform_has_fast_fp16", True):
        config.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = _make_calibrator(trt, calibration_images or [], min(max_batch, 8), cache_dir / f"{key}.calib")
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT engine build failed for {onnx_path.name} ({precision})")
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".plan-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(bytes(serialized))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, plan_path)
    del calibrator
    return plan_path


def plan_path_for(card: ModelCard, build: TensorRTBuild, *, cache_dir: str | Path,
                  environment: TensorRTEnvironment) -> Path:
    """Where the plan for ``card`` built with ``build``'s settings lives on ``environment`` (no TensorRT needed):
    the file :func:`build_tensorrt_engine` writes for the same ONNX file, settings and calibration set."""
    if card.onnx is None:
        raise ValueError(f"model {card.ref} has no ONNX export")
    return tensorrt_plan_path(cache_dir=cache_dir, onnx_sha256=card.onnx.sha256, environment=environment,
                              precision=build.precision, max_batch=build.max_batch,
                              calibration_sha256=build.calibration_sha256)


E = TypeVar("E")


def _recorded_calibration(card: ModelCard, build: TensorRTBuild) -> list[np.ndarray]:
    """The calibration images ``models build`` used, for an INT8 rebuild; refuses when they are gone or changed
    (a plan from other images would be filed under another key and never be found again)."""
    how = (f"run `cxr-triage models build {card.name} --precision int8 --max-batch {build.max_batch} "
           "--calibration-dir DIR` on this machine")
    if not build.calibration_dir:
        raise EngineUnavailable(f"model {card.ref}: its INT8 TensorRT plan must be built here, but the card records "
                                f"no calibration folder; {how}")
    try:
        images = load_calibration_images(build.calibration_dir, card.input)
    except ExportError:
        images = []
    if calibration_digest(images) != build.calibration_sha256:
        raise EngineUnavailable(
            f"model {card.ref}: its INT8 TensorRT plan must be rebuilt (no plan for this TensorRT/GPU/ONNX), but the "
            f"calibration images recorded at {build.calibration_dir} are missing or changed; {how}"
        )
    return images


def open_tensorrt_engine(
    card: ModelCard,
    *,
    onnx_path: str | Path,
    cache_dir: str | Path,
    environment: TensorRTEnvironment,
    load: Callable[[Path], E],
    build: Callable[..., Path] = build_tensorrt_engine,
    default_precision: str = "fp16",
    default_max_batch: int = 8,
) -> tuple[E, Path]:
    """The worker's TensorRT engine for ``card``: returns (engine, plan path).

    Settings: the card's ``tensorrt`` record (what ``models build`` built), else ``default_precision`` /
    ``default_max_batch``. The plan is looked up under the key of those settings; when missing it is built
    (``build``, :func:`build_tensorrt_engine` signature); when present but refused by ``load`` (TensorRT cannot
    deserialize it: a truncated file, or a plan built for another TensorRT/GPU) it is deleted and built once more.
    An INT8 build uses the recorded calibration images or raises :class:`EngineUnavailable` saying how to rebuild.
    Errors propagate: the caller decides between failing (engine ``tensorrt``) and ONNX Runtime (``auto``).
    """
    from cxr_triage.core.logging import get_logger

    record = card.tensorrt or TensorRTBuild(precision=default_precision, max_batch=default_max_batch)
    plan = plan_path_for(card, record, cache_dir=cache_dir, environment=environment)
    if plan.is_file() and plan.stat().st_size > 0:
        try:
            return load(plan), plan
        except (EngineUnavailable, RuntimeError) as exc:
            # The cache is ours: a refused plan is worth nothing, and keeping it would fail every start.
            get_logger(__name__).warning("tensorrt_plan_refused_rebuilding", model=card.ref, plan=plan.name,
                                         reason=str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            plan.unlink(missing_ok=True)
    images = _recorded_calibration(card, record) if record.precision == "int8" else None
    built = build(Path(onnx_path), precision=record.precision, calibration_images=images,
                  max_batch=record.max_batch, cache_dir=Path(cache_dir),
                  onnx_sha256=card.onnx.sha256 if card.onnx else None, environment=environment)
    return load(Path(built)), Path(built)
