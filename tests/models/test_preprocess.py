from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_triage.models.preprocess import (
    ImageTooLarge,
    InputSpec,
    Transform,
    UnsupportedImage,
    load_dicom,
    load_image,
    prepare,
)

from .conftest import DICOM_DIR, dicom, nih_pngs

ALL_DICOMS = sorted(DICOM_DIR.glob("*.dcm"))


def _dataset(pixels: np.ndarray, *, bits_stored: int | None = None, signed: bool = False,
             photometric: str = "MONOCHROME2", **attrs) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    samples = 3 if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("path", ALL_DICOMS, ids=lambda p: p.name)
def test_every_shared_dicom_loads(path: Path) -> None:
    img = load_image(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert img.dtype == np.float32
    assert img.shape == (ds.Rows, ds.Columns)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert float(img.std()) > 0.05  # real contrast, not a flat image


def test_png_and_jpeg_load() -> None:
    png = nih_pngs(1)[0]
    img = load_image(png)
    assert img.shape == (1024, 1024) and img.dtype == np.float32
    from PIL import Image

    ref = np.asarray(Image.open(png).convert("L"), dtype=np.float32) / 255.0
    np.testing.assert_allclose(img, ref, atol=1e-6)
    jpeg = next((DICOM_DIR / ".." / "kermany" / "NORMAL").glob("*.jpeg"))
    j = load_image(jpeg)
    assert j.ndim == 2 and 0.0 <= j.min() and j.max() <= 1.0


def test_jpeg_baseline_matches_pydicom_decoder_closely() -> None:
    ds = pydicom.dcmread(dicom("siim-cr-pa-jpeg-baseline.dcm"))
    ours = load_image(dicom("siim-cr-pa-jpeg-baseline.dcm"))
    ref = ds.pixel_array.astype(np.float32)
    ref = (ref - np.percentile(ref, 0.5)) / (np.percentile(ref, 99.5) - np.percentile(ref, 0.5))
    # IDCT implementations differ by a grey level or so; windows are estimated on a subsample
    assert np.mean(np.abs(np.clip(ref, 0, 1) - ours)) < 0.01


def test_monochrome1_file_is_the_same_pixels_and_is_inverted() -> None:
    a = pydicom.dcmread(dicom("siim-cr-pa-jpeg-baseline.dcm"))
    b = pydicom.dcmread(dicom("siim-cr-pa-monochrome1.dcm"))
    assert a.PixelData == b.PixelData  # the shared MONOCHROME1 file only relabels the photometric
    assert (a.PhotometricInterpretation, b.PhotometricInterpretation) == ("MONOCHROME2", "MONOCHROME1")
    m2 = load_image(dicom("siim-cr-pa-jpeg-baseline.dcm"))
    m1 = load_image(dicom("siim-cr-pa-monochrome1.dcm"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_true_monochrome1_equivalent_gives_the_same_image(tmp_path: Path) -> None:
    """A MONOCHROME1 object whose stored values are the inverse of a MONOCHROME2 one displays identically."""
    ds2 = pydicom.dcmread(dicom("siim-cr-pa-jpeg-baseline.dcm"))
    px = ds2.pixel_array.astype(np.uint8)
    mono2 = _save(_dataset(px), tmp_path / "m2.dcm")
    mono1 = _save(_dataset((255 - px).astype(np.uint8), photometric="MONOCHROME1"), tmp_path / "m1.dcm")
    np.testing.assert_allclose(load_image(mono1), load_image(mono2), atol=1e-3)


@pytest.mark.parametrize("bits", [8, 10, 12, 15, 16])
def test_bit_depths_and_masking(tmp_path: Path, bits: int) -> None:
    rng = np.random.default_rng(bits)
    dtype = np.uint8 if bits == 8 else np.uint16
    vals = rng.integers(0, 2**bits, size=(64, 48)).astype(dtype)
    stored = vals.copy()
    if bits < 16 and bits > 8:
        stored |= np.array(1 << 15, dtype=dtype)  # garbage in the unused high bit must be masked off
    ds = _dataset(stored, bits_stored=bits, WindowCenter=(2**bits) / 2, WindowWidth=2**bits)
    img = load_dicom(ds)
    expected = np.clip((vals.astype(np.float32) - ((2**bits) / 2 - 0.5 - (2**bits - 1) / 2)) / (2**bits - 1), 0, 1)
    np.testing.assert_allclose(img, expected, atol=1e-5)


def test_signed_rescale_and_window(tmp_path: Path) -> None:
    vals = np.array([[-2048, -1000, 0], [500, 1000, 2047]], dtype=np.int16)
    stored = (vals.astype(np.uint16) & 0x0FFF).astype(np.int16)  # 12-bit two's complement in 16 bits
    ds = _dataset(stored.view(np.uint16).astype(np.uint16).view(np.int16), bits_stored=12, signed=True,
                  RescaleSlope=2, RescaleIntercept=100, WindowCenter=100, WindowWidth=8193)
    img = load_dicom(ds)
    hu = vals.astype(np.float32) * 2 + 100
    expected = np.clip((hu - (100 - 0.5 - 4096)) / 8192, 0, 1)
    np.testing.assert_allclose(img, expected, atol=1e-5)


def test_percentile_fallback_without_window() -> None:
    vals = np.linspace(0, 4000, 100 * 100, dtype=np.float32).reshape(100, 100).astype(np.uint16)
    img = load_dicom(_dataset(vals, bits_stored=12))
    assert img.min() == 0.0 and img.max() == 1.0
    assert 0.45 < float(img.mean()) < 0.55


def test_voi_lut_sequence_applied() -> None:
    vals = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = _dataset(vals)
    item = pydicom.Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = list(range(255, -1, -1))  # inverting LUT
    ds.VOILUTSequence = pydicom.Sequence([item])
    img = load_dicom(ds)
    np.testing.assert_allclose(img, 1.0 - vals / 255.0, atol=1e-6)


def test_colour_is_converted_to_luminance() -> None:
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    img = load_dicom(_dataset(rgb, photometric="RGB"))
    np.testing.assert_allclose(img, (0.299 * 200 + 0.587 * 100) / 255.0, atol=1e-5)


def test_multi_frame_refused(tmp_path: Path) -> None:
    ds = _dataset(np.zeros((2 * 16, 16), dtype=np.uint8))
    ds.Rows = 16
    ds.NumberOfFrames = 2
    with pytest.raises(UnsupportedImage) as err:
        load_image(_save(ds, tmp_path / "mf.dcm"))
    assert err.value.reason == "multi-frame"


def test_missing_pixel_data_and_garbage(tmp_path: Path) -> None:
    ds = _dataset(np.zeros((4, 4), dtype=np.uint8))
    del ds.PixelData
    with pytest.raises(UnsupportedImage) as err:
        load_image(_save(ds, tmp_path / "nopix.dcm"))
    assert err.value.reason == "no-pixel-data"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(UnsupportedImage):
        load_image(bad)


def test_truncated_jpeg_frame_is_decode_failed(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom("siim-cr-pa-jpeg-baseline.dcm"))
    from pydicom.encaps import encapsulate, generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:200]])
    with pytest.raises(UnsupportedImage) as err:
        load_image(_save(ds, tmp_path / "trunc.dcm"))
    assert err.value.reason == "decode-failed"
    assert "PatientName" not in str(err.value)


