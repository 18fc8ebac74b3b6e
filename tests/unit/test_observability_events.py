"""The event bus (log records -> metrics, audit rows), the scrape-time collector, the audit
trail on a real SQLite index, and the DICOM audit message XML."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from dicomgate.index.db import Index
from dicomgate.index.schema import audit_event
from dicomgate.observability.atna import audit_message, syslog_frame
from dicomgate.observability.audit import AuditEvent, AuditQuery, AuditTrail
from dicomgate.observability.events import EventHandler
from dicomgate.observability.metrics import GatewayCollector, LabelLimiter, Metrics, QueueFigures


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = Index.open(f"sqlite:///{tmp_path}/index.db")
    yield idx
    idx.close()


@pytest.fixture
def bus(index: Index) -> Iterator[tuple[logging.Logger, Metrics, AuditTrail]]:
    metrics = Metrics()
    trail = AuditTrail(index.engine, node="node-a")
    trail.start()
    logger = logging.getLogger("dicomgate.test-events")
    handler = EventHandler(metrics, trail)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, metrics, trail
    logger.removeHandler(handler)
    trail.stop()


def value(metrics: Metrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_association_events_move_counters_and_the_active_gauge(
    bus: tuple[logging.Logger, Metrics, AuditTrail],
) -> None:
    log, m, trail = bus
    ok = {"event": "association.accepted", "calling_ae": "CT1", "peer": "10.0.0.7"}
    log.info("association accepted", extra=ok)
    log.info("association accepted", extra=ok)
    assert value(m, "dicomgate_associations_active") == 2
    log.info("released", extra={"event": "association.released", "calling_ae": "CT1"})
    log.warning("aborted", extra={"event": "association.aborted", "calling_ae": "CT1"})
    # an abort of an association never accepted (malformed request) changes nothing
    log.warning("aborted", extra={"event": "association.aborted", "calling_ae": ""})
    log.warning(
        "rejected",
        extra={"event": "association.rejected", "calling_ae": "EVIL", "peer": "10.9.9.9"},
    )
    assert value(m, "dicomgate_associations_active") == 0
    assert value(m, "dicomgate_associations_total", calling_ae="CT1", result="accepted") == 2
    assert value(m, "dicomgate_associations_total", calling_ae="EVIL", result="rejected") == 1
    assert value(m, "dicomgate_associations_ended_total", calling_ae="CT1", how="released") == 1
    assert value(m, "dicomgate_associations_ended_total", calling_ae="CT1", how="aborted") == 1
    trail.flush()
    rows = trail.query(AuditQuery(event="association.rejected"))
    assert [(r["actor"], r["source_ip"], r["outcome"], r["node"]) for r in rows] == [
        ("EVIL", "10.9.9.9", "failure", "node-a")
    ]
    assert len(trail.query(AuditQuery(event="association.accepted"))) == 2


def test_ingest_stow_and_delivery_events_move_metrics(
    bus: tuple[logging.Logger, Metrics, AuditTrail],
) -> None:
    log, m, _ = bus
    for _ in range(3):
        log.info(
            "stored",
            extra={
                "event": "instance.stored",
                "calling_ae": "MR1",
                "via": "dimse",
                "bytes": 1000,
                "seconds": 0.002,
            },
        )
    log.warning(
        "refused",
        extra={"event": "instance.refused", "calling_ae": "MR1", "reason": "InvalidInstance"},
    )
    log.info(
        "stow",
        extra={"event": "stow.request", "stored": 2, "failed": 1, "bytes": 5, "seconds": 0.3},
    )
    log.info(
        "done",
        extra={"event": "delivery.done", "destination": "pacs", "instances": 4, "seconds": 0.1},
    )
    log.warning("failed", extra={"event": "delivery.failed", "destination": "pacs"})
    log.error("dead", extra={"event": "delivery.dead_lettered", "destination": "pacs"})
    log.error("open", extra={"event": "delivery.circuit_open", "destination": "pacs"})
    received = {"calling_ae": "MR1", "ingress": "dimse"}
    assert value(m, "dicomgate_instances_received_total", **received) == 3
    assert value(m, "dicomgate_received_bytes_total", **received) == 3000
    assert value(m, "dicomgate_store_ack_seconds_count", ingress="dimse") == 3
    assert value(m, "dicomgate_store_ack_seconds_bucket", ingress="dimse", le="0.0025") == 3
    refused = {"calling_ae": "MR1", "reason": "InvalidInstance"}
    assert value(m, "dicomgate_instances_refused_total", **refused) == 1
    assert value(m, "dicomgate_stow_requests_total", result="partial") == 1
    assert value(m, "dicomgate_stow_request_seconds_sum") == pytest.approx(0.3)
    assert value(m, "dicomgate_deliveries_total", destination="pacs", outcome="done") == 4
    assert value(m, "dicomgate_deliveries_total", destination="pacs", outcome="failed") == 1
    dead = {"destination": "pacs", "outcome": "dead_lettered"}
    assert value(m, "dicomgate_deliveries_total", **dead) == 1
    assert value(m, "dicomgate_delivery_seconds_count", destination="pacs") == 1
    assert value(m, "dicomgate_circuit_breaker_trips_total", destination="pacs") == 1
    assert value(m, "dicomgate_log_errors_total", event="delivery.dead_lettered") == 1


def test_query_and_auth_events_are_audited(
    bus: tuple[logging.Logger, Metrics, AuditTrail],
) -> None:
    log, m, trail = bus
    log.info("C-FIND", extra={"event": "find.answered", "calling_ae": "WS1", "status": "0x0000"})
    log.warning("move refused", extra={"event": "move.refused", "calling_ae": "WS2"})
    log.warning("denied", extra={"event": "auth.denied", "user": "alice", "client_ip": "10.1.1.1"})
    assert value(m, "dicomgate_queries_total", service="find", result="answered") == 1
    assert value(m, "dicomgate_queries_total", service="move", result="refused") == 1
    assert value(m, "dicomgate_auth_failures_total", kind="http") == 1
    trail.flush()
    assert [r["actor"] for r in trail.query(AuditQuery(event="query"))] == ["WS1"]
    retrieve = trail.query(AuditQuery(event="retrieve"))
    assert [(r["actor"], r["outcome"]) for r in retrieve] == [("WS2", "failure")]
    denied = trail.query(AuditQuery(event="auth.denied"))
    assert [(r["actor"], r["source_ip"]) for r in denied] == [("alice", "10.1.1.1")]


def test_a_broken_event_never_breaks_the_logging_call(
    bus: tuple[logging.Logger, Metrics, AuditTrail], monkeypatch: pytest.MonkeyPatch
) -> None:
    log, _, _ = bus
    monkeypatch.setattr(logging, "raiseExceptions", False)
    log.info("weird", extra={"event": "instance.stored", "bytes": "many", "seconds": "x"})


def test_label_limiter_folds_unbounded_values_into_other() -> None:
    limit = LabelLimiter(2)
    assert [limit(v) for v in ("A", "B", "C", "A", None)] == ["A", "B", "other", "A", "other"]


def test_collector_reports_queue_disk_and_breakers_and_caches(tmp_path: Path) -> None:
    calls = []
    now = datetime.now(UTC)

    def depth() -> dict[str, QueueFigures]:
        calls.append(1)
        return {"pacs": QueueFigures({"pending": 5, "dead": 2}, now - timedelta(seconds=90))}

    clock = [0.0]
    metrics = Metrics()
    metrics.add_collector(
        GatewayCollector(
            queue_depth=depth,
            destinations=lambda: {"pacs": {"breaker_open": 1, "schedule_open": 0}},
            store_path=tmp_path,
            destination_names=["pacs", "share"],
            cache=2.0,
            clock=lambda: clock[0],
        )
    )
    r = metrics.registry
    assert r.get_sample_value("dicomgate_queue_jobs", {"destination": "pacs", "state": "pending"})
    assert (
        r.get_sample_value("dicomgate_queue_jobs", {"destination": "share", "state": "dead"}) == 0
    )
    age = r.get_sample_value("dicomgate_queue_oldest_job_age_seconds", {"destination": "pacs"})
    assert age is not None and 89 <= age < 120
    assert r.get_sample_value("dicomgate_destination_circuit_open", {"destination": "pacs"}) == 1
    free = r.get_sample_value("dicomgate_store_free_bytes")
    assert free is not None and free > 0
    before = len(calls)
    generate_latest(r)
    assert len(calls) == before  # cached
    clock[0] = 5.0
    generate_latest(r)
    assert len(calls) == before + 1


def test_audit_trail_filters_and_retention(index: Index) -> None:
    now = datetime.now(UTC)
    trail = AuditTrail(index.engine, node="n", keep_for=86400, clock=lambda: now)
    old = AuditEvent(
        "instance.received", actor="CT", study_uid="1.2.3", time=now - timedelta(days=2)
    )
    new = AuditEvent("instance.received", actor="MR", study_uid="1.2.4", patient_id="P1")
    other = AuditEvent("delivery.done", actor="pacs", object="pacs", study_uid="1.2.4")
    with index.engine.begin() as connection:
        connection.execute(audit_event.insert(), trail.rows([old, new, other]))
    assert len(trail.query(AuditQuery())) == 3
    assert [r["actor"] for r in trail.query(AuditQuery(study="1.2.4", event="delivery."))] == [
        "pacs"
    ]
    assert [r["actor"] for r in trail.query(AuditQuery(patient="P1"))] == ["MR"]
    assert len(trail.query(AuditQuery(since=now - timedelta(days=1)))) == 2
    assert [r["actor"] for r in trail.query(AuditQuery(until=now - timedelta(days=1)))] == ["CT"]
    assert trail.prune() == 1
    assert {r["actor"] for r in trail.query(AuditQuery())} == {"MR", "pacs"}


def test_instances_transferred_message_follows_ps3_15_a_5() -> None:
    event = AuditEvent(
        "instance.received",
        actor="CT1",
        source_ip="10.0.0.7",
        study_uid="1.2.3.4",
        patient_id="PID1",
        patient_name="DOE^JANE",
        detail={"instances": 3, "sop_classes": ["1.2.840.10008.5.1.4.1.1.2"]},
    )
    xml = audit_message(event, "gw1")
    assert xml is not None
    root = ET.fromstring(xml)
    ident = root.find("EventIdentification")
    assert ident is not None
    assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("C", "0")
    roles = {
        p.get("UserID"): (p.get("UserIsRequestor"), p.find("RoleIDCode").get("csd-code"))  # type: ignore[union-attr]
        for p in root.findall("ActiveParticipant")
    }
    assert roles == {"CT1": ("true", "110153"), "gw1": ("false", "110152")}
    sop = root.find("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
    assert sop is not None and sop.get("NumberOfInstances") == "3"
    frame = syslog_frame(xml, hostname="gw1", app_name="dicomgate", when="T", procid="1")
    assert frame.startswith(b"<85>1 T gw1 dicomgate 1 IHE+RFC-3881 - \xef\xbb\xbf<?xml")
    assert audit_message(AuditEvent("association.accepted"), "gw1") is None
    rejected = audit_message(AuditEvent("association.rejected", outcome="failure"), "gw1")
    assert rejected is not None and b'csd-code="110113"' in rejected


def test_the_web_framework_traces_and_exports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """FastAPI's own OpenTelemetry hooks are off, whatever the environment says."""
    import inspect

    from fastapi import FastAPI

    from dicomgate.app import _framework_telemetry_off

    monkeypatch.setenv("FASTAPI_OTEL_AUTO_CONFIGURE", "true")
    options = _framework_telemetry_off()
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        assert options == {}  # an older FastAPI: no hooks, and no argument to pass
        return
    app = FastAPI(**options)
    config = app._telemetry
    for key in ("tracing", "metrics", "logs", "operation_spans", "auto_configure"):
        assert config[key] is False, key  # type: ignore[literal-required]
    assert not app._native_telemetry.enabled()
