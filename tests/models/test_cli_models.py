"""The `cxr-triage models` commands end to end through the real CLI: fetch by catalogue name (real HTTP server on
127.0.0.1 with Range support), export, list."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

from cxr_triage.cli import app
from cxr_triage.models.classifier import build_classifier
from cxr_triage.models.registry import XRV_PATHOLOGIES, find_card, load_sources, verify_onnx, verify_weights

from .conftest import RangeHandler, dicom, save_xrv_checkpoint, serve_bytes

IMAGE = dicom("siim-cr-pa-jpeg-baseline.dcm")


@pytest.fixture(scope="module")
def xrv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_xrv_checkpoint(tmp_path_factory.mktemp("ckpt") / "xrv.pt", seed=7)


@pytest.fixture(scope="module")
def reference_output(xrv_checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's own model (plain torch, loaded without our code) on one real DICOM: what every engine
    must reproduce. Returns (model input, probabilities)."""
    from cxr_triage.models.preprocess import InputSpec, load_image, prepare

    m = build_classifier("densenet121-xrv")
    m.op_threshs = torch.zeros(18)
    m.load_state_dict(torch.load(xrv_checkpoint, weights_only=True))
    spec = InputSpec(size=224, channels=1, normalisation="xrv", resize="letterbox")
    x = prepare(load_image(IMAGE), spec)[0][None]
    with torch.no_grad():
        probs = m.eval()(torch.from_numpy(x))[0].numpy()
    return x, probs


def _run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, ["models", *args], env=env)


def _catalogue(path: Path, name: str, **entry: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: entry}))
    return path


def _entry(url: str, sha256: str, **extra: object) -> dict[str, object]:
    return {"url": url, "sha256": sha256, "format": "xrv", "architecture": "densenet121-xrv", "version": "2.1",
            **extra}


def test_fetch_by_name_resumes_verifies_and_imports(tmp_path: Path, xrv_checkpoint: Path,
                                                    reference_output: tuple[np.ndarray, np.ndarray]) -> None:
    from cxr_triage.models.analyzer import build_analyzer
    from cxr_triage.models.engines import OrtEngine
    from cxr_triage.models.export import load_card_module

    digest = hashlib.sha256(xrv_checkpoint.read_bytes()).hexdigest()
    models = tmp_path / "models"
    with serve_bytes(xrv_checkpoint.read_bytes()) as url:
        _catalogue(models / "sources.json", "xrv-rsna",
                   **_entry(url, digest, threshold=0.3, display_name="xrv RSNA DenseNet"))
        RangeHandler.cut_first = True  # the first download drops half way
        r = _run("fetch", "xrv-rsna", "--models-dir", str(models))
        assert r.exit_code == 1 and "interrupted" in r.output and "resume" in r.output, r.output
        parts = list((models / "downloads").glob("*.part"))
        have = parts[0].stat().st_size if len(parts) == 1 else -1
        assert 0 < have < len(RangeHandler.payload)
        assert not (models / "xrv-rsna.card.json").exists()

        r = _run("fetch", "xrv-rsna", "--models-dir", str(models))
        assert r.exit_code == 0, r.output
        assert f"sha256={digest}" in r.output
        # the second attempt asked only for the rest
        assert RangeHandler.requests == [None, f"bytes={have}-"]
    assert not list((models / "downloads").glob("*.part"))  # moved into blobs/, not left behind

    card = find_card(models, "xrv-rsna")
    assert card.ref == "xrv-rsna@2.1" and card.architecture == "densenet121-xrv" and card.demo is False
    assert card.weights.sha256 == digest and card.weights.source == url and card.weights.format == "xrv"
    assert verify_weights(card).read_bytes() == xrv_checkpoint.read_bytes()
    assert card.threshold == pytest.approx(0.3) and card.display_name == "xrv RSNA DenseNet"
    verify_onnx(card)  # exported as `models import` does

    # the weights load: identical outputs to the checkpoint's own model, in torch and in the ONNX export
    x, expected = reference_output
    with torch.no_grad():
        got = load_card_module(card)(torch.from_numpy(x))[0].numpy()
    np.testing.assert_array_equal(got, expected)
    ort = OrtEngine(card.onnx_path, intra_op_threads=2).run(x)["probabilities"]
    np.testing.assert_allclose(ort, expected, rtol=1e-4, atol=1e-6)

    # and the worker's analyzer serves it from that directory (no demo models, no --url anywhere)
    analyzer = build_analyzer(models_dir=models, engine="onnxruntime", detector="none", intra_op_threads=2)
    result = analyzer.infer([analyzer.prepare(IMAGE, key="k")])[0]
    pneumonia = XRV_PATHOLOGIES.index("Pneumonia")
    assert result.pneumonia_probability == pytest.approx(float(expected[0, pneumonia]), rel=1e-4, abs=1e-6)
    assert result.flagged == (result.pneumonia_probability >= 0.3)


