"""Settings owned by the API process (read from the environment next to core Settings; prefix ``CXR_``).

=============================  =========  ==================================================================
variable                       default    meaning
=============================  =========  ==================================================================
CXR_MAX_WAIT_STAT              15         worklist: minutes before a STAT study is promoted to "overdue"
CXR_MAX_WAIT_FLAGGED           30         ... suspected pneumonia
CXR_MAX_WAIT_HIGH              60         ... HIGH urgency
CXR_MAX_WAIT_NOT_ANALYSED      60         ... studies without an automated result
CXR_MAX_WAIT_ROUTINE           240        ... routine / medium / unknown urgency
CXR_MAX_WAIT_LOW               480        ... LOW urgency
CXR_SESSION_SECRET             (random)   key signing session cookies; random per process if unset (sessions
                                          then end at restart, and several API processes cannot share them).
                                          At least 16 characters; example placeholders ("change-me...") are
                                          refused at start. Generate one with
                                          python -c 'import secrets; print(secrets.token_urlsafe(32))'
CXR_SESSION_MAX_AGE_S          28800      session cookie lifetime
CXR_COOKIE_SECURE              false      mark the session cookie Secure (set true behind HTTPS)
CXR_SERVICE_SEES_PHI           false      whether role "service" may see/filter by patient ID / accession
CXR_METRICS_PUBLIC             false      serve /metrics without authentication
CXR_SSE_POLL_S                 1.0        how often the live worklist stream polls the database
CXR_SSE_MAX_S                  300        a stream ends after this long; the browser reconnects by itself
CXR_BROKER_QUEUES              analyze,deliver comma-separated Redis list names reported as broker queue length
=============================  =========  ==================================================================
"""

from __future__ import annotations

import re
import secrets

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cxr_triage.api.priority import PriorityPolicy
from cxr_triage.core.settings import load_validated

# Values people copy from examples and docs. Anyone who has read the example file knows them, so a cookie signed
# with one can be forged: refuse them rather than run "secured" by a published key.
_PLACEHOLDER_SECRET = re.compile(
    r"change[-_ .]?(me|this|it)|replace[-_ .]?(me|this)|your[-_ .]?secret|placeholder|example|not[-_ .]?secret"
    r"|^(secret|password|x+|0+|1234567890123456+)$",
    re.IGNORECASE,
)


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    max_wait_stat: float = Field(15, gt=0)
    max_wait_flagged: float = Field(30, gt=0)
    max_wait_high: float = Field(60, gt=0)
    max_wait_not_analysed: float = Field(60, gt=0)
    max_wait_routine: float = Field(240, gt=0)
    max_wait_low: float = Field(480, gt=0)
    session_secret: str = Field(default_factory=lambda: secrets.token_urlsafe(32), min_length=16)
    session_max_age_s: int = Field(8 * 3600, ge=60)
    cookie_secure: bool = False
    service_sees_phi: bool = False
    metrics_public: bool = False
    sse_poll_s: float = Field(1.0, gt=0, le=60)
    sse_max_s: float = Field(300, gt=0)
    # Password guessing: after this many failed sign-ins within the window, further attempts for that user name
    # (or from that address, at the higher limit) are refused without checking the password (HTTP 429).
    login_max_failures: int = Field(5, ge=1)
    login_max_failures_per_ip: int = Field(20, ge=1)
    login_failure_window_s: float = Field(900, gt=0)
    broker_queues: str = "analyze,deliver"

    @field_validator("session_secret")
    @classmethod
    def _refuse_placeholder(cls, value: str) -> str:
        if _PLACEHOLDER_SECRET.search(value.strip()):
            raise ValueError(
                "looks like the example placeholder; set a long random value, e.g. the output of "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))' (or unset it for a per-process key)"
            )
        return value

    @property
    def policy(self) -> PriorityPolicy:
        return PriorityPolicy(
            max_wait_stat=self.max_wait_stat,
            max_wait_flagged=self.max_wait_flagged,
            max_wait_high=self.max_wait_high,
            max_wait_not_analysed=self.max_wait_not_analysed,
            max_wait_routine=self.max_wait_routine,
            max_wait_low=self.max_wait_low,
        )


def load_api_settings(**overrides: object) -> ApiSettings:
    """Read and validate the API settings (one line per bad variable, never the value itself)."""
    return load_validated(ApiSettings, **overrides)
