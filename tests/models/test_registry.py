from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cxr_triage.models.classifier import CheckpointError, build_classifier
from cxr_triage.models.export import engine_cache_key
from cxr_triage.models.registry import (
    WeightsError,
    fetch_weights,
    find_card,
    import_weights,
    list_cards,
    load_card,
    verify_weights,
)

from .conftest import RangeHandler as _Handler
from .conftest import save_xrv_checkpoint, serve_bytes


@pytest.fixture(scope="module")
def xrv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_xrv_checkpoint(tmp_path_factory.mktemp("ckpt") / "xrv.pt")


def test_import_writes_card_blob_and_onnx(tmp_path: Path, xrv_checkpoint: Path) -> None:
    card = import_weights(xrv_checkpoint, models_dir=tmp_path, name="rsna-xrv", version="1.0",
                          architecture="densenet121-xrv", format="xrv")
    digest = hashlib.sha256(xrv_checkpoint.read_bytes()).hexdigest()
    assert card.weights.sha256 == digest
    assert card.weights.file == f"blobs/{digest}.pt" and (tmp_path / card.weights.file).is_file()
    assert card.onnx is not None and (tmp_path / card.onnx.file).is_file()
    assert card.onnx.output_names == ("probabilities", "features")
    again = load_card(tmp_path / "rsna-xrv.card.json")
    assert again.to_json() == card.to_json()
    assert [c.name for c in list_cards(tmp_path)] == ["rsna-xrv"]
    assert again.input.normalisation == "xrv" and again.input.size == 224 and "Pneumonia" in again.labels
    assert verify_weights(again) == tmp_path / card.weights.file


def test_corrupted_weights_are_refused_clearly(tmp_path: Path, xrv_checkpoint: Path) -> None:
    card = import_weights(xrv_checkpoint, models_dir=tmp_path, name="m", version="1", architecture="densenet121-xrv",
                          format="xrv", export=False)
    blob = tmp_path / card.weights.file
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupted or was replaced"):
        verify_weights(card)
    blob.unlink()
    with pytest.raises(WeightsError, match="missing"):
        verify_weights(card)
    # a truncated checkpoint imported directly: a clear CheckpointError, not a torch traceback
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        import_weights(trunc, models_dir=tmp_path, name="t", version="1", architecture="densenet121-xrv",
                       format="xrv")
    assert not (tmp_path / "t.card.json").exists()


def test_wrong_architecture_is_refused(tmp_path: Path, xrv_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="does not match|wrong shape"):
        import_weights(xrv_checkpoint, models_dir=tmp_path, name="x", version="1",
                       architecture="densenet121-chexnet", format="chexnet")


@pytest.fixture()
def server(xrv_checkpoint: Path) -> Iterator[str]:
    with serve_bytes(xrv_checkpoint.read_bytes()) as url:
        yield url


