"""FHIR R4 export. The implementation lives in `cxr_triage.db.results` so the CLI shares it without importing
the API package."""

from cxr_triage.db.results import to_fhir_bundle

__all__ = ["to_fhir_bundle"]
