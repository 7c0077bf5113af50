"""Error taxonomy: a worker retries RetryableError (with backoff) and never retries PermanentError."""

from __future__ import annotations


class CxrError(Exception):
    """Base class. Messages must never contain PHI or header values."""


class RetryableError(CxrError):
    """A transient failure: database busy, broker down, peer unreachable."""


class PermanentError(CxrError):
    """Retrying cannot help: a peer rejected the object, the input is invalid."""
