"""End-to-end coordinate mapping: real DICOM files -> load_image -> prepare (letterbox) -> detector ->
decode_detections -> Transform.to_original must land on the opacity in ORIGINAL pixels.

A tiny detector (backbone="tiny", 128 px) is trained inside the test (fixed seed, CPU, seconds) on synthetic
radiographs made of a noisy background plus one bright soft-edged ellipse ("opacity"), seen through the same
letterbox preprocessing. It is then run on DICOM files of several non-square sizes, MONOCHROME1/2 and bit
depths 8/12/16; the top box mapped back to the original frame must overlap the ellipse's box with IoU >= 0.5.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr_triage.models.detector import build_detector
from cxr_triage.models.postprocess import DetectionParams, box_iou, decode_detections
from cxr_triage.models.preprocess import InputSpec, load_image, prepare
from cxr_triage.models.train import DetectionLoss, make_optimizer, train_step

SIZE = 128
ITERATIONS = 160
SPEC = InputSpec(size=SIZE, channels=3, normalisation="imagenet", resize="letterbox")


def synth(rows: int, cols: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[0,1] image with one bright soft ellipse; returns (image, (1,4) xyxy truth box in its pixels)."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    # smooth background: low-frequency gradient + blurred noise
    from scipy.ndimage import gaussian_filter

    bg = 0.25 + 0.1 * (yy / rows) + 0.05 * np.sin(xx / cols * 6.0)
    noise = gaussian_filter(rng.normal(0, 1, (rows, cols)).astype(np.float32), sigma=max(rows, cols) / 200)
    bg = bg + 0.05 * noise / (noise.std() + 1e-6)
    rx = rng.uniform(0.08, 0.2) * cols
    ry = rng.uniform(0.08, 0.2) * rows
    cx = rng.uniform(rx + 0.02 * cols, cols - rx - 0.02 * cols)
    cy = rng.uniform(ry + 0.02 * rows, rows - ry - 0.02 * rows)
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    soft = 1.0 / (1.0 + np.exp(np.minimum((d - 1.0) / 0.06, 50.0)))  # soft edge around the nominal ellipse
    img = np.clip(bg + 0.45 * soft + 0.02 * rng.normal(0, 1, (rows, cols)), 0, 1).astype(np.float32)
    return img, np.array([[cx - rx, cy - ry, cx + rx, cy + ry]], dtype=np.float32)


def write_dicom(path, img01: np.ndarray, *, bits: int, photometric: str) -> None:
    maxval = (1 << bits) - 1
    stored = np.round(img01 * maxval).astype(np.uint16 if bits > 8 else np.uint8)
    if photometric == "MONOCHROME1":  # high stored value = dark
        stored = (maxval - stored).astype(stored.dtype)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = img01.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def trained_tiny_detector():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 spinning OpenMP threads collapse when the machine is shared
    rng = np.random.default_rng(0)
    xs, bs = [], []
    for _ in range(96):
        # original shapes with the aspect ratios of the test files and others, kept small for speed
        long_side = int(rng.integers(160, 260))
        aspect = float(rng.choice([0.75, 1.0, 1.333, 0.6, 1.6]))
        rows, cols = (long_side, int(long_side * aspect)) if aspect < 1 else (int(long_side / aspect), long_side)
        img, box = synth(rows, cols, rng)
        x, tf = prepare(img, SPEC)
        xs.append(x)
        bs.append(tf.to_model(box))
    X = torch.from_numpy(np.stack(xs))
    model = build_detector(backbone="tiny", image_size=SIZE)
    loss_fn = DetectionLoss(model, global_loss_weight=0.0, box_loss="giou")
    opt = make_optimizer(model, lr=2e-3)
    classes = torch.full((16,), 2, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for it in range(ITERATIONS):
        idx = torch.randperm(len(X), generator=g)[:16]
        train_step(model, loss_fn, opt, X[idx], [torch.from_numpy(bs[i]) for i in idx.tolist()], classes,
                   torch.device("cpu"))
    torch.set_num_threads(threads)
    return model.eval()


CASES = [
    ((600, 800), 8, "MONOCHROME2"),
    ((800, 600), 12, "MONOCHROME1"),
    ((1024, 1024), 16, "MONOCHROME2"),
    ((1024, 1024), 12, "MONOCHROME1"),
    ((2000, 1500), 16, "MONOCHROME1"),
    ((1500, 2000), 8, "MONOCHROME2"),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_box_maps_back_to_original_pixels(trained_tiny_detector, tmp_path, case):
    shape, bits, photometric = CASES[case]
    rng = np.random.default_rng(1000 + case)
    img, truth = synth(*shape, rng)
    path = tmp_path / "img.dcm"
    write_dicom(path, img, bits=bits, photometric=photometric)

    loaded = load_image(path)
    assert loaded.shape == shape
    # the opacity is bright after loading whatever the photometric interpretation
    x0, y0, x1, y1 = truth[0].astype(int)
    assert loaded[y0:y1, x0:x1].mean() > loaded.mean()

    x, tf = prepare(loaded, SPEC)
    model = trained_tiny_detector
    with torch.no_grad():
        cls, reg, _ = model(torch.from_numpy(x)[None])
    params = DetectionParams(score_threshold=0.05, nms_threshold=0.45, box_scale=1.0, max_detections=1)
    dets = decode_detections(cls[0].numpy(), reg[0].numpy(), model.anchors(), params, image_size=(SIZE, SIZE))
    assert len(dets) == 1, "no detection"
    box_orig = tf.to_original(dets[:, :4])
    iou = float(box_iou(box_orig, truth)[0, 0])
    assert iou >= 0.5, f"IoU {iou:.2f}: predicted {box_orig[0].round(1)} vs truth {truth[0].round(1)}"
    # and the truth is NOT matched by the same box read in model coordinates (the mapping matters)
    if shape != (SIZE, SIZE):
        assert float(box_iou(dets[:, :4], truth)[0, 0]) < 0.5
