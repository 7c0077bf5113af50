"""Test helper: wrap real NIH ChestX-ray14 PNGs as DX For Presentation DICOM objects (as a modality would
send them), with UIDs derived from the file name so reruns produce the same objects."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NIH_IMAGES = SHARED_DATA / "nih-cxr14" / "images"
DICOM_FILES = SHARED_DATA / "dicom"


def nih_pngs(count: int) -> list[Path]:
    return sorted(NIH_IMAGES.glob("*.png"))[:count]


def png_to_dx(png: Path, out_dir: Path, *, study_key: str | None = None, pixels: np.ndarray | None = None) -> Path:
    """Write one DX object for a PNG. Several PNGs with the same `study_key` form one study."""
    key = study_key or png.stem
    array = np.asarray(Image.open(png).convert("L"), dtype=np.uint8) if pixels is None else pixels
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["inst", png.name, key])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_PRESENTATION
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", key])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", key])
    ds.PatientName = f"TEST^{key[:20]}"
    ds.PatientID = "P" + hashlib.sha256(key.encode()).hexdigest()[:8]
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = "A" + hashlib.sha256(key.encode()).hexdigest()[8:16]
    ds.StudyID = "1"
    ds.StudyDate = "20261122"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "cxr-triage tests"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = array.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.ImagerPixelSpacing = [0.143, 0.143]
    ds.DetectorType = "SCINTILLATOR"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelData = array.tobytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{png.stem}-{key[:12]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