def test_giant_dimensions_refused_before_decoding(tmp_path: Path) -> None:
    ds = _dataset(np.zeros((4, 4), dtype=np.uint16))
    ds.Rows, ds.Columns = 60000, 60000  # claims 7.2 GB; actual pixel data is 32 bytes
    path = _save(ds, tmp_path / "giant.dcm")
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge) as err:
            load_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.reason == "image-too-large"
    assert peak < 5 * 1024 * 1024
    # the limit is a parameter
    small = _save(_dataset(np.zeros((64, 64), dtype=np.uint16)), tmp_path / "small.dcm")
    with pytest.raises(ImageTooLarge):
        load_image(small, max_bytes=1000)
    assert load_image(small, max_bytes=64 * 64 * 2).shape == (64, 64)


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_prepare_and_transform_round_trip(resize: str) -> None:
    img = np.random.default_rng(0).random((300, 500), dtype=np.float32)
    x, tf = prepare(img, InputSpec(size=100, channels=1, normalisation="xrv", resize=resize))
    assert x.shape == (1, 100, 100) and x.dtype == np.float32
    assert -1024.0 <= x.min() and x.max() <= 1024.0
    if resize == "letterbox":
        assert tf.content_shape == (60, 100)
        assert np.all(x[:, 60:, :] == -1024.0)  # bottom padding is black
    boxes = np.array([[10, 20, 400, 250], [0, 0, 500, 300]], dtype=np.float32)
    np.testing.assert_allclose(tf.to_original(tf.to_model(boxes)), boxes, atol=1e-3)
    clipped = tf.to_original(np.array([[-5, -5, 150, 150]], dtype=np.float32))
    assert clipped[0, 0] == 0 and clipped[0, 1] == 0 and clipped[0, 2] == 500 and clipped[0, 3] == 300


