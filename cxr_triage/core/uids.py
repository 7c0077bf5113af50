"""Deterministic DICOM UIDs: the same inputs always give the same UID, so a resend is the same object."""

from __future__ import annotations

import hashlib
import uuid


def derive_uid(*parts: str) -> str:
    """A UID under the 2.25 root (UUID-derived, PS3.5 B.2) from a hash of ``parts``.

    The 2.25 form needs no registered org root and fits in 64 characters (2.25. + at most 39 digits).
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"
