"""Is a received object a human frontal chest radiograph? Decided from header values alone (pure, no I/O).

``out_of_scope_reason(header)`` returns ``None`` (analyse it) or the first :class:`NotAnalysedReason` that applies,
checked in this order:

1. NOT_HUMAN -- Patient Species Description (0010,2201) / Patient Species Code Sequence (0010,2202) present and not
   human, any Patient Breed (0010,2292)/(0010,2293) value, or a veterinary word (CANINE, FELINE, EQUINE, BOVINE,
   PORCINE, OVINE, CAPRINE, AVIAN, VETERINAR...) in the descriptive text elements. First, because a dog's lateral
   thorax is "not human" before it is "not frontal".
2. SOP_CLASS -- not CR, DX (for presentation / for processing) or Secondary Capture.
3. MODALITY -- Modality (0008,0060) not CR or DX (a Secondary Capture with Modality CR or DX is in scope: the RSNA
   challenge files are exactly that). A blank modality on a CR/DX SOP class is accepted.
4. NOT_CHEST -- Body Part Examined (0018,0015) present and not a chest term (CHEST, THORAX, LUNG, TORSO, RIB...).
   Blank is allowed: many modalities leave it empty.
5. NOT_FRONTAL -- View Position (0018,5101) lateral (LL, RL, LAT, LATERAL, ...), a lateral code in View Code
   Sequence (0054,0220), or the words LAT / LATERAL in Series Description, Protocol Name or Acquisition Device
   Processing Description (but not "bilateral" and not lateral *decubitus*, which is a frontal projection).

Multi-frame and colour images are decided later by the worker (it has to look at the pixel description anyway).

``urgency(header, command_priority=None)`` normalises what the headers say about urgency; see its docstring.
"""

from __future__ import annotations

import re
from typing import Any

from cxr_triage.core.states import NotAnalysedReason

__all__ = [
    "IN_SCOPE_SOP_CLASSES",
    "CR_IMAGE",
    "DX_PRESENTATION",
    "DX_PROCESSING",
    "SECONDARY_CAPTURE",
    "out_of_scope_reason",
    "urgency",
    "URGENCY_VALUES",
]

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
IN_SCOPE_SOP_CLASSES = frozenset({CR_IMAGE, DX_PRESENTATION, DX_PROCESSING, SECONDARY_CAPTURE})
IN_SCOPE_MODALITIES = frozenset({"CR", "DX"})

_CHEST_WORDS = ("CHEST", "THORA", "LUNG", "TORSO", "RIB", "STERN", "PECHO", "TORAX", "BRUST", "POUMON")
_LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT", "LEFT LATERAL", "RIGHT LATERAL"})
# View Code Sequence (CID 4010) codes for lateral projections: SCT and the legacy SRT codes.
_LATERAL_CODES = frozenset({"399173006", "399198007", "260521005", "R-10236", "R-10232", "R-102CD"})
_HUMAN_SPECIES = ("HOMO SAPIENS", "HUMAN")
_HUMAN_CODES = frozenset({"337915000", "L-85B00"})
_VET_RE = re.compile(
    r"\b(CANINE|CANIS|FELINE|FELIS|EQUINE|EQUUS|BOVINE|PORCINE|OVINE|CAPRINE|AVIAN|VETERINAR\w*|VET CLINIC|"
    r"DOG|PUPPY|KITTEN|HORSE|PONY)\b"
)
_LAT_WORD_RE = re.compile(r"\b(LAT|LATERAL|LATERALE|LL|RL)\b")
_DECUBITUS_RE = re.compile(r"DECUB")
_TEXT_FOR_SPECIES = (
    "StudyDescription", "SeriesDescription", "InstitutionName", "InstitutionalDepartmentName", "ProtocolName",
    "BodyPartExamined", "AcquisitionDeviceProcessingDescription", "RequestedProcedureDescription",
    "PerformedProcedureStepDescription", "ImageComments",
)
_TEXT_FOR_LATERAL = ("SeriesDescription", "ProtocolName", "AcquisitionDeviceProcessingDescription")


def _text(header: Any, keyword: str) -> str:
    value = getattr(header, keyword, None) if not isinstance(header, dict) else header.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return " ".join(str(value).upper().replace("_", " ").replace("^", " ").split())


def _items(header: Any, keyword: str) -> list[Any]:
    value = getattr(header, keyword, None) if not isinstance(header, dict) else header.get(keyword)
    if value is None:
        return []
    try:
        return list(value)
    except TypeError:
        return []


