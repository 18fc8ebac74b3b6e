"""C-STORE status classes of the DIMSE destination (PS3.4 B.2.3)."""

from __future__ import annotations

import pytest

from dicomgate.egress.base import Outcome
from dicomgate.egress.dimse import outcome_of_status


@pytest.mark.parametrize(
    ("code", "delivered", "retryable"),
    [
        (0x0000, True, True),
        (0xA700, False, True),
        (0xA7FF, False, True),
        (0x0210, False, True),
        (0x0110, False, True),
        (0xA900, False, False),
        (0xC000, False, False),
        (0xCFFF, False, False),
        (0x0122, False, False),
    ],
)
def test_status_classes(code: int, delivered: bool, retryable: bool) -> None:
    outcome = outcome_of_status(1, code)
    assert (outcome.delivered, outcome.retryable) == (delivered, retryable)
    if not delivered:
        assert f"0x{code:04X}" in outcome.error


@pytest.mark.parametrize("code", [0xB000, 0xB006, 0xB007])
def test_warnings_are_delivered(code: int) -> None:
    outcome = outcome_of_status(1, code, "coerced")
    assert outcome.delivered and outcome.error == ""
    assert outcome.warning.startswith(f"status 0x{code:04X}") and "coerced" in outcome.warning


def test_success_has_no_text() -> None:
    assert outcome_of_status(5, 0) == Outcome(5, True)
