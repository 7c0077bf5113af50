"""TensorRT plan bookkeeping that needs no TensorRT: what `models build` records in the card, the cache key the
worker computes from that record, and the worker's decision when a plan is missing, refused or needs INT8
calibration. TensorRT cannot be installed on this machine, so where a plan must be deserialized or built, a
stand-in takes the place of ``TensorRTEngine`` / ``build_tensorrt_engine`` with their contracts (a refused plan
raises ``EngineUnavailable``; a build writes the plan under the key of its arguments). The real TensorRT path is
covered by the GPU-marked tests in test_engines.py."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from typer.testing import CliRunner

from cxr_triage.cli import app
from cxr_triage.models.analyzer import tensorrt_or_fallback
from cxr_triage.models.engines import EngineUnavailable
from cxr_triage.models.export import (
    TensorRTEnvironment,
    calibration_digest,
    load_calibration_images,
    open_tensorrt_engine,
    plan_path_for,
    tensorrt_build_record,
    tensorrt_plan_path,
)
from cxr_triage.models.registry import ModelCard, TensorRTBuild, find_card, load_card, save_card

from .conftest import dicom, nih_pngs

ENV = TensorRTEnvironment(tensorrt_version="10.9.0", gpu_name="NVIDIA H200", compute_capability=(9, 0))
GOOD_PLAN = b"stand-in serialized engine"


@pytest.fixture()
def calibration_dir(tmp_path: Path) -> Path:
    d = tmp_path / "calibration"
    d.mkdir()
    for p in nih_pngs(3):
        shutil.copy(p, d / p.name)
    shutil.copy(dicom("siim-cr-pa-jpeg-baseline.dcm"), d / "z-cr.dcm")
    (d / "README.txt").write_text("not an image: skipped")
    return d


@pytest.fixture()
def classifier(demo_models_dir: Path) -> ModelCard:
    return find_card(demo_models_dir, "demo-classifier")


def _int8_card(card: ModelCard, calibration_dir: Path, models_dir: Path, *, max_batch: int = 4) -> ModelCard:
    """The card as `models build NAME --precision int8 --max-batch 4 --calibration-dir DIR` leaves it."""
    images = load_calibration_images(calibration_dir, card.input)
    record = tensorrt_build_record(precision="int8", max_batch=max_batch, calibration_dir=calibration_dir,
                                   calibration_images=images)
    save_card(replace(card, tensorrt=replace(record, plan="engines/x.plan", tensorrt_version=ENV.tensorrt_version,
                                             gpu_name=ENV.gpu_name, compute_capability="9.0")), models_dir)
    return load_card(models_dir / f"{card.name}.card.json")


def test_build_record_round_trips_through_the_card(classifier: ModelCard, calibration_dir: Path,
                                                   tmp_path: Path) -> None:
    images = load_calibration_images(calibration_dir, classifier.input)
    assert len(images) == 4 and images[0].shape == (1, 224, 224)  # README skipped; prepared per the card
    card = _int8_card(classifier, calibration_dir, tmp_path / "models")
    assert card.tensorrt is not None
    assert (card.tensorrt.precision, card.tensorrt.max_batch, card.tensorrt.calibration_count) == ("int8", 4, 4)
    assert card.tensorrt.calibration_sha256 == calibration_digest(images)
    assert card.tensorrt.calibration_dir == str(calibration_dir.resolve())
    on_disk = json.loads((tmp_path / "models" / "demo-classifier.card.json").read_text())
    assert on_disk["tensorrt"]["precision"] == "int8" and on_disk["tensorrt"]["max_batch"] == 4
    # a card written before builds were recorded still loads (the worker's defaults then apply)
    del on_disk["tensorrt"]
    assert ModelCard.from_json(on_disk).tensorrt is None
    # FP16 does not depend on a calibration set: none is recorded, whatever folder was given
    fp16 = tensorrt_build_record(precision="fp16", max_batch=2, calibration_dir=calibration_dir,
                                 calibration_images=images)
    assert fp16 == TensorRTBuild(precision="fp16", max_batch=2)


def test_build_record_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="calibration"):
        tensorrt_build_record(precision="int8", max_batch=8, calibration_images=[])
    with pytest.raises(ValueError, match="precision"):
        TensorRTBuild(precision="int4")
    with pytest.raises(ValueError, match="max_batch"):
        TensorRTBuild(max_batch=0)
    with pytest.raises(ValueError, match="calibration"):
        TensorRTBuild(precision="int8")


def test_worker_computes_the_key_models_build_used(classifier: ModelCard, calibration_dir: Path,
                                                   tmp_path: Path) -> None:
    """`models build` passes the card's ONNX sha256, its precision / max batch and the calibration images to
    build_tensorrt_engine, which files the plan under tensorrt_plan_path(...) of exactly those; the worker only
    has the card. Both must name the same file, or the worker builds a second plan with other settings."""
    card = _int8_card(classifier, calibration_dir, tmp_path / "models")
    cache = tmp_path / "engines"
    built_by_models_build = tensorrt_plan_path(
        cache_dir=cache, onnx_sha256=classifier.onnx.sha256, environment=ENV, precision="int8", max_batch=4,
        calibration_sha256=calibration_digest(load_calibration_images(calibration_dir, classifier.input)))
    assert card.tensorrt is not None
    assert plan_path_for(card, card.tensorrt, cache_dir=cache, environment=ENV) == built_by_models_build
    # what the worker used to look for (fp16, batch 8, no calibration) is another file
    assert plan_path_for(card, TensorRTBuild(), cache_dir=cache, environment=ENV) != built_by_models_build
    other_gpu = replace(ENV, gpu_name="NVIDIA L4", compute_capability=(8, 9))
    assert plan_path_for(card, card.tensorrt, cache_dir=cache, environment=other_gpu) != built_by_models_build

    # With that plan in the cache the worker loads it and builds nothing.
    cache.mkdir()
    built_by_models_build.write_bytes(GOOD_PLAN)
    loaded: list[Path] = []

    def no_build(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("the recorded plan exists: nothing must be built")

    engine, plan = open_tensorrt_engine(card, onnx_path=classifier.onnx_path, cache_dir=cache, environment=ENV,
                                        load=lambda p: loaded.append(p) or "engine", build=no_build)
    assert (engine, plan, loaded) == ("engine", built_by_models_build, [built_by_models_build])


def _deserialize(path: Path) -> tuple[str, Path]:
    """Stand-in for TensorRTEngine: TensorRT's deserialize_cuda_engine returns None for bytes it cannot use,
    which TensorRTEngine turns into EngineUnavailable."""
    if path.read_bytes() != GOOD_PLAN:
        raise EngineUnavailable(f"TensorRT could not deserialize {path.name} (built for another TensorRT/GPU?)")
    return ("engine", path)


class _Builder:
    """Stand-in for build_tensorrt_engine: writes the plan under the key of its arguments, as the real one does."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, onnx_path: Path, *, precision: str, calibration_images: Any, max_batch: int,
                 cache_dir: Path, onnx_sha256: str, environment: TensorRTEnvironment) -> Path:
        self.calls.append({"precision": precision, "max_batch": max_batch, "images": calibration_images})
        plan = tensorrt_plan_path(cache_dir=cache_dir, onnx_sha256=onnx_sha256, environment=environment,
                                  precision=precision, max_batch=max_batch,
                                  calibration_sha256=calibration_digest(calibration_images))
        plan.parent.mkdir(parents=True, exist_ok=True)
        plan.write_bytes(GOOD_PLAN)
        return plan


