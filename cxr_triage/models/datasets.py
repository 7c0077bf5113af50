"""RSNA-format data: label tables, image matching, patient-level folds, augmentation, a training dataset.

Label table (``stage_2_train_labels.csv``): ``patientId,x,y,width,height,Target``; one row per box, a single
row with empty box fields for an image without boxes. Boxes are returned as float32 ``(M, 4)`` xyxy in the
pixel frame of the image file. Detailed classes (``stage_2_detailed_class_info.csv``: ``patientId,class``)
give the 3 global classes; without that table: ``Target=1 -> "Lung Opacity"`` else ``"Normal"``.

Images are matched to patientIds by file stem (``<patientId>.dcm``) or via a mapping CSV whose first column
is the file name (or stem) and whose column ``rsna_patientId`` (else the second column) is the patientId
(``MAP_nih_image_to_rsna_patientId.csv`` in shared/data/nih-cxr14 has this shape).

No torch import at module level: evaluation uses this module with ONNX Runtime only.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cxr_triage.models.postprocess import GLOBAL_CLASSES

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")


@dataclass
class RsnaLabels:
    boxes: dict[str, np.ndarray]  # patientId -> (M,4) xyxy
    target: dict[str, int]  # patientId -> 0/1
    global_class: dict[str, int]  # patientId -> index into GLOBAL_CLASSES


def _f(v: str) -> float | None:
    v = (v or "").strip()
    return float(v) if v else None


def read_rsna_labels(labels_csv: str | Path, detailed_class_csv: str | Path | None = None) -> RsnaLabels:
    boxes: dict[str, list[list[float]]] = {}
    target: dict[str, int] = {}
    with open(labels_csv, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"patientId", "x", "y", "width", "height", "Target"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{labels_csv}: missing columns {sorted(missing)}")
        for row in reader:
            pid = row["patientId"].strip()
            boxes.setdefault(pid, [])
            t = int(float(row["Target"]))
            target[pid] = max(target.get(pid, 0), t)
            x, y, w, h = (_f(row[k]) for k in ("x", "y", "width", "height"))
            if t == 1 and None not in (x, y, w, h):
                boxes[pid].append([x, y, x + w, y + h])  # type: ignore[operator]
    gclass: dict[str, int] = {}
    if detailed_class_csv is not None:
        with open(detailed_class_csv, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                name = row["class"].strip()
                if name not in GLOBAL_CLASSES:
                    raise ValueError(f"{detailed_class_csv}: unknown class {name!r}")
                gclass[row["patientId"].strip()] = GLOBAL_CLASSES.index(name)
    for pid, t in target.items():
        if pid not in gclass:
            gclass[pid] = 2 if t == 1 else 0
    arr = {k: np.asarray(v, dtype=np.float32).reshape(-1, 4) for k, v in boxes.items()}
    return RsnaLabels(boxes=arr, target=target, global_class=gclass)


def read_mapping(mapping_csv: str | Path) -> dict[str, str]:
    """File stem -> patientId."""
    out: dict[str, str] = {}
    with open(mapping_csv, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if len(cols) < 2:
            raise ValueError(f"{mapping_csv}: needs a file-name column and a patientId column")
        pid_col = "rsna_patientId" if "rsna_patientId" in cols else ("patientId" if "patientId" in cols else cols[1])
        for row in reader:
            name, pid = (row[cols[0]] or "").strip(), (row[pid_col] or "").strip()
            if name and pid:
                out[Path(name).stem] = pid
    return out


def read_detailed_classes_from_mapping(mapping_csv: str | Path) -> dict[str, int]:
    """patientId -> global class from a mapping CSV carrying ``rsna_detailed_class`` (nih-cxr14 has one)."""
    out: dict[str, int] = {}
    with open(mapping_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            name = (row.get("rsna_detailed_class") or "").strip()
            if name in GLOBAL_CLASSES and row.get("rsna_patientId"):
                out[row["rsna_patientId"].strip()] = GLOBAL_CLASSES.index(name)
    return out


def match_images(
    images_dir: str | Path,
    known_ids: Iterable[str],
    *,
    mapping: Mapping[str, str] | None = None,
) -> list[tuple[Path, str]]:
    """(path, patientId) for each image file in ``images_dir`` (non-recursive, sorted) with a known id."""
    known = set(known_ids)
    out = []
    for p in sorted(Path(images_dir).iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        pid = mapping.get(p.stem) if mapping is not None else p.stem
        if pid is not None and pid in known:
            out.append((p, pid))
    return out


def _hash_key(patient_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{patient_id}".encode()).hexdigest()


def patient_folds(patient_ids: Iterable[str], n_folds: int = 5, *, seed: int = 0) -> dict[str, int]:
    """Deterministic patient-level K-fold: distinct ids ordered by a salted SHA-256, then dealt round-robin,
    so fold sizes differ by at most one and every record of a patient lands in one fold."""
    if n_folds < 2:
        raise ValueError("n_folds: must be >= 2")
    ids = sorted(set(patient_ids), key=lambda p: _hash_key(p, seed))
    return {pid: i % n_folds for i, pid in enumerate(ids)}


def split_fold(
    items: Sequence[tuple[Path, str]], fold: int, n_folds: int = 5, *, seed: int = 0
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(train, validation) items for ``fold``; validation = the patients assigned to ``fold``."""
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold: must be in [0, {n_folds})")
    folds = patient_folds([pid for _, pid in items], n_folds, seed=seed)
    train = [it for it in items if folds[it[1]] != fold]
    val = [it for it in items if folds[it[1]] == fold]
    return train, val


