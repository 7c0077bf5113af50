"""Shared fixtures for the models tests (preprocess, registry, classifier, engines, analyzer)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


def save_xrv_checkpoint(path: Path, *, seed: int = 3) -> Path:
    """A torchxrayvision-format checkpoint (DenseNet-121 state dict with its ``op_threshs`` buffer)."""
    import torch

    from cxr_triage.models.classifier import build_classifier

    torch.manual_seed(seed)
    m = build_classifier("densenet121-xrv")
    m.op_threshs = torch.rand(18)
    torch.save(m.state_dict(), path)
    return path


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``payload`` with HTTP Range support; with ``cut_first`` the first response stops half way and the
    connection is closed (a dropped download). ``requests`` records each request's Range header."""

    payload = b""
    cut_first = False
    requests: list[str | None] = []

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        data = self.payload
        start = 0
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut_first:
            type(self).cut_first = False
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@contextmanager
def serve_bytes(payload: bytes, *, name: str = "weights.pt") -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 (free port) serving ``payload``; yields its URL."""
    RangeHandler.payload = payload
    RangeHandler.requests = []
    RangeHandler.cut_first = False
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/{name}"
    finally:
        httpd.shutdown()
        httpd.server_close()
