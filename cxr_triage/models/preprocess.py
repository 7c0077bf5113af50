"""Image decoding and model-input preparation: pure functions, float32, no global state.

Two stages:

1. :func:`load_image` turns a file (DICOM, PNG or JPEG) into a float32 ``HxW`` array in ``[0, 1]`` where
   1 is bright (bone white: the MONOCHROME2 sense).  For DICOM it

   * refuses, *before any pixel data is read or decoded*, images whose
     ``Rows*Columns*frames*bytes_per_sample*samples`` exceeds ``max_bytes`` (:class:`ImageTooLarge`);
   * refuses multi-frame objects (:class:`UnsupportedImage` reason ``"multi-frame"``);
   * decodes with the fastest codec for the transfer syntax (imagecodecs: libjpeg-turbo for JPEG
     baseline/extended/lossless, OpenJPEG for JPEG 2000, CharLS for JPEG-LS, its DICOM RLE decoder for
     greyscale RLE Lossless; numpy for native) and falls back to pydicom's own pixel handlers (pylibjpeg /
     Pillow / RLE) when imagecodecs cannot (:func:`decode_dicom_pixels_and_codec` says which one did);
   * masks / sign-extends ``BitsStored`` inside ``BitsAllocated``, applies the Modality LUT (rescale slope /
     intercept or a Modality LUT sequence), then the VOI LUT sequence or the first WindowCenter/WindowWidth
     (LINEAR, LINEAR_EXACT or SIGMOID), falling back to a robust 0.5..99.5 percentile window, and inverts
     MONOCHROME1 -- all in float32 numpy;
   * converts colour (RGB, YBR_*) to luminance.

   Every error is a :class:`ValueError` subclass with a short ``reason`` code and a message free of PHI
   (never a header value other than sizes / transfer syntax UIDs).

2. :func:`prepare` resizes an image for a model according to an :class:`InputSpec` and normalises it, returning
   the ``CxHxW`` float32 array and the :class:`Transform` that maps boxes between model and original pixels.

   Resize policy ``"letterbox"``: keep the aspect ratio, scale the longer side to ``size`` and pad the
   **bottom / right** with black (value 0 before normalisation), so the image content starts at model pixel
   (0, 0).  Policy ``"stretch"``: scale each axis independently to ``size``.  Resampling is PIL's float32 ("F")
   BILINEAR, which widens its kernel when reducing, so a 1024->224 reduction is anti-aliased (area-like).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ImageError",
    "ImageTooLarge",
    "UnsupportedImage",
    "InputSpec",
    "Transform",
    "load_image",
    "load_dicom",
    "dicom_to_float",
    "decode_dicom_pixels",
    "decode_dicom_pixels_and_codec",
    "prepare",
    "normalise",
    "NORMALISATIONS",
    "RESIZE_POLICIES",
]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
NORMALISATIONS = ("xrv", "imagenet", "unit")
RESIZE_POLICIES = ("letterbox", "stretch")

# Transfer syntaxes
_NATIVE = {
    "1.2.840.10008.1.2",  # implicit VR LE
    "1.2.840.10008.1.2.1",  # explicit VR LE
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR LE (pydicom inflates on read)
    "1.2.840.10008.1.2.2",  # explicit VR BE (retired)
}
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_JPEG_8_12 = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}
_JPEG_LOSSLESS = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
_JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_RLE = "1.2.840.10008.1.2.5"
_J2K = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}


class ImageError(ValueError):
    """Base class: the image cannot be analysed. ``reason`` is a short machine-readable code."""

    reason: str = "unsupported"

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or reason)


class ImageTooLarge(ImageError):
    """Declared pixel size exceeds the limit (raised before decoding)."""

    def __init__(self, declared_bytes: int, max_bytes: int) -> None:
        self.declared_bytes = declared_bytes
        self.max_bytes = max_bytes
        super().__init__(
            "image-too-large",
            f"image-too-large: declared pixel data {declared_bytes} bytes exceeds the limit of {max_bytes} bytes",
        )


class UnsupportedImage(ImageError):
    """Not a single-frame greyscale/colour image we can decode. Reasons include
    ``multi-frame``, ``no-pixel-data``, ``decode-failed``, ``missing-attributes``, ``unsupported-format``."""


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def load_image(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Read a DICOM, PNG or JPEG file -> float32 HxW in [0, 1], 1 = bright.

    DICOM is recognised by its ``DICM`` preamble (or a ``.dcm`` suffix); anything else goes to PIL.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise UnsupportedImage("unreadable", f"unreadable: {type(exc).__name__}") from exc
    if (len(head) >= 132 and head[128:132] == b"DICM") or path.suffix.lower() in (".dcm", ".dicom"):
        return load_dicom(path, max_bytes=max_bytes)
    return _load_raster(path, max_bytes=max_bytes)


def _load_raster(path: Path, *, max_bytes: int) -> np.ndarray:
    from PIL import Image

    try:
        im = Image.open(path)  # lazy: reads the header only
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise UnsupportedImage("unsupported-format", "unsupported-format: not DICOM, PNG or JPEG") from exc
    with im:
        w, h = im.size
        bands = len(im.getbands())
        bps = 2 if im.mode.startswith("I;16") else (4 if im.mode in ("I", "F") else 1)
        declared = w * h * bands * bps
        if declared > max_bytes:
            raise ImageTooLarge(declared, max_bytes)
        if getattr(im, "n_frames", 1) > 1:
            raise UnsupportedImage("multi-frame", "multi-frame: animated / multi-page raster")
        try:
            im.load()
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedImage("decode-failed", "decode-failed: raster image") from exc
        mode = im.mode
        if mode in ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
            if mode in ("L", "LA"):
                arr = np.asarray(im.getchannel(0), dtype=np.float32)
            elif mode == "1":
                arr = np.asarray(im, dtype=np.float32)
                return arr
            else:
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
                arr = _luminance(rgb)
            return np.multiply(arr, np.float32(1.0 / 255.0), dtype=np.float32)
        if mode.startswith("I;16"):
            arr = np.asarray(im, dtype=np.float32)
            return np.multiply(arr, np.float32(1.0 / 65535.0), dtype=np.float32)
        if mode in ("I", "F"):
            arr = np.asarray(im, dtype=np.float32)
            return _percentile_window(arr)
        raise UnsupportedImage("unsupported-format", f"unsupported-format: raster mode {mode}")


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an HxWx3 float32 array."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    out = np.multiply(r, np.float32(0.299), dtype=np.float32)
    out += np.float32(0.587) * g
    out += np.float32(0.114) * b
    return out


def load_dicom(source: Any, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """DICOM file path or a pydicom Dataset -> float32 HxW in [0, 1], 1 = bright."""
    import pydicom

    if isinstance(source, (str, Path)):
        try:
            # defer_size: big elements (pixel data) are not read until accessed, i.e. after the size check
            ds = pydicom.dcmread(str(source), defer_size=1024 * 1024, force=True)
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedImage("not-dicom", "not-dicom: could not parse DICOM header") from exc
    else:
        ds = source
    check_dicom_header(ds, max_bytes=max_bytes)
    pixels = decode_dicom_pixels(ds)
    return dicom_to_float(ds, pixels)


def _int(ds: Any, keyword: str, default: int | None = None) -> int | None:
    v = ds.get(keyword, None)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def check_dicom_header(ds: Any, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Validate the header before touching pixel data. Raises ImageTooLarge / UnsupportedImage."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnsupportedImage("no-pixel-data", "no-pixel-data: dataset has no Pixel Data element")
    if "PixelData" not in ds:
        raise UnsupportedImage("unsupported-format", "unsupported-format: float pixel data")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits_alloc = _int(ds, "BitsAllocated")
    if not rows or not cols or not bits_alloc or rows < 0 or cols < 0:
        raise UnsupportedImage("missing-attributes", "missing-attributes: Rows/Columns/BitsAllocated")
    frames = max(_int(ds, "NumberOfFrames", 1) or 1, 1)
    samples = max(_int(ds, "SamplesPerPixel", 1) or 1, 1)
    declared = rows * cols * frames * samples * max(1, math.ceil(bits_alloc / 8))
    if declared > max_bytes:
        raise ImageTooLarge(declared, max_bytes)
    if frames > 1:
        raise UnsupportedImage("multi-frame", f"multi-frame: {frames} frames")
    if bits_alloc not in (1, 8, 16, 32):
        raise UnsupportedImage("unsupported-format", f"unsupported-format: BitsAllocated {bits_alloc}")


def _transfer_syntax(ds: Any) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID", None) if meta is not None else None
    return str(ts) if ts else "1.2.840.10008.1.2.1"


def decode_dicom_pixels(ds: Any) -> np.ndarray:
    """Decode the single frame of ``ds`` to its stored values: HxW (grey) or HxWx3 (colour, RGB order for
    compressed colour; native YBR stays YBR and is handled by :func:`dicom_to_float`)."""
    return decode_dicom_pixels_and_codec(ds)[0]


def decode_dicom_pixels_and_codec(ds: Any) -> tuple[np.ndarray, str]:
    """:func:`decode_dicom_pixels` plus the name of the codec that decoded the frame (``"numpy"``,
    ``"imagecodecs.jpeg8"`` (libjpeg-turbo), ``"imagecodecs.ljpeg"``, ``"imagecodecs.jpeg2k"`` (OpenJPEG),
    ``"imagecodecs.jpegls"`` (CharLS), ``"imagecodecs.dicomrle"`` or ``"pydicom"``, the slow fallback), so a
    test or benchmark can tell the fast path from the fallback."""
    ts = _transfer_syntax(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = _int(ds, "SamplesPerPixel", 1) or 1
    expected = (rows, cols) if samples == 1 else (rows, cols, samples)
    try:
        if ts in _NATIVE:
            arr, codec = _decode_native(ds, ts, rows, cols, samples), "numpy"
        else:
            arr, codec = _decode_encapsulated(ds, ts, expected)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - codecs raise their own types
        raise UnsupportedImage("decode-failed", f"decode-failed: transfer syntax {ts}") from exc
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.shape != expected:
        raise UnsupportedImage("decode-failed", f"decode-failed: decoded shape {arr.shape} != header {expected}")
    return arr, codec


def _decode_native(ds: Any, ts: str, rows: int, cols: int, samples: int) -> np.ndarray:
    bits_alloc = int(ds.BitsAllocated)
    signed = (_int(ds, "PixelRepresentation", 0) or 0) == 1
    if bits_alloc == 1:
        return np.asarray(ds.pixel_array)
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_alloc // 8}")
    dtype = dtype.newbyteorder(">" if ts == _BIG_ENDIAN else "<")
    raw = ds.PixelData
    n = rows * cols * samples
    if len(raw) < n * dtype.itemsize:
        raise UnsupportedImage("decode-failed", "decode-failed: pixel data shorter than declared")
    arr = np.frombuffer(raw, dtype=dtype, count=n)
    if samples > 1:
        planar = (_int(ds, "PlanarConfiguration", 0) or 0) == 1
        arr = arr.reshape(samples, rows, cols).transpose(1, 2, 0) if planar else arr.reshape(rows, cols, samples)
    else:
        arr = arr.reshape(rows, cols)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _rle_decoder(ds: Any, rows: int, cols: int) -> Any:
    """imagecodecs' DICOM RLE decoder for one greyscale frame (40x pydicom's numpy RLE handler on a 16-bit CR).
    It returns the segments reassembled as little-endian bytes; colour (one segment set per sample, planar) is
    left to pydicom."""
    import imagecodecs

    bits_alloc = _int(ds, "BitsAllocated", 0) or 0
    if (_int(ds, "SamplesPerPixel", 1) or 1) != 1 or bits_alloc not in (8, 16, 32):
        return None
    signed = (_int(ds, "PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_alloc // 8}")

    def decode(frame: bytes) -> np.ndarray:
        raw = imagecodecs.dicomrle_decode(frame, dtype)
        return np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols).astype(dtype.newbyteorder("="))

    return decode


def _decode_encapsulated(ds: Any, ts: str, expected: tuple[int, ...]) -> tuple[np.ndarray, str]:
    import imagecodecs
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedImage("decode-failed", f"decode-failed: bad encapsulation, {ts}") from exc
    attempts: list[tuple[str, Any]] = []
    if ts in _JPEG_8_12 or ts in _JPEG_LOSSLESS:
        # libjpeg-turbo (>= 3.0) decodes lossless JPEG (process 14) itself, 2-16 bit, and is the fastest here
        attempts = [("imagecodecs.jpeg8", imagecodecs.jpeg8_decode), ("imagecodecs.ljpeg", imagecodecs.ljpeg_decode)]
    elif ts in _J2K:
        attempts = [("imagecodecs.jpeg2k", imagecodecs.jpeg2k_decode)]
    elif ts in _JPEG_LS:
        attempts = [("imagecodecs.jpegls", imagecodecs.jpegls_decode)]
    elif ts == _RLE:
        rle = _rle_decoder(ds, *expected[:2])
        attempts = [("imagecodecs.dicomrle", rle)] if rle is not None else []
    for name, fn in attempts:
        try:
            arr = np.asarray(fn(frame))
        except Exception:  # noqa: BLE001 - try the next codec
            continue
        squeezed = arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
        # A codec that "succeeds" with another shape did not understand the stream (liblj92 returns an empty
        # array for JPEG-LS data): try the next one rather than fail on the shape check.
        if squeezed.shape == expected:
            return arr, name
    # Fallback: pydicom's pixel handlers (pylibjpeg, Pillow, RLE ...)
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedImage("decode-failed", f"decode-failed: transfer syntax {ts}") from exc
    return arr, "pydicom"


def _apply_lut(x: np.ndarray, descriptor: Any, data: Any, bits_hint: int) -> tuple[np.ndarray, int]:
    n, first, bits = (int(v) for v in descriptor)
    n = n or 65536
    if isinstance(data, (bytes, bytearray)):
        lut = np.frombuffer(data, dtype="<u2" if bits > 8 or len(data) >= 2 * n else "u1")[:n]
    else:
        lut = np.asarray(data)
    lut = lut.astype(np.float32)
    idx = np.clip(np.rint(x - first), 0, len(lut) - 1).astype(np.intp)
    return lut[idx], bits or bits_hint


def dicom_to_float(ds: Any, stored: np.ndarray) -> np.ndarray:
    """Stored values -> float32 HxW in [0, 1] (1 = bright) using the header's LUT pipeline."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits_alloc = _int(ds, "BitsAllocated", 16) or 16
    bits_stored = _int(ds, "BitsStored", bits_alloc) or bits_alloc
    signed = (_int(ds, "PixelRepresentation", 0) or 0) == 1

    if stored.ndim == 3:  # colour: luminance, and analyse as greyscale
        x = stored.astype(np.float32)
        if photometric in ("YBR_FULL", "YBR_FULL_422") and _transfer_syntax(ds) in _NATIVE:
            y = x[..., 0].copy()  # luma is stored directly
        else:
            y = _luminance(x)
        maxval = float((1 << min(bits_stored, 16)) - 1)
        return np.clip(y * np.float32(1.0 / maxval), 0, 1).astype(np.float32, copy=False)

    arr = stored
    # Mask / sign-extend BitsStored inside BitsAllocated (only integer storage)
    if arr.dtype.kind in "ui" and bits_stored < arr.dtype.itemsize * 8:
        width = arr.dtype.itemsize * 8
        if signed:
            sdt = np.dtype(f"i{arr.dtype.itemsize}")
            shift = width - bits_stored
            arr = (arr.astype(sdt, copy=False) << shift) >> shift
        else:
            mask = (1 << bits_stored) - 1
            if arr.dtype.kind == "u" and int(arr.max(initial=0)) > mask:
                arr = arr & np.array(mask, dtype=arr.dtype)
    x = arr.astype(np.float32)

    # Modality LUT
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        item = ds.ModalityLUTSequence[0]
        x, _ = _apply_lut(x, item.LUTDescriptor, item.LUTData, bits_stored)
    else:
        slope = _float(ds.get("RescaleSlope", None), 1.0)
        intercept = _float(ds.get("RescaleIntercept", None), 0.0)
        if slope != 1.0:
            x *= np.float32(slope)
        if intercept != 0.0:
            x += np.float32(intercept)

    # VOI LUT
    out: np.ndarray | None = None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        try:
            y, bits = _apply_lut(x, item.LUTDescriptor, item.LUTData, bits_stored)
            out = y * np.float32(1.0 / float((1 << bits) - 1))
        except Exception:  # noqa: BLE001 - a broken VOI LUT falls back to windowing
            out = None
    if out is None:
        center = _first(ds.get("WindowCenter", None))
        width = _first(ds.get("WindowWidth", None))
        if center is not None and width is not None and width >= 1.0:
            function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
            out = _window(x, center, width, function)
    if out is None:
        out = _percentile_window(x)
    out = np.clip(out, 0.0, 1.0, out=out)
    if photometric == "MONOCHROME1":
        out = np.subtract(np.float32(1.0), out, dtype=np.float32)
    return out.astype(np.float32, copy=False)


