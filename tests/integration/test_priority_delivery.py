"""Route priorities, end to end: with a backlog waiting for a destination, a route with
``priority: high`` is delivered first and ``low`` last, as seen at a DCMTK storescp."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from tests.conftest import Corpus, GatewayProcess, needs_dcmtk, sop_uid_of, wait_until
from tests.integration.test_routing_delivery import StoreSCP

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]


def _post(gw: GatewayProcess, path: str) -> dict[str, object]:
    request = urllib.request.Request(gw.url(path), method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=5) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


def test_high_priority_jumps_the_backlog_and_low_goes_last(
    gateway: Callable[..., GatewayProcess], corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("priority", 16, seed=631)
    low, routine, urgent = files[:4], files[4:12], files[12:]
    pacs = StoreSCP(tmp_path / "scp").start()
    try:
        gw = gateway(
            {
                "destinations": {
                    "pacs": {
                        "type": "dimse",
                        "ae_title": "PACS",
                        "host": "127.0.0.1",
                        "port": pacs.port,
                        # One instance per lease on one association: the arrival order at
                        # the PACS is the order the queue handed the jobs out.
                        "max_associations": 1,
                        "batch_max_instances": 1,
                    }
                },
                "routes": [
                    {
                        "name": "er",
                        "match": {"calling_ae": "ER"},
                        "priority": "high",
                        "to": ["pacs"],
                    },
                    {
                        "name": "archive",
                        "match": {"calling_ae": "OLD"},
                        "priority": "low",
                        "to": ["pacs"],
                    },
                    {"name": "routine", "match": {"calling_ae": "CT1"}, "to": ["pacs"]},
                ],
            }
        )
        assert _post(gw, "/api/destinations/pacs/pause")["paused"] is True
        # Oldest first: the low and normal backlog is there before the urgent study arrives.
        assert gw.storescu(low, "-aet", "OLD").returncode == 0
        assert gw.storescu(routine, "-aet", "CT1").returncode == 0
        assert gw.storescu(urgent, "-aet", "ER").returncode == 0
        status, body = gw.http_get("/api/queue?destination=pacs&state=pending")
        assert status == 200 and len(body["jobs"]) == len(files), body
        assert _post(gw, "/api/destinations/pacs/resume")["paused"] is False

        wanted = {sop_uid_of(f) for f in files}
        wait_until(lambda: set(pacs.received()) == wanted, 60, "every instance at the PACS")
        arrivals = sorted(pacs.folder.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        order = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in arrivals]
    finally:
        pacs.stop()
    assert set(order[:4]) == {sop_uid_of(f) for f in urgent}
    assert set(order[4:12]) == {sop_uid_of(f) for f in routine}
    assert set(order[12:]) == {sop_uid_of(f) for f in low}
