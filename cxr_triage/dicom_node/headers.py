"""Header-only parse of a spooled file -> :class:`ReceivedObject` fields. Never decodes (or reads) pixel data.

:func:`read_header` parses the data set up to the Pixel Data element only, then checks -- by seeking, never by
reading the value -- that the pixel data the header promises is really in the file (a defined length fits in the
file; an encapsulated value reaches its sequence delimiter). Header values such as Rows x Columns claiming
gigabytes are just numbers here: allocating for them is the worker's decision.

:func:`received_object` turns the header into a :class:`ReceivedObject`: strings stripped and clipped to the
database column sizes (``db/tables.py``), PN values converted to ``str``, the scope decision and urgency added.
UIDs are not clipped (a clipped UID is a different UID): an over-long or missing UID is a :class:`BadHeader`.

Errors carry no header values (no PHI): only which check failed.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble, _read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, UID

from cxr_triage.core.contracts import ReceivedObject
from cxr_triage.core.errors import PermanentError
from cxr_triage.dicom_node import scope

__all__ = [
    "HEADER_KEYWORDS",
    "HeaderError",
    "BadHeader",
    "UnreadableHeader",
    "TruncatedDataset",
    "Header",
    "read_header",
    "received_object",
]

# Everything routing, scope, urgency and the database need; nothing else is parsed.
HEADER_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "BodyPartExamined",
    "ViewPosition", "ViewCodeSequence", "Rows", "Columns", "PatientID", "PatientName", "PatientBirthDate",
    "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "StudyDescription", "SeriesDescription",
    "ReferringPhysicianName", "ProtocolName", "AcquisitionDeviceProcessingDescription", "InstitutionName",
    "InstitutionalDepartmentName", "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
    "PatientBreedDescription", "PatientBreedCodeSequence", "RequestedProcedurePriority",
    "RequestAttributesSequence", "ScheduledProcedureStepPriority", "CurrentPatientLocation",
    "RequestedProcedureDescription", "PerformedProcedureStepDescription", "ImageComments",
)
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"SQ", b"UC", b"UR", b"SV", b"UV"})
_MAX_INFLATED_HEADER = 32 << 20
_UNDEFINED = 0xFFFFFFFF
# Column sizes in db/tables.py.
_CLIP = {
    "patient_id": 64, "patient_name": 324, "patient_birth_date": 8, "patient_sex": 16, "accession_number": 16,
    "study_id": 16, "study_date": 8, "study_time": 16, "study_description": 64, "referring_physician_name": 324,
    "modality": 16, "body_part": 64, "view_position": 16, "calling_ae": 16, "urgency": 16,
}
_UID_MAX = 64


class HeaderError(PermanentError):
    """The object cannot be accepted as sent. Messages name the check, never a value."""


class UnreadableHeader(HeaderError):
    """The data set cannot be parsed (-> C-STORE 0xC000 "cannot understand")."""


class TruncatedDataset(HeaderError):
    """The pixel data the header announces is not all there (-> 0xC001)."""


class BadHeader(HeaderError):
    """Parsed, but a required attribute is missing or invalid (-> 0xA900 "does not match SOP class")."""


@dataclass(frozen=True)
class Header:
    dataset: Dataset
    transfer_syntax_uid: str
    has_pixel_data: bool


def _tag_int(tag: Any) -> int:
    return int(tag)


def _at_pixels(tag: Any, vr: Any, length: Any) -> bool:
    return _tag_int(tag) in _PIXEL_TAGS


def _pixel_data_complete(fp: BinaryIO, file_size: int, *, implicit: bool, little: bool) -> bool | None:
    """At the Pixel Data tag (or EOF): None when there is no pixel data; else whether its value is all there."""
    start = fp.tell()
    head = fp.read(8)
    if len(head) == 0:
        return None
    if len(head) < 8:
        return False
    endian = "<" if little else ">"
    group, element = struct.unpack(endian + "HH", head[:4])
    if ((group << 16) | element) not in _PIXEL_TAGS:
        return None
    if implicit:
        length = struct.unpack(endian + "L", head[4:8])[0]
        value_start = start + 8
    elif head[4:6] in _LONG_VRS:
        ext = fp.read(4)
        if len(ext) < 4:
            return False
        length = struct.unpack(endian + "L", ext)[0]
        value_start = start + 12
    else:
        length = struct.unpack(endian + "H", head[6:8])[0]
        value_start = start + 8
    if length != _UNDEFINED:
        return value_start + length <= file_size
    # Encapsulated: items (FFFE,E000) up to the sequence delimiter (FFFE,E0DD). Seek over each fragment.
    pos = value_start
    while True:
        fp.seek(pos)
        item = fp.read(8)
        if len(item) < 8:
            return False
        group, element, item_len = struct.unpack("<HHL", item)
        tag = (group << 16) | element
        if tag == 0xFFFEE0DD:
            return True
        if tag != 0xFFFEE000 or item_len == _UNDEFINED:
            return False
        pos += 8 + item_len
        if pos > file_size:
            return False


def read_header(path: Path | str) -> Header:
    """Parse the header of a spooled DICOM file (with file meta) without touching pixel values."""
    path = Path(path)
    file_size = path.stat().st_size
    try:
        with open(path, "rb") as fp:
            read_preamble(fp, force=False)
            meta = _read_file_meta_info(fp)
            ts = UID(str(meta.get("TransferSyntaxUID", "")).strip("\x00 "))
            if not ts:
                raise UnreadableHeader("no transfer syntax in file meta")
            if ts == DeflatedExplicitVRLittleEndian:
                # Bounded inflate: a deflate bomb cannot make us allocate more than the header budget.
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                data = inflater.decompress(fp.read(), _MAX_INFLATED_HEADER)
                buf = io.BytesIO(data)
                ds = read_dataset(buf, False, True, stop_when=_at_pixels, defer_size="1 MB")
                complete = _pixel_data_complete(buf, len(data), implicit=False, little=True)
                if complete is False and not inflater.unconsumed_tail and inflater.eof:
                    raise TruncatedDataset("pixel data shorter than announced")
                has_pixels = complete is not None
            else:
                implicit = ts.is_implicit_VR
                little = ts.is_little_endian
                ds = read_dataset(fp, implicit, little, stop_when=_at_pixels, defer_size="1 MB")
                complete = _pixel_data_complete(fp, file_size, implicit=implicit, little=little)
                if complete is False:
                    raise TruncatedDataset("pixel data shorter than announced")
                has_pixels = complete is True
            # Touch the values we need now, while the file is open (deferred reads re-open by name otherwise).
            for keyword in HEADER_KEYWORDS:
                if keyword in ds:
                    ds[keyword].value  # noqa: B018 - force the read
    except HeaderError:
        raise
    except Exception as exc:  # pydicom raises a zoo of types on malformed input
        raise UnreadableHeader(f"data set cannot be parsed ({type(exc).__name__})") from None
    return Header(dataset=ds, transfer_syntax_uid=str(ts), has_pixel_data=has_pixels)


# ------------------------------------------------------------------------------------------------ mapping
def _value(ds: Dataset, keyword: str) -> Any:
    try:
        elem = ds[keyword] if keyword in ds else None
    except Exception:
        return None
    if elem is None:
        return None
    try:
        return elem.value
    except Exception:
        return None


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).replace("\x00", "").strip()
    return text or None


def _clip(field: str, value: Any) -> str | None:
    text = _clean(value)
    if text is None:
        return None
    return text[: _CLIP[field]]


def _uid(ds: Dataset, keyword: str) -> str:
    text = _clean(_value(ds, keyword))
    if not text:
        raise BadHeader(f"missing {keyword}")
    if len(text) > _UID_MAX or not all(c.isdigit() or c == "." for c in text):
        raise BadHeader(f"invalid {keyword}")
    return text


def _int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 <= number < 2**31 else None


def received_object(
    header: Header,
    *,
    sha256: str,
    size: int,
    spool_name: str,
    calling_ae: str | None,
    received_at: datetime,
    command_priority: int | None = None,
) -> ReceivedObject:
    """Build the record of a durable object from its header. Raises :class:`BadHeader` on missing/invalid UIDs."""
    ds = header.dataset
    reason = scope.out_of_scope_reason(ds)
    return ReceivedObject(
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        sop_class_uid=_uid(ds, "SOPClassUID"),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        transfer_syntax_uid=header.transfer_syntax_uid,
        file_sha256=sha256,
        file_size=size,
        spool_name=spool_name,
        calling_ae=_clip("calling_ae", calling_ae),
        modality=_clip("modality", _value(ds, "Modality")),
        body_part=_clip("body_part", _value(ds, "BodyPartExamined")),
        view_position=_clip("view_position", _value(ds, "ViewPosition")),
        rows=_int(_value(ds, "Rows")),
        columns=_int(_value(ds, "Columns")),
        out_of_scope_reason=str(reason) if reason is not None else None,
        patient_id=_clip("patient_id", _value(ds, "PatientID")),
        patient_name=_clip("patient_name", _value(ds, "PatientName")),
        patient_birth_date=_clip("patient_birth_date", _value(ds, "PatientBirthDate")),
        patient_sex=_clip("patient_sex", _value(ds, "PatientSex")),
        accession_number=_clip("accession_number", _value(ds, "AccessionNumber")),
        study_id=_clip("study_id", _value(ds, "StudyID")),
        study_date=_clip("study_date", _value(ds, "StudyDate")),
        study_time=_clip("study_time", _value(ds, "StudyTime")),
        study_description=_clip("study_description", _value(ds, "StudyDescription")),
        referring_physician_name=_clip("referring_physician_name", _value(ds, "ReferringPhysicianName")),
        urgency=_clip("urgency", scope.urgency(ds, command_priority)),
        received_at=received_at,
    )