def _float(v: Any, default: float) -> float:
    try:
        return float(v) if v is not None and v != "" else default
    except (TypeError, ValueError):
        return default


def _first(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        if isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and not isinstance(v, (str, bytes))):
            v = list(v)[0]
        return float(v)
    except (TypeError, ValueError, IndexError):
        return None


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1], float32."""
    if function == "SIGMOID":
        z = (x - np.float32(center)) * np.float32(-4.0 / width)
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(z))).astype(np.float32, copy=False)
    if function == "LINEAR_EXACT":
        lo, span = center - width / 2.0, width
    else:  # LINEAR
        lo, span = center - 0.5 - (width - 1.0) / 2.0, width - 1.0
    if span <= 0:
        span = 1.0
    return (x - np.float32(lo)) * np.float32(1.0 / span)


def _percentile_window(x: np.ndarray) -> np.ndarray:
    """Robust window: 0.5..99.5 percentiles (estimated on a strided subsample for speed)."""
    step = max(1, int(math.sqrt(x.size / 250_000)))
    sample = x[::step, ::step] if x.ndim == 2 else x.reshape(-1)[::step]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    lo, hi = float(lo), float(hi)
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise UnsupportedImage("decode-failed", "decode-failed: non-finite pixel values")
    if hi - lo < 1e-6:
        return np.zeros_like(x, dtype=np.float32)
    out = (x.astype(np.float32, copy=False) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


# ----------------------------------------------------------------------------------------------------------
# Model input preparation
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: square ``size`` px, ``channels``, ``normalisation`` in NORMALISATIONS and
    ``resize`` in RESIZE_POLICIES."""

    size: int
    channels: int
    normalisation: str
    resize: str = "letterbox"

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError("InputSpec.size must be positive")
        if self.channels not in (1, 3):
            raise ValueError("InputSpec.channels must be 1 or 3")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"InputSpec.normalisation must be one of {NORMALISATIONS}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"InputSpec.resize must be one of {RESIZE_POLICIES}")
        if self.normalisation == "imagenet" and self.channels != 3:
            raise ValueError("imagenet normalisation needs 3 channels")

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "channels": self.channels, "normalisation": self.normalisation, "resize": self.resize}


