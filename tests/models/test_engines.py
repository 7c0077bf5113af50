from __future__ import annotations

import importlib.util

from pathlib import Path

import numpy as np
import pytest

from cxr_triage.models.engines import (
    EngineUnavailable,
    OrtEngine,
    TorchEngine,
    ort_provider_entries,
    ort_providers,
    select_engine,
)
from cxr_triage.models.export import load_card_module, output_names_for
from cxr_triage.models.preprocess import load_image, prepare
from cxr_triage.models.registry import find_card

from .conftest import dicom, nih_pngs

REAL = [dicom("siim-cr-pa-jpeg-baseline.dcm"), dicom("wg04-cr-chest-pa-j2k-monochrome1.dcm"), *nih_pngs(2)]


def _rel_close(a: np.ndarray, b: np.ndarray, rtol: float) -> None:
    scale = max(float(np.abs(b).max()), 1e-6)
    assert float(np.abs(a - b).max()) <= rtol * scale, float(np.abs(a - b).max()) / scale


def _batch(card, paths) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.stack([prepare(load_image(p), card.input)[0] for p in paths])


def test_classifier_ort_matches_torch_on_real_images(demo_models_dir: Path) -> None:
    card = find_card(demo_models_dir, "demo-classifier")
    batch = _batch(card, REAL)
    ort_out = OrtEngine(card.onnx_path, intra_op_threads=2).run(batch)
    torch_out = TorchEngine(load_card_module(card), output_names=output_names_for(card)).run(batch)
    assert ort_out["probabilities"].shape == (4, 18) and ort_out["features"].shape == (4, 1024, 7, 7)
    _rel_close(ort_out["probabilities"], torch_out["probabilities"], 1e-4)
    _rel_close(ort_out["features"], torch_out["features"], 1e-4)
    # batch composition does not change a result
    single = OrtEngine(card.onnx_path, intra_op_threads=2).run(batch[:1])
    _rel_close(single["probabilities"][0], ort_out["probabilities"][0], 1e-5)


def test_detector_ort_matches_torch(demo_models_dir: Path) -> None:
    card = find_card(demo_models_dir, "demo-detector")
    batch = _batch(card, REAL[:1])
    ort_out = OrtEngine(card.onnx_path, intra_op_threads=2).run(batch)
    torch_out = TorchEngine(load_card_module(card), output_names=output_names_for(card)).run(batch)
    assert set(ort_out) == {"cls_logits", "bbox_regression", "global_logits"}
    for k in ort_out:
        _rel_close(ort_out[k], torch_out[k], 1e-4)


def test_select_engine(demo_models_dir: Path) -> None:
    card = find_card(demo_models_dir, "demo-classifier")
    e = select_engine("auto", onnx_path=card.onnx_path, intra_op_threads=2)
    assert e.name == "onnxruntime" and "CPUExecutionProvider" in e.providers
    with pytest.raises(EngineUnavailable):
        select_engine("onnxruntime")
    with pytest.raises(ValueError):
        select_engine("bogus")
    with pytest.raises(EngineUnavailable):
        select_engine("tensorrt", onnx_path=card.onnx_path)


