"""Pausing a destination: jobs wait (no attempt spent) and are all delivered on resume."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import DICOMGATE, Corpus, GatewayProcess, wait_until


def _post(gw: GatewayProcess, path: str) -> tuple[int, Any]:
    request = urllib.request.Request(gw.url(path), method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=5) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        exc.close()
        return exc.code, json.loads(body)


def _jobs(gw: GatewayProcess, state: str) -> list[dict[str, Any]]:
    status, body = gw.http_get(f"/api/queue?destination=share&state={state}&limit=1000")
    assert status == 200, body
    jobs: list[dict[str, Any]] = body["jobs"]
    return jobs


def _cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DICOMGATE, "queue", *args, "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_paused_destination_piles_up_then_drains_on_resume(
    gateway: Any, corpus: Corpus, tmp_path: Path
) -> None:
    share = tmp_path / "share"
    gw: GatewayProcess = gateway(
        {
            "destinations": {"share": {"type": "folder", "path": str(share)}},
            "routes": [{"name": "all", "to": ["share"]}],
            "queue": {"poll_interval": 0.1},
        }
    )
    status, body = _post(gw, "/api/destinations/share/pause")
    assert status == 200 and body["paused"] is True, body
    files = corpus.mr("pause", 8, seed=811)
    assert gw.storescu(files).returncode == 0
    time.sleep(1.0)  # ten poll intervals: a worker that ignored the pause would have leased
    pending = _jobs(gw, "pending")
    assert len(pending) == len(files)
    assert all(j["attempts"] == 0 for j in pending), pending
    assert not share.exists() or not list(share.rglob("*.dcm"))
    status, body = gw.http_get("/api/destinations")
    assert status == 200
    assert body["destinations"]["share"] == {
        "paused": True,
        "breaker": "closed",
        "schedule": "open",
        "delivered": 0,
        "failed": 0,
    }

    resumed = _cli(gw, "resume", "share")  # the CLI, reaching the gateway from its config
    assert resumed.returncode == 0, resumed.stderr
    wait_until(lambda: len(_jobs(gw, "done")) == len(files), 20, "every job delivered")
    assert len(list(share.rglob("*.dcm"))) == len(files)
    assert all(j["attempts"] == 1 for j in _jobs(gw, "done"))
    _, body = gw.http_get("/api/destinations")
    assert body["destinations"]["share"]["paused"] is False
    assert body["destinations"]["share"]["delivered"] == len(files)
    assert gw.log_count("delivery.paused") == gw.log_count("delivery.resumed") == 1

    paused = _cli(gw, "pause", "share")
    assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr
    _, body = gw.http_get("/api/destinations")
    assert body["destinations"]["share"]["paused"] is True


def test_pausing_an_unknown_destination_is_a_404(gateway: Any) -> None:
    gw: GatewayProcess = gateway()
    status, body = _post(gw, "/api/destinations/nope/pause")
    assert status == 404 and "nope" in body["error"]
    unknown = _cli(gw, "resume", "nope")
    assert unknown.returncode == 1 and "HTTP 404" in unknown.stderr
