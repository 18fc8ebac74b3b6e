"""The shipped retry and circuit-breaker defaults, end to end (issue #3): a PACS that is
down long enough for the breaker to open gets its whole backlog within about a minute of
coming back, and nothing is dead-lettered meanwhile. No ``queue`` or ``breaker`` setting
is overridden here: this is what a site gets without tuning."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import Corpus, GatewayProcess, needs_dcmtk, sop_uid_of, wait_until
from tests.integration.test_routing_delivery import StoreSCP

pytestmark = [pytest.mark.timeout(180), needs_dcmtk]


def test_default_policy_drains_a_returning_pacs_within_a_minute(
    gateway: Callable[..., GatewayProcess], corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("defaults-outage", 40, seed=641)
    pacs = StoreSCP(tmp_path / "scp")  # not started: the PACS is down
    gw = gateway(
        {
            "destinations": {
                "pacs": {
                    "type": "dimse",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": pacs.port,
                }
            },
            "routes": [{"name": "all", "to": ["pacs"]}],
        }
    )
    try:
        assert gw.storescu(files).returncode == 0  # acknowledged while the PACS is down
        # Five whole-batch failures open the breaker (default failures: 5); from then on the
        # jobs wait without spending attempts, one probe per cool-down (default 30 s).
        wait_until(lambda: gw.log_count("delivery.circuit_open") >= 1, 60, "the breaker to open")
        time.sleep(5)
        status, body = gw.http_get("/api/queue?destination=pacs&state=dead")
        assert status == 200 and body["jobs"] == [], "dead-lettered during the outage"
        back = time.monotonic()
        pacs.start()
        wanted = {sop_uid_of(f) for f in files}
        wait_until(
            lambda: set(pacs.received()) == wanted, 75, "the backlog after the PACS came back"
        )
        drained = time.monotonic() - back
    finally:
        pacs.stop()
    assert drained < 60, f"backlog delivered {drained:.0f} s after the PACS came back"
    _, body = gw.http_get("/api/queue?destination=pacs&state=dead")
    assert body["jobs"] == []
