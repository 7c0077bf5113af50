"""The `cxr-triage` command: the only place that wires packages together (plus supervisor.py)."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cxr_triage.core.logging import configure_logging, get_logger
from cxr_triage.core.states import StudyState
from cxr_triage.core.settings import Destination, Settings, SettingsError, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Chest radiograph triage over DICOM.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
users_app = typer.Typer(no_args_is_help=True, help="Web UI / API accounts.")
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")

try:  # the models sub-commands (import, fetch, export, build, evaluate, train)
    from cxr_triage.models.cli_models import app as models_app

    app.add_typer(models_app, name="models", help="Model weights, engines, evaluation and training.")
except ImportError as _exc:  # pragma: no cover - only when optional model deps are missing
    _MODELS_IMPORT_ERROR = _exc

log = get_logger("cxr_triage.cli")


def _process_start() -> None:
    """Every long-running process (up, listen, work, api): PHI-free logging and one pydicom configuration."""
    from cxr_triage.core.dicom_config import configure_pydicom

    configure_logging()
    configure_pydicom()


def _settings() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


def _session_factory(settings: Settings):  # type: ignore[no-untyped-def]
    from cxr_triage.db.session import make_engine, make_session_factory

    return make_session_factory(make_engine(settings.effective_database_url))


def _require_schema(settings: Settings) -> None:
    """Wait (bounded) for the database, then insist that its schema is current."""
    from tenacity import retry, stop_after_delay, wait_exponential

    from cxr_triage.db.migrate import current_revision, head_revision

    url = settings.effective_database_url

    @retry(stop=stop_after_delay(60), wait=wait_exponential(max=5), reraise=True)
    def _current() -> str | None:
        return current_revision(url)

    try:
        current = _current()
    except Exception as exc:
        typer.echo(f"database unreachable ({type(exc).__name__}); check CXR_DATABASE_URL", err=True)
        raise typer.Exit(3) from None
    if current != head_revision(url):
        typer.echo(f"database schema is at {current}, code expects {head_revision(url)}: run `cxr-triage db upgrade`", err=True)
        raise typer.Exit(3)


# ---------------------------------------------------------------------------------------------- service
@app.command()
def up() -> None:
    """Run everything on embedded defaults: bundled Redis, SQLite, listener, workers, web UI."""
    _process_start()
    settings = _settings()
    from cxr_triage.db.migrate import upgrade
    from cxr_triage.supervisor import run_up

    upgrade(settings.effective_database_url)
    if settings.demo_models:
        from cxr_triage.models.demo import ensure_demo_models

        typer.echo("preparing demo models (first start only) ...")
        ensure_demo_models(settings.models_path)
    raise typer.Exit(run_up(settings, echo=typer.echo))


@app.command()
def listen(processes: Annotated[int, typer.Option(min=1, max=64, help="Listener processes sharing the port (SO_REUSEPORT).")] = 1) -> None:
    """Run the DICOM listener (C-ECHO, C-STORE)."""
    _process_start()
    settings = _settings()
    _require_schema(settings)
    from cxr_triage.dicom_node.listener import serve

    record, publish, recorded = listener_callbacks(settings)
    typer.echo(f"listening as {settings.ae_title} on {settings.dicom_host}:{settings.dicom_port}")
    serve(settings, record=record, publish=publish, block=True, processes=processes, recorded=recorded)


def listener_callbacks(settings: Settings) -> tuple[Any, Any, Any]:
    """The listener's ``record``, ``publish`` and ``recorded`` as production wires them (database + Celery).

    ``publish`` runs on the listener's background publisher thread, after the C-STORE answer: the task, then
    the row marked QUEUED. Connections open lazily, per process (fork-safe for ``listen --processes N``).
    Also used by benchmarks/bench_receive.py, so the benchmark measures the production path.
    """
    from cxr_triage.core.contracts import ReceivedObject, RecordOutcome
    from cxr_triage.db import repo
    from cxr_triage.worker.celery_app import make_celery

    factory = _session_factory(settings)
    celery = make_celery(settings)

    def record(obj: ReceivedObject) -> RecordOutcome:
        with factory() as session:
            return repo.record_received(session, obj=obj)

    def publish(instance_id: int) -> None:
        celery.cxr_publish_analyze(instance_id)  # type: ignore[attr-defined]
        with factory() as session:
            repo.mark_queued(session, instance_ids=[instance_id], now=datetime.now(timezone.utc))
            session.commit()

    def recorded(sha256s: list[str]) -> set[str]:
        with factory() as session:
            return repo.recorded_hashes(session, sha256s=sha256s)

    return record, publish, recorded


@app.command()
def work(
    queues: Annotated[str, typer.Option(help="Comma-separated: analyze, deliver.")] = "analyze,deliver",
    beat: Annotated[bool, typer.Option(help="Also run the scheduler (tick + reconciler). Exactly one per deployment.")] = False,
    concurrency: Annotated[Optional[int], typer.Option(help="Threads; default: batch size for analyze, 4 otherwise.")] = None,
) -> None:
    """Run a Celery worker."""
    _process_start()
    settings = _settings()
    _require_schema(settings)
    from cxr_triage.worker.celery_app import make_celery
    from cxr_triage.worker.context import context_for

    celery = make_celery(settings)
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    if "analyze" in wanted:
        typer.echo("loading models ...")
        deps = context_for(celery).analysis_deps()  # load before consuming: the first image shouldn't wait
        typer.echo(f"models ready: {deps.analyzer.model_version}{' (UNTRAINED DEMO MODEL)' if deps.analyzer.demo else ''}")
    from cxr_triage.worker.watchdog import install_watchdog

    # The threads pool ignores task_time_limit; this makes an overrunning task end the process as prefork would.
    install_watchdog(celery, limit_s=settings.task_time_limit_s)
    threads = concurrency or (max(settings.batch_size, 2) if "analyze" in wanted else 4)
    argv = ["worker", "-Q", ",".join(wanted), "-P", "threads", "-c", str(threads), "--loglevel", "WARNING",
            "-n", f"{'-'.join(wanted)}@%h", "--without-gossip", "--without-mingle"]
    if beat:
        argv += ["-B", "-s", str(settings.data_dir / "celerybeat-schedule")]
    celery.worker_main(argv)


@app.command()
def api() -> None:
    """Serve the web UI and the results API."""
    _process_start()
    settings = _settings()
    _require_schema(settings)
    import uvicorn

    from cxr_triage.api.app import create_app

    fastapi_app = create_app(settings, session_factory=_session_factory(settings), actions=_admin_actions(settings))
    uvicorn.run(fastapi_app, host=settings.api_host, port=settings.api_port, log_level="warning")


def _admin_actions(settings: Settings):  # type: ignore[no-untyped-def]
    from cxr_triage.worker.admin import CeleryAdminActions
    from cxr_triage.worker.celery_app import make_celery

    return CeleryAdminActions(make_celery(settings), _session_factory(settings))


# ---------------------------------------------------------------------------------------------- db
@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Create or migrate the schema."""
    settings = _settings()
    from cxr_triage.db.migrate import current_revision, upgrade

    upgrade(settings.effective_database_url, revision)
    typer.echo(f"database at revision {current_revision(settings.effective_database_url)}")


