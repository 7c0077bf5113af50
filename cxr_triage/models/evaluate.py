"""Evaluation: the RSNA Pneumonia Detection Challenge metric, ROC/PR for the image-level probability,
post-processing sweeps on cached raw detector outputs, and a Markdown/HTML report with PNG plots.

RSNA metric (Kaggle "RSNA Pneumonia Detection Challenge", Evaluation page, as quoted verbatim in public
copies of the competition text, e.g. the notebooks found with the query "rsna pneumonia detection evaluation
metric map iou"; cross-checked against Yicheng Chen's public kernel "Mean Average Precision Metric"
(kaggle.com/chenyc15/mean-average-precision-metric), which the 2018 participants used locally):

* IoU thresholds t = 0.40, 0.45, ..., 0.75 (8 values).
* At each t, predictions are taken in descending confidence; a prediction is a true positive if its IoU with
  a not-yet-matched ground-truth box is *greater than* t ("a predicted object is considered a 'hit' if its
  intersection over union with a ground truth object is greater than 0.5"); we match it to the unmatched GT
  box of highest IoU. Unmatched predictions are FP, unmatched GT boxes are FN.
  Score(t) = TP / (TP + FP + FN); image score = mean over t.
  (Chen's kernel uses ``>=``; pass ``inclusive=True`` for that. They differ only at exact ties.)
* "if there are no ground truth objects at all for a given image, ANY number of predictions (false
  positives) will result in the image receiving a score of zero, and being included in the mean".
* An image with no ground truth and no predictions is not counted (Chen's kernel returns ``None`` for it
  and skips it in the mean; TP+FP+FN = 0 leaves the ratio undefined).
* The final score is the mean of the image scores of the counted images.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np

from cxr_triage.models.postprocess import DetectionParams, box_iou, decode_detections

if TYPE_CHECKING:
    from cxr_triage.models.preprocess import Transform

RSNA_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.40 + 0.05 * i, 2) for i in range(8))


def _as_preds(p: np.ndarray | None) -> np.ndarray:
    if p is None:
        return np.zeros((0, 5), dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if p.size == 0:
        return np.zeros((0, 5), dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 5:
        raise ValueError(f"predictions must be (K,5) x0,y0,x1,y1,score; got shape {p.shape}")
    return p


def _as_gt(g: np.ndarray | None) -> np.ndarray:
    if g is None:
        return np.zeros((0, 4), dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    if g.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if g.ndim != 2 or g.shape[1] != 4:
        raise ValueError(f"ground truth must be (M,4) x0,y0,x1,y1; got shape {g.shape}")
    return g


def rsna_image_score(
    predictions: np.ndarray | None,
    ground_truth: np.ndarray | None,
    *,
    thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
    inclusive: bool = False,
) -> float | None:
    """RSNA score of one image, or ``None`` when the image is not counted (no GT and no predictions)."""
    preds = _as_preds(predictions)
    gt = _as_gt(ground_truth)
    if len(gt) == 0 and len(preds) == 0:
        return None
    if len(gt) == 0 or len(preds) == 0:
        return 0.0
    order = np.argsort(-preds[:, 4], kind="stable")
    iou = box_iou(preds[order, :4], gt)  # (K, M)
    total = 0.0
    for t in thresholds:
        matched = np.zeros(len(gt), dtype=bool)
        tp = 0
        for k in range(len(preds)):
            cand = np.where(matched, -1.0, iou[k])
            j = int(np.argmax(cand))
            hit = cand[j] >= t if inclusive else cand[j] > t
            if cand[j] >= 0 and hit:
                matched[j] = True
                tp += 1
        fp = len(preds) - tp
        fn = len(gt) - tp
        total += tp / (tp + fp + fn)
    return total / len(thresholds)


@dataclass
class MetricResult:
    score: float
    per_image: dict[str, float | None] = field(default_factory=dict)

    @property
    def n_counted(self) -> int:
        return sum(v is not None for v in self.per_image.values())


def rsna_metric_details(
    predictions: Mapping[str, np.ndarray],
    ground_truth: Mapping[str, np.ndarray],
    *,
    thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
    inclusive: bool = False,
) -> MetricResult:
    """Metric over the images of ``ground_truth`` (an image without predictions has none). A prediction
    for an image that is not in ``ground_truth`` is an error (its label is unknown)."""
    unknown = set(predictions) - set(ground_truth)
    if unknown:
        raise KeyError(f"predictions for {len(unknown)} image(s) without ground truth, e.g. {sorted(unknown)[:3]}")
    per = {
        k: rsna_image_score(predictions.get(k), g, thresholds=thresholds, inclusive=inclusive)
        for k, g in ground_truth.items()
    }
    vals = [v for v in per.values() if v is not None]
    return MetricResult(score=float(np.mean(vals)) if vals else float("nan"), per_image=per)


def rsna_metric(
    predictions: Mapping[str, np.ndarray],
    ground_truth: Mapping[str, np.ndarray],
    **kwargs: object,
) -> float:
    """Mean RSNA image score (``nan`` if no image is counted). See :func:`rsna_metric_details`."""
    return rsna_metric_details(predictions, ground_truth, **kwargs).score  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# image-level classification


@dataclass(frozen=True)
class ClassificationMetrics:
    auc: float
    threshold: float
    sensitivity: float
    specificity: float
    n_positive: int
    n_negative: int
    average_precision: float

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def youden_threshold(y_true: Sequence[int], y_score: Sequence[float]) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(np.asarray(y_true), np.asarray(y_score, dtype=np.float64))
    i = int(np.argmax(tpr - fpr))
    return float(min(thr[i], 1.0))


def classification_metrics(
    y_true: Sequence[int], y_score: Sequence[float], *, threshold: float | None = None
) -> ClassificationMetrics:
    """ROC AUC, average precision, and sensitivity/specificity at ``threshold`` (score >= threshold is
    positive); when ``threshold`` is None, the Youden-J optimal threshold is used (optimistic: chosen on
    the same data)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y_true, dtype=int)
    s = np.asarray(y_score, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError("y_true and y_score must have the same length")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    both = n_pos > 0 and n_neg > 0
    auc = float(roc_auc_score(y, s)) if both else float("nan")
    ap = float(average_precision_score(y, s)) if n_pos > 0 else float("nan")
    if threshold is None:
        threshold = youden_threshold(y, s) if both else 0.5
    pred = s >= threshold
    sens = float((pred & (y == 1)).sum() / n_pos) if n_pos else float("nan")
    spec = float((~pred & (y == 0)).sum() / n_neg) if n_neg else float("nan")
    return ClassificationMetrics(auc, float(threshold), sens, spec, n_pos, n_neg, ap)


# --------------------------------------------------------------------------------------------------------
# sweeps over post-processing parameters on cached raw outputs


@dataclass
class RawDetection:
    """Raw detector head outputs of one image plus how to get back to original pixels."""

    cls_logits: np.ndarray  # (A,1)
    bbox_regression: np.ndarray  # (A,4)
    to_original: Callable[[np.ndarray], np.ndarray] | None = None  # (K,4) model px -> (K,4) original px
    pneumonia_probability: float | None = None  # classifier output, for gating
    # The image's letterbox transform. When set, post-processing is exactly the analyzer's (served_detections:
    # padding boxes dropped, boxes clipped to the model image) and ``to_original`` is not used.
    transform: Transform | None = None


def detections_from_raw(
    raw: Mapping[str, RawDetection],
    anchors: np.ndarray,
    params: DetectionParams,
    *,
    gate: bool = False,
) -> dict[str, np.ndarray]:
    from cxr_triage.models.postprocess import gate_with_classifier, served_detections

    out: dict[str, np.ndarray] = {}
    for key, r in raw.items():
        if r.transform is not None:
            out[key] = served_detections(r.cls_logits, r.bbox_regression, anchors, params, r.transform,
                                         pneumonia_probability=r.pneumonia_probability if gate else None)
            continue
        dets = decode_detections(r.cls_logits, r.bbox_regression, anchors, params)
        if gate and r.pneumonia_probability is not None:
            dets = gate_with_classifier(dets, r.pneumonia_probability, params)
        if r.to_original is not None and len(dets):
            dets = dets.copy()
            dets[:, :4] = np.asarray(r.to_original(dets[:, :4]), dtype=np.float32)
        out[key] = dets
    return out


def sweep(
    raw: Mapping[str, RawDetection],
    anchors: np.ndarray,
    ground_truth: Mapping[str, np.ndarray],
    *,
    base: DetectionParams = DetectionParams(),
    parameter: str = "score_threshold",
    values: Iterable[float] = (),
    gate: bool = False,
    progress: bool = False,
) -> list[tuple[float, float]]:
    """RSNA metric for each value of one :class:`DetectionParams` field, re-running post-processing only."""
    import dataclasses

    res = []
    vals: Iterable[float] = list(values)
    if progress:
        from tqdm import tqdm

        vals = tqdm(vals, desc=f"sweep {parameter}", unit="value")
    for v in vals:
        params = dataclasses.replace(base, **{parameter: v})
        preds = detections_from_raw(raw, anchors, params, gate=gate)
        res.append((float(v), rsna_metric(preds, ground_truth)))
    return res


# --------------------------------------------------------------------------------------------------------
# report


@dataclass
class ScorerResult:
    """Everything the report shows for one scorer (a model run, or a predictions CSV)."""

    name: str
    y_true: list[int]
    y_score: list[float]
    classification: ClassificationMetrics
    rsna: MetricResult | None = None
    sweeps: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _fmt(v: float | int | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return "nan" if math.isnan(v) else f"{v:.{digits}f}"


def _plots(results: Sequence[ScorerResult], out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    files: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=80)
    for r in results:
        if r.classification.n_positive and r.classification.n_negative:
            fpr, tpr, _ = roc_curve(r.y_true, r.y_score)
            ax.plot(fpr, tpr, label=f"{r.name} (AUC {r.classification.auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (image level)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png")
    plt.close(fig)
    files["roc"] = "roc.png"

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=80)
    for r in results:
        if r.classification.n_positive:
            p, rc, _ = precision_recall_curve(r.y_true, r.y_score)
            ax.plot(rc, p, label=f"{r.name} (AP {r.classification.average_precision:.3f})")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (image level)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "pr.png")
    plt.close(fig)
    files["pr"] = "pr.png"

    for param, fname, label in (
        ("score_threshold", "metric_vs_score_threshold.png", "score threshold"),
        ("nms_threshold", "metric_vs_nms_threshold.png", "NMS IoU threshold"),
    ):
        series = [(r.name, r.sweeps[param]) for r in results if r.sweeps.get(param)]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=80)
        for name, pts in series:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
        ax.set(xlabel=label, ylabel="RSNA metric", title=f"RSNA metric vs {label}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname)
        plt.close(fig)
        files[param] = fname
    return files


def write_report(
    results: Sequence[ScorerResult],
    out_dir: str | Path,
    *,
    title: str = "cxr-triage evaluation",
    dataset_note: str = "",
    formats: Sequence[str] = ("md", "html"),
) -> list[Path]:
    """Write ``report.md`` and/or ``report.html`` plus PNG plots into ``out_dir``; returns the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(results, out)
    header = ["scorer", "n images", "positives", "ROC AUC", "AP", "threshold", "sensitivity", "specificity",
              "RSNA metric", "images counted"]
    rows = []
    for r in results:
        c = r.classification
        rows.append([
            r.name, str(c.n_positive + c.n_negative), str(c.n_positive), _fmt(c.auc), _fmt(c.average_precision),
            _fmt(c.threshold), _fmt(c.sensitivity), _fmt(c.specificity),
            _fmt(r.rsna.score) if r.rsna else "-", str(r.rsna.n_counted) if r.rsna else "-",
        ])
    notes = [f"**{r.name}**: {n}" for r in results for n in r.notes]
    written: list[Path] = []
    if "md" in formats:
        lines = [f"# {title}", ""]
        if dataset_note:
            lines += [dataset_note, ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += [""]
        if notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
        for key, fname in plots.items():
            lines += [f"![{key}]({fname})", ""]
        for r in results:
            for param, pts in r.sweeps.items():
                lines += [f"### {r.name}: RSNA metric vs {param}", "", "| value | metric |", "|---|---|"]
                lines += [f"| {v:.2f} | {m:.4f} |" for v, m in pts] + [""]
        p = out / "report.md"
        p.write_text("\n".join(lines), encoding="utf-8")
        written.append(p)
    if "html" in formats:
        e = html.escape
        body = [f"<h1>{e(title)}</h1>"]
        if dataset_note:
            body.append(f"<p>{e(dataset_note)}</p>")
        body.append("<table border=1 cellspacing=0 cellpadding=3><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        body.append("</table>")
        if notes:
            body.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
        body += [f'<img src="{e(f)}" alt="{e(k)}">' for k, f in plots.items()]
        p = out / "report.html"
        p.write_text("<!doctype html><html><head><meta charset='utf-8'><title>" + e(title) + "</title></head><body>"
                     + "\n".join(body) + "</body></html>", encoding="utf-8")
        written.append(p)
    return written + [out / f for f in plots.values()]


# --------------------------------------------------------------------------------------------------------
# scorers: a predictions CSV, or models run through an Analyzer (injected)


@dataclass
class EvalSet:
    """What is evaluated: image key (RSNA patientId) -> truth, plus where the image file is."""

    ground_truth: dict[str, np.ndarray]  # (M,4) xyxy, original pixels
    target: dict[str, int]
    paths: dict[str, Path] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # file stem -> key


def load_eval_set(
    labels_csv: str | Path,
    *,
    images_dir: str | Path | None = None,
    mapping_csv: str | Path | None = None,
    limit: int | None = None,
) -> EvalSet:
    """Label CSV (+ optional images folder and stem->patientId mapping). With ``images_dir`` only the images
    found there are evaluated; without it, every labelled patient (for predictions CSVs)."""
    from cxr_triage.models import datasets as ds

    labels = ds.read_rsna_labels(labels_csv)
    mapping = ds.read_mapping(mapping_csv) if mapping_csv else None
    aliases = dict(mapping) if mapping else {}
    if images_dir is not None:
        items = ds.match_images(images_dir, labels.target.keys(), mapping=mapping)
        seen: dict[str, Path] = {}
        for p, pid in items:
            seen.setdefault(pid, p)
        keys = sorted(seen)
        paths = seen
    else:
        keys = sorted(labels.target)
        paths = {}
    if limit is not None:
        keys = keys[:limit]
    return EvalSet(
        ground_truth={k: labels.boxes[k] for k in keys},
        target={k: labels.target[k] for k in keys},
        paths={k: paths[k] for k in keys if k in paths},
        aliases=aliases,
    )


def parse_prediction_string(s: str) -> np.ndarray:
    """RSNA submission ``"conf x y w h conf x y w h ..."`` -> (K,5) xyxy+score."""
    vals = [float(v) for v in (s or "").split()]
    if len(vals) % 5:
        raise ValueError("PredictionString must hold groups of 5 numbers")
    a = np.asarray(vals, dtype=np.float64).reshape(-1, 5)
    return np.stack([a[:, 1], a[:, 2], a[:, 1] + a[:, 3], a[:, 2] + a[:, 4], a[:, 0]], axis=1) if len(a) else \
        np.zeros((0, 5))


def evaluate_predictions_csv(
    csv_path: str | Path,
    eval_set: EvalSet,
    *,
    score_column: str = "prob_Pneumonia",
    name: str | None = None,
    threshold: float | None = None,
) -> ScorerResult:
    """Score a per-image predictions CSV. Key column: ``patientId`` if present, else the first column (file
    names are mapped through ``eval_set.aliases``). Optional ``PredictionString`` (RSNA submission format)
    gives boxes for the RSNA metric; without it only the image-level metrics are computed."""
    import csv

    scores: dict[str, float] = {}
    boxes: dict[str, np.ndarray] = {}
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        key_col = "patientId" if "patientId" in cols else cols[0]
        has_boxes = "PredictionString" in cols
        if score_column not in cols and not has_boxes:
            raise ValueError(f"{csv_path}: no column {score_column!r} (columns: {cols[:6]}...)")
        for row in reader:
            raw = (row[key_col] or "").strip()
            key = raw if raw in eval_set.target else eval_set.aliases.get(Path(raw).stem)
            if key is None or key not in eval_set.target:
                continue
            if has_boxes:
                boxes[key] = parse_prediction_string(row["PredictionString"])
            if score_column in cols and row[score_column] not in ("", None):
                scores[key] = float(row[score_column])
            elif has_boxes:
                scores[key] = float(boxes[key][:, 4].max()) if len(boxes[key]) else 0.0
    keys = [k for k in eval_set.target if k in scores]
    if not keys:
        raise ValueError(f"{csv_path}: no row matches an evaluated image")
    y_true = [eval_set.target[k] for k in keys]
    y_score = [scores[k] for k in keys]
    res = ScorerResult(
        name=name or Path(csv_path).stem,
        y_true=y_true,
        y_score=y_score,
        classification=classification_metrics(y_true, y_score, threshold=threshold),
    )
    missing = len(eval_set.target) - len(keys)
    if missing:
        res.notes.append(f"{missing} evaluated image(s) have no row in {Path(csv_path).name}")
    if has_boxes:
        gt = {k: eval_set.ground_truth[k] for k in keys}
        res.rsna = rsna_metric_details({k: boxes[k] for k in keys}, gt)
    else:
        res.notes.append("no boxes in this CSV: RSNA metric not applicable (image-level metrics only)")
    return res


def detection_params_from_card(card: object) -> tuple[DetectionParams, np.ndarray]:
    """Post-processing parameters and anchors described by a detector model card."""
    from cxr_triage.models.detector import detector_anchors

    known = {"score_threshold", "nms_threshold", "box_scale", "max_detections", "gate_weight"}
    post = getattr(card, "postprocess", {}) or {}
    params = DetectionParams(**{k: v for k, v in post.items() if k in known})
    p = getattr(card, "architecture_params", {}) or {}
    anchors = detector_anchors(
        image_size=int(p.get("image_size", card.input.size)),  # type: ignore[attr-defined]
        small_anchors=bool(p.get("small_anchors", True)),
        backbone=str(p.get("backbone", "resnet50")),
    )
    return params, anchors


SCORE_SWEEP = tuple(round(0.05 * i, 2) for i in range(1, 19))
NMS_SWEEP = tuple(round(0.1 + 0.05 * i, 2) for i in range(15))


def evaluate_analyzer(
    analyzer: object,
    eval_set: EvalSet,
    *,
    name: str = "models",
    batch_size: int = 4,
    sweeps: bool = True,
    progress: bool = True,
    threshold: float | None = None,
) -> list[ScorerResult]:
    """Run an :class:`cxr_triage.models.analyzer.Analyzer` (injected) over the images of ``eval_set``.

    The classifier probability comes from ``analyzer.infer`` run with the detector detached (a shallow
    copy with ``detector_engine=None``); the detector's raw outputs are computed once with
    ``analyzer.detector_engine`` and cached, then decoded + gated with the card's post-processing exactly as
    the analyzer does (:func:`~cxr_triage.models.postprocess.served_detections`),
    which is what the score/NMS sweeps re-run. Returns the classifier scorer and, when a detector is
    present, a "detector global head" scorer (softmax P(Lung Opacity)).
    """
    import copy

    keys = [k for k in eval_set.target if k in eval_set.paths]
    if not keys:
        raise ValueError("no image of the evaluation set was found")
    det_engine = getattr(analyzer, "detector_engine", None)
    det_card = getattr(analyzer, "detector_card", None)
    cls_only = copy.copy(analyzer)
    cls_only.detector_engine = None  # type: ignore[attr-defined]
    # A checkpoint/fold ensemble serves WBF-fused boxes: measure those from the full analyzer; the sweeps re-run
    # the first member's post-processing only.
    ensemble = bool(getattr(analyzer, "ensemble_members", ()))
    served: dict[str, np.ndarray] = {}
    probs: dict[str, float] = {}
    raw: dict[str, RawDetection] = {}
    glob: dict[str, float] = {}
    failed: list[str] = []
    it: Iterable[int] = range(0, len(keys), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(list(it), desc=f"evaluate {name}", unit="batch")
    for start in it:
        chunk = keys[start : start + batch_size]
        prepared = []
        for k in chunk:
            try:
                prepared.append(analyzer.prepare(eval_set.paths[k], key=k))  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - report, keep going
                failed.append(k)
        if not prepared:
            continue
        for r in (analyzer if ensemble else cls_only).infer(prepared):  # type: ignore[attr-defined]
            probs[r.key] = r.pneumonia_probability
            if ensemble:
                served[r.key] = np.array([[b.x0, b.y0, b.x1, b.y1, b.score] for b in r.boxes],
                                         dtype=np.float32).reshape(-1, 5)
        if det_engine is not None:
            out = det_engine.run(np.stack([p.detector_input for p in prepared]))
            for i, p in enumerate(prepared):
                tf = p.detector_transform
                raw[p.key] = RawDetection(
                    cls_logits=out["cls_logits"][i], bbox_regression=out["bbox_regression"][i],
                    pneumonia_probability=probs[p.key], transform=tf,
                )
                if "global_logits" in out:
                    g = out["global_logits"][i].astype(np.float64)
                    e = np.exp(g - g.max())
                    glob[p.key] = float(e[-1] / e.sum())
    done = [k for k in keys if k in probs]
    y_true = [eval_set.target[k] for k in done]
    results = []
    cls_res = ScorerResult(
        name=f"{name}: classifier", y_true=y_true, y_score=[probs[k] for k in done],
        classification=classification_metrics(y_true, [probs[k] for k in done], threshold=threshold),
    )
    if failed:
        cls_res.notes.append(f"{len(failed)} image(s) could not be analysed and are left out")
    if getattr(analyzer, "demo", False):
        cls_res.notes.append("UNTRAINED DEMO MODELS: numbers show the pipeline works, not clinical performance")
    results.append(cls_res)
    if raw and det_card is not None:
        params, anchors = detection_params_from_card(det_card)
        gt = {k: eval_set.ground_truth[k] for k in raw}
        preds = served if ensemble else detections_from_raw(raw, anchors, params, gate=True)
        cls_res.rsna = rsna_metric_details(preds, gt)
        what = (f"ensemble of {1 + len(analyzer.ensemble_members)} detectors fused by WBF"  # type: ignore[attr-defined]
                if ensemble else "detector")
        cls_res.notes.append(
            f"RSNA metric on the served boxes ({what} + classifier gating, {params}); "
            f"{sum(len(v) for v in preds.values())} boxes on {len(preds)} images"
        )
        if ensemble and sweeps:
            cls_res.notes.append("threshold sweeps re-run the first ensemble member's post-processing only")
        if sweeps:
            cls_res.sweeps["score_threshold"] = sweep(raw, anchors, gt, base=params, parameter="score_threshold",
                                                      values=SCORE_SWEEP, gate=True, progress=progress)
            cls_res.sweeps["nms_threshold"] = sweep(raw, anchors, gt, base=params, parameter="nms_threshold",
                                                    values=NMS_SWEEP, gate=True, progress=progress)
        if glob:
            gk = [k for k in done if k in glob]
            yt = [eval_set.target[k] for k in gk]
            results.append(ScorerResult(
                name=f"{name}: detector global head", y_true=yt, y_score=[glob[k] for k in gk],
                classification=classification_metrics(yt, [glob[k] for k in gk], threshold=threshold),
            ))
    return results