def test_a_refused_plan_is_deleted_and_rebuilt_with_the_recorded_settings(classifier: ModelCard,
                                                                         calibration_dir: Path,
                                                                         tmp_path: Path) -> None:
    card = _int8_card(classifier, calibration_dir, tmp_path / "models", max_batch=2)
    cache = tmp_path / "engines"
    assert card.tensorrt is not None
    plan = plan_path_for(card, card.tensorrt, cache_dir=cache, environment=ENV)
    cache.mkdir()
    plan.write_bytes(GOOD_PLAN[:7])  # truncated: a crash while the plan was written, or a foreign plan
    build = _Builder()
    with capture_logs() as logs:
        engine, used = open_tensorrt_engine(card, onnx_path=classifier.onnx_path, cache_dir=cache, environment=ENV,
                                            load=_deserialize, build=build)
    assert engine == ("engine", plan) and used == plan and plan.read_bytes() == GOOD_PLAN
    assert [(c["precision"], c["max_batch"]) for c in build.calls] == [("int8", 2)]
    assert calibration_digest(build.calls[0]["images"]) == card.tensorrt.calibration_sha256
    refused = [e for e in logs if e["event"] == "tensorrt_plan_refused_rebuilding"]
    assert refused and refused[0]["model"] == card.ref and "could not deserialize" in refused[0]["reason"]


