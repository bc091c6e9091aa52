"""Debian's chromium for the browser tests (Playwright drives it; no browser is downloaded).

Without ``/usr/bin/chromium`` a browser test skips with the reason locally and fails under
``CI=true``, as the server tests do: CI installs the package (``.ci/run``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox"]  # CI runs as root, where chromium's sandbox refuses to start


def chromium_path() -> str:
    """The chromium to launch: skip without it, or fail under CI."""
    if not os.access(CHROMIUM, os.X_OK):
        message = f"no chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run the browser tests", pytrace=False)
        pytest.skip(message)
    return str(CHROMIUM)