@db_app.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Migrate the schema down to REVISION (e.g. -1)."""
    settings = _settings()
    from cxr_triage.db.migrate import current_revision, downgrade

    downgrade(settings.effective_database_url, revision)
    typer.echo(f"database at revision {current_revision(settings.effective_database_url)}")


# ---------------------------------------------------------------------------------------------- query
class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    fhir = "fhir"


def _parse_time(value: str | None, option: str) -> datetime | None:
    """ISO 8601 as the API reads it: no zone means UTC; an aware time is converted to UTC."""
    from cxr_triage.api.views import InvalidQuery, as_utc

    if value is None:
        return None
    try:
        return as_utc(datetime.fromisoformat(value))
    except (ValueError, InvalidQuery) as exc:
        raise typer.BadParameter(f"{value!r} is not a usable ISO 8601 date/time ({exc})", param_hint=option) from None


def _cli_username() -> str:
    """Who ran the command, for the audit trail: the OS user, prefixed so it can't pass for a web account."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"[:128]
    except (KeyError, OSError):  # no passwd entry / no login name (containers): still say it was the CLI
        return "cli"


@app.command()
def query(
    format: Annotated[OutputFormat, typer.Option("--format", "-f")] = OutputFormat.table,
    since: Annotated[Optional[str], typer.Option(help="Received at or after (ISO 8601; UTC if no zone).")] = None,
    until: Annotated[Optional[str], typer.Option(help="Received before (ISO 8601; UTC if no zone).")] = None,
    min_score: Annotated[Optional[float], typer.Option(min=0, max=1)] = None,
    max_score: Annotated[Optional[float], typer.Option(min=0, max=1)] = None,
    flagged: Annotated[Optional[bool], typer.Option("--flagged/--not-flagged")] = None,
    state: Annotated[Optional[StudyState], typer.Option(
        "--state", "--status", case_sensitive=False, help="Study state (the API's `state`).")] = None,
    model_version: Annotated[Optional[str], typer.Option()] = None,
    accession_number: Annotated[Optional[str], typer.Option(help="Exact accession number (PHI: audited).")] = None,
    patient_id: Annotated[Optional[str], typer.Option(help="Exact patient ID (PHI: audited).")] = None,
    include_phi: Annotated[bool, typer.Option(help="Show accession number, patient ID and name (audited).")] = False,
    limit: Annotated[int, typer.Option(
        min=1, max=100000, help="Rows; 100 like GET /api/results (the API's export defaults to 1000).")] = 100,
    offset: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """List study results: the same query, filters, order and columns as GET /api/results.

    Every run is recorded in the audit trail as user cli:<OS user> (PS3.15 A.5 Query; Export for csv/fhir).
    """
    settings = _settings()
    _require_schema(settings)
    from cxr_triage.db import accounts, repo, results

    filters = repo.ResultFilter(
        since=_parse_time(since, "--since"), until=_parse_time(until, "--until"), min_score=min_score,
        max_score=max_score, flagged=flagged, status=state.value if state else None, model_version=model_version,
        accession_number=accession_number, patient_id=patient_id,
    )
    used = {"since": since, "until": until, "min_score": min_score, "max_score": max_score, "flagged": flagged,
            "state": state, "model_version": model_version, "accession_number": accession_number,
            "patient_id": patient_id}
    with _session_factory(settings)() as session:
        studies = repo.query_studies(session, filters=filters, limit=limit, offset=offset)
        records = [results.study_record(s, include_phi=include_phi) for s in studies]
        # Audited before anything is printed: output that was shown must have a record. Filter names only, never
        # their values (they may be PHI), as the API does.
        # Like the API: a listing is a Query; a file format (CSV, FHIR) is an Export.
        exported = format in (OutputFormat.csv, OutputFormat.fhir)
        accounts.audit(session, event=accounts.EVENT_EXPORT if exported else accounts.EVENT_QUERY,
                       action="R" if exported else "E", now=datetime.now(timezone.utc),
                       username=_cli_username(),
                       detail={"filters": sorted(k for k, v in used.items() if v is not None),
                               "studies": [s.id for s in studies], "count": len(studies), "phi": include_phi,
                               "format": format.value, "via": "cli"})
        if format is OutputFormat.json:
            typer.echo(results.records_to_json(records))
        elif format is OutputFormat.csv:
            typer.echo(results.records_to_csv(records), nl=False)
        elif format is OutputFormat.fhir:
            import json

            typer.echo(json.dumps(results.to_fhir_bundle(studies, include_phi=include_phi), indent=2))
        else:
            _print_table(records)


def _print_table(records: list[dict]) -> None:  # type: ignore[type-arg]
    from rich.console import Console
    from rich.table import Table

    columns = [c for c in ("id", "received_at", "state", "pneumonia_score", "flagged", "n_images",
                           "n_analysed", "not_analysed_reasons", "model_version", "model_note",
                           "accession_number", "patient_id") if not records or c in records[0]]
    table = Table(show_lines=False)
    for column in columns:
        table.add_column(column)
    for rec in records:
        table.add_row(*(_table_cell(rec.get(c)) for c in columns))
    Console(width=200).print(table)


def _table_cell(value: object) -> str:
    """A table is for people: scores to three decimals, times to the second (json/csv keep full precision)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, str) and len(value) > 19 and value[10:11] == "T" and value[4:5] == "-":
        return value[:19].replace("T", " ") + " UTC" if value.endswith("+00:00") else value
    return str(value)


# ---------------------------------------------------------------------------------------------- send
@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(exists=True, help="Files or folders (recursed).")],
    to: Annotated[str, typer.Option("--to", help="AETITLE@host:port (default: our own listener).")] = "",
    associations: Annotated[int, typer.Option(min=1, max=32)] = 1,
    calling_ae: Annotated[str, typer.Option()] = "CXRSEND",
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """C-STORE DICOM files to an AE, like storescu."""
    settings = _settings()
    from cxr_triage.dicom_node.sender import send_paths

    try:
        destination = Destination.parse(to) if to else Destination(
            ae_title=settings.ae_title, host="127.0.0.1", port=settings.dicom_port)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    summary = send_paths(list(paths), destination, calling_ae=calling_ae, associations=associations, progress=progress)
    typer.echo(str(summary))
    if getattr(summary, "failed", 0):
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- users
@users_app.command("create")
def users_create(
    username: str,
    role: Annotated[str, typer.Option(help="radiologist | admin | service")] = "radiologist",
    password: Annotated[Optional[str], typer.Option(help="Omit to be prompted (or read from stdin).")] = None,
) -> None:
    """Create a user who can log in to the web UI."""
    settings = _settings()
    _require_schema(settings)
    from cxr_triage.db.accounts import create_user

    if password is None:
        password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else typer.prompt(
            "password", hide_input=True, confirmation_prompt=True)
    with _session_factory(settings)() as session:
        create_user(session, username=username, password=password, role=role)
        session.commit()
    typer.echo(f"user {username} created with role {role}")


@users_app.command("token")
def users_token(username: str, name: Annotated[str, typer.Option()] = "cli") -> None:
    """Create an API token for a user (printed once)."""
    settings = _settings()
    _require_schema(settings)
    from cxr_triage.db.accounts import create_token

    with _session_factory(settings)() as session:
        token = create_token(session, username=username, name=name)
        session.commit()
    typer.echo(token)


def main() -> None:
    app()