def test_fetch_catalogue_from_setting_errors_and_overrides(tmp_path: Path, xrv_checkpoint: Path) -> None:
    """CXR_MODEL_SOURCES names the catalogue and CXR_MODELS_DIR the models dir (no --models-dir): unknown names
    list the known ones; a wrong sha256 is refused with no card and no partial file; --sha256 overrides."""
    digest = hashlib.sha256(xrv_checkpoint.read_bytes()).hexdigest()
    models = tmp_path / "models"
    with serve_bytes(xrv_checkpoint.read_bytes()) as url:
        sources = tmp_path / "etc" / "model-sources.json"
        sources.parent.mkdir()
        sources.write_text(json.dumps({"good": _entry(url, digest), "wrong-hash": _entry(url, "ab" * 32)}))
        env = {"CXR_MODEL_SOURCES": str(sources), "CXR_MODELS_DIR": str(models)}

        r = _run("fetch", "nope", env=env)
        assert r.exit_code == 1
        assert "'nope' is not in the model catalogue (known: good, wrong-hash)" in r.output, r.output
        assert RangeHandler.requests == []  # nothing downloaded for an unknown name

        r = _run("fetch", "wrong-hash", env=env)
        assert r.exit_code == 1 and "refusing it" in r.output and digest in r.output and "ab" * 32 in r.output
        assert not (models / "wrong-hash.card.json").exists()
        assert not list((models / "downloads").glob("*.part"))  # the bad download is deleted
        assert not (models / "blobs").exists()  # nothing of it was stored

        # the command line wins over the catalogue
        r = _run("fetch", "wrong-hash", "--sha256", digest, "--version", "9", env=env)
        assert r.exit_code == 0, r.output
        card = find_card(models, "wrong-hash")
        assert card.weights.sha256 == digest and card.version == "9" and card.onnx is not None

        # a missing catalogue file that the setting names is an error, not an empty catalogue
        r = _run("fetch", "good", env={**env, "CXR_MODEL_SOURCES": str(tmp_path / "missing.json")})
        assert r.exit_code == 1 and "missing.json (CXR_MODEL_SOURCES) does not exist" in r.output


def test_catalogue_entries_are_validated(tmp_path: Path) -> None:
    url, sha = "http://127.0.0.1:9/w.pt", "a" * 64
    bad = [
        ({**_entry(url, sha), "treshold": 0.4}, "unknown key(s) ['treshold']"),
        ({k: v for k, v in _entry(url, sha).items() if k != "sha256"}, "missing ['sha256']"),
        (_entry(url, "xyz"), "sha256 must be 64 hex digits"),
        (_entry("ftp://host/w.pt", sha), "url must be http(s):// or file://"),
        ({**_entry(url, sha), "architecture": "vgg"}, "unknown architecture 'vgg'"),
        ({**_entry(url, sha), "ensemble": "g"}, "ensemble applies to detector checkpoints only"),
    ]
    for entry, message in bad:
        _catalogue(tmp_path / "sources.json", "m", **entry)
        with pytest.raises(ValueError, match="sources.json: model 'm'") as err:
            load_sources(tmp_path)
        assert message in str(err.value)
    # through the CLI: one clear line naming the file
    r = _run("fetch", "m", "--models-dir", str(tmp_path))
    assert r.exit_code == 1 and "sources.json: model 'm'" in r.output
    (tmp_path / "sources.json").write_text("{not json")
    r = _run("fetch", "m", "--models-dir", str(tmp_path))
    assert r.exit_code == 1 and "cannot read model catalogue" in r.output


