"""`cxr-triage query` and the API give the same answers: the real command (typer's runner, in process) and
GET /api/results on the same seeded database, SQLite and PostgreSQL; plus each filter, format and the audit row."""

from __future__ import annotations

import csv
import getpass
import io
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from cxr_triage.cli import app as cli_app
from cxr_triage.db.tables_auth import AuditEvent
from tests.api.conftest import T0, add_study, auth


@pytest.fixture
def seeded(session_factory: sessionmaker[Session]) -> dict[str, int]:
    with session_factory() as s:
        return {
            "old_flagged": add_study(s, received_at=T0 - timedelta(days=2), score=0.93, flagged=True,
                                     boxes=[(1, 2, 3, 4, 0.6)], patient_id="P-1", accession="A-1").id,
            "mid": add_study(s, received_at=T0 - timedelta(hours=5), score=0.45, flagged=False, patient_id="P-2",
                             accession="A-2", model_version="cls@2").id,
            "low": add_study(s, received_at=T0 - timedelta(hours=2), score=0.05, flagged=False, patient_id="P-1",
                             accession="A-3", demo=True).id,
            "failed": add_study(s, received_at=T0 - timedelta(hours=1), state="failed", reasons=["decode-failed"],
                                patient_id="P-3", accession="A-4").id,
            "na": add_study(s, received_at=T0 - timedelta(minutes=30), state="not_analysed", reasons=["not-chest"],
                            patient_id="P-4", accession="A-5").id,
            "pending": add_study(s, received_at=T0, state="receiving", patient_id="P-5", accession="A-6").id,
        }


@pytest.fixture
def run(backend_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Invoke the real command against the test database; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)  # no stray .env from the working directory
    runner = CliRunner()
    env = {"CXR_DATABASE_URL": backend_url, "CXR_DATA_DIR": str(tmp_path / "data")}

    def invoke(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(cli_app, ["query", *args], env=env)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    return invoke


# (CLI options, the same filters as API query parameters)
CASES: list[tuple[list[str], dict[str, Any]]] = [
    ([], {}),
    (["--since", "2026-01-05T03:00:00"], {"since": "2026-01-05T03:00:00"}),
    (["--since", "2026-01-05T08:00:00+05:00"], {"since": "2026-01-05T08:00:00+05:00"}),  # = 03:00 UTC
    (["--until", "2026-01-05T07:00:00Z"], {"until": "2026-01-05T07:00:00Z"}),
    (["--since", "2026-01-04T00:00:00", "--until", "2026-01-05T07:30:00"],
     {"since": "2026-01-04T00:00:00", "until": "2026-01-05T07:30:00"}),
    (["--min-score", "0.4"], {"min_score": 0.4}),
    (["--max-score", "0.5"], {"max_score": 0.5}),
    (["--min-score", "0.04", "--max-score", "0.5"], {"min_score": 0.04, "max_score": 0.5}),
    (["--flagged"], {"flagged": "true"}),
    (["--not-flagged"], {"flagged": "false"}),
    (["--status", "failed"], {"state": "failed"}),
    (["--state", "not_analysed"], {"state": "not_analysed"}),
    (["--status", "RECEIVING"], {"state": "receiving"}),
    (["--model-version", "cls@2"], {"model_version": "cls@2"}),
    (["--patient-id", "P-1"], {"patient_id": "P-1"}),
    (["--accession-number", "A-4"], {"accession_number": "A-4"}),
    (["--patient-id", "P-1", "--not-flagged"], {"patient_id": "P-1", "flagged": "false"}),
    (["--limit", "2", "--offset", "1"], {"limit": 2, "offset": 1}),
]


def test_cli_json_equals_api_results(seeded: dict[str, int], run: Any, client: Any, users: dict[str, str]) -> None:
    rad, svc = auth(users["radiologist"]), auth(users["service"])
    non_empty = 0
    for options, params in CASES:
        code, out, err = run("--format", "json", "--include-phi", *options)
        assert code == 0, (options, err)
        api = client.get("/api/results", params=params, headers=rad)
        assert api.status_code == 200, (params, api.text)
        assert json.loads(out) == api.json()["items"], options
        non_empty += bool(api.json()["items"])
        if "--patient-id" in options or "--accession-number" in options:
            continue  # the service role may not filter by PHI (403); nothing to compare
        code, out, err = run("--format", "json", *options)
        assert code == 0, (options, err)
        assert json.loads(out) == client.get("/api/results", params=params, headers=svc).json()["items"], options
    assert non_empty >= len(CASES) - 1  # the cases really select rows


def test_each_filter_selects_the_expected_studies(seeded: dict[str, int], run: Any) -> None:
    def ids(*options: str) -> list[int]:
        code, out, err = run("--format", "json", *options)
        assert code == 0, err
        return [r["id"] for r in json.loads(out)]

    s = seeded
    newest_first = [s["pending"], s["na"], s["failed"], s["low"], s["mid"], s["old_flagged"]]
    assert ids() == newest_first
    assert ids("--since", "2026-01-05T06:00:00") == [s["pending"], s["na"], s["failed"], s["low"]]
    assert ids("--since", "2026-01-05T07:00:00+01:00") == [s["pending"], s["na"], s["failed"], s["low"]]
    assert ids("--until", "2026-01-05T07:00:00") == [s["low"], s["mid"], s["old_flagged"]]  # exclusive
    assert ids("--min-score", "0.45") == [s["mid"], s["old_flagged"]]
    assert ids("--flagged") == [s["old_flagged"]]
    assert ids("--not-flagged") == [s["low"], s["mid"]]
    assert ids("--status", "failed") == [s["failed"]]
    assert ids("--status", "not_analysed") == [s["na"]]
    assert ids("--patient-id", "P-1") == [s["low"], s["old_flagged"]]
    assert ids("--accession-number", "A-2") == [s["mid"]]


def test_invalid_filters_exit_2_with_a_clear_message(seeded: dict[str, int], run: Any) -> None:
    code, out, err = run("--status", "done")
    assert code == 2 and out == ""
    assert "--state" in err and "'done' is not one of" in err and "not_analysed" in err
    code, out, err = run("--since", "yesterday")
    assert code == 2 and "--since" in err and "'yesterday' is not a usable ISO 8601" in err
    code, out, err = run("--since", "0001-01-01T00:00:00+14:00")  # valid ISO, but before year 1 in UTC
    assert code == 2 and "out of range" in err
    code, out, err = run("--min-score", "1.5")
    assert code == 2 and "--min-score" in err


def test_csv_and_fhir_equal_the_api_export(seeded: dict[str, int], run: Any, client: Any,
                                           users: dict[str, str]) -> None:
    rad = auth(users["radiologist"])
    code, out, _ = run("--format", "csv", "--include-phi", "--not-flagged")
    assert code == 0
    api = client.get("/api/results/export", params={"format": "csv", "flagged": "false"}, headers=rad)
    assert out == api.text
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["id"]) for r in rows] == [seeded["low"], seeded["mid"]]
    assert rows[0]["patient_id"] == "P-1" and rows[0]["model_note"] == "UNTRAINED DEMO MODEL"
    code, out, _ = run("--format", "csv", "--not-flagged")
    assert code == 0 and "patient_id" not in out.splitlines()[0] and "P-1" not in out
    code, out, _ = run("--format", "fhir", "--include-phi", "--flagged")
    api = client.get("/api/results/export", params={"format": "fhir", "flagged": "true"}, headers=rad)
    assert code == 0 and json.loads(out) == api.json()