@dataclass(frozen=True)
class Transform:
    """Affine per-axis map ``model = original * scale + offset`` (x = column, y = row).

    ``original_shape`` and ``model_shape`` are (rows, cols). ``content_shape`` is the (rows, cols) region of the
    model image covered by the original image (the rest is letterbox padding).
    """

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    original_shape: tuple[int, int]
    model_shape: tuple[int, int]

    @property
    def content_shape(self) -> tuple[int, int]:
        return (
            int(round(self.original_shape[0] * self.scale_y)),
            int(round(self.original_shape[1] * self.scale_x)),
        )

    def _as_boxes(self, boxes: np.ndarray) -> np.ndarray:
        b = np.asarray(boxes, dtype=np.float32)
        if b.size == 0:
            return b.reshape(0, 4)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError("boxes must be an array of shape (K, 4) xyxy")
        return b

    def to_model(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        b = self._as_boxes(boxes_xyxy).copy()
        b[:, [0, 2]] = b[:, [0, 2]] * self.scale_x + self.offset_x
        b[:, [1, 3]] = b[:, [1, 3]] * self.scale_y + self.offset_y
        return b

    def to_original(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Model xyxy -> original pixel xyxy, clipped to [0, cols] x [0, rows]."""
        b = self._as_boxes(boxes_xyxy).copy()
        b[:, [0, 2]] = (b[:, [0, 2]] - self.offset_x) / self.scale_x
        b[:, [1, 3]] = (b[:, [1, 3]] - self.offset_y) / self.scale_y
        rows, cols = self.original_shape
        b[:, 0] = np.clip(b[:, 0], 0.0, cols)
        b[:, 2] = np.clip(b[:, 2], 0.0, cols)
        b[:, 1] = np.clip(b[:, 1], 0.0, rows)
        b[:, 3] = np.clip(b[:, 3], 0.0, rows)
        return b

    def crop_to_content(self, grid: np.ndarray) -> np.ndarray:
        """Crop a coarse map over the model image (e.g. a 7x7 CAM) to the part covering the original image."""
        gh, gw = grid.shape[-2:]
        mh, mw = self.model_shape
        ch, cw = self.content_shape
        y0 = int(math.floor(self.offset_y / mh * gh))
        x0 = int(math.floor(self.offset_x / mw * gw))
        y1 = max(y0 + 1, int(math.ceil((self.offset_y + ch) / mh * gh)))
        x1 = max(x0 + 1, int(math.ceil((self.offset_x + cw) / mw * gw)))
        return grid[..., y0:y1, x0:x1]


def _resize(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    from PIL import Image

    if image.shape == (rows, cols):
        return image.astype(np.float32, copy=True)
    im = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    return np.asarray(im.resize((cols, rows), resample=Image.Resampling.BILINEAR), dtype=np.float32)


def normalise(image01: np.ndarray, spec: InputSpec) -> np.ndarray:
    """HxW float32 in [0, 1] -> CxHxW float32 per ``spec.normalisation``."""
    x = image01.astype(np.float32, copy=False)
    if spec.normalisation == "xrv":
        y = x * np.float32(2048.0) - np.float32(1024.0)
        return np.repeat(y[None], spec.channels, axis=0) if spec.channels > 1 else y[None].copy()
    if spec.normalisation == "imagenet":
        return ((x[None] - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]).astype(np.float32)
    return np.repeat(x[None], spec.channels, axis=0).astype(np.float32, copy=False)


def prepare(image: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Transform]:
    """float32 HxW in [0, 1] -> (CxSxS float32 normalised model input, Transform)."""
    if image.ndim != 2:
        raise ValueError("prepare expects a 2-D greyscale image")
    rows, cols = image.shape
    size = spec.size
    if spec.resize == "stretch":
        new_r, new_c = size, size
    else:
        s = size / max(rows, cols)
        new_r, new_c = max(1, min(size, int(round(rows * s)))), max(1, min(size, int(round(cols * s))))
    resized = _resize(image, new_r, new_c)
    if (new_r, new_c) != (size, size):
        canvas = np.zeros((size, size), dtype=np.float32)
        canvas[:new_r, :new_c] = resized
        resized = canvas
    transform = Transform(
        scale_x=new_c / cols,
        scale_y=new_r / rows,
        offset_x=0.0,
        offset_y=0.0,
        original_shape=(rows, cols),
        model_shape=(size, size),
    )
    return np.ascontiguousarray(normalise(resized, spec)), transform
