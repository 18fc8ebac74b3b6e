"""DICOMweb destination against Orthanc's DICOMweb plugin and a scripted HTTP server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import (
    Corpus,
    Orthanc,
    RecordingServer,
    delivery_of,
    free_port,
)

from dicomgate.egress.base import Delivery, Outcome
from dicomgate.egress.dicomweb import MAX_ANSWER, DicomwebSender
from dicomgate.egress.models import DicomwebDestination


def _send(url: str, deliveries: list[Delivery], **settings: Any) -> list[Outcome]:
    model = DicomwebDestination.model_validate({"type": "dicomweb", "url": url, **settings})

    async def run() -> list[Outcome]:
        sender = DicomwebSender("cloud", model)
        try:
            return await sender.send(deliveries)
        finally:
            await sender.close()

    return asyncio.run(run())


# ----------------------------------------------------------------- Orthanc


def test_batch_of_ten_goes_in_one_request_and_is_stored(orthanc: Orthanc, corpus: Corpus) -> None:
    files = corpus.mr("egress-stow", 10, seed=31)
    deliveries = [delivery_of(f, n) for n, f in enumerate(files)]
    outcomes = _send(f"http://127.0.0.1:{orthanc.http_port}/dicom-web", deliveries)
    assert outcomes == [Outcome(n, True) for n in range(10)]
    assert len(orthanc.get("/instances")) == 10
    stored = {
        orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
        for i in orthanc.get("/instances")
    }
    assert stored == {d.sop_instance_uid for d in deliveries}


def test_byte_limit_splits_into_several_requests(orthanc: Orthanc, corpus: Corpus) -> None:
    files = corpus.mr("egress-stow-split", 6, seed=32)
    deliveries = [delivery_of(f, n) for n, f in enumerate(files)]
    limit = deliveries[0].size * 2 + 1  # two per request
    outcomes = _send(
        f"http://127.0.0.1:{orthanc.http_port}/dicom-web", deliveries, batch_max_bytes=limit
    )
    assert all(o.delivered for o in outcomes)
    assert len(orthanc.get("/instances")) == 6


def test_wrong_base_path_is_not_retryable(orthanc: Orthanc, corpus: Corpus) -> None:
    files = corpus.mr("egress-stow", 10, seed=31)[:2]
    outcomes = _send(
        f"http://127.0.0.1:{orthanc.http_port}/no-such-root",
        [delivery_of(f, n) for n, f in enumerate(files)],
    )
    assert [(o.delivered, o.retryable) for o in outcomes] == [(False, False)] * 2
    assert all(o.error.startswith("HTTP 404") for o in outcomes)
    assert orthanc.get("/instances") == []


def test_orthanc_down_is_retryable(corpus: Corpus) -> None:
    files = corpus.mr("egress-stow", 10, seed=31)[:1]
    outcomes = _send(f"http://127.0.0.1:{free_port()}/dicom-web", [delivery_of(files[0], 1)])
    assert (outcomes[0].delivered, outcomes[0].retryable) == (False, True)
    assert outcomes[0].error.startswith("ConnectError")


# ----------------------------------------------------------------- scripted server


def test_server_error_is_retryable(http_server: RecordingServer, corpus: Corpus) -> None:
    http_server.status = 500
    files = corpus.mr("egress-stow", 10, seed=31)[:3]
    outcomes = _send(http_server.url + "/dw", [delivery_of(f, n) for n, f in enumerate(files)])
    assert [(o.delivered, o.retryable, o.error) for o in outcomes] == [
        (False, True, "HTTP 500")
    ] * 3
    assert len(http_server.requests) == 1


def test_bearer_token_and_headers_are_sent(
    http_server: RecordingServer, corpus: Corpus, tmp_path: Path
) -> None:
    files = corpus.mr("egress-stow", 10, seed=31)[:2]
    token = tmp_path / "token"
    token.write_text("tok-1\n")
    outcomes = _send(
        http_server.url + "/dw/",
        [delivery_of(f, n) for n, f in enumerate(files)],
        auth={"bearer_file": str(token)},
        headers={"X-Tenant": "radiology"},
    )
    assert all(o.delivered for o in outcomes)  # 200 with an empty body
    (request,) = http_server.requests
    assert request.path == "/dw/studies"
    assert request.headers["authorization"] == "Bearer tok-1"
    assert request.headers["x-tenant"] == "radiology"
    assert request.headers["accept"] == "application/dicom+json"
    assert len(request.body) == int(request.headers["content-length"])
    for f in files:
        assert f.read_bytes() in request.body


def test_partial_failure_from_the_server(http_server: RecordingServer, corpus: Corpus) -> None:
    files = corpus.mr("egress-stow", 10, seed=31)[:2]
    deliveries = [delivery_of(f, n) for n, f in enumerate(files)]
    http_server.status = 202
    http_server.body = json.dumps(
        {
            "00081199": {
                "vr": "SQ",
                "Value": [{"00081155": {"vr": "UI", "Value": [deliveries[0].sop_instance_uid]}}],
            },
            "00081198": {
                "vr": "SQ",
                "Value": [
                    {
                        "00081155": {"vr": "UI", "Value": [deliveries[1].sop_instance_uid]},
                        "00081197": {"vr": "US", "Value": [0xC000]},
                    }
                ],
            },
        }
    ).encode()
    outcomes = _send(http_server.url, deliveries)
    assert outcomes[0] == Outcome(0, True)
    assert (outcomes[1].delivered, outcomes[1].retryable) == (False, False)


def test_a_web_page_with_200_is_not_counted_as_stored(
    http_server: RecordingServer, corpus: Corpus, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy's or a login page's 200 (PS3.18 10.5.3 answers a DICOM data set)."""
    http_server.content_type = "text/html; charset=utf-8"
    http_server.body = b"<html><body>Please sign in</body></html>"
    files = corpus.mr("egress-stow", 10, seed=31)[:2]
    outcomes = _send(http_server.url + "/dw", [delivery_of(f, n) for n, f in enumerate(files)])
    assert [(o.delivered, o.retryable, o.error) for o in outcomes] == [
        (False, True, "HTTP 200 with a text/html page, not a STOW-RS answer")
    ] * 2
    assert "egress.dicomweb_not_stow" in {getattr(r, "event", "") for r in caplog.records}


