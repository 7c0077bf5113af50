"""Shared fixtures for the models tests (preprocess, registry, classifier, engines, analyzer)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data"
DICOM_DIR = DATA / "dicom"
NIH_DIR = DATA / "nih-cxr14" / "images"

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
def demo_models_dir(demo_models_cache: Path) -> Path:
    """Demo models (classifier + detector): the suite-wide cache from tests/conftest.py, built once per run."""
    return demo_models_cache


def dicom(name: str) -> Path:
    return DICOM_DIR / name


def nih_pngs(n: int) -> list[Path]:
    return sorted(NIH_DIR.glob("*.png"))[:n]
