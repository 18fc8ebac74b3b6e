"""Traffic control end to end: rate limit, schedule window, breaker settings, orphaned jobs.

A real gateway process receives with storescu and delivers to folders (or to a DIMSE port
nobody listens on); timing assertions are lower bounds only (a rate limit can only make
delivery slower), so a slow machine cannot make them fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from tests.conftest import Corpus, GatewayProcess, free_port, needs_dcmtk, wait_until

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]


def _counts(gw: GatewayProcess) -> dict[str, dict[str, int]]:
    status, body = gw.http_get("/api/queue")
    assert status == 200
    counts: dict[str, dict[str, int]] = body["counts"]
    return counts


def test_rate_limit_spreads_deliveries_and_does_not_slow_others(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("traffic-rate", 40, seed=71)
    slow, fast = tmp_path / "slow", tmp_path / "fast"
    gw = gateway(
        {
            "destinations": {
                "slow": {
                    "type": "folder",
                    "path": str(slow),
                    "rate_limit": {"instances_per_second": 10},
                },
                "fast": {"type": "folder", "path": str(fast)},
            },
            "routes": [{"name": "all", "match": {}, "to": ["slow", "fast"]}],
            "queue": {"poll_interval": 0.1},
        }
    )
    started = time.monotonic()
    assert gw.storescu(files).returncode == 0
    wait_until(lambda: len(list(fast.rglob("*.dcm"))) == 40, 20, "the unlimited copies")
    fast_done = time.monotonic() - started
    wait_until(lambda: len(list(slow.rglob("*.dcm"))) == 40, 30, "the rate-limited copies")
    mtimes = sorted(p.stat().st_mtime for p in slow.rglob("*.dcm"))
    # 40 instances at 10/s: the last starts >= 3 s after the first, less 1 s of burst credit.
    assert mtimes[-1] - mtimes[0] >= 1.8, mtimes
    # The limit is per destination: the other destination was not held back by it.
    assert fast_done < time.monotonic() - started
    assert _counts(gw)["slow"] == {"done": 40}


def test_schedule_window_holds_jobs_until_it_opens(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("traffic-schedule", 5, seed=72)
    night, now = tmp_path / "night", tmp_path / "now"
    hour = datetime.now().hour  # the gateway uses the host's local time, as we do
    closed = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"
    gw = gateway(
        {
            "destinations": {
                "night": {"type": "folder", "path": str(night), "schedule": closed},
                "now": {"type": "folder", "path": str(now)},
            },
            "routes": [{"name": "all", "match": {}, "to": ["night", "now"]}],
            "queue": {"poll_interval": 0.1},
        }
    )
    assert gw.storescu(files).returncode == 0
    wait_until(lambda: len(list(now.rglob("*.dcm"))) == 5, 20, "the unscheduled copies")
    gw.wait_log("delivery.schedule_closed")
    time.sleep(1.5)
    assert not night.exists() or not list(night.rglob("*.dcm"))
    assert _counts(gw)["night"] == {"pending": 5}
    # Jobs waiting for a window spend no attempts.
    _, body = gw.http_get("/api/queue?destination=night")
    assert {job["attempts"] for job in body["jobs"]} == {0}


def test_breaker_settings_and_orphaned_jobs(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("traffic-breaker", 3, seed=73)
    gw = gateway(
        {
            "destinations": {
                "gone": {
                    "type": "dimse",
                    "ae_title": "NOBODY",
                    "host": "127.0.0.1",
                    "port": free_port(),  # nothing listens: every association is refused
                    "breaker": {"failures": 2, "cooldown": 600},
                    "max_associations": 1,
                }
            },
            "routes": [{"name": "all", "match": {}, "to": ["gone"]}],
            "queue": {"poll_interval": 0.1, "retry": {"initial": 0.1, "max": 0.2}},
        }
    )
    assert gw.storescu(files).returncode == 0
    gw.wait_log("delivery.circuit_open")
    attempts_then = _attempts(gw)
    time.sleep(1.5)  # backoff is 0.2 s, but the open breaker (600 s) leases nothing
    assert _attempts(gw) == attempts_then
    assert gw.log_count("delivery.circuit_open") == 1
    # The destination leaves the config: its jobs are kept and flagged at start-up.
    gw.terminate()
    gw.config["destinations"] = {"share": {"type": "folder", "path": str(tmp_path / "s")}}
    gw.config["routes"] = []
    gw.start()
    gw.wait_log("queue.orphaned")
    assert "3 unfinished jobs for destination 'gone'" in gw.log_text()
    assert _counts(gw)["gone"] == {"pending": 3}


def _attempts(gw: GatewayProcess) -> int:
    _, body = gw.http_get("/api/queue?destination=gone")
    return sum(int(job["attempts"]) for job in body["jobs"])