@pytest.mark.parametrize(
    ("body", "event"),
    [
        (b'{"00081199": {"vr": "SQ", "Value": [' * 50_000, ""),  # json: RecursionError
        (b" " * (MAX_ANSWER + 1), "egress.dicomweb_answer_too_large"),
    ],
    ids=["nested too deep", "larger than MAX_ANSWER"],
)
def test_an_unreadable_answer_counts_as_naming_no_instance(
    http_server: RecordingServer,
    corpus: Corpus,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    event: str,
) -> None:
    http_server.status = 202
    http_server.body = body
    files = corpus.mr("egress-stow", 10, seed=31)[:2]
    outcomes = _send(http_server.url + "/dw", [delivery_of(f, n) for n, f in enumerate(files)])
    assert [(o.delivered, o.retryable, o.error) for o in outcomes] == [
        (False, True, "HTTP 202, instance not in the response")
    ] * 2
    if event:
        assert event in {getattr(r, "event", "") for r in caplog.records}


def test_basic_auth_against_an_orthanc_that_requires_it(tmp_path: Path, corpus: Corpus) -> None:
    """Orthanc with HTTP authentication on: the right user stores, a wrong password is
    refused with 401 (retried: credentials are fixed by the operator, not the instance)."""
    import subprocess
    import time

    import httpx
    import pytest
    from tests.conftest import DICOMWEB_PLUGIN, ORTHANC

    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        pytest.fail("needs orthanc and orthanc-dicomweb (test peers)")
    port = free_port()
    user = ("gateway", "s3cret-pw")
    config = tmp_path / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "Name": "dicomgate-basic-auth",
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": True,
                "RegisteredUsers": {user[0]: user[1]},
                "Plugins": [str(DICOMWEB_PLUGIN)],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                "StorageDirectory": str(tmp_path / "db"),
                "IndexDirectory": str(tmp_path / "db"),
                "HttpPort": port,
                "DicomPort": free_port(),
            }
        )
    )
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen([str(ORTHANC), str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/system", auth=user, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "Orthanc did not start"
            time.sleep(0.1)
        files = corpus.mr("egress-stow-basic", 3, seed=33)
        deliveries = [delivery_of(f, n) for n, f in enumerate(files)]
        wrong = {"basic": {"username": user[0], "password": "wrong"}}
        refused = _send(f"{base}/dicom-web", deliveries, auth=wrong)
        assert [(o.delivered, o.retryable, o.error) for o in refused] == [
            (False, True, "HTTP 401")
        ] * 3
        right = {"basic": {"username": user[0], "password": user[1]}}
        assert _send(f"{base}/dicom-web", deliveries, auth=right) == [
            Outcome(n, True) for n in range(3)
        ]
        assert len(httpx.get(f"{base}/instances", auth=user, timeout=10).json()) == 3
        assert httpx.get(f"{base}/instances", timeout=10).status_code == 401
    finally:
        proc.terminate()
        proc.wait(15)
