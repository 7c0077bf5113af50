from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxr_triage.models.analyzer import ImageResult, ModelsUnavailable, NotAnalysable, build_analyzer

from .conftest import dicom, nih_pngs

IMAGES = [dicom("siim-cr-pa-jpeg-baseline.dcm"), dicom("veterinary-dx-lateral-thorax.dcm"), nih_pngs(1)[0]]


@pytest.fixture(scope="module")
def analyzer(demo_models_dir: Path):  # type: ignore[no-untyped-def]
    return build_analyzer(models_dir=demo_models_dir, demo=True, intra_op_threads=2)


@pytest.fixture(scope="module")
def results(analyzer) -> list[ImageResult]:  # type: ignore[no-untyped-def]
    prepared = [analyzer.prepare(p, key=f"k{i}") for i, p in enumerate(IMAGES)]
    return analyzer.infer(prepared)


def test_identity_fields(analyzer) -> None:  # type: ignore[no-untyped-def]
    assert analyzer.demo is True
    assert analyzer.model_version == "demo-classifier@0.0.0-demo+demo-detector@0.0.0-demo"
    assert "UNTRAINED DEMO MODEL" in analyzer.algorithm_name
    assert all("UNTRAINED DEMO MODEL" in c.display_name for c in analyzer.cards)
    assert len(analyzer.algorithm_version) <= 64


def test_results_are_sane(analyzer, results: list[ImageResult]) -> None:  # type: ignore[no-untyped-def]
    assert [r.key for r in results] == ["k0", "k1", "k2"]
    for path, r in zip(IMAGES, results):
        rows, cols = (1024, 1024) if path.suffix == ".png" else (lambda d: (d.Rows, d.Columns))(
            pydicom.dcmread(path, stop_before_pixels=True))
        assert 0.0 <= r.pneumonia_probability <= 1.0
        assert r.flagged == (r.pneumonia_probability >= analyzer.classifier_card.threshold)
        assert r.label_probabilities["Pneumonia"] == pytest.approx(r.pneumonia_probability)
        assert len(r.label_probabilities) == 18 + 3
        assert r.heatmap is not None and r.heatmap.shape == (16, 16) and r.heatmap.dtype == np.float32
        assert float(r.heatmap.min()) >= 0.0 and float(r.heatmap.max()) <= 1.0
        assert len(r.boxes) <= 10
        for b in r.boxes:
            assert 0 <= b.x0 < b.x1 <= cols and 0 <= b.y0 < b.y1 <= rows
            assert 0.0 <= b.score <= 1.0
    assert any(r.boxes for r in results)  # the demo detector does emit (meaningless) boxes


def test_deterministic_across_builds(demo_models_dir: Path, results: list[ImageResult]) -> None:
    other = build_analyzer(models_dir=demo_models_dir, demo=True, intra_op_threads=2, detector="none")
    again = other.infer([other.prepare(IMAGES[0], key="k0")])[0]
    assert again.pneumonia_probability == pytest.approx(results[0].pneumonia_probability, abs=1e-6)
    np.testing.assert_allclose(again.heatmap, results[0].heatmap, atol=1e-5)
    assert again.boxes == ()


def test_not_analysable_reasons(analyzer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(dicom("nih-dx-secondary-capture.dcm"))
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(tmp_path / "big.dcm")
    with pytest.raises(NotAnalysable) as err:
        analyzer.prepare(tmp_path / "big.dcm", key="x")
    assert err.value.reason == "image-too-large"
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(NotAnalysable) as err:
        analyzer.prepare(tmp_path / "nopix.dcm", key="x")
    assert err.value.reason == "no-pixel-data"
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)
    with pytest.raises(NotAnalysable):
        analyzer.prepare(tmp_path / "junk.dcm", key="x")


