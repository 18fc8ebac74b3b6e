"""HTTP semantics every route shares, on a real gateway: HEAD answered like GET on every
GET resource (RFC 9110 9.1, 9.3.2), ``Vary: Accept`` where Accept chooses the answer
(12.5.5), and forwarded headers believed only from ``http.trusted_proxies``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import GatewayProcess, needs_dcmtk, wait_until
from tests.corpus import make_large_instance, make_mr_series

from dicomgate.security.http_auth import hash_api_key, new_api_key

pytestmark = [pytest.mark.timeout(180), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]
MB = 1024 * 1024
SECOND_LOOPBACK = "127.0.0.2"
RETRIEVE_URL = "00081190"


def load(gw: GatewayProcess, files: list[Path]) -> None:
    sent = gw.storescu(files)
    assert sent.returncode == 0, sent.stdout


def uid_of(gw: GatewayProcess, level: str, **query: str) -> str:
    tag = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}[level]
    answer = httpx.get(gw.url(f"/dicomweb/{level}"), params=query)
    assert answer.status_code == 200, answer.text
    return str(answer.json()[0][tag]["Value"][0])


def media(answer: httpx.Response) -> str:
    """The Content-Type without its boundary (a new one for every multipart answer)."""
    value = answer.headers.get("content-type", "")
    return ";".join(p for p in value.split(";") if not p.strip().startswith("boundary="))


def rchar(pid: int) -> int:
    """Bytes the process has read with read() and friends so far (files and sockets)."""
    with open(f"/proc/{pid}/io", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar")


# -- HEAD -----------------------------------------------------------------------------------


def test_head_answers_like_get_on_every_kind_of_get_resource(
    gateway: Gateway, tmp_path: Path
) -> None:
    gw = gateway()
    load(gw, make_mr_series(tmp_path / "mr", 2, seed=91))
    study = uid_of(gw, "studies")
    series = uid_of(gw, "series")
    sop = uid_of(gw, "instances")
    instance = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    paths = [
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/queue",  # admin API (local client)
        "/dicomweb/studies",  # QIDO-RS
        f"/dicomweb/studies/{study}/series?Modality=MR",
        f"/dicomweb/studies/{study}",  # WADO-RS, streamed multipart
        f"/dicomweb/studies/{study}/metadata",
        instance + "/frames/1",
        instance + "/rendered",
        f"/dicomweb/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}",
        f"/fhir/ImagingStudy/{study}",
        "/dicomweb/studies/1.2.3/metadata",  # 404 from the app
        "/no/such/path",  # 404 from the router
        "/dicomweb/studies?limit=x",  # 400
    ]
    with httpx.Client(base_url=gw.url(""), timeout=30) as client:
        for path in paths:
            got = client.get(path)
            head = client.head(path)
            assert head.status_code == got.status_code, (path, head.status_code, got.text)
            assert head.content == b"", path
            assert media(head) == media(got), path
            if "content-length" in got.headers and "/metrics" not in path:
                assert head.headers["content-length"] == got.headers["content-length"], path
            assert "allow" not in head.headers, path
        # The connection is still usable after every HEAD (no stray body bytes).
        assert client.get("/healthz").json()["status"] == "ok"


def test_head_of_a_large_retrieve_does_not_read_the_file(gateway: Gateway, tmp_path: Path) -> None:
    """A streamed WADO-RS answer stops when its HEAD has its headers: the 64 MB file is
    not read to the end for nothing (nor is one GET short of it)."""
    gw = gateway()
    size = 64 * MB
    load(gw, [make_large_instance(tmp_path / "large.dcm", size, seed=5)])
    study = uid_of(gw, "studies")
    path = f"/dicomweb/studies/{study}"
    headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    with httpx.Client(base_url=gw.url(""), timeout=60) as client:
        before = rchar(gw.pid)
        head = client.head(path, headers=headers)
        assert head.status_code == 200, head.text
        assert head.headers["content-type"].startswith("multipart/related")
        assert head.content == b""
        time.sleep(0.5)  # a stream left running would go on reading meanwhile
        read_by_head = rchar(gw.pid) - before
        before = rchar(gw.pid)
        got = client.get(path, headers=headers)
        assert got.status_code == 200
        assert len(got.content) > size
        read_by_get = rchar(gw.pid) - before
    assert read_by_get > size  # the measure sees file reads
    assert read_by_head < 8 * MB, read_by_head


def test_head_is_a_read_for_auth_audit_and_metrics(gateway: Gateway, tmp_path: Path) -> None:
    reader, admin = new_api_key(), new_api_key()
    keys = [
        {"name": "viewer", "sha256": hash_api_key(reader), "scopes": ["read"]},
        {"name": "ops", "sha256": hash_api_key(admin), "scopes": ["admin"]},
    ]
    gw = gateway({"http": {"auth": {"api_keys": keys}}})
    load(gw, make_mr_series(tmp_path / "mr", 1, seed=92))
    with httpx.Client(base_url=gw.url(""), timeout=30) as client:
        refused = client.head("/dicomweb/studies")
        assert refused.status_code == 401
        assert refused.content == b""
        read = client.head("/dicomweb/studies", headers={"X-API-Key": reader})
        assert read.status_code == 200
        assert read.headers["content-type"] == "application/dicom+json"
        # The read permission is not enough for the admin API, with HEAD as with GET.
        assert client.head("/api/queue", headers={"X-API-Key": reader}).status_code == 403
        as_admin = {"X-API-Key": admin}

        def audited() -> list[dict[str, Any]]:
            answer = client.get("/api/audit", params={"event": "query"}, headers=as_admin)
            assert answer.status_code == 200, answer.text
            rows: list[dict[str, Any]] = answer.json()["events"]
            return rows

        wait_until(lambda: any(r["actor"] == "viewer" for r in audited()), 10, "audit row")
        metrics = client.get("/metrics", headers=as_admin).text
    assert 'route="/dicomweb/studies",status="200"' in metrics


def test_405_allow_lists_head_and_head_follows_get(gateway: Gateway) -> None:
    gw = gateway()
    with httpx.Client(base_url=gw.url(""), timeout=30) as client:
        answer = client.delete("/dicomweb/studies")
        assert answer.status_code == 405
        assert {m.strip() for m in answer.headers["allow"].split(",")} == {"GET", "HEAD", "POST"}
        # A path without GET has no HEAD either.
        post_only = client.head("/api/queue/7/retry")
        assert post_only.status_code == 405
        assert post_only.headers["allow"] == "POST"


# -- Vary: Accept ---------------------------------------------------------------------------


def test_negotiated_answers_vary_on_accept(gateway: Gateway, tmp_path: Path) -> None:
    gw = gateway()
    load(gw, make_mr_series(tmp_path / "mr", 1, seed=93))
    study = uid_of(gw, "studies")
    series = uid_of(gw, "series")
    sop = uid_of(gw, "instances")
    with httpx.Client(base_url=gw.url(""), timeout=30) as client:
        for path in (
            "/dicomweb/studies",
            f"/dicomweb/studies/{study}",
            f"/dicomweb/studies/{study}/metadata",
            f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/rendered",
            f"/dicomweb/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}",
        ):
            answer = client.get(path)
            assert answer.status_code == 200, (path, answer.text)
            assert answer.headers.get_list("vary") == ["Accept"], path
        refused = client.get("/dicomweb/studies", headers={"Accept": "image/png"})
        assert refused.status_code == 406
        assert refused.headers["vary"] == "Accept"
        assert "vary" not in client.get("/healthz").headers


def test_vary_accept_joins_the_vary_of_cors(gateway: Gateway) -> None:
    origin = "https://viewer.example"
    gw = gateway({"http": {"cors": {"allow_origins": [origin]}}})
    with httpx.Client(base_url=gw.url(""), timeout=30) as client:
        answer = client.get("/dicomweb/studies", headers={"Origin": origin})
        assert answer.headers["access-control-allow-origin"] == origin
        assert answer.headers.get_list("vary") == ["Origin, Accept"]
        assert client.get("/healthz").headers.get_list("vary") == ["Origin"]


# -- forwarded headers ------------------------------------------------------------------------


def from_second_loopback() -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=SECOND_LOOPBACK), timeout=30)


def retrieve_urls(answer: httpx.Response) -> list[str]:
    assert answer.status_code == 200, answer.text
    return [str(item[RETRIEVE_URL]["Value"][0]) for item in answer.json()]


def test_forwarded_host_and_proto_count_only_from_a_trusted_proxy(
    gateway: Gateway, tmp_path: Path
) -> None:
    gw = gateway({"http": {"trusted_proxies": [SECOND_LOOPBACK]}})
    load(gw, make_mr_series(tmp_path / "mr", 1, seed=94))
    study = uid_of(gw, "studies")
    own = f"http://127.0.0.1:{gw.http_port}/dicomweb/studies/{study}"
    forged = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    # Not a proxy (the peer is 127.0.0.1): neither header is believed.
    assert retrieve_urls(httpx.get(gw.url("/dicomweb/studies"), headers=forged)) == [own]
    fhir = httpx.get(gw.url(f"/fhir/ImagingStudy/{study}"), headers=forged)
    assert "evil.example" not in fhir.text
    with from_second_loopback() as proxy:
        # The trusted proxy: host and scheme as the client used them, both or either.
        proxied = {"X-Forwarded-Host": "pacs.hospital.example", "X-Forwarded-Proto": "https"}
        answer = proxy.get(gw.url("/dicomweb/studies"), headers=proxied)
        assert retrieve_urls(answer) == [f"https://pacs.hospital.example/dicomweb/studies/{study}"]
        answer = proxy.get(gw.url("/dicomweb/studies"), headers={"X-Forwarded-Proto": "https"})
        assert retrieve_urls(answer) == [
            f"https://127.0.0.1:{gw.http_port}/dicomweb/studies/{study}"
        ]
        # A chain: the entry the trusted proxy wrote (the last) counts, not the client's.
        chained = {"X-Forwarded-Host": "evil.example, pacs.hospital.example:8443"}
        answer = proxy.get(gw.url("/dicomweb/studies"), headers=chained)
        assert retrieve_urls(answer) == [
            f"http://pacs.hospital.example:8443/dicomweb/studies/{study}"
        ]
        # A forwarded host that is no host is not used.
        bad = proxy.get(gw.url("/dicomweb/studies"), headers={"X-Forwarded-Host": "a b/c"})
        assert retrieve_urls(bad) == [f"http://127.0.0.1:{gw.http_port}/dicomweb/studies/{study}"]
