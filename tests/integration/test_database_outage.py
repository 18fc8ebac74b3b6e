"""The index database goes away while the gateway runs, and comes back.

A PostgreSQL database of the test's own stops accepting connections (its open ones are
ended), as in a database restart or failover. What a PACS administrator expects then:

- what arrives is refused with a status that says *retry later* (C-STORE 0xA700, STOW-RS
  503 Busy with FailureReason 0xA700, a dropped file left where it is), and nothing is half kept;
- every reader answers a clear error (HTTP 503 with a JSON body, C-FIND 0xA700,
  C-MOVE/C-GET 0xA701), never a 500 or an aborted association;
- a delivery that was sent meanwhile is recorded once the database answers again, so it
  is not sent twice, and the delivery workers keep running;
- the log says so in a few lines, not a traceback every second;
- once the database is back everything works again without a restart.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from tests.conftest import (
    Corpus,
    GatewayProcess,
    SlowPacs,
    free_port,
    pg_cut_off,
    sop_uid_of,
    wait_until,
)
from tests.integration.test_cli_console import _run as run_cli
from tests.integration.test_metrics_audit import _metrics, _value
from tests.integration.test_qr_scp import STUDY_ROOT, findscu, getscu, movescu

pytestmark = [pytest.mark.timeout(180)]

Gateway = Callable[..., GatewayProcess]
OUT_OF_RESOURCES = 0xA700
REFUSED = ("dicomgate_instances_refused_total", "IndexUnavailable")


def _store_files(gw: GatewayProcess) -> list[Path]:
    return sorted(p for p in (gw.data / "store").rglob("*") if p.is_file())


def _no_traceback(gw: GatewayProcess) -> None:
    log = gw.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-4000:]


def test_stores_meanwhile_are_refused_and_nothing_is_half_kept(
    gateway: Gateway, own_database: tuple[str, str], corpus: Corpus, tmp_path: Path
) -> None:
    name, url = own_database
    watch = tmp_path / "drop"
    gw = gateway(
        {
            "database": {"url": url},
            "ingest": {"watch": str(watch), "settle": 0.2, "poll_interval": 0.1},
        }
    )
    files = corpus.mr("db-outage-ingest", 6, seed=931)
    assert gw.storescu(files[:2]).returncode == 0
    pg_cut_off(name, allow=False)
    try:
        sent = gw.storescu([files[2]], "-v")
        assert "Received Store Response (Refused: OutOfResources)" in sent.stdout, sent.stdout
        stow = httpx.post(
            gw.url("/dicomweb/studies"),
            content=files[3].read_bytes(),
            headers={"content-type": "application/dicom"},
            timeout=30,
        )
        # PS3.18 10.5.3 "503 Busy": none stored for want of resources; retry later.
        assert stow.status_code == 503, stow.text
        assert stow.headers["retry-after"] == "10"
        failed = stow.json()["00081198"]["Value"]
        assert [f["00081197"]["Value"] for f in failed] == [[OUT_OF_RESOURCES]]
        watch.mkdir(exist_ok=True)
        shutil.copy(files[4], watch / "e.dcm")
        gw.wait_log("folder.retry")
        time.sleep(0.5)  # more scans: the file still waits, nothing is rejected
        assert (watch / "e.dcm").exists()
        assert [p for p in watch.rglob("*") if p.is_file() and p.name != "e.dcm"] == []
        # Nothing refused was kept: the store holds the two acknowledged instances only.
        assert len(_store_files(gw)) == 2
        # Each refusal is counted (it was not: the index's refusals bypassed the counter).
        refused = _metrics(gw)
        metric, reason = REFUSED
        assert _value(refused, metric, calling_ae="STORESCU", reason=reason) == 1, refused
        assert gw.running()
    finally:
        pg_cut_off(name, allow=True)
    wait_until(lambda: not (watch / "e.dcm").exists(), 30, "the dropped file to be ingested")
    again = gw.storescu([files[2], files[3], files[5]])
    assert again.returncode == 0, again.stdout
    index = gw.index
    assert all(index.instance(sop_uid_of(f)) is not None for f in files)
    assert index.count_instances(current_only=False) == 6
    assert len(_store_files(gw)) == 6
    _no_traceback(gw)


def test_readers_answer_a_clear_error_meanwhile(
    gateway: Gateway, own_database: tuple[str, str], corpus: Corpus, tmp_path: Path
) -> None:
    name, url = own_database
    gw = gateway(
        {
            "database": {"url": url},
            "dimse": {"move_destinations": {"ARCHIVE": {"host": "127.0.0.1", "port": free_port()}}},
            "metrics": {"scrape_cache": 0},
        }
    )
    files = corpus.mr("db-outage-read", 2, seed=932)
    assert gw.storescu(files).returncode == 0
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    instance = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    paths = [
        "/dicomweb/studies",
        "/dicomweb/series",
        "/dicomweb/instances",
        f"/dicomweb/studies/{study}/series",
        f"/dicomweb/studies/{study}/instances",
        f"/dicomweb/studies/{study}/series/{series}/instances",
        f"/dicomweb/studies/{study}",
        f"/dicomweb/studies/{study}/metadata",
        instance,
        f"{instance}/frames/1",
        f"{instance}/rendered",
        f"/dicomweb/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}",
        f"/fhir/ImagingStudy/{study}",
        "/api/queue",
        "/api/audit",
    ]
    pg_cut_off(name, allow=False)
    try:
        for path in paths:
            answer = httpx.get(gw.url(path), timeout=30)
            assert answer.status_code == 503, (path, answer.status_code, answer.text[:300])
            assert answer.headers.get("retry-after") == "10", path  # when to ask again
            assert answer.headers["content-type"].split(";")[0].endswith("json"), path
            body = json.loads(answer.text)
            assert "unavailable" in json.dumps(body), (path, body)
            if not path.startswith("/api"):  # the operator's API keeps the driver's text
                # A DICOMweb or FHIR client is not told the database's host, port or name.
                assert name not in answer.text and "5432" not in answer.text, (path, body)
        # /metrics keeps answering, without the queue's figures; one line says why.
        for _ in range(3):
            scrape = httpx.get(gw.url("/metrics"), timeout=30)
            assert scrape.status_code == 200 and "dicomgate_queue_jobs{" not in scrape.text
            assert "\ndicomgate_index_up 0.0\n" in scrape.text  # alert DicomgateIndexDown
        assert gw.log_count("metrics.queue_failed") == 1
        # The console: the overview still shows what the process knows, with the reason;
        # pages that read the index answer an HTML page saying why.
        view = httpx.get(gw.url("/ui/api/overview"), timeout=30)
        assert view.status_code == 200, view.text
        assert view.json()["index"].startswith("unavailable: ")
        assert view.json()["disk"]["instances"] is None
        assert view.json()["disk"]["disk_free_bytes"] > 0
        page = httpx.get(gw.url("/ui"), timeout=30)
        assert page.status_code == 200 and "The index database is unavailable" in page.text
        for path in ("/ui/studies", "/ui/queue", "/ui/audit"):
            page = httpx.get(gw.url(path), timeout=30)
            assert page.status_code == 503, (path, page.text[:300])
            assert page.headers["content-type"].startswith("text/html"), path
            assert "The index database is unavailable" in page.text, path
        status = run_cli("status", "--config", str(gw.config_path))
        assert status.returncode == 1, status.stdout + status.stderr
        assert "index database unavailable" in status.stdout, status.stdout
        find = findscu(gw, STUDY_ROOT, {"QueryRetrieveLevel": "STUDY"}, tmp_path / "find")
        assert find.final == OUT_OF_RESOURCES, find.output[-2000:]
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
        move = movescu(gw, STUDY_ROOT, keys, "ARCHIVE")
        assert move.final == 0xA701, move.output[-2000:]
        get = getscu(gw, STUDY_ROOT, keys, tmp_path / "get")
        assert get.final == 0xA701, get.output[-2000:]
        for answer in (find, move, get):  # released normally, not aborted
            assert "Releasing Association" in answer.output, answer.output[-2000:]
            # The Error Comment says the index is down, not where the database is.
            assert "index database is unavailable" in answer.output, answer.output[-2000:]
            assert name not in answer.output and "5432" not in answer.output
    finally:
        pg_cut_off(name, allow=True)
    wait_until(
        lambda: httpx.get(gw.url("/dicomweb/studies"), timeout=10).status_code == 200,
        20,
        "QIDO-RS to answer again",
    )
    assert len(httpx.get(gw.url(f"/dicomweb/studies/{study}/instances"), timeout=10).json()) == 2
    scrape = httpx.get(gw.url("/metrics"), timeout=10)
    assert "dicomgate_queue_jobs" in scrape.text and "\ndicomgate_index_up 1.0\n" in scrape.text
    assert gw.log_count("metrics.queue_recovered") == 1
    find = findscu(gw, STUDY_ROOT, {"QueryRetrieveLevel": "STUDY"}, tmp_path / "find2")
    assert find.final == 0 and len(find.responses) == 1, find.output[-2000:]
    _no_traceback(gw)


def test_deliveries_sent_meanwhile_are_recorded_when_it_is_back(
    gateway: Gateway, own_database: tuple[str, str], corpus: Corpus, slow_pacs: SlowPacs
) -> None:
    """The PACS takes a second per instance, so the sends end while the database is cut
    off: the results wait in the gateway and are recorded once it answers; nothing is sent
    twice and the workers deliver what comes next."""
    name, url = own_database
    gw = gateway(
        {
            "database": {"url": url},
            "destinations": {"slow": slow_pacs.destination},
            "routes": [{"name": "all", "match": {}, "to": ["slow"]}],
        }
    )
    files = corpus.mr("db-outage-deliver", 4, seed=933)
    assert gw.storescu(files[:3]).returncode == 0
    gw.wait_log("egress.dimse_associated")  # leased and sending (3 s at least)
    pg_cut_off(name, allow=False)
    try:
        gw.wait_log("delivery.record_waiting", timeout=30)  # a send ended meanwhile
        time.sleep(3)  # the workers keep trying to lease and record meanwhile
    finally:
        pg_cut_off(name, allow=True)
    gw.wait_log("delivery.record_resumed", timeout=30)
    assert gw.storescu(files[3:]).returncode == 0  # the workers still deliver

    def states() -> dict[str, int]:
        status, body = gw.http_get("/api/queue?state=done")
        assert status == 200, body
        return dict(body["counts"]["slow"])

    wait_until(lambda: states() == {"done": 4}, 60, "every job done")
    time.sleep(1)
    assert sorted(slow_pacs.received()) == sorted(sop_uid_of(f) for f in files)  # each once
    # A few lines for the whole outage, none with a traceback.
    for event in ("delivery.record_waiting", "delivery.record_resumed"):
        assert gw.log_count(event) == 1, gw.log_tail(60)
    assert gw.log_count("delivery.lease_error") <= 1
    assert gw.log_count("delivery.timer_error") == 1
    assert gw.log_count("notify.disconnected") == 1
    assert gw.log_count("delivery.worker_error") == 0
    _no_traceback(gw)


def _audit_rows(gw: GatewayProcess, event: str, since: str) -> list[dict[str, Any]]:
    status, body = gw.http_get(f"/api/audit?event={event}&since={since}&limit=1000")
    assert status == 200, body
    return list(body["events"])


def test_audit_events_meanwhile_wait_on_disk_and_are_written_when_it_is_back(
    gateway: Gateway, own_database: tuple[str, str]
) -> None:
    """Associations accepted and refused while the database is cut off are audited once it
    answers again, in the running gateway and across a stop during the outage; none is
    lost (before, each batch was dropped after three tries)."""
    name, url = own_database
    gw = gateway({"database": {"url": url}})
    journal = gw.node_dir / "audit-journal.jsonl"
    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")

    def journaled() -> int:
        _, body = gw.http_get("/readyz")
        return int(body["details"]["audit"]["journaled"]) if body else -1

    pg_cut_off(name, allow=False)
    try:
        for _ in range(3):
            assert gw.echoscu().returncode == 0
        assert gw.echoscu(called="NOT-US").returncode != 0
        wait_until(lambda: journaled() >= 4, 30, "the outage's audit events kept on disk")
        assert journal.exists()
        gw.wait_log("audit.journaling")
    finally:
        pg_cut_off(name, allow=True)
    wait_until(lambda: journaled() == 0, 30, "the journal written to the database")
    assert not journal.exists()
    gw.wait_log("audit.journal_replayed")
    assert len(_audit_rows(gw, "association.accepted", since)) >= 3
    (rejected,) = _audit_rows(gw, "association.rejected", since)
    assert rejected["object"] == "NOT-US" and rejected["outcome"] == "failure"

    # Cut off again and stop meanwhile: what waits is written by the next start.
    pg_cut_off(name, allow=False)
    try:
        assert gw.echoscu(called="STILL-NOT-US").returncode != 0
        wait_until(lambda: journaled() >= 1, 30, "the second outage's event kept on disk")
        assert gw.terminate() == 0, gw.log_tail()
        assert journal.exists()  # application.stop joined it on the way out
    finally:
        pg_cut_off(name, allow=True)
    gw.restart()
    wait_until(lambda: not journal.exists(), 30, "the journal written after the restart")
    refused = _audit_rows(gw, "association.rejected", since)
    assert sorted(r["object"] for r in refused) == ["NOT-US", "STILL-NOT-US"]
    assert len(_audit_rows(gw, "application.stop", since)) == 1
    status, body = gw.http_get("/readyz")
    assert status == 200 and body["details"]["audit"]["dropped"] == 0, body
    assert gw.log_count("audit.write_failed") == 0
    _no_traceback(gw)


def test_dicomweb_client_retries_a_stow_through_an_outage(
    gateway: Gateway, own_database: tuple[str, str], corpus: Corpus
) -> None:
    """dicomweb-client (a client nobody here wrote) retries a 503 by default, with
    exponential waits (2 s, 4 s, ...), and gives up at once on a 409. Sent while the index
    is unreachable, its STOW-RS is refused 503 Busy; the database comes back before the
    client's next try, and the same call returns the instance stored."""
    from dicomweb_client.api import DICOMwebClient

    name, url = own_database
    gw = gateway({"database": {"url": url}})
    (path,) = corpus.mr("db-outage-client", 1, seed=933)
    client = DICOMwebClient(gw.url("/dicomweb"))
    pg_cut_off(name, allow=False)
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            outcome["answer"] = client.store_instances([pydicom.dcmread(path)])
        except Exception as exc:  # the test's assertion reports it
            outcome["error"] = exc

    sender = threading.Thread(target=send)
    try:
        sender.start()
        wait_until(lambda: gw.log_count("stow.request") >= 1, 30, "the first, refused try")
        assert "answer" not in outcome and "error" not in outcome, outcome
    finally:
        pg_cut_off(name, allow=True)
    sender.join(60)
    assert "error" not in outcome, outcome.get("error")
    stored = outcome["answer"].ReferencedSOPSequence
    assert [item.ReferencedSOPInstanceUID for item in stored] == [sop_uid_of(path)]
    assert gw.index.instance(sop_uid_of(path)) is not None
    assert gw.log_count("stow.request") == 2  # refused once, stored on the retry
    _no_traceback(gw)


