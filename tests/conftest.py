"""Fixtures shared by every test package."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TEST_CACHE = Path("/tmp/cxr-triage-test-cache")


def _models_code_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted((REPO / "cxr_triage" / "models").glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"test data missing: {SHARED_DATA} (the repository's ../shared/data)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_models_cache() -> Path:
    """Deterministic demo models, built once per version of the models code and reused across runs."""
    from cxr_triage.models.demo import ensure_demo_models

    directory = TEST_CACHE / f"demo-models-{_models_code_hash()}"
    ensure_demo_models(directory)
    return directory
