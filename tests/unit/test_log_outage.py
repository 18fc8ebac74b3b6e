"""observability.logging.Outage: what a retrying background task logs while it fails."""

from __future__ import annotations

import logging

import pytest

from dicomgate.errors import IndexUnavailable
from dicomgate.observability.logging import Outage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _outage(clock: Clock, **kwargs: object) -> Outage:
    return Outage(
        logging.getLogger("dicomgate.test"),
        "leasing jobs",
        "delivery.lease_error",
        "delivery.lease_recovered",
        remind=300.0,
        extra={"destination": "pacs"},
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )


def _records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, str, bool]]:
    return [
        (r.levelno, getattr(r, "event", ""), r.getMessage(), r.exc_info is not None)
        for r in caplog.records
    ]


def test_one_line_per_outage_then_reminders_then_one_recovery_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dicomgate.test")
    clock = Clock()
    outage = _outage(clock)
    outage.ok()  # nothing failed: nothing said
    for _ in range(150):  # every 2 s for 299 s
        outage.failed(IndexUnavailable("connection refused\nsecond line"))
        clock.now += 2
    lines = [r for r in _records(caplog) if r[0] > logging.DEBUG]
    assert lines == [
        (logging.ERROR, "delivery.lease_error", "leasing jobs failed: connection refused", False)
    ]
    assert outage.failing
    clock.now = 1000.0 + 300
    outage.failed(IndexUnavailable("connection refused"))
    assert _records(caplog)[-1] == (
        logging.ERROR,
        "delivery.lease_error",
        "leasing jobs still failing after 300 s (151 failures): connection refused",
        False,
    )
    clock.now += 60
    outage.ok()
    outage.ok()
    assert _records(caplog)[-1] == (
        logging.INFO,
        "delivery.lease_recovered",
        "leasing jobs: working again after 360 s (151 failures)",
        False,
    )
    assert next(r for r in caplog.records if r.levelno == logging.INFO).destination == "pacs"
    assert sum(1 for r in _records(caplog) if r[0] == logging.INFO) == 1
    assert not outage.failing and outage.failures == 0


def test_an_unexpected_error_keeps_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomgate.test")
    outage = _outage(Clock())
    for _ in range(3):
        try:
            raise KeyError("bug")
        except KeyError as exc:
            outage.failed(exc)
    assert _records(caplog) == [
        (logging.ERROR, "delivery.lease_error", "leasing jobs failed: 'bug'", True)
    ]


def test_level_and_expected_errors_are_the_caller_s(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomgate.test")
    outage = _outage(Clock(), level=logging.WARNING, expected=(OSError,))
    outage.failed(ConnectionResetError("reset by peer"))
    assert _records(caplog) == [
        (logging.WARNING, "delivery.lease_error", "leasing jobs failed: reset by peer", False)
    ]