def test_int8_rebuild_without_its_calibration_images_refuses_clearly(classifier: ModelCard, calibration_dir: Path,
                                                                    tmp_path: Path) -> None:
    card = _int8_card(classifier, calibration_dir, tmp_path / "models")
    build = _Builder()
    (calibration_dir / sorted(p.name for p in calibration_dir.iterdir())[0]).unlink()  # the set changed
    with pytest.raises(EngineUnavailable, match="calibration images recorded at .* missing or changed.*"
                                                "models build demo-classifier --precision int8"):
        open_tensorrt_engine(card, onnx_path=classifier.onnx_path, cache_dir=tmp_path / "engines", environment=ENV,
                             load=_deserialize, build=build)
    shutil.rmtree(calibration_dir)
    with pytest.raises(EngineUnavailable, match="missing or changed"):
        open_tensorrt_engine(card, onnx_path=classifier.onnx_path, cache_dir=tmp_path / "engines", environment=ENV,
                             load=_deserialize, build=build)
    assert build.calls == []  # refused before any build
    # No record at all: the worker's defaults (fp16, batch 8) are built, no calibration needed.
    _, plan = open_tensorrt_engine(classifier, onnx_path=classifier.onnx_path, cache_dir=tmp_path / "engines",
                                   environment=ENV, load=_deserialize, build=build)
    assert [(c["precision"], c["max_batch"], c["images"]) for c in build.calls] == [("fp16", 8, None)]
    assert plan == plan_path_for(classifier, TensorRTBuild(), cache_dir=tmp_path / "engines", environment=ENV)


def test_auto_falls_back_to_onnxruntime_with_the_reason_and_tensorrt_fails(classifier: ModelCard,
                                                                         tmp_path: Path) -> None:
    cache = tmp_path / "engines"

    def refuse(path: Path) -> Any:
        raise EngineUnavailable(f"TensorRT could not deserialize {path.name}")

    def attempt() -> Any:  # every plan refused, the rebuilt one too
        return open_tensorrt_engine(classifier, onnx_path=classifier.onnx_path, cache_dir=cache, environment=ENV,
                                    load=refuse, build=_Builder())[0]

    with capture_logs() as logs:
        assert tensorrt_or_fallback("auto", classifier.ref, attempt) is None
    fallback = [e for e in logs if e["event"] == "tensorrt_unavailable_using_onnxruntime"]
    assert fallback and fallback[0]["model"] == classifier.ref
    assert fallback[0]["reason"].startswith("EngineUnavailable: TensorRT could not deserialize")
    with pytest.raises(EngineUnavailable, match=f"model {classifier.ref}: TensorRT engine unavailable"):
        tensorrt_or_fallback("tensorrt", classifier.ref, attempt)
    assert tensorrt_or_fallback("auto", classifier.ref, lambda: "trt") == "trt"


def test_models_build_without_tensorrt_records_nothing(demo_models_dir: Path, tmp_path: Path,
                                                       calibration_dir: Path) -> None:
    models = tmp_path / "models"
    card = find_card(demo_models_dir, "demo-classifier")
    for rel in (card.weights.file, card.onnx.file, "demo-classifier.card.json"):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_models_dir / rel, models / rel)
    before = (models / "demo-classifier.card.json").read_text()
    runner = CliRunner()
    r = runner.invoke(app, ["models", "build", "demo-classifier", "--precision", "int8", "--models-dir", str(models)])
    assert r.exit_code == 1 and "calibration" in r.output  # settings checked before any TensorRT work
    r = runner.invoke(app, ["models", "build", "demo-classifier", "--precision", "int8", "--max-batch", "4",
                            "--calibration-dir", str(calibration_dir), "--models-dir", str(models)])
    assert r.exit_code == 1 and "TensorRT is not installed" in r.output, r.output
    assert (models / "demo-classifier.card.json").read_text() == before
    assert find_card(models, "demo-classifier").tensorrt is None
