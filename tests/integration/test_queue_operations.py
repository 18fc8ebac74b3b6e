"""Operator control of the delivery queue: dead-letter, inspect and re-drive (CLI and /api)."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import DICOMGATE, Corpus, GatewayProcess, needs_dcmtk, wait_until

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]


def _post(gw: GatewayProcess, path: str) -> tuple[int, object]:
    req = urllib.request.Request(gw.url(path), method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, json.loads(resp.read())


def test_dead_lettered_jobs_are_listed_and_redriven(
    gateway: Callable[..., GatewayProcess], corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("queue-dead", 4, seed=501)
    target = tmp_path / "share"
    target.write_text("a file where the destination folder should be")
    gw = gateway(
        {
            "destinations": {"share": {"type": "folder", "path": str(target)}},
            "routes": [{"name": "all", "to": ["share"]}],
            "queue": {"retry": {"initial": 0.1, "max": 0.2, "max_attempts": 2}},
        }
    )
    assert gw.storescu(files).returncode == 0

    def dead() -> int:
        status, body = gw.http_get("/api/queue?state=dead")
        assert status == 200, body
        assert isinstance(body, dict)
        return len(body["jobs"])

    wait_until(lambda: dead() == 4, 60, "4 dead-lettered jobs")
    assert gw.log_count("delivery.dead_lettered") == 4
    status, body = gw.http_get("/api/queue?state=dead")
    job = body["jobs"][0]
    assert job["attempts"] == 2 and job["last_error"]
    assert gw.http_get(f"/api/queue/{job['id']}")[0] == 200
    assert gw.http_get("/api/queue/999999")[0] == 404
    bad = gw.http_get("/api/queue?state=bogus")
    assert bad[0] == 400 and "error" in bad[1]

    cli = subprocess.run(
        [DICOMGATE, "queue", "list", "--config", str(gw.config_path), "--state", "dead"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert "dead" in cli.stdout and "share" in cli.stdout

    # The operator fixes the destination and re-drives: one job by the CLI, the rest by the API.
    target.unlink()
    target.mkdir()
    one = subprocess.run(
        [DICOMGATE, "queue", "retry", "--config", str(gw.config_path), str(job["id"])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert one.returncode == 0, one.stderr
    status, answer = _post(gw, "/api/queue/retry-dead?destination=share")
    assert status == 200 and answer == {"retried": 3}
    wait_until(lambda: len(list(target.rglob("*.dcm"))) == 4, 60, "re-driven deliveries")
    wait_until(
        lambda: gw.http_get("/api/queue?state=done")[1]["counts"]["share"].get("done") == 4,
        30,
        "4 done jobs",
    )

    # The job's history: both failed attempts, the re-drive, then the delivery.
    status, shown = gw.http_get(f"/api/queue/{job['id']}")
    assert status == 200 and shown["state"] == "done"
    steps = [(h["attempt"], h["outcome"]) for h in shown["history"]]
    assert steps == [(1, "failed"), (2, "dead"), (2, "redriven"), (1, "delivered")], steps
    assert all(h["error"] for h in shown["history"][:2])  # why each attempt failed
    assert shown["history"][3]["error"] is None and shown["history"][3]["node"]
    show = subprocess.run(
        [DICOMGATE, "queue", "show", "--config", str(gw.config_path), str(job["id"])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert show.returncode == 0, show.stderr
    printed = json.loads(show.stdout)
    assert [(h["attempt"], h["outcome"]) for h in printed["history"]] == steps

    # A done job cannot be re-driven; done jobs are purged (CLI), dead ones by the API.
    refused = urllib.request.Request(gw.url(f"/api/queue/{job['id']}/retry"), method="POST")
    with pytest.raises(urllib.error.HTTPError) as conflict:
        urllib.request.urlopen(refused, timeout=5)
    assert conflict.value.code == 409
    conflict.value.close()
    purged = subprocess.run(
        [DICOMGATE, "queue", "purge", "--config", str(gw.config_path), "--destination", "share"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.strip() == "4 done jobs deleted"
    assert gw.http_get("/api/queue")[1] == {"counts": {}, "jobs": []}
    assert gw.http_get(f"/api/queue/{job['id']}")[0] == 404  # its history went with it
    assert len(list(target.rglob("*.dcm"))) == 4  # purging forgets jobs, not images
    delete = urllib.request.Request(gw.url("/api/queue?state=dead"), method="DELETE")
    with urllib.request.urlopen(delete, timeout=5) as resp:
        assert json.loads(resp.read()) == {"deleted": 0}
    pending = urllib.request.Request(gw.url("/api/queue?state=pending"), method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as bad_state:
        urllib.request.urlopen(pending, timeout=5)
    assert bad_state.value.code == 400
    bad_state.value.close()