def test_table_format(seeded: dict[str, int], run: Any) -> None:
    code, out, _ = run("--format", "table", "--status", "failed")
    assert code == 0
    # rich draws the header row between heavy bars (┃) and data rows between light ones (│).
    lines = [line for line in out.splitlines() if "│" in line or "┃" in line]
    header = [c.strip() for c in re.split("[│┃]", lines[0])[1:-1]]
    assert header == ["id", "received_at", "state", "pneumonia_score", "flagged", "n_images", "n_analysed",
                      "not_analysed_reasons", "model_version", "model_note"]
    row = [c.strip() for c in re.split("[│┃]", lines[1])[1:-1]]
    assert row[0] == str(seeded["failed"]) and row[2] == "failed" and row[7] == "decode-failed"
    assert len(lines) == 2 and "P-3" not in out
    # Scores and times are rounded for reading; json keeps the full value.
    code, out, _ = run("--format", "table", "--min-score", "0")
    lines = [line for line in out.splitlines() if "│" in line]
    scores = [c.strip() for line in lines for c in re.split("│", line)[4:5]]
    assert scores and all(re.fullmatch(r"\d\.\d{3}", s) for s in scores), scores
    times = [re.split("│", line)[2].strip() for line in lines]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", t) for t in times), times
    code, out, _ = run("--include-phi", "--patient-id", "P-3")
    assert code == 0 and "accession_number" in out and "A-4" in out and "P-3" in out


def test_every_run_is_audited_with_the_returned_ids(seeded: dict[str, int], run: Any,
                                                    session_factory: sessionmaker[Session]) -> None:
    assert run("--format", "json", "--include-phi", "--patient-id", "P-1")[0] == 0
    assert run("--format", "csv", "--flagged")[0] == 0
    with session_factory() as s:
        events = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    got = [(e.event_code, e.event_name, e.action, e.username, e.detail) for e in events]
    user = f"cli:{getpass.getuser()}"
    assert got == [
        ("110112", "Query", "E", user, {"filters": ["patient_id"], "studies": [seeded["low"], seeded["old_flagged"]],
                                         "count": 2, "phi": True, "format": "json", "via": "cli"}),
        ("110106", "Export", "R", user, {"filters": ["flagged"], "studies": [seeded["old_flagged"]], "count": 1,
                                          "phi": False, "format": "csv", "via": "cli"}),
    ]
    assert "P-1" not in repr(got)