def test_normalisations() -> None:
    img = np.full((10, 10), 0.5, dtype=np.float32)
    x, _ = prepare(img, InputSpec(10, 3, "imagenet"))
    np.testing.assert_allclose(x[:, 0, 0], (0.5 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
                               rtol=1e-5)
    u, _ = prepare(img, InputSpec(10, 3, "unit"))
    assert u.shape == (3, 10, 10) and np.allclose(u, 0.5)
    with pytest.raises(ValueError):
        InputSpec(10, 1, "imagenet")


def test_transform_is_frozen_value() -> None:
    tf = Transform(0.5, 0.5, 0, 0, (200, 200), (100, 100))
    with pytest.raises(AttributeError):
        tf.scale_x = 2  # type: ignore[misc]


# -- lossless transfer syntaxes: encoded inside the test from real radiographs, decoded bit-exactly -----------

def _native_source(name: str, crop: tuple[int, int]) -> pydicom.Dataset:
    """A real radiograph from ../shared/data as uncompressed (explicit VR LE) stored values, cropped to keep the
    encoders quick: the 15-bit MONOCHROME1 CR (from its J2K file) or the 8-bit SIIM CR (from its JPEG)."""
    from cxr_triage.models.preprocess import decode_dicom_pixels

    ds = pydicom.dcmread(dicom(name))
    pixels = np.ascontiguousarray(decode_dicom_pixels(ds)[: crop[0], : crop[1]])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW" if pixels.itemsize == 2 else "OB"
    if "LossyImageCompression" in ds:
        del ds.LossyImageCompression  # a crop of decoded pixels, re-encoded losslessly below
    return ds


def _encoded(native: pydicom.Dataset, ts: str) -> pydicom.Dataset:
    """``native`` re-encoded losslessly in transfer syntax ``ts``: RLE by pydicom's own encoder; JPEG lossless
    (process 14), JPEG-LS and JPEG 2000 by imagecodecs, encapsulated as DICOM requires."""
    import copy

    import imagecodecs
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    ds = copy.deepcopy(native)
    pixels = ds.pixel_array
    bits = int(ds.BitsStored)
    if ts == RLELossless:
        ds.compress(RLELossless)
        return ds
    if ts == "1.2.840.10008.1.2.4.70":  # JPEG Lossless, first-order prediction (process 14, selection value 1)
        frame = imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=bits)
    elif ts == "1.2.840.10008.1.2.4.57":  # JPEG Lossless, process 14, any predictor: 7 = (Ra + Rb) / 2
        frame = imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=7, bitspersample=bits)
    elif ts == "1.2.840.10008.1.2.4.80":  # JPEG-LS lossless (CharLS)
        frame = imagecodecs.jpegls_encode(pixels)
    elif ts == "1.2.840.10008.1.2.4.90":  # JPEG 2000 lossless (reversible 5/3 wavelet)
        frame = imagecodecs.jpeg2k_encode(pixels, codecformat="J2K", reversible=True, bitspersample=bits)
    else:  # pragma: no cover - parametrisation error
        raise AssertionError(ts)
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    return ds


LOSSLESS = {
    "1.2.840.10008.1.2.4.70": "imagecodecs.jpeg8",  # libjpeg-turbo: the fast JPEG-lossless path
    "1.2.840.10008.1.2.4.57": "imagecodecs.jpeg8",
    "1.2.840.10008.1.2.4.80": "imagecodecs.jpegls",
    "1.2.840.10008.1.2.5": "imagecodecs.dicomrle",
    "1.2.840.10008.1.2.4.90": "imagecodecs.jpeg2k",
}


@pytest.fixture(scope="module", params=[("wg04-cr-chest-pa-j2k-monochrome1.dcm", (1000, 900)),
                                        ("siim-cr-pa-jpeg-baseline.dcm", (1024, 1000))],
                ids=["cr-15bit-mono1", "cr-8bit"])
def native_source(request: pytest.FixtureRequest) -> pydicom.Dataset:
    return _native_source(*request.param)


@pytest.mark.parametrize("ts", sorted(LOSSLESS), ids=lambda ts: pydicom.uid.UID(ts).name)
def test_lossless_transfer_syntaxes_decode_exactly(native_source: pydicom.Dataset, ts: str,
                                                   tmp_path: Path) -> None:
    from cxr_triage.models.preprocess import decode_dicom_pixels_and_codec

    stored = native_source.pixel_array
    assert float(stored.std()) > 10  # real content, not a flat crop
    native_path = _save(native_source, tmp_path / "native.dcm")
    path = _save(_encoded(native_source, ts), tmp_path / "encoded.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ts and len(ds.PixelData) < stored.nbytes  # really compressed
    pixels, codec = decode_dicom_pixels_and_codec(ds)
    assert codec == LOSSLESS[ts]  # the fast codec, not pydicom's fallback
    assert pixels.dtype == stored.dtype and pixels.shape == stored.shape
    np.testing.assert_array_equal(pixels, stored)
    # the whole load (LUTs, MONOCHROME1 inversion) gives the uncompressed file's image exactly
    np.testing.assert_array_equal(load_image(path), load_image(native_path))
    # and the file is standard: pydicom's own decoders read the same values
    np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, stored)


def test_native_and_fallback_report_their_codec(tmp_path: Path) -> None:
    """Colour RLE is not for imagecodecs' greyscale path: pydicom decodes it, and says so."""
    from pydicom.uid import RLELossless

    from cxr_triage.models.preprocess import decode_dicom_pixels_and_codec

    rgb = np.random.default_rng(1).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    ds = _dataset(rgb, photometric="RGB")
    assert decode_dicom_pixels_and_codec(ds)[1] == "numpy"
    ds.compress(RLELossless)
    pixels, codec = decode_dicom_pixels_and_codec(pydicom.dcmread(_save(ds, tmp_path / "rgb.dcm")))
    assert codec == "pydicom"
    np.testing.assert_array_equal(pixels, rgb)