def _is_non_human(header: Any) -> bool:
    species = _text(header, "PatientSpeciesDescription")
    if species and not any(word in species for word in _HUMAN_SPECIES):
        return True
    for item in _items(header, "PatientSpeciesCodeSequence"):
        code = _text(item, "CodeValue") or _text(item, "LongCodeValue") or _text(item, "URNCodeValue")
        meaning = _text(item, "CodeMeaning")
        if code and code not in _HUMAN_CODES and not any(word in meaning for word in _HUMAN_SPECIES):
            return True
    if _text(header, "PatientBreedDescription") or _items(header, "PatientBreedCodeSequence"):
        return True
    return any(_VET_RE.search(_text(header, keyword)) for keyword in _TEXT_FOR_SPECIES)


def _is_lateral(header: Any) -> bool:
    view = _text(header, "ViewPosition")
    if view in _LATERAL_VIEWS:
        return True
    for item in _items(header, "ViewCodeSequence"):
        code = _text(item, "CodeValue")
        meaning = _text(item, "CodeMeaning")
        if code in _LATERAL_CODES or ("LATERAL" in meaning and "DECUB" not in meaning and "BILATERAL" not in meaning):
            return True
    for keyword in _TEXT_FOR_LATERAL:
        text = _text(header, keyword)
        if text and _LAT_WORD_RE.search(text) and not _DECUBITUS_RE.search(text):
            return True
    return False


def out_of_scope_reason(header: Any) -> NotAnalysedReason | None:
    """None when the object should be analysed; otherwise why not. ``header``: a pydicom Dataset (or a dict)."""
    if _is_non_human(header):
        return NotAnalysedReason.NOT_HUMAN
    sop_class = _text(header, "SOPClassUID")
    if sop_class not in IN_SCOPE_SOP_CLASSES:
        return NotAnalysedReason.SOP_CLASS
    modality = _text(header, "Modality")
    if sop_class == SECONDARY_CAPTURE:
        if modality not in IN_SCOPE_MODALITIES:
            return NotAnalysedReason.MODALITY
    elif modality and modality not in IN_SCOPE_MODALITIES:
        return NotAnalysedReason.MODALITY
    body_part = _text(header, "BodyPartExamined")
    if body_part and not any(word in body_part for word in _CHEST_WORDS):
        return NotAnalysedReason.NOT_CHEST
    if _is_lateral(header):
        return NotAnalysedReason.NOT_FRONTAL
    return None


# ------------------------------------------------------------------------------------------------ urgency
URGENCY_VALUES = ("STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW")
_ED_RE = re.compile(r"\b(ED|ER|A&E|EMERGENCY|EMERG|NOTAUFNAHME|URGENCES?)\b")
_DIMSE_PRIORITY_HIGH = 0x0001


def _priority(value: str) -> str | None:
    value = value.strip()
    return value if value in URGENCY_VALUES else None


def urgency(header: Any, command_priority: int | None = None) -> str | None:
    """Normalised urgency for the worklist, or None when the headers say nothing.

    In order, the first that gives a value:

    1. Requested Procedure Priority (0040,1003) -- CS, defined terms STAT, HIGH, ROUTINE, MEDIUM, LOW -- at the top
       level or in an item of Request Attributes Sequence (0040,0275).
    2. Scheduled Procedure Step Priority (0040,4003) -- HIGH, MEDIUM, LOW.
    3. Current Patient Location (0038,0300) naming the emergency department (ED, ER, A&E, EMERGENCY...) -> HIGH.
       Not STAT: being in the ED says where the patient is, not that the order is STAT.
    4. The C-STORE request's own Priority (0000,0700) = HIGH -> HIGH (MEDIUM/LOW say nothing: most senders
       always send MEDIUM).
    """
    found = _priority(_text(header, "RequestedProcedurePriority"))
    if found:
        return found
    for item in _items(header, "RequestAttributesSequence"):
        found = _priority(_text(item, "RequestedProcedurePriority"))
        if found:
            return found
    found = _priority(_text(header, "ScheduledProcedureStepPriority"))
    if found:
        return found
    if _ED_RE.search(_text(header, "CurrentPatientLocation")):
        return "HIGH"
    if command_priority == _DIMSE_PRIORITY_HIGH:
        return "HIGH"
    return None