def test_models_unavailable_without_real_weights(tmp_path: Path, demo_models_dir: Path) -> None:
    with pytest.raises(ModelsUnavailable, match="CXR_DEMO_MODELS=1"):
        build_analyzer(models_dir=tmp_path)
    with pytest.raises(ModelsUnavailable):  # demo cards are not used unless demo=True
        build_analyzer(models_dir=demo_models_dir)


def test_boxes_on_the_letterbox_padding_are_dropped() -> None:
    import numpy as np

    from cxr_triage.models.postprocess import drop_padding_boxes
    from cxr_triage.models.preprocess import InputSpec, prepare

    # A tall image letterboxed into 512: content is 256 wide, padding on the right.
    _, tf = prepare(np.zeros((1000, 500), dtype=np.float32), InputSpec(size=512, channels=1, normalisation="unit"))
    assert tf.content_shape == (512, 256)
    dets = np.array([[10, 10, 100, 100, 0.9],     # on the radiograph
                     [240, 10, 300, 100, 0.8],    # 16 of 60 px inside: mostly padding
                     [300, 10, 400, 100, 0.7],    # entirely padding
                     [200, 10, 280, 100, 0.6]],   # 56 of 80 px inside: kept
                    dtype=np.float32)
    kept = drop_padding_boxes(dets, tf)
    assert kept[:, 4].tolist() == pytest.approx([0.9, 0.6])


def test_demo_scores_on_real_radiographs_are_spread_not_pinned(analyzer) -> None:  # type: ignore[no-untyped-def]
    from tests.dicomize import nih_pngs

    batch = [analyzer.prepare(p, key=p.name) for p in nih_pngs(12)]
    scores = [r.pneumonia_probability for r in analyzer.infer(batch)]
    # Meaningless but usable for a demo: some low, some high, so the worklist shows flagged studies.
    assert min(scores) < 0.1 and max(scores) > 0.4, scores


def test_evaluation_measures_exactly_the_served_boxes(analyzer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The evaluation re-runs post-processing from cached raw outputs (for its sweeps); on the card's own
    parameters it must give the boxes the analyzer serves, padding filter and letterbox mapping included."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from cxr_triage.models import evaluate as ev

    # Wide and tall crops: letterboxed, so the demo detector fires on the padding and the filter matters.
    images = [IMAGES[0], *nih_pngs(2)]
    for j, png in enumerate(nih_pngs(4)[2:]):
        pixels = np.asarray(Image.open(png).convert("L"))
        crop = tmp_path / f"crop{j}.png"
        Image.fromarray(pixels[:, 200:650] if j else pixels[300:800, :]).save(crop)
        images.append(crop)
    prepared = [analyzer.prepare(p, key=f"k{i}") for i, p in enumerate(images)]
    assert {p.detector_transform.content_shape for p in prepared[-2:]} == {(250, 512), (512, 225)}
    params, anchors = ev.detection_params_from_card(analyzer.detector_card)
    # A low threshold so that the demo detector yields boxes to compare (on both sides alike).
    low = dataclasses.replace(params, score_threshold=0.0, gate_weight=0.0)
    analyzer._members[0] = (analyzer._members[0][0], low, anchors, 1.0)
    try:
        served = analyzer.infer(prepared)
    finally:
        analyzer._members[0] = (analyzer._members[0][0], params, anchors, 1.0)
    out = analyzer.detector_engine.run(np.stack([p.detector_input for p in prepared]))
    raw = {
        p.key: ev.RawDetection(cls_logits=out["cls_logits"][i], bbox_regression=out["bbox_regression"][i],
                               pneumonia_probability=r.pneumonia_probability, transform=p.detector_transform)
        for i, (p, r) in enumerate(zip(prepared, served))
    }
    measured = ev.detections_from_raw(raw, anchors, low, gate=True)
    total = 0
    for r in served:
        expected = np.array([[b.x0, b.y0, b.x1, b.y1, b.score] for b in r.boxes], dtype=np.float32).reshape(-1, 5)
        np.testing.assert_allclose(measured[r.key], expected, rtol=1e-5, atol=1e-3)
        total += len(expected)
    assert total > 0
