"""Fixtures for dicom_node tests. Invalid DICOM values fail the tests (as highdicom's own suite does)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydicom import config

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # lets `from tests.peers import ...` work under any pytest import mode
    sys.path.insert(0, str(REPO_ROOT))

DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "dicom"


@pytest.fixture(autouse=True)
def _strict_dicom_values():
    reading, writing = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    config.settings.writing_validation_mode = config.RAISE
    yield
    config.settings.reading_validation_mode, config.settings.writing_validation_mode = reading, writing


@pytest.fixture(scope="session")
def dicom_data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"shared DICOM data not found at {DATA_DIR}")
    return DATA_DIR
