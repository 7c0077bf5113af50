from __future__ import annotations

from structlog.testing import capture_logs

from cxr_triage.core.logging import drop_phi, get_logger


def test_phi_keys_are_redacted_by_the_processor() -> None:
    event = drop_phi(None, "info", {"event": "x", "patient_name": "DOE^JANE", "instance": 3, "AccessionNumber": "A1"})
    assert event["patient_name"] == "[redacted]" and event["instance"] == 3


def test_capture_logs_of_pipeline_events_have_no_phi() -> None:
    with capture_logs(processors=[drop_phi]) as logs:
        get_logger("t").info("analysed", instance=5, patient_id="12345", sop_instance_uid="1.2.3")
    text = repr(logs)
    assert "12345" not in text and "1.2.3" not in text and "instance" in text


def test_python_warnings_reach_stderr_without_their_message() -> None:
    import subprocess
    import sys

    code = (
        "import warnings\n"
        "from cxr_triage.core.logging import configure_logging\n"
        "configure_logging()\n"
        "warnings.warn('Invalid value for VR PN: DOE^JANE')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "UserWarning" in proc.stderr and "DOE^JANE" not in proc.stderr
