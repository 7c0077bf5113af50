from __future__ import annotations

import pytest

from cxr_triage.core.settings import Destination, SettingsError, load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    for key in ("CXR_AE_TITLE", "CXR_DICOM_PORT", "CXR_PACS", "CXR_DATABASE_URL", "CXR_REDIS_URL"):
        monkeypatch.delenv(key, raising=False)
    s = load_settings()
    assert s.ae_title == "CXRTRIAGE" and s.dicom_port == 11112 and s.pacs == ()
    assert s.effective_database_url.startswith("sqlite:///") and s.bundled_redis


def test_pacs_list_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_PACS", "PACS1@10.0.0.5:104, ORTHANC@[::1]:4242")
    s = load_settings()
    assert s.pacs == (Destination(ae_title="PACS1", host="10.0.0.5", port=104), Destination(ae_title="ORTHANC", host="::1", port=4242))


@pytest.mark.parametrize(
    ("name", "value"),
    [("CXR_PACS", "nope"), ("CXR_DICOM_PORT", "70000"), ("CXR_AE_TITLE", "WAY_TOO_LONG_AE_TITLE"), ("CXR_ENGINE", "cuda")],
)
def test_invalid_values_give_a_clear_message(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert name in str(info.value)