# ------------------------------------------------------------------------------------------------------------
# augmentation (numpy/scipy, applied to the [0,1] model-frame image and its boxes together)


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.5
    shift: float = 0.06  # fraction of the image size
    scale: tuple[float, float] = (0.85, 1.15)
    shear_deg: float = 4.0
    rotate_deg: float = 0.0  # off by default (as in the recipe)
    blur_p: float = 0.2
    noise_p: float = 0.2
    gamma: tuple[float, float] = (0.8, 1.25)


def affine_matrix(
    size: int, *, flip: bool, scale: float, shift: tuple[float, float], shear_deg: float, rotate_deg: float
) -> np.ndarray:
    """3x3 matrix mapping input (x, y) to output (x, y) pixel coordinates, about the image centre."""
    c = size / 2.0
    to_c = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]], dtype=np.float64)
    back = np.array([[1, 0, c + shift[0]], [0, 1, c + shift[1]], [0, 0, 1]], dtype=np.float64)
    f = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    s = np.diag([scale, scale, 1.0])
    sh = np.array([[1, np.tan(np.radians(shear_deg)), 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    a = np.radians(rotate_deg)
    r = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]], dtype=np.float64)
    return back @ r @ sh @ s @ f @ to_c


def warp_image(image: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Warp an HxW image by the forward matrix ``m`` (bilinear, zeros outside)."""
    from scipy.ndimage import affine_transform

    inv = np.linalg.inv(m)
    # scipy works in (row, col) = (y, x): swap axes of the inverse map
    p = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float64)
    inv_rc = p @ inv @ p
    return affine_transform(image, inv_rc[:2, :2], offset=inv_rc[:2, 2], order=1, mode="constant", cval=0.0).astype(
        np.float32
    )


def warp_boxes(boxes: np.ndarray, m: np.ndarray, size: int, *, min_side: float = 2.0) -> np.ndarray:
    """Transform the 4 corners of each box, take their bounding box, clip to the image, drop tiny boxes."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(b) == 0:
        return np.zeros((0, 4), dtype=np.float32)
    xs = b[:, [0, 2, 2, 0]]
    ys = b[:, [1, 1, 3, 3]]
    pts = np.stack([xs, ys, np.ones_like(xs)], axis=-1) @ m.T  # (M,4,3)
    out = np.stack([pts[..., 0].min(1), pts[..., 1].min(1), pts[..., 0].max(1), pts[..., 1].max(1)], axis=1)
    out = np.clip(out, 0, size)
    keep = ((out[:, 2] - out[:, 0]) >= min_side) & ((out[:, 3] - out[:, 1]) >= min_side)
    return out[keep].astype(np.float32)


def augment(
    image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Random geometric + intensity augmentation of a square [0,1] image and its xyxy boxes."""
    size = image.shape[0]
    m = affine_matrix(
        size,
        flip=bool(rng.random() < cfg.hflip),
        scale=float(rng.uniform(*cfg.scale)),
        shift=(float(rng.uniform(-cfg.shift, cfg.shift) * size), float(rng.uniform(-cfg.shift, cfg.shift) * size)),
        shear_deg=float(rng.uniform(-cfg.shear_deg, cfg.shear_deg)),
        rotate_deg=float(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)) if cfg.rotate_deg else 0.0,
    )
    img = warp_image(image, m)
    bx = warp_boxes(boxes, m, size)
    if rng.random() < cfg.blur_p:
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(img, sigma=float(rng.uniform(0.3, 1.2)))
    if rng.random() < cfg.noise_p:
        img = img + rng.normal(0, rng.uniform(0.005, 0.03), img.shape).astype(np.float32)
    img = np.clip(img, 0.0, 1.0) ** np.float32(rng.uniform(*cfg.gamma))
    return img.astype(np.float32), bx


# ------------------------------------------------------------------------------------------------------------


@dataclass
class DetectionDataset:
    """Items -> (CxSxS float32 normalised image, (M,4) float32 boxes in model px, global class index).

    Uses :func:`cxr_triage.models.preprocess.load_image` / ``prepare`` (letterbox) so training sees exactly the
    frame inference sees. Works with ``torch.utils.data.DataLoader`` (map-style: ``__len__``/``__getitem__``).
    ``cache`` keeps the prepared [0,1] images in memory (size^2*4 bytes each).
    """

    items: Sequence[tuple[Path, str]]
    labels: RsnaLabels
    image_size: int = 512
    channels: int = 3
    normalisation: str = "imagenet"
    augment: AugmentConfig | None = None
    seed: int = 0
    cache: bool = True
    _cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    _epoch: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def _base(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self._cache:
            return self._cache[i]
        from cxr_triage.models.preprocess import InputSpec, load_image, prepare

        path, pid = self.items[i]
        img = load_image(path)
        unit, tf = prepare(img, InputSpec(size=self.image_size, channels=1, normalisation="unit"))
        boxes = tf.to_model(self.labels.boxes.get(pid, np.zeros((0, 4), np.float32)))
        out = (unit[0], np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        if self.cache:
            self._cache[i] = out
        return out

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        from cxr_triage.models.preprocess import InputSpec, normalise

        img, boxes = self._base(i)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self._epoch, i])
            img, boxes = augment(img, boxes, rng, self.augment)
        spec = InputSpec(size=self.image_size, channels=self.channels, normalisation=self.normalisation)
        x = normalise(img, spec)
        pid = self.items[i][1]
        return np.ascontiguousarray(x, dtype=np.float32), boxes, int(self.labels.global_class.get(pid, 0))


def collate(batch: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> tuple[Any, list[Any], Any]:
    import torch

    images = torch.from_numpy(np.stack([b[0] for b in batch]))
    boxes = [torch.from_numpy(np.asarray(b[1], dtype=np.float32).reshape(-1, 4)) for b in batch]
    classes = torch.tensor([b[2] for b in batch], dtype=torch.long)
    return images, boxes, classes
