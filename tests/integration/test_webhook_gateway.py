"""Webhook destination end to end: storescu -> dicomgate -> JSON notification, and the
receiver fetching the instance back from the gateway with the notification's WADO-RS URL
(what an AI engine does)."""

from __future__ import annotations

import io
import json
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import yaml
from tests.conftest import (
    DICOMGATE,
    Corpus,
    GatewayProcess,
    RecordingServer,
    needs_dcmtk,
    wait_until,
)

pytestmark = [pytest.mark.timeout(120), needs_dcmtk]


def _wado_parts(url: str) -> list[bytes]:
    """GET a WADO-RS instance URL; the bodies of its multipart/related parts."""
    request = urllib.request.Request(
        url, headers={"Accept": 'multipart/related; type="application/dicom"'}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        content_type = response.headers["Content-Type"]
        body = response.read()
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, data = chunk.partition(b"\r\n\r\n")
        parts.append(data.removesuffix(b"\r\n"))
    return parts


def test_notification_urls_fetch_the_instances_back(
    gateway: Callable[..., GatewayProcess], http_server: RecordingServer, corpus: Corpus
) -> None:
    files = corpus.mr("webhook-e2e", 3, seed=611)
    gw = gateway(
        {
            "destinations": {"ai": {"type": "webhook", "url": http_server.url + "/hook"}},
            "routes": [{"name": "to-ai", "match": {"Modality": "MR"}, "to": ["ai"]}],
        }
    )
    assert gw.storescu(files).returncode == 0
    wait_until(lambda: len(http_server.requests) == len(files), 30, "one notification each")

    sources = {}
    for f in files:
        ds = pydicom.dcmread(f)
        sources[str(ds.SOPInstanceUID)] = ds
    seen = set()
    for request in http_server.requests:
        assert request.path == "/hook"
        note = json.loads(request.body)
        source = sources[note["sop_instance_uid"]]
        assert note["event"] == "instance.received" and note["route"] == "to-ai"
        assert note["study_instance_uid"] == source.StudyInstanceUID
        assert note["series_instance_uid"] == source.SeriesInstanceUID
        assert note["sop_class_uid"] == source.SOPClassUID
        (part,) = _wado_parts(note["wado_rs"])  # the URL works, from the receiver's side
        fetched = pydicom.dcmread(io.BytesIO(part))
        assert fetched.SOPInstanceUID == source.SOPInstanceUID
        assert fetched.PixelData == source.PixelData
        seen.add(note["sop_instance_uid"])
    assert seen == set(sources)
    wait_until(
        lambda: gw.http_get("/api/queue?state=done")[1]["counts"]["ai"].get("done") == 3,
        10,
        "three done jobs",
    )


def test_notifications_use_http_public_url(
    gateway: Callable[..., GatewayProcess], http_server: RecordingServer, corpus: Corpus
) -> None:
    """With `http.public_url` (the name receivers reach the gateway by), the links are
    built on it -- here `localhost` and the gateway's port, not the listening address."""
    files = corpus.mr("webhook-public-url", 1, seed=612)
    gw = gateway(
        {
            "destinations": {"ai": {"type": "webhook", "url": http_server.url + "/hook"}},
            "routes": [{"name": "to-ai", "to": ["ai"]}],
        },
        start=False,
    )
    gw.config["http"]["public_url"] = f"http://localhost:{gw.config['http']['port']}/"
    gw.start()
    assert gw.storescu(files).returncode == 0
    wait_until(lambda: len(http_server.requests) == 1, 30, "the notification")
    note = json.loads(http_server.requests[0].body)
    assert note["wado_rs"].startswith(f"http://localhost:{gw.config['http']['port']}/dicomweb/")
    (part,) = _wado_parts(note["wado_rs"])
    assert pydicom.dcmread(io.BytesIO(part)).SOPInstanceUID == note["sop_instance_uid"]


def test_a_webhook_answering_503_with_retry_after_is_held_that_long(
    gateway: Callable[..., GatewayProcess], http_server: RecordingServer, corpus: Corpus
) -> None:
    """An AI engine that is busy answers 503 with Retry-After: 3. The gateway's own backoff
    (0.2 s) would knock again at once; it sends nothing to the engine for 3 s, neither the
    refused notification nor those of instances stored meanwhile, then delivers them all."""
    http_server.first = [(503, {"Retry-After": "3"})]
    first, later = corpus.mr("webhook-busy", 1, seed=613), corpus.mr("webhook-busy-2", 2, seed=614)
    gw = gateway(
        {
            "destinations": {"ai": {"type": "webhook", "url": http_server.url + "/hook"}},
            "routes": [{"name": "to-ai", "to": ["ai"]}],
            # Retry-After is honoured up to queue.retry.max (10 s here).
            "queue": {"poll_interval": 0.1, "retry": {"initial": 0.2, "max": 10.0, "jitter": 0}},
        }
    )
    assert gw.storescu(first).returncode == 0
    gw.wait_log("delivery.held", timeout=30)
    assert gw.storescu(later).returncode == 0  # more notifications for it during the wait
    wait_until(lambda: len(http_server.requests) == 4, 30, "the refused one and three more")
    refused, *rest = http_server.requests
    assert min(r.at for r in rest) - refused.at >= 2.9, "sent again before the Retry-After"
    notified = [json.loads(r.body)["sop_instance_uid"] for r in http_server.requests]
    assert notified.count(notified[0]) == 2 and len(set(notified)) == 3
    wait_until(
        lambda: gw.http_get("/api/queue?state=done")[1]["counts"]["ai"].get("done") == 3,
        10,
        "three done jobs",
    )
    assert gw.log_count("delivery.held") == 1


def test_a_route_with_a_pipeline_cannot_notify_a_webhook(tmp_path: Path) -> None:
    """The notification names the stored original; a processed copy is never stored, so
    its URL would answer 404 (new UIDs) or hand over what the pipeline removed."""
    config = {
        "storage": {"path": str(tmp_path / "data")},
        "destinations": {
            "ai": {"type": "webhook", "url": "http://127.0.0.1:9/hook"},
            "share": {"type": "folder", "path": str(tmp_path / "share")},
        },
        "routes": [
            {"name": "plain", "to": ["ai"]},
            {
                "name": "research",
                "to": ["share", "ai"],
                "pipeline": [{"deidentify": {"options": ["retain_uids"]}}],
            },
        ],
    }
    path = tmp_path / "dicomgate.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run(
        [DICOMGATE, "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "routes[1].to" in line and "'ai' is a webhook" in line
