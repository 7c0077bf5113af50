"""Real-weights path as an ML engineer uses it: checkpoints in the torchxrayvision and our detector formats are
imported with `cxr-triage models import`, and the worker's analyzer runs them (demo=False) — including a
two-checkpoint detector ensemble merged by weighted box fusion."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from cxr_triage.cli import app
from cxr_triage.models.analyzer import ModelsUnavailable, build_analyzer
from cxr_triage.models.classifier import build_classifier
from cxr_triage.models.detector import build_detector
from cxr_triage.models.registry import find_card, save_card
from cxr_triage.models.train import save_checkpoint
from tests.dicomize import DICOM_FILES

runner = CliRunner()


def _import(models_dir: Path, *args: str) -> None:
    result = runner.invoke(app, ["models", "import", *args, "--models-dir", str(models_dir)])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(7)
    root = tmp_path_factory.mktemp("real-weights")
    models_dir = root / "models"
    classifier = build_classifier("densenet121-xrv").eval()
    torch.save(classifier.state_dict(), root / "xrv.pth")
    _import(models_dir, str(root / "xrv.pth"), "--name", "site-xrv", "--version", "3",
            "--architecture", "densenet121-xrv", "--format", "xrv", "--threshold", "0.3")
    torch.manual_seed(8)
    detector = build_detector(backbone="resnet18", image_size=512)
    save_checkpoint(root / "fold0.pt", model=detector, epoch=1)
    for name in ("det-fold0", "det-fold1"):  # the same checkpoint twice: fusion must change nothing
        _import(models_dir, str(root / "fold0.pt"), "--name", name, "--version", "1",
                "--architecture", "retinanet-resnet18", "--format", "detector", "--ensemble", "rsna")
        # A freshly initialised RetinaNet scores every anchor near its 0.01 prior, below the default 0.2
        # threshold: without lowering it (in the card, the way a site tunes it) there would be no box to check.
        card = find_card(models_dir, name)
        save_card(replace(card, postprocess={**card.postprocess, "score_threshold": 0.0}), models_dir)
    return models_dir, classifier


def test_no_models_without_demo_gives_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ModelsUnavailable, match="models import"):
        build_analyzer(models_dir=tmp_path, demo=False)


def test_imported_weights_drive_the_analyzer(imported: tuple[Path, torch.nn.Module]) -> None:
    models_dir, classifier = imported
    analyzer = build_analyzer(models_dir=models_dir, demo=False, engine="onnxruntime")
    assert not analyzer.demo
    assert analyzer.model_version == "site-xrv@3+det-fold0@1+det-fold1@1"
    path = DICOM_FILES / "nih-dx-secondary-capture.dcm"
    prepared = analyzer.prepare(path, key="1")
    (result,) = analyzer.infer([prepared])
    with torch.no_grad():
        probs, _ = classifier(torch.from_numpy(prepared.classifier_input[None]))
    pneumonia = analyzer.classifier_card.labels.index("Pneumonia")
    assert result.pneumonia_probability == pytest.approx(float(probs[0, pneumonia]), rel=1e-4, abs=1e-6)
    assert result.flagged == (result.pneumonia_probability >= 0.3)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert result.boxes, "the lowered card threshold must yield boxes to check"
    for b in result.boxes:
        assert 0 <= b.x0 < b.x1 <= ds.Columns and 0 <= b.y0 < b.y1 <= ds.Rows


def test_ensemble_of_identical_members_equals_one_member(imported: tuple[Path, torch.nn.Module]) -> None:
    models_dir, _ = imported
    ensemble = build_analyzer(models_dir=models_dir, demo=False, engine="onnxruntime")
    single = build_analyzer(models_dir=models_dir, demo=False, engine="onnxruntime", detector="det-fold0")
    assert len(ensemble.ensemble_members) == 1 and single.ensemble_members == ()
    item = ensemble.prepare(DICOM_FILES / "siim-cr-pa-jpeg-baseline.dcm", key="x")
    (fused,) = ensemble.infer([item])
    (alone,) = single.infer([item])
    a = np.array(sorted((b.x0, b.y0, b.x1, b.y1, b.score) for b in fused.boxes))
    b = np.array(sorted((b.x0, b.y0, b.x1, b.y1, b.score) for b in alone.boxes))
    assert len(a) > 0, "the lowered card threshold must yield boxes to compare"
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=0.5)
