"""End-to-end in headless Chromium (Selenium): log in, worklist order, study viewer overlays, mark read, live
update via server-sent events. Screenshots always go to test-artifacts/ (untracked); the tracked copies in
docs/screenshots/ are refreshed only with CXR_UPDATE_SCREENSHOTS=1, so a test run leaves the tree clean."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from cxr_triage.core.settings import Settings
from cxr_triage.db import accounts, migrate
from cxr_triage.db.session import make_engine, make_session_factory
from cxr_triage.db.tables import Study
from tests.api.conftest import Clock, FakeActions, _api_settings, add_study

REPO = Path(__file__).resolve().parents[2]
DICOM = REPO.parent / "shared" / "data" / "dicom" / "siim-cr-pa-monochrome1.dcm"
ARTIFACTS = REPO / "test-artifacts"
CHROMEDRIVER = "/usr/bin/chromedriver"

# ./scripts/test installs chromium + chromium-driver; a missing browser fails here rather than skipping silently.
assert DICOM.exists(), f"shared DICOM test data missing: {DICOM}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    import uvicorn

    from cxr_triage.api.app import create_app

    data = tmp_path / "data"
    (data / "spool").mkdir(parents=True)
    (data / "models").mkdir()
    digest = hashlib.sha256(DICOM.read_bytes()).hexdigest()
    spool_name = f"{digest[:2]}/{digest}.dcm"
    (data / "spool" / digest[:2]).mkdir()
    shutil.copyfile(DICOM, data / "spool" / spool_name)
    (data / "models" / "cxr-demo.card.json").write_text(
        '{"name": "cxr-demo", "version": "cxr-demo@1", "description": "DenseNet-121 classifier + RetinaNet '
        'detector, deterministic untrained weights", "intended_use": "pipeline testing only", "demo": true}')
    url = f"sqlite:///{tmp_path / 'ui.sqlite3'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    clock = Clock()
    now = clock.now
    ids = {}
    with factory() as s:
        accounts.create_user(s, username="dr.house", password="radiologist-pw", role="radiologist")
        ids["routine"] = add_study(s, received_at=now - timedelta(minutes=50), score=0.12, flagged=False,
                                   patient_id="P100", accession="A100").id
        ids["flagged"] = add_study(
            s, received_at=now - timedelta(minutes=8), score=0.91, flagged=True, demo=True, spool_name=spool_name,
            rows=1024, columns=1024, patient_id="P200", accession="A200",
            boxes=[(560, 380, 820, 700, 0.83), (180, 420, 380, 640, 0.41)],
            heatmap=[[0.0, 0.1, 0.1, 0.0], [0.1, 0.3, 0.8, 0.2], [0.1, 0.4, 0.9, 0.3], [0.0, 0.1, 0.2, 0.1]]).id
        # The flagged study's SR: delivered to the PACS, still failing at a second destination.
        from cxr_triage.db.tables import OutboxItem, StructuredReport

        flagged_study = s.get(Study, ids["flagged"])
        built = now - timedelta(minutes=8) + timedelta(seconds=16)
        report = StructuredReport(study_pk=ids["flagged"], model_version="cxr-demo@1", revision=1,
                                  sop_instance_uid="2.25.101", series_instance_uid="2.25.102",
                                  instance_pks=[flagged_study.instances[0].id], file_name="sr.dcm", created_at=built)
        report.outbox = [
            OutboxItem(destination="PACS@pacs.internal:104", state="sent", attempts=1, next_attempt_at=built,
                       created_at=built, sent_at=built + timedelta(milliseconds=40), last_status=0),
            OutboxItem(destination="ARCHIVE@archive.internal:11112", state="pending", attempts=2,
                       next_attempt_at=now, created_at=built, last_error="association rejected"),
        ]
        s.add(report)
        s.commit()
        ids["stat"] = add_study(s, received_at=now - timedelta(minutes=2), urgency="STAT", score=0.30,
                                flagged=False, patient_id="P300", accession="A300").id
        ids["na"] = add_study(s, received_at=now - timedelta(minutes=20), state="not_analysed",
                              reasons=["not-frontal-view"], patient_id="P400", accession="A400").id
        ids["overdue"] = add_study(s, received_at=now - timedelta(minutes=250), score=0.05, flagged=False,
                                   urgency="ROUTINE", patient_id="P500", accession="A500").id
    settings = Settings(data_dir=data, _env_file=None)  # type: ignore[call-arg]
    app = create_app(settings, session_factory=factory, actions=FakeActions(), clock=clock,
                     api_settings=_api_settings(sse_poll_s=0.3))
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1,
                            lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield {"base": f"http://127.0.0.1:{port}", "factory": factory, "ids": ids, "clock": clock}
    srv.should_exit = True
    thread.join(timeout=10)
    engine.dispose()


@pytest.fixture
def driver(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1440,1000"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def _wait(fn, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception:  # noqa: BLE001 -- element not there yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def _full_page_shot(driver, name: str) -> Path:
    """Screenshot of the whole page (the study page's timings and SR delivery sit below the fold): grow the window
    to the document height, let the overlay redraw for the new size, capture, then restore the window."""
    size = driver.get_window_size()
    chrome = size["height"] - driver.execute_script("return window.innerHeight")
    for _ in range(3):  # the image grows with the viewport, which can grow the page again
        height = driver.execute_script("return document.documentElement.scrollHeight")
        if height <= driver.execute_script("return window.innerHeight"):
            break
        driver.set_window_size(size["width"], height + chrome)
        _wait(lambda: driver.execute_script(
            "var i=document.getElementById('image'), c=document.getElementById('overlay');"
            "return !i || !c || (c.width === i.clientWidth && c.height === i.clientHeight);"), what="overlay redrawn")
    path = _shot(driver, name)
    driver.set_window_size(size["width"], size["height"])
    return path


def _row_ids(driver):
    # One script call: the live update may replace the rows between two WebDriver calls.
    return [int(x) for x in driver.execute_script(
        "return Array.from(document.querySelectorAll('#worklist-body tr[data-study-id]'))"
        ".map(function (r) { return r.getAttribute('data-study-id'); });")]


def test_radiologist_flow(server, driver):
    from selenium.webdriver.common.by import By

    base, ids = server["base"], server["ids"]
    driver.get(base + "/")
    assert "/login" in driver.current_url
    driver.find_element(By.ID, "username").send_keys("dr.house")
    driver.find_element(By.ID, "password").send_keys("radiologist-pw")
    driver.find_element(By.ID, "login-submit").click()
    _wait(lambda: driver.find_elements(By.ID, "worklist-body"), what="worklist")

    expected = [ids["overdue"], ids["stat"], ids["flagged"], ids["na"], ids["routine"]]
    assert _row_ids(driver) == expected
    _wait(lambda: driver.find_element(By.ID, "live").text == "live", what="SSE connected")
    time.sleep(0.5)  # let the refresh on connect settle
    first = driver.find_element(By.CSS_SELECTOR, "#worklist-body tr").text
    assert "overdue" in first and "cap for routine" in first
    na_row = driver.find_element(By.CSS_SELECTOR, f'tr[data-study-id="{ids["na"]}"]').text
    assert "NOT ANALYSED" in na_row
    shot = _shot(driver, "worklist.png")

    # Open the flagged study.
    driver.find_element(By.CSS_SELECTOR, f'tr[data-study-id="{ids["flagged"]}"] a.study-link').click()
    _wait(lambda: driver.find_element(By.ID, "image").get_attribute("data-loaded") == "1", timeout=30,
          what="image rendered")
    canvas = driver.find_element(By.ID, "overlay")
    _wait(lambda: canvas.get_attribute("data-boxes-drawn") == "2", what="boxes drawn")
    assert "UNTRAINED DEMO MODEL" in driver.find_element(By.ID, "demo-banner").text
    assert "0.91" in driver.find_element(By.ID, "result").text
    assert len(driver.find_elements(By.CSS_SELECTOR, "#findings tbody tr")) == 2
    driver.find_element(By.ID, "toggle-heatmap").click()
    _wait(lambda: canvas.get_attribute("data-heatmap-drawn") == "1", what="heatmap drawn")
    # Pixels really are painted on the overlay.
    painted = driver.execute_script(
        "var c=document.getElementById('overlay');var d=c.getContext('2d').getImageData(0,0,c.width,c.height).data;"
        "var n=0;for(var i=3;i<d.length;i+=4){if(d[i]>0)n++;}return n;")
    assert painted > 1000
    study_shot = _full_page_shot(driver, "study.png")
    timings = driver.find_element(By.ID, "timings").text
    assert "1.0 s" in timings and "4.0 s" in timings  # per-stage durations of the seeded image
    sent = driver.find_element(By.CSS_SELECTOR, '#deliveries tr[data-destination="PACS@pacs.internal:104"]').text
    assert "sent (0x0000)" in sent and "+40 ms" in sent
    pending = driver.find_element(By.CSS_SELECTOR,
                                  '#deliveries tr[data-destination="ARCHIVE@archive.internal:11112"]').text
    assert "pending" in pending and "association rejected" in pending
    driver.find_element(By.ID, "toggle-boxes").click()
    _wait(lambda: canvas.get_attribute("data-boxes-drawn") == "0", what="boxes hidden")
    driver.find_element(By.ID, "toggle-boxes").click()

    # Mark read: back on the worklist, the study is gone.
    driver.find_element(By.ID, "mark-read").click()
    _wait(lambda: driver.current_url.rstrip("/") == base, what="back to worklist")
    _wait(lambda: ids["flagged"] not in _row_ids(driver) and len(_row_ids(driver)) == 4, what="read study removed")
    _wait(lambda: driver.find_element(By.ID, "live").text == "live", what="SSE connected again")

    # A new analysed study arrives while the page is open: it appears without reloading.
    marker = driver.execute_script("window.__noReload = 1; return 1;")
    with server["factory"]() as s:
        new_id = add_study(s, received_at=server["clock"].now, score=0.97, flagged=True, patient_id="P900",
                           accession="A900").id
    _wait(lambda: new_id in _row_ids(driver), timeout=15, what="live update")
    assert driver.execute_script("return window.__noReload") == marker  # same page, not reloaded
    assert _row_ids(driver).index(new_id) == 2  # below overdue and STAT, top of the flagged tier
    _shot(driver, "worklist-live.png")

    if os.environ.get("CXR_UPDATE_SCREENSHOTS") == "1":  # deliberately refreshing the README's pictures
        docs = REPO / "docs" / "screenshots"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, docs / "worklist.png")
        shutil.copyfile(study_shot, docs / "study.png")
