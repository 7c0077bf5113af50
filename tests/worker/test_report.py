"""build_report on real spooled files and a real database (SQLite and PostgreSQL): non-conformant, non-ASCII
source headers still give a valid SR (dciodvfy) and no header value reaches a log; a permanently failing build is
recorded, not retried."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from cxr_triage.core.contracts import ReceivedObject
from cxr_triage.core.dicom_config import QUIET_LIBRARIES, configure_pydicom
from cxr_triage.core.settings import Destination, Settings
from cxr_triage.core.states import ReportFailure
from cxr_triage.db import repo
from cxr_triage.db.migrate import upgrade
from cxr_triage.db.session import make_engine, make_session_factory
from cxr_triage.db.tables import OutboxItem, StructuredReport, Study
from cxr_triage.dicom_node.headers import read_header, received_object
from cxr_triage.models.analyzer import build_analyzer
from cxr_triage.worker.context import WorkerContext
from cxr_triage.worker.pipeline import (
    AlgorithmLabel,
    ReportDeps,
    build_report,
    due_reports,
    fallback_algorithm_label,
)
from tests.databases import database
from tests.dicomize import DICOM_FILES

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
BAD_VALUES = {
    "PatientName": "Müller^Jürgen",
    "PatientID": "PID-ÆØÅ-42",
    "PatientBirthDate": "1970-01-01",  # DA is YYYYMMDD
    "PatientSex": "X",  # M, F or O
    "StudyTime": "25:61:00",
    "AccessionNumber": "ACC-ÄÖÜ-0123456789",  # SH: 16 characters at most
    "ReferringPhysicianName": "Dr\x07Bell^Ring",  # a control character
    "StudyID": "S1",
}


@pytest.fixture
def production_pydicom() -> Iterator[list[warnings.WarningMessage]]:
    """The process-wide pydicom setup of every cxr-triage process, undone afterwards; yields the warnings seen."""
    settings = pydicom_config.settings
    saved = (settings.reading_validation_mode, settings.writing_validation_mode)
    levels = {name: logging.getLogger(name).level for name in QUIET_LIBRARIES}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configure_pydicom()
        yield caught
    settings.reading_validation_mode, settings.writing_validation_mode = saved
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@dataclass
class Env:
    sessions: sessionmaker[Session]
    spool: Path
    deps: ReportDeps
    now: list[datetime]  # the pipeline's clock: now[0]

    def receive(self, path: Path, *, at: datetime = T0, model_version: str = "demo-cls@1") -> int:
        """What the listener does: spool under the content hash, record from the header, then analyse."""
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        name = f"{sha[:2]}/{sha}.dcm"
        (self.spool / sha[:2]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.spool / name)
        obj = received_object(read_header(self.spool / name), sha256=sha, size=len(data), spool_name=name,
                              calling_ae="MODALITY", received_at=at)
        with self.sessions() as s:
            iid = repo.record_received(s, obj=obj).instance_id
        result = repo.AnalysisRecord(pneumonia_probability=0.81, flagged=True, threshold=0.5, boxes=[],
                                     label_probabilities={"Pneumonia": 0.81}, heatmap=None)
        with self.sessions() as s:
            repo.save_analysis(s, instance_id=iid, model_version=model_version, demo_model=True, result=result,
                               inferred_at=at, now=at)
        return iid

    def study_of(self, iid: int) -> Study:
        from cxr_triage.db.tables import Instance

        with self.sessions() as s:
            inst = s.get(Instance, iid)
            assert inst is not None
            study = s.get(Study, inst.study_pk)
            assert study is not None
            return study


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    with database(request.param, tmp_path) as url:
        yield from _env(url, tmp_path)


def _env(url: str, tmp_path: Path) -> Iterator[Env]:
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    deps = ReportDeps(
        session_factory=sessions, spool_dir=tmp_path / "spool", sr_dir=tmp_path / "sr",
        destinations=[Destination.parse("PACS@127.0.0.1:104")], stable=timedelta(seconds=1),
        clock=lambda: now[0],
    )
    now = [T0 + timedelta(minutes=5)]
    yield Env(sessions, tmp_path / "spool", deps, now)
    engine.dispose()


def _nonconformant_source(tmp_path: Path) -> Path:
    ds = pydicom.dcmread(DICOM_FILES / "nih-dx-secondary-capture.dcm")
    with pydicom_config.disable_value_validation():  # a modality that gets it wrong, on purpose
        ds.SpecificCharacterSet = "ISO_IR 100"
        for keyword, value in BAD_VALUES.items():
            setattr(ds, keyword, value)
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        out = tmp_path / "latin1-bad-values.dcm"
        ds.save_as(out)
    raw = out.read_bytes()
    assert "Müller".encode("latin-1") in raw  # really Latin-1 on disk, not UTF-8
    return out


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy (dicom3tools) not installed; ./scripts/test installs it")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def test_nonconformant_latin1_source_gives_a_valid_sr_and_no_phi_in_logs(
    env: Env, tmp_path: Path, production_pydicom: list[warnings.WarningMessage],
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    source = _nonconformant_source(tmp_path)
    src = pydicom.dcmread(source, stop_before_pixels=True)
    caplog.set_level(logging.DEBUG)
    with capture_logs() as events:
        iid = env.receive(source)
        outbox = build_report(env.study_of(iid).id, env.deps)
    assert len(outbox) == 1
    with env.sessions() as s:
        (report,) = s.scalars(select(StructuredReport)).all()
    path = env.deps.sr_dir / report.file_name
    assert _dciodvfy_errors(path) == []

    sr = pydicom.dcmread(path)
    assert sr.SpecificCharacterSet == "ISO_IR 100"  # the source's, which encodes the names
    assert str(sr.PatientName) == "Müller^Jürgen" and sr.PatientID == "PID-ÆØÅ-42"
    for dropped in ("PatientBirthDate", "PatientSex", "StudyTime", "AccessionNumber", "ReferringPhysicianName"):
        assert str(sr.get(dropped, "")) == "", dropped
    assert sr.StudyID == "S1" and sr.StudyInstanceUID == src.StudyInstanceUID

    seen = repr(events) + caplog.text + "".join(str(w.message) for w in production_pydicom)
    out = capsys.readouterr()
    seen += out.out + out.err
    assert "report created" in repr(events)  # the pipeline's own log was captured
    for value in [*BAD_VALUES.values(), "Müller", "Jürgen", "ÆØÅ", str(src.SOPInstanceUID), str(src.StudyInstanceUID)]:
        assert value not in seen, "a header value reached the logs"


def test_utf8_is_used_when_the_source_charset_cannot_encode_the_name(
    env: Env, tmp_path: Path, production_pydicom: list[warnings.WarningMessage],
) -> None:
    ds = pydicom.dcmread(DICOM_FILES / "nih-dx-secondary-capture.dcm")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Wang^Xiǎomíng"  # not in Latin-1
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.save_as(tmp_path / "utf8.dcm")
    iid = env.receive(tmp_path / "utf8.dcm")
    assert len(build_report(env.study_of(iid).id, env.deps)) == 1
    with env.sessions() as s:
        (report,) = s.scalars(select(StructuredReport)).all()
    sr = pydicom.dcmread(env.deps.sr_dir / report.file_name)
    assert sr.SpecificCharacterSet == "ISO_IR 192" and str(sr.PatientName) == "Wang^Xiǎomíng"
    assert _dciodvfy_errors(env.deps.sr_dir / report.file_name) == []


def test_a_permanently_failing_build_is_recorded_not_retried(
    env: Env, tmp_path: Path, production_pydicom: list[warnings.WarningMessage],
) -> None:
    source = tmp_path / "good.dcm"
    ds = pydicom.dcmread(DICOM_FILES / "nih-dx-secondary-capture.dcm")
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.save_as(source)
    iid = env.receive(source)
    study_id = env.study_of(iid).id
    # The spooled file disappears (disk damage, an operator): the SR can never be built from it.
    for p in env.spool.rglob("*.dcm"):
        p.unlink()
    with capture_logs() as events:
        assert build_report(study_id, env.deps) == []
    study = env.study_of(iid)
    assert study.report_failure == ReportFailure.SOURCE_UNREADABLE
    assert any(e.get("reason") == "sr-source-unreadable" for e in events)
    # Not retried: the per-second tick no longer sees it, and another build attempt does nothing.
    assert due_reports(env.deps) == []
    assert build_report(study_id, env.deps) == []
    with env.sessions() as s:
        assert s.scalars(select(StructuredReport)).all() == [] and s.scalars(select(OutboxItem)).all() == []

    # A later image of the same study is a new input: the study is due again and its SR is built.
    late = tmp_path / "late.dcm"
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(late)
    env.receive(late, at=T0 + timedelta(minutes=6))
    env.now[0] = T0 + timedelta(minutes=10)
    assert due_reports(env.deps) == [study_id]
    assert build_report(study_id, env.deps) == []  # the first image's file is still missing: recorded again
    assert due_reports(env.deps) == []


def test_sr_names_the_algorithm_as_the_analyzer_does(
    env: Env, tmp_path: Path, demo_models_cache: Path, production_pydicom: list[warnings.WarningMessage],
) -> None:
    analyzer = build_analyzer(models_dir=demo_models_cache, demo=True, engine="onnxruntime", max_bytes=64 << 20)
    # A deliver worker: it has the model cards but loads no engines.
    settings = Settings(data_dir=tmp_path / "var", models_dir=demo_models_cache, _env_file=None)  # type: ignore[call-arg]
    ctx = WorkerContext(settings=settings, session_factory=env.sessions)
    label = ctx.algorithm_label(analyzer.model_version, True)
    assert label == AlgorithmLabel(name=analyzer.algorithm_name, version=analyzer.algorithm_version)
    assert "UNTRAINED DEMO MODEL" in label.name

    source = tmp_path / "src.dcm"
    ds = pydicom.dcmread(DICOM_FILES / "nih-dx-secondary-capture.dcm")
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.save_as(source)
    iid = env.receive(source, model_version=analyzer.model_version)
    deps = dataclasses.replace(env.deps, algorithm=ctx.algorithm_label)
    assert len(build_report(env.study_of(iid).id, deps)) == 1
    with env.sessions() as s:
        (report,) = s.scalars(select(StructuredReport)).all()
    sr = hd.sr.srread(env.deps.sr_dir / report.file_name)
    names = [str(item.TextValue) for item in _content_items(sr) if "TextValue" in item
             and item.ConceptNameCodeSequence[0].CodeMeaning in ("Algorithm Name", "Device Observer Name")]
    # Device observer and every algorithm identification say what the analyzer says (the demo mark included).
    assert names and set(names) == {analyzer.algorithm_name}, names


def _content_items(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_fallback_label_keeps_the_demo_mark_and_fits_lo() -> None:
    label = fallback_algorithm_label("x" * 100, True)
    assert label.name.startswith("UNTRAINED DEMO MODEL") and len(label.version) == 64
    assert fallback_algorithm_label("cls@1", False) == AlgorithmLabel(
        name="cxr-triage pneumonia classifier + opacity detector", version="cls@1")


def test_concurrent_writers_of_one_sr_file_never_collide(tmp_path: Path) -> None:
    """build_report and the tick run as threads of one process and may write the same SR file at once."""
    import threading

    from cxr_triage.worker.pipeline import fsync_write

    target = tmp_path / "sr" / "ab" / "report.dcm"
    payloads = [bytes([n]) * (256 << 10) for n in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(payloads))

    def writer(data: bytes) -> None:
        try:
            start.wait()
            for _ in range(10):
                fsync_write(target, data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_bytes() in payloads  # one writer's complete bytes, never a mix
    assert [p.name for p in target.parent.iterdir()] == ["report.dcm"]  # no temp files left behind


def test_a_permanent_rejection_marks_the_outbox_row_failed_and_is_not_retried(
    env: Env, tmp_path: Path, production_pydicom: list[warnings.WarningMessage],
) -> None:
    """A real PACS over a real socket (a pynetdicom SCP) answers 0xA900: the row is FAILED, never sent again."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage

    from cxr_triage.core.states import OutboxState
    from cxr_triage.dicom_node.netutil import free_port
    from cxr_triage.dicom_node.sender import StoreClient
    from cxr_triage.worker.pipeline import DeliveryDeps, deliver, due_deliveries

    requests: list[str] = []

    def refuse(event: evt.Event) -> int:
        requests.append(str(event.request.AffectedSOPInstanceUID))
        return 0xA900  # "data set does not match SOP class": a permanent failure

    port = free_port()
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(ComprehensiveSRStorage)
    server = pacs.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, refuse)])
    clients: dict[str, StoreClient] = {}
    try:
        source = tmp_path / "src.dcm"
        ds = pydicom.dcmread(DICOM_FILES / "nih-dx-secondary-capture.dcm")
        ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
        ds.save_as(source)
        iid = env.receive(source)
        report_deps = dataclasses.replace(env.deps, destinations=[Destination.parse(f"PACS@127.0.0.1:{port}")])
        (outbox_id,) = build_report(env.study_of(iid).id, report_deps)

        def client_for(destination: str) -> StoreClient:
            if destination not in clients:
                clients[destination] = StoreClient(Destination.parse(destination), calling_ae="CXRTRIAGE")
            return clients[destination]

        deps = DeliveryDeps(session_factory=env.sessions, sr_dir=env.deps.sr_dir, client_for=client_for,
                            clock=lambda: env.now[0])
        with capture_logs() as events:
            assert deliver(outbox_id, deps) == "permanent"
        with env.sessions() as s:
            item = s.get(OutboxItem, outbox_id)
            assert item is not None
            assert (item.state, item.last_status, item.attempts) == (OutboxState.FAILED, 0xA900, 1)
        assert any(e["event"] == "report rejected permanently" and e.get("status") == 0xA900 for e in events)
        # Not retried: not due now nor an hour later, and a direct attempt does nothing.
        env.now[0] += timedelta(hours=1)
        assert due_deliveries(deps) == []
        assert deliver(outbox_id, deps) == "not-due"
        with env.sessions() as s:
            (report,) = s.scalars(select(StructuredReport)).all()
        assert requests == [report.sop_instance_uid]  # the PACS saw exactly one C-STORE
    finally:
        for client in clients.values():
            client.close()
        server.shutdown()