def test_fetch_over_http_with_resume(tmp_path: Path, server: str, xrv_checkpoint: Path) -> None:
    digest = hashlib.sha256(xrv_checkpoint.read_bytes()).hexdigest()
    _Handler.cut_first = True
    with pytest.raises(WeightsError, match="interrupted"):
        fetch_weights("net", models_dir=tmp_path, url=server, sha256=digest, version="2",
                      architecture="densenet121-xrv", format="xrv", export=False)
    parts = list((tmp_path / "downloads").glob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(_Handler.payload)
    card = fetch_weights("net", models_dir=tmp_path, url=server, sha256=digest, version="2",
                         architecture="densenet121-xrv", format="xrv", export=False)
    assert _Handler.requests[0] is None and _Handler.requests[-1].startswith("bytes=")
    assert card.weights.sha256 == digest and verify_weights(card).is_file()
    assert find_card(tmp_path, "net").weights.source == server


def test_fetch_refuses_sha_mismatch(tmp_path: Path, server: str) -> None:
    with pytest.raises(WeightsError, match="refusing"):
        fetch_weights("net", models_dir=tmp_path, url=server, sha256="0" * 64, version="1",
                      architecture="densenet121-xrv", format="xrv", export=False)
    assert not list((tmp_path / "downloads").glob("*.part"))
    assert not (tmp_path / "net.card.json").exists()


def test_fetch_file_url(tmp_path: Path, xrv_checkpoint: Path) -> None:
    digest = hashlib.sha256(xrv_checkpoint.read_bytes()).hexdigest()
    card = fetch_weights("f", models_dir=tmp_path, url=xrv_checkpoint.as_uri(), sha256=digest, version="1",
                         architecture="densenet121-xrv", format="xrv", export=False)
    assert card.weights.sha256 == digest


def test_engine_cache_key_changes_with_every_input() -> None:
    base = dict(onnx_sha256="a" * 64, tensorrt_version="10.3.0", gpu_name="NVIDIA H100", compute_capability=(9, 0),
                precision="fp16", max_batch=8)
    k = engine_cache_key(**base)
    assert k == engine_cache_key(**base)
    for field, value in [("onnx_sha256", "b" * 64), ("tensorrt_version", "10.4.0"), ("gpu_name", "NVIDIA L4"),
                         ("compute_capability", (8, 9)), ("precision", "fp32"), ("max_batch", 16)]:
        assert engine_cache_key(**{**base, field: value}) != k, field
    i8 = {**base, "precision": "int8"}
    assert engine_cache_key(**i8, calibration_sha256="x") != engine_cache_key(**i8, calibration_sha256="y")
    with pytest.raises(ValueError):
        engine_cache_key(**{**base, "precision": "fp64"})


def test_xrv_operating_points_travel_into_the_card(tmp_path: Path) -> None:
    """An xrv checkpoint's op_threshs become the card's thresholds (NaN = untrained label: default kept)."""
    from cxr_triage.models.registry import XRV_PATHOLOGIES

    torch.manual_seed(5)
    m = build_classifier("densenet121-xrv")
    op = torch.full((18,), float("nan"))
    pneu, opac = XRV_PATHOLOGIES.index("Pneumonia"), XRV_PATHOLOGIES.index("Lung Opacity")
    op[pneu], op[opac] = 0.0734, 0.2391  # the shape of xrv's rsna model: two trained labels
    m.op_threshs = op
    path = tmp_path / "rsna.pt"
    torch.save(m.state_dict(), path)
    card = import_weights(path, models_dir=tmp_path / "models", name="rsna", version="1", architecture="densenet121-xrv",
                          format="xrv")
    assert card.threshold == pytest.approx(0.0734)
    assert card.operating_thresholds["Lung Opacity"] == pytest.approx(0.2391)
    assert "Atelectasis" not in card.operating_thresholds or card.operating_thresholds["Atelectasis"] == 0.5
    assert load_card(tmp_path / "models" / "rsna.card.json").threshold == pytest.approx(0.0734)

    # An explicit threshold wins over the checkpoint's, through the CLI too.
    from typer.testing import CliRunner

    from cxr_triage.cli import app

    out = CliRunner().invoke(app, ["models", "import", str(path), "--name", "rsna2", "--version", "1",
                                   "--threshold", "0.3", "--models-dir", str(tmp_path / "models")])
    assert out.exit_code == 0, out.output
    assert load_card(tmp_path / "models" / "rsna2.card.json").threshold == pytest.approx(0.3)
    explicit = import_weights(path, models_dir=tmp_path / "m3", name="r3", version="1", architecture="densenet121-xrv",
                              format="xrv", card_overrides={"operating_thresholds": {"Pneumonia": 0.6}})
    assert explicit.threshold == pytest.approx(0.6)


def _tiny_detector_checkpoint(path: Path, *, image_size: int, small_anchors: bool) -> Path:
    from cxr_triage.models.detector import build_detector
    from cxr_triage.models.train import save_checkpoint

    torch.manual_seed(11)
    return save_checkpoint(path, model=build_detector(backbone="tiny", image_size=image_size,
                                                      small_anchors=small_anchors), epoch=1)


def test_detector_import_takes_size_and_anchors_from_the_checkpoint(tmp_path: Path) -> None:
    """A checkpoint trained at 96 px with the default (COCO) anchors: the card, its ONNX export and the anchors
    the analyzer decodes with all follow the checkpoint, not the 512 px / small-anchor architecture defaults."""
    import numpy as np

    from cxr_triage.models.detector import detector_anchors, load_detector_checkpoint
    from cxr_triage.models.engines import OrtEngine
    from cxr_triage.models.evaluate import detection_params_from_card
    from cxr_triage.models.preprocess import load_image, prepare

    from .conftest import dicom

    ckpt = _tiny_detector_checkpoint(tmp_path / "det96.pt", image_size=96, small_anchors=False)
    card = import_weights(ckpt, models_dir=tmp_path / "models", name="det96", version="1",
                          architecture="retinanet-tiny", format="detector")
    assert card.input.size == 96 and card.input.channels == 3 and card.input.normalisation == "imagenet"
    p = card.architecture_params
    assert (p["backbone"], p["image_size"], p["small_anchors"]) == ("tiny", 96, False)
    assert load_card(tmp_path / "models" / "det96.card.json").to_json() == card.to_json()

    x = prepare(load_image(dicom("siim-cr-pa-jpeg-baseline.dcm")), card.input)[0][None]
    out = OrtEngine(card.onnx_path, intra_op_threads=2).run(x)
    _, anchors = detection_params_from_card(card)
    expected = detector_anchors(image_size=96, small_anchors=False, backbone="tiny")
    np.testing.assert_array_equal(anchors, expected)  # the default anchors, not the small ones
    assert not np.array_equal(expected, detector_anchors(image_size=96, small_anchors=True, backbone="tiny"))
    assert out["cls_logits"].shape == (1, len(expected), 1)
    with torch.no_grad():
        ref = load_detector_checkpoint(ckpt)(torch.from_numpy(x))
    np.testing.assert_allclose(out["cls_logits"], ref[0].numpy(), rtol=1e-4, atol=1e-4)


def test_detector_checkpoint_of_another_backbone_names_the_right_architecture(tmp_path: Path) -> None:
    ckpt = _tiny_detector_checkpoint(tmp_path / "tiny.pt", image_size=64, small_anchors=True)
    with pytest.raises(ValueError, match="--architecture retinanet-tiny"):
        import_weights(ckpt, models_dir=tmp_path, name="d", version="1", architecture="retinanet-resnet18",
                       format="detector")
    assert not (tmp_path / "d.card.json").exists()
    # an explicit override that contradicts the checkpoint is reported, not silently replaced
    with pytest.raises(ValueError, match="conflicting"):
        import_weights(ckpt, models_dir=tmp_path, name="d", version="1", architecture="retinanet-tiny",
                       format="detector", card_overrides={"architecture_params": {
                           "backbone": "tiny", "image_size": 128, "in_channels": 3, "num_global_classes": 3,
                           "small_anchors": True}})