def test_a_gateway_delivering_to_one_whose_index_is_down_waits_its_retry_after(
    gateway: Gateway, own_database: tuple[str, str], corpus: Corpus
) -> None:
    """Two gateways: the far one's index is unreachable, so its STOW-RS answer is 503 with
    Retry-After: 10. The near one sends nothing to it for those 10 s (its own backoff
    would have tried again after 1 s), then delivers once the far one is back."""
    name, url = own_database
    far = gateway({"database": {"url": url}})
    near = gateway(
        {
            "destinations": {"far": {"type": "dicomweb", "url": far.url("/dicomweb")}},
            "routes": [{"name": "all", "to": ["far"]}],
        }
    )
    files = corpus.mr("db-outage-far", 1, seed=934)  # one job: one request each time
    pg_cut_off(name, allow=False)
    try:
        assert near.storescu(files).returncode == 0
        near.wait_log("delivery.held")
        refused_at = time.monotonic()
        assert far.log_count("stow.request") == 1
    finally:
        pg_cut_off(name, allow=True)
    wait_until(lambda: far.log_count("stow.request") >= 2, 30, "the delivery after the wait")
    assert time.monotonic() - refused_at >= 9.0, "sent again before the far end's Retry-After"
    wait_until(lambda: far.index.count_instances() == 1, 10, "the instance at the far end")
    assert far.log_count("stow.request") == 2
    assert near.log_count("delivery.held") == 1
    assert "no request for 10 s" in near.log_text()
    _no_traceback(near)
    _no_traceback(far)
