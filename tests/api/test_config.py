"""API settings refuse the deploy example's placeholder session secret, with a message naming the variable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_triage.api.config import load_api_settings
from cxr_triage.core.settings import SettingsError

REPO = Path(__file__).resolve().parents[2]


def _example_secret() -> str:
    text = (REPO / "deploy" / "cxr-triage.env.example").read_text()
    return re.search(r"^CXR_SESSION_SECRET=(\S+)", text, re.M).group(1)  # type: ignore[union-attr]


@pytest.mark.parametrize("value", [_example_secret(), "CHANGE_ME_PLEASE_0123456789", "replace-me-with-32-chars-0000",
                                   "your-secret-goes-here-0123", "xxxxxxxxxxxxxxxxxxxxxxxx"])
def test_placeholder_secret_is_refused(value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_api_settings(_env_file=None, session_secret=value)
    message = str(err.value)
    assert "CXR_SESSION_SECRET" in message and "placeholder" in message and "token_urlsafe" in message
    assert value not in message  # the message never echoes a secret


def test_real_and_default_secrets_are_accepted() -> None:
    assert load_api_settings(_env_file=None, session_secret="k3J9-q0PzX_7wLmN2vB8rT5yU1").session_secret
    assert len(load_api_settings(_env_file=None).session_secret) >= 32  # unset: random per process


def test_api_start_refuses_the_placeholder_with_one_clear_line(tmp_path: Path) -> None:
    """What an operator sees: `create_app` without explicit settings reads the environment and stops."""
    code = ("from cxr_triage.api.app import create_app\n"
            "from cxr_triage.core.settings import Settings\n"
            "create_app(Settings(_env_file=None), session_factory=None)\n")
    env = {"CXR_SESSION_SECRET": _example_secret(), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("invalid configuration:\n  CXR_SESSION_SECRET: "), r.stderr
