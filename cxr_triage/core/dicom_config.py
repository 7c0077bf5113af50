"""How pydicom and highdicom behave in every cxr-triage process, set once at start (:func:`configure_pydicom`).

Both libraries quote header values in their messages: pydicom's validation warnings ("Invalid value for VR DA:
'1970-01-01'"), its exceptions when a value is set under RAISE, highdicom's warnings and log lines about patient
names and its INFO lines naming SOP Instance UIDs. Header values are PHI, and they must not reach a log.

* Reading: IGNORE. Received headers are whatever modalities send; we check what we rely on ourselves (UIDs,
  sizes, the values an SR copies), and pydicom's per-value warnings would only print PHI.
* Writing: RAISE. What we write (SR, file meta) must be valid. The SR builder makes copied source values
  conformant before it sets them, so a RAISE here is a bug of ours, caught by the caller and recorded with a
  reason code, never logged with its message.
* Their loggers at CRITICAL and their warnings ignored, since both carry values.

The CLI calls this in every long-running process (listener, workers, API, `up`); the listener's ``build_ae``
calls it too, for embedded use.
"""

from __future__ import annotations

import logging
import warnings

from pydicom import config as pydicom_config

__all__ = ["configure_pydicom", "QUIET_LIBRARIES"]

QUIET_LIBRARIES = ("pydicom", "highdicom")


def configure_pydicom() -> None:
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.CRITICAL)
        # `module` is matched against the module that issued the warning (a regex from its start).
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")