def test_export_writes_onnx_matching_torch(tmp_path: Path, xrv_checkpoint: Path,
                                           reference_output: tuple[np.ndarray, np.ndarray]) -> None:
    import onnx

    from cxr_triage.models.engines import OrtEngine

    models = tmp_path / "models"
    r = _run("import", str(xrv_checkpoint), "--name", "cls", "--version", "1", "--models-dir", str(models))
    assert r.exit_code == 0, r.output
    first = find_card(models, "cls")
    assert first.onnx is not None and first.onnx.opset == 17
    first.onnx_path.unlink()  # a lost export: `models export` must write it again

    r = _run("export", "cls", "--opset", "18", "--models-dir", str(models))
    assert r.exit_code == 0, r.output
    card = find_card(models, "cls")
    assert card.onnx is not None and card.onnx.opset == 18 and f"-> {card.onnx.file}" in r.output
    path = verify_onnx(card)  # the card's sha256 is the file's
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["probabilities", "features"]
    assert any(op.version == 18 for op in model.opset_import if op.domain in ("", "ai.onnx"))

    x, expected = reference_output
    out = OrtEngine(path, intra_op_threads=2).run(x)
    np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-4, atol=1e-6)
    assert out["features"].shape == (1, 1024, 7, 7)

    r = _run("export", "absent", "--models-dir", str(models))
    assert r.exit_code == 1 and "no model card named 'absent'" in r.output


def test_list_shows_cards_and_marks_demo_models(tmp_path: Path, xrv_checkpoint: Path,
                                                demo_models_dir: Path) -> None:
    import shutil

    r = _run("list", "--models-dir", str(tmp_path / "empty"))
    assert r.exit_code == 0 and "no models" in r.output

    models = tmp_path / "models"
    shutil.copytree(demo_models_dir, models)  # the shared cache stays untouched
    r = _run("import", str(xrv_checkpoint), "--name", "real-xrv", "--version", "3", "--models-dir", str(models))
    assert r.exit_code == 0, r.output

    r = _run("list", "--models-dir", str(models))
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line for line in r.output.splitlines() if line.strip()}
    assert set(lines) == {"demo-classifier@0.0.0-demo", "demo-detector@0.0.0-demo", "real-xrv@3"}
    for ref in ("demo-classifier@0.0.0-demo", "demo-detector@0.0.0-demo"):
        assert "UNTRAINED DEMO MODEL" in lines[ref]
    assert "UNTRAINED DEMO MODEL" not in lines["real-xrv@3"] and "DEMO" not in lines["real-xrv@3"]
    assert "classification" in lines["real-xrv@3"] and "densenet121-xrv" in lines["real-xrv@3"]
    assert "detection" in lines["demo-detector@0.0.0-demo"]

    r = _run("list", "--json", "--models-dir", str(models))
    cards = {c["name"]: c for c in json.loads(r.output)}
    assert set(cards) == {"demo-classifier", "demo-detector", "real-xrv"}
    assert cards["real-xrv"]["demo"] is False and cards["demo-classifier"]["demo"] is True
    assert cards["real-xrv"]["weights"]["sha256"] == hashlib.sha256(xrv_checkpoint.read_bytes()).hexdigest()
