"""Audit rows and ATNA messages are complete: who, from where, what (docs/observability.md).

Real peers on loopback: DCMTK storescu/findscu/movescu/getscu/echoscu and a storescp as the
move destination, a pynetdicom SCU for an A-ABORT, a syslog repository (RFC 6587 octet
counting, tests/integration/test_atna.py), HTTP clients with an API key. The patient data
planted in the instances must reach the audit rows and the ATNA messages, never the log.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path
from typing import Any

import pydicom
import pytest
from tests.conftest import Corpus, GatewayProcess, free_port, needs_dcmtk, wait_until
from tests.integration.test_atna import SyslogReceiver, check_audit_message
from tests.integration.test_metrics_audit import _metrics, _multipart, _value
from tests.integration.test_qr_scp import STUDY_ROOT, StoreSCP, findscu, getscu, movescu

pytestmark = [pytest.mark.timeout(180), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]
PATIENT_NAME = "QRPLANT^AUDITNAME"
PATIENT_ID = "QRPID0815"
STUDY = "1.2.826.0.1.3680043.10.998.1"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
KEY = "audit-completeness-key"
KEY_NAME = "operator1"
AUTH = {
    "api_keys": [
        {
            "name": KEY_NAME,
            "sha256": sha256(KEY.encode()).hexdigest(),
            "scopes": ["read", "write", "admin"],
        }
    ]
}


def _planted(files: list[Path], folder: Path, study_uid: str) -> list[Path]:
    """Copies of ``files`` in study ``study_uid`` of the planted patient."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.StudyInstanceUID = PATIENT_NAME, PATIENT_ID, study_uid
        target = folder / f"{i:03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def _http(
    gw: GatewayProcess,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    key: str | None = KEY,
) -> tuple[int, bytes]:
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(gw.url(path), data=body, headers=sent, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def _audit(gw: GatewayProcess, key: str | None = KEY, **filters: str) -> list[dict[str, Any]]:
    status, body = _http(
        gw, "/api/audit?" + urllib.parse.urlencode({"limit": "1000", **filters}), key=key
    )
    assert status == 200, body
    events: list[dict[str, Any]] = json.loads(body)["events"]
    return events


def _wait_rows(
    gw: GatewayProcess, count: int, key: str | None = KEY, **filters: str
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal rows
        rows = _audit(gw, key, **filters)
        return len(rows) >= count

    wait_until(enough, 15, f"{count} audit rows {filters}")
    return rows


def _event_id(root: ET.Element) -> str:
    ident = root.find("EventIdentification/EventID")
    assert ident is not None
    return str(ident.get("csd-code"))


def _objects(root: ET.Element) -> dict[str, ET.Element]:
    return {
        str(o.get("ParticipantObjectID")): o
        for o in root.findall("ParticipantObjectIdentification")
    }


def _code(element: ET.Element, tag: str) -> str:
    found = element.find(tag)
    assert found is not None, tag
    return str(found.get("csd-code"))


def test_dimse_query_and_retrieve_rows_and_atna_messages(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    files = _planted(corpus.mr("qr-audit", 2, seed=731), tmp_path / "in", STUDY)
    receiver = SyslogReceiver()
    movedst = StoreSCP(tmp_path / "movedst", "MOVEDST")
    try:
        gw = gateway(
            {
                "dimse": {
                    "move_destinations": {"MOVEDST": {"host": "127.0.0.1", "port": movedst.port}}
                },
                "audit": {
                    "node_name": "gw-qr",
                    "syslog": {"host": "127.0.0.1", "port": receiver.port, "protocol": "tcp"},
                },
            }
        )
        assert gw.storescu(files, "-aet", "MODALITY1").returncode == 0
        find = findscu(
            gw,
            STUDY_ROOT,
            {"QueryRetrieveLevel": "STUDY", "PatientName": "QRPLANT*", "StudyInstanceUID": ""},
            tmp_path / "find",
            aet="FINDER",
        )
        assert find.final == 0 and find.values("StudyInstanceUID") == [STUDY], find.output[-2000:]
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": STUDY}
        move = movescu(gw, STUDY_ROOT, keys, "MOVEDST", aet="MOVER")
        assert move.final == 0, move.output[-2000:]
        get = getscu(gw, STUDY_ROOT, keys, tmp_path / "get")
        assert get.final == 0, get.output[-2000:]

        # The audit rows: who, from where, which study, the search keys.
        query = _wait_rows(gw, 1, event="query")[0]
        assert (query["actor"], query["source_ip"], query["object"]) == (
            "FINDER",
            "127.0.0.1",
            "C-FIND",
        )
        assert query["detail"]["query"]["PatientName"] == "QRPLANT*"
        assert query["detail"]["sop_class"] == STUDY_ROOT_FIND
        retrieves = {r["object"]: r for r in _wait_rows(gw, 2, event="retrieve")}
        moved, got = retrieves["C-MOVE"], retrieves["C-GET"]
        assert (moved["actor"], moved["source_ip"], moved["study_uid"]) == (
            "MOVER",
            "127.0.0.1",
            STUDY,
        )
        assert moved["detail"]["move_destination"] == "MOVEDST"
        assert moved["detail"]["studies"] == {STUDY: {MR_STORAGE: 2}}
        assert (moved["patient_id"], moved["patient_name"]) == (PATIENT_ID, PATIENT_NAME)
        assert (got["actor"], got["source_ip"], got["study_uid"]) == ("GETSCU", "127.0.0.1", STUDY)
        assert got["patient_id"] == PATIENT_ID
        # The search keys and the patient reach the audit trail only (DESIGN rule 5).
        log = gw.log_text()
        assert "QRPLANT" not in log and PATIENT_ID not in log and STUDY not in log

        # ATNA: Query with the SOP queried and the query; C-MOVE to the move destination.
        wait_until(
            lambda: sum(_event_id(r) == "110104" for _, r in receiver.messages()) >= 3,
            15,
            "the retrieve messages",
        )
        messages = [root for _, root in receiver.messages()]
        for root in messages:
            check_audit_message(root)
            for sop_class in root.iter("SOPClass"):
                assert sop_class.get("UID"), ET.tostring(root)  # never UID=""
        (query_message,) = [r for r in messages if _event_id(r) == "110112"]
        sop_queried = _objects(query_message)[STUDY_ROOT_FIND]
        assert _code(sop_queried, "ParticipantObjectIDTypeCode") == "110181"
        identifier = base64.b64decode(sop_queried.findtext("ParticipantObjectQuery") or "")
        assert b"QRPLANT*" in identifier
        users = {p.get("UserID"): p for p in query_message.findall("ActiveParticipant")}
        assert users["FINDER"].get("NetworkAccessPointID") == "127.0.0.1"

        transferred = [r for r in messages if _event_id(r) == "110104"]
        (move_message,) = [
            r
            for r in transferred
            if "MOVEDST" in {p.get("UserID") for p in r.findall("ActiveParticipant")}
        ]
        by_user = {p.get("UserID"): p for p in move_message.findall("ActiveParticipant")}
        assert _code(by_user["MOVEDST"], "RoleIDCode") == "110152"  # Destination Role ID
        assert by_user["MOVER"].get("UserIsRequestor") == "true"
        assert (
            by_user["MOVER"].find("RoleIDCode") is None
            or _code(by_user["MOVER"], "RoleIDCode") != "110152"
        )
        objects = _objects(move_message)
        assert set(objects) == {STUDY, PATIENT_ID}
        assert _code(objects[PATIENT_ID], "ParticipantObjectIDTypeCode") == "2"
        assert objects[PATIENT_ID].findtext("ParticipantObjectName") == PATIENT_NAME
        sop = objects[STUDY].find("ParticipantObjectDescription/SOPClass")
        assert sop is not None and (sop.get("UID"), sop.get("NumberOfInstances")) == (
            MR_STORAGE,
            "2",
        )
        get_messages = [
            r
            for r in transferred
            if "GETSCU" in {p.get("UserID") for p in r.findall("ActiveParticipant")}
        ]
        assert len(get_messages) == 1 and set(_objects(get_messages[0])) == {STUDY, PATIENT_ID}
        assert receiver.errors == []
    finally:
        movedst.stop()
        receiver.stop()


def test_stow_rows_name_the_user_and_refusals_are_counted(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    files = _planted(corpus.mr("stow-audit", 2, seed=732), tmp_path / "in", STUDY)
    receiver = SyslogReceiver()
    try:
        gw = gateway(
            {
                "http": {"auth": AUTH},
                "metrics": {"scrape_cache": 0},
                "audit": {
                    "node_name": "gw-stow",
                    "syslog": {"host": "127.0.0.1", "port": receiver.port, "protocol": "tcp"},
                },
            }
        )
        multipart = 'multipart/related; type="application/dicom"; boundary=audit-boundary'
        headers = {"Content-Type": multipart, "Accept": "application/dicom+json"}
        status, body = _http(
            gw, "/dicomweb/studies", method="POST", body=_multipart(files), headers=headers
        )
        assert status == 200, body
        # An instance of another study than the path names: refused at ingest (409).
        status, body = _http(
            gw,
            "/dicomweb/studies/1.2.826.0.1.3680043.10.998.99",
            method="POST",
            body=_multipart(files[:1]),
            headers=headers,
        )
        assert status == 409, body
        # Refused as a whole: an Accept the gateway cannot answer.
        status, _ = _http(
            gw,
            "/dicomweb/studies",
            method="POST",
            body=_multipart(files),
            headers={**headers, "Accept": "application/dicom+xml"},
        )
        assert status == 406

        requests = _wait_rows(gw, 3, event="stow.request")
        assert {r["actor"] for r in requests} == {KEY_NAME}
        assert {r["source_ip"] for r in requests} == {"127.0.0.1"}
        refused = [r for r in requests if r["detail"].get("status") == 406]
        assert len(refused) == 1 and refused[0]["outcome"] == "failure"
        received = _wait_rows(gw, 1, event="instance.received")
        assert {(r["actor"], r["detail"]["via"]) for r in received} == {(KEY_NAME, "stow")}
        (mismatch,) = _wait_rows(gw, 1, event="instance.refused")
        assert (mismatch["actor"], mismatch["source_ip"]) == (KEY_NAME, "127.0.0.1")

        samples = _metrics(gw)
        assert _value(samples, "dicomgate_stow_requests_total", result="refused") == 1
        assert _value(samples, "dicomgate_stow_request_seconds_count") == 3
        assert gw.log_count("stow.refused") == 1

        wait_until(
            lambda: any(_event_id(r) == "110104" for _, r in receiver.messages()),
            15,
            "the instances-transferred message",
        )
        for _, stored in receiver.messages():
            if _event_id(stored) == "110104":
                requestor = [
                    p
                    for p in stored.findall("ActiveParticipant")
                    if p.get("UserIsRequestor") == "true"
                ]
                assert [p.get("UserID") for p in requestor] == [KEY_NAME]
    finally:
        receiver.stop()


def test_refused_requests_are_labelled_by_their_route(gateway: Gateway) -> None:
    gw = gateway({"http": {"auth": AUTH}, "metrics": {"scrape_cache": 0}})
    assert _http(gw, "/dicomweb/studies?PatientName=X*", key=None)[0] == 401
    assert _http(gw, "/dicomweb/studies/1.2.3/series", key="wrong")[0] == 401
    assert _http(gw, "/api/queue", key=None)[0] == 401
    assert _http(gw, "/no/such/path", key=None)[0] == 401
    status, body = _http(gw, "/metrics")
    assert status == 200, body
    samples = _metrics_text(body.decode())
    requests = "dicomgate_http_requests_total"
    assert samples.get((requests, "GET", "/dicomweb/studies", "401")) == 1
    assert samples.get((requests, "GET", "/dicomweb/studies/{study}/series", "401")) == 1
    assert samples.get((requests, "GET", "/api/queue", "401")) == 1
    assert samples.get((requests, "GET", "<unmatched>", "401")) == 1


def _metrics_text(text: str) -> dict[tuple[str, str, str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "dicomgate_http_requests_total":
                out[(s.name, s.labels["method"], s.labels["route"], s.labels["status"])] = s.value
    return out


def test_operator_actions_and_audit_reads_are_audited(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    receiver = SyslogReceiver()
    try:
        gw = gateway(
            {
                "http": {"auth": AUTH},
                "destinations": {
                    "down": {
                        "type": "dimse",
                        "ae_title": "DOWN",
                        "host": "127.0.0.1",
                        "port": free_port(),
                    }
                },
                "routes": [{"name": "all", "to": ["down"]}],
                "queue": {"retry": {"max_attempts": 1}},
                "audit": {
                    "node_name": "gw-ops",
                    "syslog": {"host": "127.0.0.1", "port": receiver.port, "protocol": "tcp"},
                },
            }
        )
        assert gw.storescu(corpus.mr("ops-audit", 2, seed=733), "-aet", "MODALITY2").returncode == 0
        gw.wait_log("delivery.dead_lettered", timeout=30)
        wait_until(
            lambda: (
                json.loads(_http(gw, "/api/queue?state=dead")[1])["counts"]
                .get("down", {})
                .get("dead", 0)
                == 2
            ),
            30,
            "two dead jobs",
        )
        status, body = _http(gw, "/api/destinations/down/pause", method="POST")
        assert status == 200, body
        status, body = _http(gw, "/api/queue/retry-dead?destination=down", method="POST")
        assert status == 200 and json.loads(body)["retried"] == 2, body
        status, body = _http(gw, "/api/destinations/down/resume", method="POST")
        assert status == 200, body

        (redriven,) = _wait_rows(gw, 1, event="queue.redriven")
        assert (redriven["actor"], redriven["source_ip"], redriven["object"]) == (
            KEY_NAME,
            "127.0.0.1",
            "down",
        )
        assert redriven["detail"]["jobs"] == 2 and redriven["detail"]["destination"] == "down"
        for kind in ("destination.paused", "destination.resumed"):
            (row,) = _wait_rows(gw, 1, event=kind)
            assert (row["actor"], row["source_ip"], row["object"]) == (
                KEY_NAME,
                "127.0.0.1",
                "down",
            )

        # Reading the trail is audited (the reads above included), with the filters.
        reads = _wait_rows(gw, 4, event="audit.read")
        assert {r["actor"] for r in reads} == {KEY_NAME}
        assert {r["source_ip"] for r in reads} == {"127.0.0.1"}
        assert any(r["detail"].get("query", "").find("event=queue.redriven") >= 0 for r in reads)
        wait_until(
            lambda: any(_event_id(r) == "110101" for _, r in receiver.messages()),
            15,
            "an Audit Log Used message",
        )
        used = next(r for _, r in receiver.messages() if _event_id(r) == "110101")
        check_audit_message(used)
        assert used.find("EventIdentification").get("EventActionCode") == "R"  # type: ignore[union-attr]
        (participant,) = used.findall("ActiveParticipant")
        assert (participant.get("UserID"), participant.get("UserIsRequestor")) == (KEY_NAME, "true")
        (log_object,) = used.findall("ParticipantObjectIdentification")
        assert log_object.get("ParticipantObjectTypeCodeRole") == "13"
        assert log_object.findtext("ParticipantObjectName") == "Security Audit Log"
    finally:
        receiver.stop()


def test_peer_abort_is_counted_as_aborted(gateway: Gateway) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    gw = gateway({"metrics": {"scrape_cache": 0}})
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gw.dimse_port, ae_title=gw.ae_title)
    assert assoc.is_established
    assoc.abort()
    ended = "dicomgate_associations_ended_total"
    wait_until(
        lambda: _value(_metrics(gw), ended, calling_ae="ABORTER", how="aborted") == 1,
        10,
        "the abort counted",
    )
    samples = _metrics(gw)
    assert _value(samples, ended, calling_ae="ABORTER", how="lost") == 0
    assert _value(samples, "dicomgate_associations_active") == 0


def test_repository_outage_logs_once_and_counts_only_messages_to_send(gateway: Gateway) -> None:
    receiver = SyslogReceiver()
    gw = gateway(
        {
            "metrics": {"scrape_cache": 0},
            "audit": {"syslog": {"host": "127.0.0.1", "port": receiver.port, "protocol": "tcp"}},
        }
    )
    wait_until(lambda: len(receiver.messages()) >= 1, 10, "application.start sent")
    receiver.stop()
    for _ in range(6):  # association.accepted: kept in the database, never forwarded
        assert gw.echoscu("-aet", "ECHOER").returncode == 0
        time.sleep(0.6)  # one writer batch each
    for _ in range(3):  # association.rejected: a Security Alert message each
        assert gw.echoscu("-aet", "ECHOER", called="NOT-THE-GATEWAY").returncode != 0
        time.sleep(0.6)
    failures = "dicomgate_audit_failures_total"
    wait_until(lambda: _value(_metrics(gw), failures, sink="syslog") >= 3, 15, "3 failures")
    time.sleep(1.0)
    assert _value(_metrics(gw), failures, sink="syslog") == 3
    assert gw.log_count("audit.forward_failed") == 1, gw.log_tail()
