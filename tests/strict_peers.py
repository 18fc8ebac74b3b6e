"""A test skipped because a peer tool is missing ("needs ...") FAILS instead.

`make test` installs every peer (DCMTK, dicom3tools, Orthanc + DICOMweb, HAProxy,
Chromium), so a missing one means the claim the test makes was not checked: that must not
pass as a quiet "s" in CI. A developer without the peers can set
``DICOMGATE_TEST_ALLOW_MISSING_PEERS=1`` to get the skips back. Loaded with ``-p`` from
pyproject.toml.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

ALLOW_ENV = "DICOMGATE_TEST_ALLOW_MISSING_PEERS"


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr: Any = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or os.environ.get(ALLOW_ENV) == "1":
        return
    reason = _skip_reason(report)
    if reason.startswith("needs "):
        report.outcome = "failed"
        report.longrepr = (
            f"required peer missing ({reason}); `make test` installs it, or set {ALLOW_ENV}=1"
        )
