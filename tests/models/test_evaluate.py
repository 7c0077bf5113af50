"""Evaluation plumbing: predictions CSVs (real reference CheXNet numbers), sweeps on cached raw outputs,
analyzer-driven evaluation with an injected fake analyzer, the report and the CLI."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cxr_triage.models import evaluate as ev
from cxr_triage.models.detector import detector_anchors
from cxr_triage.models.postprocess import DetectionParams
from cxr_triage.models.preprocess import Transform

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
NIH = SHARED / "nih-cxr14"
REF = SHARED / "reference" / "chexnet-retrained-preds-621.csv"
LABELS = NIH / "LABEL_ROWS_rsna_stage_2_train_labels.csv"
MAPPING = NIH / "MAP_nih_image_to_rsna_patientId.csv"
need_data = pytest.mark.skipif(not (REF.is_file() and LABELS.is_file()), reason="shared data not present")


@need_data
def test_reference_chexnet_auc_on_real_rsna_labels():
    es = ev.load_eval_set(LABELS, images_dir=NIH / "images", mapping_csv=MAPPING)
    assert len(es.target) == 222 and sum(es.target.values()) == 29
    assert sum(len(b) for b in es.ground_truth.values()) == 37
    res = ev.evaluate_predictions_csv(REF, es, score_column="prob_Pneumonia")
    # data README: "its prob_Pneumonia separates RSNA Target 1 from 0 with ROC AUC 0.843"
    assert res.classification.auc == pytest.approx(0.843, abs=0.0006)
    assert res.classification.n_positive == 29 and res.classification.n_negative == 193
    assert res.rsna is None


@need_data
def test_rsna_metric_on_real_labels_with_submission_csv(tmp_path):
    es = ev.load_eval_set(LABELS, mapping_csv=MAPPING)
    sub = tmp_path / "sub.csv"
    with open(sub, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patientId", "PredictionString"])
        for k, boxes in es.ground_truth.items():
            w.writerow([k, " ".join(f"0.9 {b[0]} {b[1]} {b[2] - b[0]} {b[3] - b[1]}" for b in boxes)])
    perfect = ev.evaluate_predictions_csv(sub, es)
    assert perfect.rsna is not None and perfect.rsna.score == 1.0
    assert perfect.rsna.n_counted == 29  # the 193 images without boxes and without predictions are not counted
    assert perfect.classification.auc == 1.0

    # shrink every box by 0.875 about its centre: IoU = 0.875^2 = 0.766 > 0.75 -> still 1.0; 0.8 -> 0.64:
    # hits at 0.40..0.60 only (5/8)
    for f, expected in ((0.875, 1.0), (0.8, 5 / 8)):
        with open(sub, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["patientId", "PredictionString"])
            for k, boxes in es.ground_truth.items():
                parts = []
                for b in boxes:
                    cx, cy, bw, bh = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, (b[2] - b[0]) * f, (b[3] - b[1]) * f
                    parts.append(f"0.9 {cx - bw / 2} {cy - bh / 2} {bw} {bh}")
                w.writerow([k, " ".join(parts)])
        assert ev.evaluate_predictions_csv(sub, es).rsna.score == pytest.approx(expected)


def test_parse_prediction_string():
    np.testing.assert_allclose(ev.parse_prediction_string("0.5 10 20 30 40 0.2 1 1 2 2"),
                               [[10, 20, 40, 60, 0.5], [1, 1, 3, 3, 0.2]])
    assert ev.parse_prediction_string("").shape == (0, 5)
    with pytest.raises(ValueError):
        ev.parse_prediction_string("0.5 1 2")


def _raw_for_boxes(anchors: np.ndarray, picks: dict[int, float]) -> ev.RawDetection:
    """Raw outputs whose decoded detections are exactly the anchors ``picks`` with the given scores."""
    logits = np.full((len(anchors), 1), -20.0, dtype=np.float32)
    for i, s in picks.items():
        logits[i, 0] = np.log(s / (1 - s))
    return ev.RawDetection(logits, np.zeros((len(anchors), 4), np.float32), to_original=lambda b: b * 2.0)


def test_sweeps_rerun_postprocessing_on_cached_raw_outputs():
    anchors = detector_anchors(image_size=64, backbone="tiny")
    i_true = 100
    a = anchors[i_true]
    gt = {"img": (a * 2.0)[None]}  # truth in the "original" frame (x2)
    # a correct box at score 0.6, a far FP (disjoint anchor) at score 0.3
    ious = ((np.minimum(anchors[:, 2], a[2]) - np.maximum(anchors[:, 0], a[0])).clip(0)
            * (np.minimum(anchors[:, 3], a[3]) - np.maximum(anchors[:, 1], a[1])).clip(0))
    i_fp = int(np.nonzero(ious == 0)[0][0])
    raw = {"img": _raw_for_boxes(anchors, {i_true: 0.6, i_fp: 0.3})}
    base = DetectionParams(box_scale=1.0)
    res = dict(ev.sweep(raw, anchors, gt, base=base, parameter="score_threshold", values=[0.2, 0.5, 0.7]))
    assert res == {0.2: pytest.approx(0.5), 0.5: pytest.approx(1.0), 0.7: pytest.approx(0.0)}
    # NMS sweep: a duplicate of the true box at IoU ~0.56 is suppressed only when the NMS threshold < IoU
    j = next(j for j in range(len(anchors))
             if j != i_true and 0.5 < ev.box_iou(anchors[j:j + 1], a[None])[0, 0] < 0.7)
    raw2 = {"img": _raw_for_boxes(anchors, {i_true: 0.9, j: 0.8})}
    iou = float(ev.box_iou(anchors[j:j + 1], a[None])[0, 0])
    res2 = dict(ev.sweep(raw2, anchors, gt, base=base, parameter="nms_threshold", values=[0.3, 0.9]))
    assert res2[0.3] == pytest.approx(1.0) and res2[0.9] == pytest.approx(0.5), iou
    # gating with the classifier probability lowers scores below the threshold
    raw["img"].pneumonia_probability = 0.0
    gated = ev.detections_from_raw(raw, anchors, DetectionParams(box_scale=1.0, gate_weight=0.5,
                                                                 score_threshold=0.25), gate=True)
    np.testing.assert_allclose(gated["img"][:, 4], [0.3])


class _FakeEngine:
    def __init__(self, anchors):
        self.anchors = anchors

    def run(self, batch):
        n = len(batch)
        logits = np.full((n, len(self.anchors), 1), -20.0, np.float32)
        logits[:, 100, 0] = 3.0
        return {"cls_logits": logits, "bbox_regression": np.zeros((n, len(self.anchors), 4), np.float32),
                "global_logits": np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (n, 1))}


class _FakeAnalyzer:
    """Duck-typed stand-in for cxr_triage.models.analyzer.Analyzer (prepare / infer / detector_*)."""

    demo = True

    def __init__(self, probs):
        self.probs = probs
        anchors = detector_anchors(image_size=64, backbone="tiny")
        self.detector_engine = _FakeEngine(anchors)
        self.detector_card = SimpleNamespace(
            postprocess={"score_threshold": 0.2, "box_scale": 1.0, "gate_weight": 0.0},
            architecture_params={"backbone": "tiny", "image_size": 64, "small_anchors": True},
            input=SimpleNamespace(size=64))
        self.calls = 0

    def prepare(self, path, *, key):
        # Original image twice the model size, no padding: to_original doubles coordinates.
        tf = Transform(scale_x=0.5, scale_y=0.5, offset_x=0.0, offset_y=0.0, original_shape=(128, 128),
                       model_shape=(64, 64))
        return SimpleNamespace(key=key, detector_input=np.zeros((3, 64, 64), np.float32), detector_transform=tf)

    def infer(self, batch):
        assert self.detector_engine is None  # evaluate_analyzer runs the detector itself (once)
        return [SimpleNamespace(key=b.key, pneumonia_probability=self.probs[b.key]) for b in batch]


def test_evaluate_analyzer_with_injected_analyzer(tmp_path):
    anchors = detector_anchors(image_size=64, backbone="tiny")
    box = anchors[100] * 2.0
    es = ev.EvalSet(ground_truth={"a": box[None], "b": np.zeros((0, 4)), "c": np.zeros((0, 4))},
                    target={"a": 1, "b": 0, "c": 0},
                    paths={"a": Path("a.png"), "b": Path("b.png"), "c": Path("c.png")})
    fake = _FakeAnalyzer({"a": 0.9, "b": 0.2, "c": 0.6})
    results = ev.evaluate_analyzer(fake, es, batch_size=2, progress=False)
    cls, glob = results
    assert cls.classification.auc == 1.0
    # every image gets the same box: a -> TP (1.0); b, c -> FP on an empty image (0.0) -> mean 1/3
    assert cls.rsna.score == pytest.approx(1 / 3) and cls.rsna.n_counted == 3
    assert set(cls.sweeps) == {"score_threshold", "nms_threshold"}
    assert glob.name.endswith("detector global head")
    files = ev.write_report(results, tmp_path / "rep", title="t")
    names = {f.name for f in files}
    assert {"report.md", "report.html", "roc.png", "pr.png", "metric_vs_score_threshold.png",
            "metric_vs_nms_threshold.png"} <= names
    assert sum(f.stat().st_size for f in files) < 1_000_000
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "0.333" in md and "UNTRAINED DEMO" in md


@need_data
def test_cli_evaluate_reference_only(tmp_path):
    import typer
    from typer.testing import CliRunner

    from cxr_triage.models.cli_eval import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "rep"
    r = CliRunner().invoke(app, ["evaluate", "--labels", str(LABELS), "--images", str(NIH / "images"),
                                 "--mapping", str(MAPPING), "--reference-predictions", str(REF),
                                 "--out", str(out), "--formats", "md"])
    assert r.exit_code == 0, r.output
    assert "AUC=0.843" in r.output
    assert (out / "report.md").is_file() and (out / "roc.png").is_file() and not (out / "report.html").exists()
    bad = CliRunner().invoke(app, ["evaluate", "--labels", str(LABELS), "--out", str(out)])
    assert bad.exit_code != 0
