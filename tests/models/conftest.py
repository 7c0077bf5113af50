"""Shared fixtures for the models tests (preprocess, registry, classifier, engines, analyzer)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data"
DICOM_DIR = DATA / "dicom"
NIH_DIR = DATA / "nih-cxr14" / "images"
CACHE_ROOT = Path("/tmp/cxr-triage-test-cache")

# files whose content defines the demo models: a change rebuilds them
_DEMO_INPUTS = ("demo.py", "classifier.py", "detector.py", "export.py", "registry.py", "preprocess.py")


def _demo_code_hash() -> str:
    h = hashlib.sha256()
    for name in _DEMO_INPUTS:
        p = REPO / "cxr_triage" / "models" / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"shared test data missing at {DATA.resolve()}")
    return DATA


@pytest.fixture(scope="session")
def demo_models_dir() -> Path:
    """Demo models (classifier + detector) built once per code version under /tmp/cxr-triage-test-cache."""
    from cxr_triage.models.demo import ensure_demo_models

    directory = CACHE_ROOT / f"models-demo-{_demo_code_hash()}"
    ensure_demo_models(directory)
    return directory


def dicom(name: str) -> Path:
    return DICOM_DIR / name


def nih_pngs(n: int) -> list[Path]:
    return sorted(NIH_DIR.glob("*.png"))[:n]
