"""Metrics and audit trail end to end: a known workload, then /metrics and /api/audit.

Workload: N instances by storescu from a known calling AE, M instances by STOW-RS, one
association rejected (wrong called AE); every instance routed to a folder destination (all
delivered) and to a DIMSE destination nobody listens on (every job dead-lettered at its
first attempt). The PatientName/PatientID planted in the instances must be in the audit
rows and nowhere in the gateway's log.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import (
    Corpus,
    GatewayProcess,
    dcmtk_env,
    free_port,
    needs_dcmtk,
    wait_until,
)

pytestmark = [pytest.mark.timeout(180), needs_dcmtk]

Gateway = Callable[..., GatewayProcess]
REPO = Path(__file__).resolve().parents[2]
PATIENT_NAME = "PLANTEDNAME^AUDIT"
PATIENT_ID = "PLANTEDPID4711"
SENDER = "MODALITY7"
N_DIMSE = 6
M_STOW = 3


def _planted(files: list[Path], folder: Path, study_uid: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.StudyInstanceUID = study_uid
        target = folder / f"{i:03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def _multipart(files: list[Path], boundary: str = "audit-boundary") -> bytes:
    body = b""
    for f in files:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += f.read_bytes() + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def _metrics(gw: GatewayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(gw.url("/metrics"), timeout=10) as r:
        text = r.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _audit(gw: GatewayProcess, **filters: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"limit": "1000", **filters})
    status, body = gw.http_get(f"/api/audit?{query}", timeout=10)
    assert status == 200, body
    events: list[dict[str, Any]] = body["events"]
    return events


@pytest.fixture
def workload(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> tuple[GatewayProcess, str, str, Path]:
    dimse_study, stow_study = "1.2.826.0.1.3680043.10.999.1", "1.2.826.0.1.3680043.10.999.2"
    dimse_files = _planted(corpus.mr("audit-dimse", N_DIMSE, seed=701), tmp_path / "d", dimse_study)
    stow_files = _planted(corpus.mr("audit-stow", M_STOW, seed=702), tmp_path / "s", stow_study)
    share = tmp_path / "share"
    gw = gateway(
        {
            "destinations": {
                "share": {"type": "folder", "path": str(share)},
                "broken": {
                    "type": "dimse",
                    "ae_title": "NOBODY",
                    "host": "127.0.0.1",
                    "port": free_port(),
                },
            },
            "routes": [{"name": "all", "to": ["share", "broken"]}],
            "queue": {"retry": {"max_attempts": 1}},
            "metrics": {"scrape_cache": 0},
        }
    )
    rejected = gw.storescu(dimse_files[:1], "-aet", SENDER, called="NOT-THE-GATEWAY")
    assert rejected.returncode != 0
    assert gw.storescu(dimse_files, "-aet", SENDER).returncode == 0
    request = urllib.request.Request(
        gw.url("/dicomweb/studies"),
        data=_multipart(stow_files),
        headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=audit-boundary',
            "Accept": "application/dicom+json",
        },
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.status == 200
    total = N_DIMSE + M_STOW
    wait_until(lambda: len(list(share.rglob("*.dcm"))) == total, 60, "folder deliveries")
    wait_until(
        lambda: gw.log_count("delivery.dead_lettered") >= total, 60, "dead-lettered deliveries"
    )
    return gw, dimse_study, stow_study, share


def test_metrics_count_the_workload(
    workload: tuple[GatewayProcess, str, str, Path],
) -> None:
    gw, _, _, _ = workload
    total = N_DIMSE + M_STOW
    wait_until(
        lambda: _value(_metrics(gw), "dicomgate_audit_events_total", event="delivery.done") > 0,
        10,
        "audit rows written",
    )
    m = _metrics(gw)
    received = "dicomgate_instances_received_total"
    assert _value(m, received, calling_ae=SENDER, ingress="dimse") == N_DIMSE
    assert _value(m, received, calling_ae="", ingress="stow") == M_STOW
    assert _value(m, "dicomgate_received_bytes_total", calling_ae=SENDER, ingress="dimse") > 0
    assoc = "dicomgate_associations_total"
    assert _value(m, assoc, calling_ae=SENDER, result="accepted") == 1
    assert _value(m, assoc, calling_ae=SENDER, result="rejected") == 1
    assert _value(m, "dicomgate_associations_active") == 0
    ended = "dicomgate_associations_ended_total"
    assert _value(m, ended, calling_ae=SENDER, how="released") == 1
    assert _value(m, "dicomgate_store_ack_seconds_count", ingress="dimse") == N_DIMSE
    assert _value(m, "dicomgate_store_ack_seconds_count", ingress="stow") == M_STOW
    assert _value(m, "dicomgate_stow_requests_total", result="stored") == 1
    assert _value(m, "dicomgate_stow_request_seconds_count") == 1
    deliveries = "dicomgate_deliveries_total"
    assert _value(m, deliveries, destination="share", outcome="done") == total
    assert _value(m, deliveries, destination="broken", outcome="dead_lettered") == total
    assert _value(m, deliveries, destination="broken", outcome="done") == 0
    assert _value(m, "dicomgate_delivery_seconds_count", destination="share") >= 1
    jobs = "dicomgate_queue_jobs"
    assert _value(m, jobs, destination="broken", state="dead") == total
    assert _value(m, jobs, destination="share", state="pending") == 0
    assert _value(m, "dicomgate_queue_oldest_job_age_seconds", destination="share") == 0
    assert _value(m, "dicomgate_destination_circuit_open", destination="share") == 0
    assert _value(m, "dicomgate_store_free_bytes") > 0
    http = "dicomgate_http_requests_total"
    assert _value(m, http, method="POST", route="/dicomweb/studies", status="200") == 1
    assert _value(m, "dicomgate_build_info", version=_version(), node=socket.gethostname()) == 1


def _version() -> str:
    from dicomgate import __version__

    return __version__


def test_audit_rows_for_each_event_kind_and_filters(
    workload: tuple[GatewayProcess, str, str, Path],
) -> None:
    gw, dimse_study, stow_study, _ = workload
    wait_until(
        lambda: len(_audit(gw, event="delivery.dead_lettered")) >= 2, 10, "delivery audit rows"
    )
    expected = {
        "application.start",
        "association.accepted",
        "association.rejected",
        "instance.received",
        "stow.request",
        "delivery.done",
        "delivery.dead_lettered",
    }
    # Rows other than the received instances' are written by a batching thread.
    wait_until(lambda: expected <= {e["event"] for e in _audit(gw)}, 10, "every event kind")

    received = _audit(gw, event="instance.received", actor=SENDER)
    assert sum(e["detail"]["instances"] for e in received) == N_DIMSE
    row = received[0]
    assert row["study_uid"] == dimse_study
    assert row["patient_id"] == PATIENT_ID and row["patient_name"] == PATIENT_NAME
    assert row["source_ip"] == "127.0.0.1" and row["outcome"] == "success"
    assert row["detail"]["via"] == "dimse"
    stow_rows = _audit(gw, event="instance.received", study=stow_study)
    assert sum(e["detail"]["instances"] for e in stow_rows) == M_STOW
    assert {e["detail"]["via"] for e in stow_rows} == {"stow"}

    rejected = _audit(gw, event="association.rejected")
    assert [(e["actor"], e["outcome"]) for e in rejected] == [(SENDER, "failure")]
    dead = _audit(gw, event="delivery.dead_lettered", study=dimse_study)
    assert sum(e["detail"]["instances"] for e in dead) == N_DIMSE
    assert {e["object"] for e in dead} == {"broken"}
    by_prefix = {e["event"] for e in _audit(gw, event="delivery.")}
    assert by_prefix == {"delivery.done", "delivery.dead_lettered"}

    # time filters: nothing before the epoch of this test, nothing after now + 1 h
    assert _audit(gw, until="2000-01-01T00:00:00Z") == []

    # Each read of the trail adds an audit.read row of its own (written a moment later):
    # compare the rows of everything else.
    def others(rows: list[dict[str, Any]]) -> list[int]:
        return [r["id"] for r in rows if r["event"] != "audit.read"]

    assert others(_audit(gw, since="2000-01-01")) == others(_audit(gw))
    status, body = gw.http_get("/api/audit?since=yesterday")
    assert status == 400 and "since" in body["error"]
    page = _audit(gw, limit="2")
    assert len(page) == 2

    # DESIGN rule 5: the planted identifiers are in the audit trail, never in the log
    log = gw.log_text()
    assert "PLANTEDNAME" not in log and PATIENT_ID not in log
    assert dimse_study not in log and stow_study not in log


def test_dashboard_and_alerts_use_only_existing_metrics(
    workload: tuple[GatewayProcess, str, str, Path],
) -> None:
    gw, _, _, _ = workload
    exposed = {name for name, _ in _metrics(gw)}
    with urllib.request.urlopen(gw.url("/metrics"), timeout=10) as r:
        text = r.read().decode()
    exposed |= set(re.findall(r"^# TYPE (\S+)", text, re.M))
    dashboard = (REPO / "deploy/grafana/dicomgate.json").read_text()
    panels = json.loads(dashboard)["panels"]
    assert panels
    for panel in panels:
        if panel.get("type") == "row":
            continue
        exprs = [t["expr"] for t in panel.get("targets", [])]
        assert exprs, f"panel {panel['title']!r} has no query"
    alerts = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    rules = [r for group in alerts["groups"] for r in group["rules"]]
    assert {r["alert"] for r in rules} >= {
        "DicomgateDown",
        "DicomgateDestinationFailing",
        "DicomgateQueueGrowing",
        "DicomgateDeadLetters",
        "DicomgateDiskAlmostFull",
    }
    used = set(re.findall(r"dicomgate_[a-z0-9_]+", dashboard))
    used |= {n for r in rules for n in re.findall(r"dicomgate_[a-z0-9_]+", r["expr"])}
    assert used
    missing = sorted(n for n in used if n not in exposed)
    assert not missing, f"metrics used by the dashboard or alerts but not exposed: {missing}"


def test_audit_messages_reach_a_syslog_repository(
    gateway: Gateway, corpus: Corpus, tmp_path: Path
) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(15)
    port = receiver.getsockname()[1]
    study = "1.2.826.0.1.3680043.10.999.3"
    files = _planted(corpus.mr("audit-syslog", 2, seed=703), tmp_path / "f", study)
    try:
        gw = gateway(
            {
                "audit": {
                    "node_name": "gw-test",
                    "syslog": {"host": "127.0.0.1", "port": port, "protocol": "udp"},
                }
            }
        )
        assert gw.storescu(files, "-aet", SENDER).returncode == 0
        messages = []
        while True:
            data = receiver.recv(65536)
            messages.append(data)
            if b"110104" in data:
                break
    finally:
        receiver.close()
    frame = messages[-1]
    header, _, xml = frame.partition(b"\xef\xbb\xbf")
    assert re.match(rb"<85>1 \S+ gw-test dicomgate \d+ IHE\+RFC-3881 - $", header), header
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    ident = root.find("EventIdentification")
    assert ident is not None and ident.get("EventActionCode") == "C"
    assert ident.get("EventOutcomeIndicator") == "0"
    event_id = ident.find("EventID")
    assert event_id is not None and event_id.get("csd-code") == "110104"
    users = {p.get("UserID") for p in root.findall("ActiveParticipant")}
    assert users == {SENDER, "gw-test"}
    objects = {
        o.get("ParticipantObjectID"): o for o in root.findall("ParticipantObjectIdentification")
    }
    assert set(objects) == {study, PATIENT_ID}
    name = objects[PATIENT_ID].find("ParticipantObjectName")
    assert name is not None and name.text == PATIENT_NAME
    sop = objects[study].find("ParticipantObjectDescription/SOPClass")
    assert sop is not None and sop.get("NumberOfInstances") in ("1", "2")
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "gw-test"


def test_dimse_permission_refusals_are_audited_and_counted(
    gateway: Gateway, corpus: Corpus
) -> None:
    gw = gateway({"dimse": {"allow": {"store": ["CT*"], "find": ["VIEWER*"]}}})
    files = corpus.mr("refused", 2, seed=713)
    refused = gw.storescu(files, "-aet", "STORESCU")
    assert "0x0124" in refused.stdout or refused.returncode != 0, refused.stdout
    find = subprocess.run(
        [
            *("findscu", "-v", "-S", "-to", "10", "-aec", gw.ae_title, "-aet", "FINDSCU"),
            *("-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"),
            *("127.0.0.1", str(gw.dimse_port)),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Status: 0x124" in find.stderr, find.stderr

    # storescu stops at the first refusal: one row.
    wait_until(lambda: len(_audit(gw, event="instance.refused")) == 1, 10, "refusal audited")
    rows = _audit(gw, event="instance.refused")
    assert {(r["actor"], r["source_ip"], r["outcome"]) for r in rows} == {
        ("STORESCU", "127.0.0.1", "failure")
    }
    assert {(r["detail"]["reason"], r["detail"]["status"]) for r in rows} == {
        ("not_authorized", "0x0124")
    }
    wait_until(lambda: bool(_audit(gw, event="query", outcome="failure")), 10, "query audited")
    assert _value(_metrics(gw), "dicomgate_auth_failures_total", kind="dimse") == 2
    assert gw.index.count_instances() == 0

    # dicomgate_queries_total counts the HTTP side too, by service.
    assert gw.http_get("/dicomweb/studies")[0] == 200
    assert gw.http_get("/dicomweb/studies/1.2.3.999/metadata")[0] == 404
    m = _metrics(gw)
    queries = "dicomgate_queries_total"
    assert _value(m, queries, service="find", result="refused") == 1
    assert _value(m, queries, service="qido", result="answered") == 1
    assert _value(m, queries, service="wado", result="refused") == 1
    assert _value(m, queries, service="wado", result="answered") == 0
    # ... and the WADO-RS retrieval is audited (it was not: the routes had no tag).
    wait_until(lambda: bool(_audit(gw, event="retrieve")), 10, "WADO-RS retrieve audited")
    [retrieve] = _audit(gw, event="retrieve")
    assert retrieve["object"] == "/dicomweb/studies/{study}/metadata"
    assert (retrieve["study_uid"], retrieve["outcome"]) == ("1.2.3.999", "failure")
