"""One settings object per process, read from the environment (and a `.env` file), validated at start.

Every variable is prefixed ``CXR_``. Invalid values stop the process with a message that names the variable,
never with a traceback from deep inside a library.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_AE_TITLE = re.compile(r"^[\x20-\x7e]{1,16}$")
_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[A-Za-z0-9_.\-]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


class Destination(BaseModel):
    """A DICOM peer that receives our results: ``AETITLE@host:port``."""

    model_config = {"frozen": True, "extra": "forbid"}

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        match = _DESTINATION.match(text.strip())
        if not match:
            raise ValueError(f"destination {text!r} is not of the form AETITLE@host:port")
        port = int(match["port"])
        if not 0 < port < 65536:
            raise ValueError(f"destination {text!r}: port out of range")
        ae = match["ae"].strip()
        if not _AE_TITLE.match(ae) or "\\" in ae:
            raise ValueError(f"destination {text!r}: invalid AE title")
        return cls(ae_title=ae, host=match["host"].strip("[]"), port=port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Settings(BaseSettings):
    """Configuration of one cxr-triage process. See README.md for the table of variables."""

    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    data_dir: Path = Path("./var")
    ae_title: str = "CXRTRIAGE"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(11112, ge=1, le=65535)
    pacs: Annotated[tuple[Destination, ...], NoDecode] = ()
    database_url: str | None = None
    redis_url: str | None = None
    study_stable_seconds: float = Field(10.0, ge=0)
    allowed_calling_ae: Annotated[tuple[str, ...], NoDecode] = ()
    demo_models: bool = False
    api_host: str = "127.0.0.1"
    api_port: int = Field(8080, ge=1, le=65535)
    # Operational limits. Defaults suit one node; each is a documented knob.
    disk_reserve_mb: int = Field(512, ge=0)
    max_associations: int = Field(16, ge=1, le=1000)
    max_pdu_bytes: int = Field(1 << 20, ge=4096, le=64 << 20)
    max_image_bytes: int = Field(256 << 20, ge=1 << 20)
    batch_size: int = Field(8, ge=1, le=256)
    batch_wait_ms: int = Field(50, ge=0, le=10_000)
    max_attempts: int = Field(3, ge=1, le=20)
    task_time_limit_s: int = Field(300, ge=10)
    analysis_lease_s: float = Field(30.0, ge=3)  # renewed while in flight: a dead worker is noticed this fast
    engine: str = "auto"
    models_dir: Path | None = None
    # extra model catalogue for `models fetch NAME` (JSON, as <models dir>/sources.json); None: only that file
    model_sources: Path | None = None
    worker_concurrency: int = Field(1, ge=1, le=64)
    reconcile_interval_s: float = Field(30.0, gt=0)
    reconcile_batch: int = Field(500, ge=1, le=100_000)  # instances re-published per reconcile round at most
    sr_retry_max_s: float = Field(300.0, gt=0)

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        if not _AE_TITLE.match(value) or "\\" in value or not value.strip():
            raise ValueError("must be 1-16 printable ASCII characters without backslash")
        return value.strip()

    @field_validator("pacs", mode="before")
    @classmethod
    def _parse_pacs(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(Destination.parse(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("allowed_calling_ae", mode="before")
    @classmethod
    def _parse_allowed(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("engine")
    @classmethod
    def _check_engine(cls, value: str) -> str:
        allowed = {"auto", "onnxruntime", "tensorrt", "torch"}
        if value not in allowed:
            raise ValueError(f"must be one of {sorted(allowed)}")
        return value

    # Derived locations: every file we write lives under data_dir, named by us, never by a header value.
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def sr_dir(self) -> Path:
        return self.data_dir / "sr"

    @property
    def models_path(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.data_dir / "models"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def bundled_redis(self) -> bool:
        return self.redis_url is None

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'cxr-triage.sqlite3').resolve()}"

    @cached_property
    def bundled_redis_socket(self) -> Path:
        return (self.redis_dir / "redis.sock").resolve()

    @property
    def effective_redis_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        return f"redis+socket://{self.bundled_redis_socket}"


class SettingsError(SystemExit):
    """Raised with a human-readable message when the environment is invalid."""


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_validated(cls: type[SettingsT], **overrides: object) -> SettingsT:
    """Build a settings object from the environment; a validation failure stops the process with one line per
    bad variable, naming it (never a pydantic traceback, and never the value: it may be a secret with a typo)."""
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = ["invalid configuration:"]
        for err in exc.errors():
            name = "CXR_" + "_".join(str(p) for p in err["loc"][:1]).upper()
            lines.append(f"  {name}: {err['msg']}")
        raise SettingsError("\n".join(lines)) from None


def load_settings(**overrides: object) -> Settings:
    """Read and validate settings; turn a validation failure into one clear message per bad variable."""
    return load_validated(Settings, **overrides)