CPU_ONLY = ("AzureExecutionProvider", "CPUExecutionProvider")  # what onnxruntime (CPU build) offers here
GPU_BUILD = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def test_ort_provider_order() -> None:
    assert ort_providers(CPU_ONLY) == ["CPUExecutionProvider"]
    assert ort_providers(GPU_BUILD) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(GPU_BUILD[1:]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(GPU_BUILD, device="cpu") == ["CPUExecutionProvider"]
    assert ort_providers(("TensorrtExecutionProvider", "CPUExecutionProvider")) == [
        "TensorrtExecutionProvider", "CPUExecutionProvider"]


def test_ort_provider_entries_configure_tensorrt(tmp_path: Path) -> None:
    entries = ort_provider_entries(ort_providers(GPU_BUILD), GPU_BUILD, trt_cache_dir=tmp_path / "trt",
                                   trt_fp16=True, input_shape=(3, 512, 512), max_batch=4)
    assert [e if isinstance(e, str) else e[0] for e in entries] == list(GPU_BUILD)
    trt = dict(entries[0][1])  # type: ignore[index]
    assert trt["trt_engine_cache_enable"] is True and trt["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert trt["trt_fp16_enable"] is True
    assert trt["trt_profile_min_shapes"] == "input:1x3x512x512"
    assert trt["trt_profile_max_shapes"] == "input:4x3x512x512"
    assert entries[1] == ("CUDAExecutionProvider", {"device_id": 0})
    fp32 = ort_provider_entries(["TensorrtExecutionProvider"], GPU_BUILD, trt_fp16=False)
    assert fp32[0][1]["trt_fp16_enable"] is False and "trt_engine_cache_path" not in fp32[0][1]  # type: ignore[index]
    assert fp32[-1] == "CPUExecutionProvider"  # CPU appended: the fallback for unsupported nodes
    # Asked-for providers that are not installed are dropped; a CPU machine gets exactly what it got before.
    assert ort_provider_entries(ort_providers(CPU_ONLY), CPU_ONLY, trt_cache_dir=tmp_path / "x") == [
        "CPUExecutionProvider"]
    assert ort_provider_entries(list(GPU_BUILD), CPU_ONLY) == ["CPUExecutionProvider"]


def test_select_engine_on_cpu_is_unchanged_by_tensorrt_options(demo_models_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    card = find_card(demo_models_dir, "demo-classifier")
    e = select_engine("auto", onnx_path=card.onnx_path, intra_op_threads=2, trt_cache_dir=tmp_path / "trt",
                      trt_fp16=True, input_shape=(1, 224, 224), max_batch=4)
    wanted = ort_providers(ort.get_available_providers())
    # what runs is the wanted list, in order, less any provider the session could not start
    assert list(e.providers) == [p for p in wanted if p in e.providers] and e.providers[-1] == "CPUExecutionProvider"
    if wanted == ["CPUExecutionProvider"]:  # this machine: exactly the CPU session it always was
        assert e.providers == ("CPUExecutionProvider",) and not (tmp_path / "trt").exists()


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# The GPU tests run where the device is (``pytest -m gpu`` on a machine with CUDA, and TensorRT where named); on
# CPU-only machines they are reported as skipped with the reason, never silently passed.
needs_cuda = pytest.mark.skipif(not _cuda(), reason="CUDA not available")
needs_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                                    reason="TensorRT (python package tensorrt) not installed")


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_matches_cpu(demo_models_dir: Path) -> None:
    card = find_card(demo_models_dir, "demo-classifier")
    batch = _batch(card, REAL)
    cpu = TorchEngine(load_card_module(card), output_names=output_names_for(card)).run(batch)
    gpu = TorchEngine(load_card_module(card), output_names=output_names_for(card), device="cuda").run(batch)
    _rel_close(gpu["probabilities"], cpu["probabilities"], 1e-3)


@pytest.mark.gpu
@needs_cuda
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_matches_ort(demo_models_dir: Path, tmp_path: Path, precision: str) -> None:
    from cxr_triage.models.engines import TensorRTEngine
    from cxr_triage.models.export import build_tensorrt_engine

    card = find_card(demo_models_dir, "demo-classifier")
    batch = _batch(card, REAL)
    plan = build_tensorrt_engine(card.onnx_path, precision=precision, max_batch=8, cache_dir=tmp_path)
    t0 = plan.stat().st_mtime_ns
    assert build_tensorrt_engine(card.onnx_path, precision=precision, max_batch=8, cache_dir=tmp_path) == plan
    assert plan.stat().st_mtime_ns == t0  # cached, not rebuilt
    trt_out = TensorRTEngine(plan).run(batch)
    ref = OrtEngine(card.onnx_path).run(batch)
    tol = 1e-3 if precision == "fp32" else 2e-2
    _rel_close(trt_out["probabilities"], ref["probabilities"], tol)
    assert TensorRTEngine(plan).run(batch[:1])["probabilities"].shape == (1, 18)


@pytest.fixture()
def _strict_fp32():  # type: ignore[no-untyped-def]
    """FP32 on the GPU means FP32: cuDNN convolutions default to TF32 on Ampere and later (10-bit mantissa),
    which would make an FP32 parity check measure TF32 instead."""
    import torch

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["compile", "cuda_graphs"])
@pytest.mark.parametrize("model", ["demo-classifier", "demo-detector"])
def test_torch_cuda_compiled_matches_cpu_onnxruntime(demo_models_dir: Path, _strict_fp32: None, mode: str,
                                                     model: str) -> None:
    """torch.compile (inductor) and CUDA graphs (mode="reduce-overhead") on the GPU against the CPU ONNX Runtime
    session the worker runs without a GPU, on real radiographs."""
    card = find_card(demo_models_dir, model)
    batch = _batch(card, REAL if model == "demo-classifier" else REAL[:2])
    ref = OrtEngine(card.onnx_path, intra_op_threads=2).run(batch)
    engine = TorchEngine(load_card_module(card), output_names=output_names_for(card), device="cuda",
                         compile=mode == "compile", cuda_graphs=mode == "cuda_graphs")
    assert engine.name == "torch-compiled"
    # CUDA graphs are recorded after warm-up calls; the third call replays the graph. Each result is copied to
    # the host before the next call, so a replay cannot overwrite an earlier result.
    outs = [engine.run(batch) for _ in range(3)]
    for out in outs:
        assert set(out) == set(ref)
        for k in ref:
            _rel_close(out[k], ref[k], 1e-3)


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_fp16_matches_cpu_onnxruntime(demo_models_dir: Path) -> None:
    """FP16 (half weights and inputs) on real images: probabilities within 1e-2 absolute of FP32 CPU."""
    card = find_card(demo_models_dir, "demo-classifier")
    batch = _batch(card, REAL)
    ref = OrtEngine(card.onnx_path, intra_op_threads=2).run(batch)
    half = TorchEngine(load_card_module(card), output_names=output_names_for(card), device="cuda", half=True)
    assert half.half
    out = half.run(batch)
    assert out["probabilities"].dtype == np.float32 and np.isfinite(out["probabilities"]).all()
    np.testing.assert_allclose(out["probabilities"], ref["probabilities"], rtol=0, atol=1e-2)
    compiled = TorchEngine(load_card_module(card), output_names=output_names_for(card), device="cuda", half=True,
                           compile=True)
    np.testing.assert_allclose(compiled.run(batch)["probabilities"], ref["probabilities"], rtol=0, atol=1e-2)


def _calibration_folder(root: Path) -> Path:
    import shutil

    folder = root / "calibration"
    folder.mkdir()
    for p in [*REAL, *nih_pngs(12)]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.mark.gpu
@needs_cuda
@needs_tensorrt
def test_tensorrt_int8_with_calibration_runs(demo_models_dir: Path, tmp_path: Path) -> None:
    """INT8 build with entropy calibration on sample radiographs, then inference on real images."""
    from cxr_triage.models.engines import TensorRTEngine
    from cxr_triage.models.export import build_tensorrt_engine, load_calibration_images

    card = find_card(demo_models_dir, "demo-classifier")
    calib = load_calibration_images(_calibration_folder(tmp_path), card.input)
    assert len(calib) >= 14
    plan = build_tensorrt_engine(card.onnx_path, precision="int8", calibration_images=calib, max_batch=4,
                                 cache_dir=tmp_path / "engines")
    assert (tmp_path / "engines" / f"{plan.stem}.calib").is_file()  # the calibrator wrote its cache
    engine = TensorRTEngine(plan)
    assert engine.max_batch == 4
    batch = _batch(card, REAL)
    out = engine.run(batch)
    ref = OrtEngine(card.onnx_path).run(batch)
    p, q = out["probabilities"], ref["probabilities"]
    assert p.shape == q.shape and np.isfinite(p).all() and 0.0 <= p.min() and p.max() <= 1.0
    # INT8 is an approximation: close on average, never far off
    assert float(np.abs(p - q).mean()) < 0.05 and float(np.abs(p - q).max()) < 0.15
    # a bigger batch than the profile's maximum is split, not refused
    assert engine.run(np.concatenate([batch, batch]))["probabilities"].shape == (8, 18)


@pytest.mark.gpu
@needs_cuda
@needs_tensorrt
def test_worker_serves_the_plan_models_build_made_and_survives_a_corrupt_one(demo_models_dir: Path,
                                                                             tmp_path: Path) -> None:
    """`models build --precision int8 --max-batch 4` -> the analyzer's TensorRT engine is that very plan; a plan
    overwritten with garbage is rebuilt at start instead of stopping the worker."""
    import shutil
    from dataclasses import replace

    from typer.testing import CliRunner

    from cxr_triage.cli import app
    from cxr_triage.models.analyzer import build_analyzer
    from cxr_triage.models.registry import save_card

    models = tmp_path / "models"
    card = find_card(demo_models_dir, "demo-classifier")
    for rel in (card.weights.file, card.onnx.file):  # type: ignore[union-attr]
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_models_dir / rel, models / rel)
    save_card(replace(card, demo=False, name="site-cls"), models)  # a "real" card: no demo models get built
    r = CliRunner().invoke(app, ["models", "build", "site-cls", "--precision", "int8", "--max-batch", "4",
                                 "--calibration-dir", str(_calibration_folder(tmp_path)), "--models-dir", str(models)])
    assert r.exit_code == 0, r.output
    record = find_card(models, "site-cls").tensorrt
    assert record is not None and (record.precision, record.max_batch) == ("int8", 4) and record.plan
    plan = models / record.plan
    analyzer = build_analyzer(models_dir=models, engine="tensorrt", detector="none")
    assert analyzer.classifier_engine.name == "tensorrt"
    assert analyzer.classifier_engine.plan_path == plan and analyzer.classifier_engine.max_batch == 4
    assert sorted(p.name for p in (models / "engines").glob("*.plan")) == [plan.name]  # nothing else built
    plan.write_bytes(b"garbage" * 100)
    again = build_analyzer(models_dir=models, engine="tensorrt", detector="none")
    assert again.classifier_engine.plan_path == plan and plan.read_bytes()[:7] != b"garbage"
    (result,) = again.infer([again.prepare(REAL[0], key="x")])
    assert 0.0 <= result.pneumonia_probability <= 1.0
