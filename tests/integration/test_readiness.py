"""``/readyz`` per component, on a real gateway: the database and the delivery queue (a
PostgreSQL database of the test's own that stops accepting connections), the audit writer,
the ATNA repository (a TCP syslog receiver that goes away and comes back)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from tests.conftest import (
    Corpus,
    GatewayProcess,
    free_port,
    pg_cut_off,
    wait_until,
)
from tests.integration.test_atna import SyslogReceiver

pytestmark = [pytest.mark.timeout(120)]

Gateway = Callable[..., GatewayProcess]
CORE = {"startup", "database", "queue", "ingest", "store", "dimse", "audit"}


def ready(gw: GatewayProcess) -> tuple[int, dict[str, Any]]:
    status, body = gw.http_get("/readyz", timeout=15)
    assert isinstance(body, dict), (status, body)
    return status, body


def test_ready_gateway_reports_every_component(gateway: Gateway, corpus: Corpus) -> None:
    receiver = SyslogReceiver()
    try:
        gw = gateway(
            {
                "audit": {
                    "syslog": {"host": "127.0.0.1", "port": receiver.port, "protocol": "tcp"}
                },
                "destinations": {
                    "down": {
                        "type": "dimse",
                        "ae_title": "DOWN",
                        "host": "127.0.0.1",
                        "port": free_port(),
                        "dimse_timeout": 2,
                    }
                },
                "routes": [{"name": "all", "to": ["down"]}],
                "queue": {"poll_interval": 0.2, "retry": {"max_attempts": 1}},
            }
        )
        assert gw.storescu(corpus.mr("ready", 2, seed=77)).returncode == 0
        # Both jobs fail once and, with max_attempts 1, are dead-lettered.
        wait_until(lambda: ready(gw)[1]["details"]["queue"]["dead"] == 2, 20, "2 dead jobs")
        status, body = ready(gw)
        assert status == 200 and body["status"] == "ready" and body["failing"] == []
        assert body["checks"] == {name: "ok" for name in CORE | {"syslog"}}
        queue = body["details"]["queue"]
        assert queue == {"pending": 0, "leased": 0, "dead": 2, "oldest_job_age_seconds": 0.0}
        assert body["details"]["audit"]["backlog"] >= 0
        assert body["details"]["audit"]["dropped"] == 0
        syslog = body["details"]["syslog"]
        assert syslog["repository"] == f"tcp://127.0.0.1:{receiver.port}" and syslog["sent"] >= 1
    finally:
        receiver.stop()


def test_a_down_audit_repository_degrades_or_blocks(gateway: Gateway, corpus: Corpus) -> None:
    # Not required (the default): nothing listens from the start; the gateway serves and
    # says so with 200 "degraded".
    port = free_port()
    gw = gateway({"audit": {"syslog": {"host": "127.0.0.1", "port": port, "protocol": "tcp"}}})
    wait_until(lambda: ready(gw)[1]["failing"] == ["syslog"], 10, "syslog failing")
    status, body = ready(gw)
    assert (status, body["status"]) == (200, "degraded"), body
    assert body["checks"]["syslog"].startswith("failed: audit repository unreachable")
    assert "failing_since" in body["details"]["syslog"]
    assert all(body["checks"][name] == "ok" for name in CORE)

    # Required: a repository that goes away makes /readyz 503 naming it, and one that
    # comes back is found again without any audit event to send (the writer probes it).
    receiver = SyslogReceiver()
    strict = gateway(
        {
            "audit": {
                "syslog": {
                    "host": "127.0.0.1",
                    "port": receiver.port,
                    "protocol": "tcp",
                    "required": True,
                }
            }
        }
    )
    back: SyslogReceiver | None = None
    try:
        assert ready(strict)[0] == 200
        receiver.stop()
        assert strict.storescu(corpus.mr("strict", 1, seed=78)).returncode == 0  # audited
        wait_until(lambda: ready(strict)[0] == 503, 10, "503 with the repository gone")
        status, body = ready(strict)
        assert body["status"] == "not ready" and body["failing"] == ["syslog"], body
        back = SyslogReceiver(receiver.port)
        wait_until(lambda: ready(strict)[0] == 200, 15, "ready again")
        assert ready(strict)[1]["status"] == "ready"
    finally:
        receiver.stop()
        if back is not None:
            back.stop()


def test_database_outage_makes_readyz_503_naming_database_and_queue(
    gateway: Gateway, own_database: tuple[str, str]
) -> None:
    name, url = own_database
    gw = gateway({"database": {"url": url}})
    assert ready(gw)[0] == 200
    pg_cut_off(name, allow=False)
    try:
        wait_until(lambda: ready(gw)[0] == 503, 15, "503 while the database is cut off")
        body = ready(gw)[1]
        assert body["status"] == "not ready"
        assert {"database", "queue"} <= set(body["failing"]), body
        assert body["checks"]["queue"].startswith("failed: ")
        assert body["checks"]["store"] == body["checks"]["dimse"] == "ok"
        # An audit event meanwhile (the C-ECHO's association) cannot be written: the
        # writer says so until the database answers again, and keeps it on disk.
        echo = gw.echoscu()
        assert echo.returncode == 0, echo.stdout
        wait_until(lambda: "audit" in ready(gw)[1]["failing"], 15, "the audit writer failing")
        audit = ready(gw)[1]["details"]["audit"]
        assert audit["journaled"] >= 1 and audit["dropped"] == 0, audit
    finally:
        pg_cut_off(name, allow=True)
    wait_until(lambda: ready(gw)[0] == 200, 20, "ready again once the database is back")
    body = ready(gw)[1]
    assert body["status"] == "ready" and body["failing"] == []
    wait_until(lambda: ready(gw)[1]["details"]["audit"]["journaled"] == 0, 10, "journal written")
    assert gw.running()
