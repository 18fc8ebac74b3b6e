"""Traffic control: schedule windows, rate limiter, circuit breaker (queue/traffic.py)."""

from __future__ import annotations

from datetime import datetime

import pytest

from dicomgate.config import parse_config
from dicomgate.errors import ConfigError
from dicomgate.queue.traffic import Breaker, RateLimiter, Schedule, parse_schedule, parse_window

# 2026-11-23 is a Monday.
MON = 23


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("spec", "open_at", "closed_at"),
    [
        ("08:00-17:00", [at(MON, 8), at(MON, 16, 59)], [at(MON, 7, 59), at(MON, 17)]),
        ("20:00-06:00", [at(MON, 20), at(MON, 23, 59), at(MON + 1, 5, 59)], [at(MON, 6)]),
        ("00:00-24:00", [at(MON, 0), at(MON, 23, 59)], []),
        ("Sat,Sun", [at(MON + 5, 0), at(MON + 6, 23, 59)], [at(MON + 4, 23, 59), at(MON, 0)]),
        # a window past midnight belongs to the day it starts on: Fri night runs into Sat
        (
            "Mon-Fri 19:00-07:00",
            [at(MON, 19), at(MON + 1, 6, 59), at(MON + 5, 6, 59)],
            [at(MON, 6, 59), at(MON + 5, 19), at(MON + 6, 20)],
        ),
        ("fri-mon 10:00-11:00", [at(MON + 4, 10), at(MON + 6, 10), at(MON, 10)], [at(MON + 1, 10)]),
        ("Wednesday", [at(MON + 2, 12)], [at(MON + 1, 12)]),
    ],
)
def test_windows(spec: str, open_at: list[datetime], closed_at: list[datetime]) -> None:
    window = parse_window(spec)
    for when in open_at:
        assert window.contains(when), (spec, when)
    for when in closed_at:
        assert not window.contains(when), (spec, when)


@pytest.mark.parametrize(
    "spec",
    ["", "25:00-26:00", "08:00", "08:00-08:00", "Funday 08:00-09:00", "24:00-02:00", "8-9"],
)
def test_bad_windows(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_window(spec)


def test_schedule_seconds_until_open() -> None:
    schedule = Schedule(parse_schedule(["20:00-06:00", "Sat,Sun"]))
    assert schedule.seconds_until_open(at(MON, 21)) == 0
    assert schedule.seconds_until_open(at(MON, 19, 30)) == 30 * 60
    assert schedule.seconds_until_open(at(MON + 4, 6, 0)) == 14 * 3600  # Fri 06:00 -> 20:00
    assert Schedule([]).always and Schedule([]).seconds_until_open(at(MON, 12)) == 0


def test_rate_limiter_long_run_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(10.0, None, clock)
    assert limiter.batch_size(50) == 10
    waited = 0.0
    for _ in range(20):  # 20 batches of 10 instances at 10/s book 20 s...
        wait = limiter.book(10, 0)
        waited += wait
        clock.now += wait
    # ...the last one starts 19 s after the first, less the 1 s of burst credit
    assert waited == pytest.approx(18.0)
    assert limiter.ready_in() == pytest.approx(1.0)


def test_rate_limiter_bytes_and_idle_credit() -> None:
    clock = Clock()
    limiter = RateLimiter(None, 1_000_000.0, clock)
    assert limiter.batch_size(16) == 16  # no instance limit: the sender's batch
    assert limiter.book(1, 5_000_000) == 0  # the first send starts at once...
    assert limiter.ready_in() == pytest.approx(4.0)  # ...and books 5 s (less 1 s burst)
    clock.now += 60  # idle: at most one second of credit is saved up
    assert limiter.book(1, 3_000_000) == 0
    assert limiter.book(1, 1) == pytest.approx(2.0)
    assert RateLimiter(None, None, clock).book(10**6, 10**12) == 0


def test_breaker_opens_probes_and_closes() -> None:
    clock = Clock()
    breaker = Breaker(3, 30.0, clock)
    assert breaker.allow() is None
    assert not breaker.record(False) and not breaker.record(False)
    assert breaker.record(False)  # the third failure opens it
    assert breaker.is_open and breaker.allow() == 0
    clock.now += 30
    assert breaker.allow() == 1  # one probe...
    assert breaker.allow() == 0  # ...at a time
    assert not breaker.record(False)  # probe failed: open for another cool-down
    assert breaker.allow() == 0
    clock.now += 30
    assert breaker.allow() == 1
    breaker.release_probe()  # nothing to send: the next look may probe again
    assert breaker.allow() == 1
    breaker.record(True)
    assert not breaker.is_open and breaker.allow() is None


def test_breaker_disabled() -> None:
    breaker = Breaker(0, 30.0, Clock())
    for _ in range(100):
        breaker.record(False)
    assert breaker.allow() is None


def test_destination_traffic_keys_validated() -> None:
    base = {"type": "folder", "path": "/tmp/out"}
    cfg = parse_config(
        {
            "destinations": {
                "share": {
                    **base,
                    "schedule": ["Mon-Fri 19:00-07:00", "Sat,Sun"],
                    "schedule_timezone": "Europe/Paris",
                    "rate_limit": {"instances_per_second": 5, "megabytes_per_second": 2.5},
                    "breaker": {"failures": 0},
                }
            }
        }
    )
    share = cfg.destinations["share"]
    assert share.rate_limit.megabytes_per_second == 2.5
    assert len(share.traffic_schedule().windows) == 2
    with pytest.raises(ConfigError) as err:
        parse_config({"destinations": {"share": {**base, "schedule": "7pm-7am"}}})
    assert err.value.key == "destinations.share.schedule"
    with pytest.raises(ConfigError) as err:
        parse_config({"destinations": {"share": {**base, "schedule_timezone": "Mars/Base"}}})
    assert err.value.key == "destinations.share.schedule_timezone"
    with pytest.raises(ConfigError) as err:
        parse_config(
            {"destinations": {"share": {**base, "rate_limit": {"instances_per_second": 0}}}}
        )
    assert err.value.key == "destinations.share.rate_limit.instances_per_second"
