"""The event bus: log records with an ``event`` name become metric updates and audit rows.

Every component already logs each thing that happens with a stable event name
(``extra={"event": "association.accepted", "calling_ae": ...}``, see
:mod:`dicomgate.observability.logging`). :class:`EventHandler`, installed on the
``dicomgate`` logger, maps those names to metric updates and, for security-relevant and
data-moving events, to audit rows. PHI reaches a row only through fields named ``audit_*``
(the C-FIND search keys, the studies of a C-MOVE/C-GET), which the log formatters never
print; the components that own more PHI (the ingest committer, the delivery dispatcher)
write their audit rows themselves.

Durations travel as a ``seconds`` field of the event (``instance.stored``,
``stow.request``, ``delivery.done``). A handler never raises into the logging call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dicomgate.observability.audit import FAILURE, SUCCESS, AuditEvent, AuditTrail
from dicomgate.observability.metrics import Metrics

Update = Callable[[logging.LogRecord], None]

# Fields that may name who and from where, in the order they are tried (auth.denied and
# future events may use any of them).
_ACTOR_FIELDS = ("calling_ae", "user", "key", "key_name", "subject", "actor", "client")
_IP_FIELDS = ("peer", "source_ip", "client_ip", "ip", "remote")
# PHI-free fields of the C-FIND/C-MOVE/C-GET lines kept in the audit row's detail.
_QR_FIELDS = (
    "level",
    "sop_class",
    "transfer_syntax",
    "move_destination",
    "matches",
    "instances",
    "completed",
    "warning",
    "failed",
)


def _get(record: logging.LogRecord, name: str, default: Any = None) -> Any:
    return getattr(record, name, default)


def _first(record: logging.LogRecord, names: tuple[str, ...]) -> str:
    for name in names:
        value = getattr(record, name, None)
        if value:
            return str(value)
    return ""


def _number(record: logging.LogRecord, name: str, default: float = 0.0) -> float:
    value = getattr(record, name, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


class EventHandler(logging.Handler):
    """Log records -> metrics (always) and PHI-free audit rows (when ``audit`` is set)."""

    def __init__(self, metrics: Metrics, audit: AuditTrail | None = None) -> None:
        super().__init__(level=logging.DEBUG)
        self.metrics = metrics
        self.audit = audit
        self._active_aes: dict[str, int] = {}
        m = metrics
        self._updates: dict[str, Update] = {
            "association.accepted": self._accepted,
            "association.rejected": self._rejected,
            "dimse.tls_probe": lambda r: m.tls_probes.inc(),
            "association.released": lambda r: self._ended(r, "released"),
            "association.aborted": lambda r: self._ended(r, "aborted"),
            "association.lost": lambda r: self._ended(r, "lost"),
            "instance.stored": self._stored,
            "instance.refused": self._instance_refused,
            "instance.relabelled": lambda r: self._mislabelled(r, "relabelled"),
            "instance.mislabelled": lambda r: self._mislabelled(r, "kept"),
            "instance.duplicate_rejected": lambda r: self._refused(r, "duplicate"),
            "stow.request": self._stow,
            "stow.refused": self._stow_refused,
            "delivery.done": self._delivered,
            "delivery.failed": lambda r: self._delivery_failed(r, "failed"),
            "delivery.dead_lettered": lambda r: self._delivery_failed(r, "dead_lettered"),
            "delivery.circuit_open": lambda r: m.breaker_trips.labels(
                m.name(_get(r, "destination"))
            ).inc(),
            "find.answered": lambda r: self._query(r, "find", SUCCESS),
            "move.answered": lambda r: self._query(r, "move", SUCCESS),
            "get.answered": lambda r: self._query(r, "get", SUCCESS),
            "find.refused": lambda r: self._query(r, "find", FAILURE),
            "move.refused": lambda r: self._query(r, "move", FAILURE),
            "get.refused": lambda r: self._query(r, "get", FAILURE),
            "auth.denied": self._auth_denied,
            "retention.deleted": self._retention,
            "queue.redriven": self._redriven,
            "delivery.paused": lambda r: self._destination(r, "destination.paused"),
            "delivery.resumed": lambda r: self._destination(r, "destination.resumed"),
            "queue.orphaned": lambda r: self._audit(r, "queue.orphaned", FAILURE),
            "gateway.ready": lambda r: self._audit(r, "application.start", SUCCESS),
            "gateway.stopping": lambda r: self._audit(r, "application.stop", SUCCESS),
            "tls.reloaded": lambda r: self._tls_reload(r, SUCCESS),
            "tls.reload_failed": lambda r: self._tls_reload(r, FAILURE),
        }

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, "event", None)
            if record.levelno >= logging.ERROR:
                self.metrics.log_errors.labels(str(event or record.name)[:64]).inc()
            if event is None:
                return
            update = self._updates.get(event)
            if update is not None:
                update(record)
        except Exception:  # metrics must never break the code that logs
            self.handleError(record)

    # -- audit --------------------------------------------------------------------------

    def _audit(self, record: logging.LogRecord, kind: str, outcome: str, **fields: Any) -> None:
        if self.audit is None:
            return
        detail = fields.pop("detail", None)
        if detail is None:
            detail = {"message": record.getMessage()}
        self.audit.record(
            AuditEvent(
                event=kind,
                outcome=outcome,
                actor=fields.pop("actor", None) or _first(record, _ACTOR_FIELDS),
                source_ip=fields.pop("source_ip", None) or _first(record, _IP_FIELDS),
                detail=detail,
                **fields,
            )
        )

    # -- DIMSE associations -------------------------------------------------------------

    def _accepted(self, record: logging.LogRecord) -> None:
        m = self.metrics
        ae = str(_get(record, "calling_ae", ""))
        m.associations.labels(m.ae(ae), "accepted").inc()
        m.associations_active.inc()
        self._active_aes[ae] = self._active_aes.get(ae, 0) + 1
        self._audit(record, "association.accepted", SUCCESS, detail={})

    def _rejected(self, record: logging.LogRecord) -> None:
        m = self.metrics
        m.associations.labels(m.ae(_get(record, "calling_ae", "")), "rejected").inc()
        detail = {
            "reason": record.getMessage(),
            "code": str(_get(record, "reason", "") or ""),
            "called_ae": _get(record, "called_ae", ""),
        }
        tls_error = _get(record, "tls_error")
        if tls_error is not None:  # refused in the DICOM TLS handshake: an authentication
            m.auth_failures.labels("dimse_tls").inc()
            detail["tls_error"] = str(tls_error)
        self._audit(
            record,
            "association.rejected",
            FAILURE,
            object=str(_get(record, "called_ae", "")),
            detail=detail,
        )

    def _ended(self, record: logging.LogRecord, how: str) -> None:
        # Only associations counted as accepted end here: an abort before acceptance (a
        # malformed request) has no calling AE yet, or one never counted.
        ae = str(_get(record, "calling_ae", "") or "")
        open_ = self._active_aes.get(ae, 0)
        if open_ <= 0:
            return
        if open_ == 1:
            del self._active_aes[ae]
        else:
            self._active_aes[ae] = open_ - 1
        m = self.metrics
        m.associations_active.dec()
        m.associations_ended.labels(m.ae(ae), how).inc()

    # -- ingest -------------------------------------------------------------------------

    def _stored(self, record: logging.LogRecord) -> None:
        m = self.metrics
        ae = m.ae(_get(record, "calling_ae", ""))
        via = str(_get(record, "via", "") or "unknown")
        m.instances_received.labels(ae, via).inc()
        m.bytes_received.labels(ae, via).inc(_number(record, "bytes"))
        seconds = _get(record, "seconds")
        if seconds is not None:
            m.store_ack_seconds.labels(via).observe(float(seconds))

    def _mislabelled(self, record: logging.LogRecord, action: str) -> None:
        m = self.metrics
        via = str(_get(record, "via", "") or "unknown")
        m.instances_mislabelled.labels(m.ae(_get(record, "calling_ae", "")), via, action).inc()

    def _refused(self, record: logging.LogRecord, reason: str) -> None:
        m = self.metrics
        m.instances_refused.labels(m.ae(_get(record, "calling_ae", "")), reason[:64]).inc()

    def _instance_refused(self, record: logging.LogRecord) -> None:
        reason = str(_get(record, "reason") or "refused")
        self._refused(record, reason)
        if reason == "not_authorized":  # dimse.allow.store: 0x0124
            self.metrics.auth_failures.labels("dimse").inc()
        detail: dict[str, Any] = {"reason": reason, "message": record.getMessage()}
        for name in ("status", "sop"):  # sop: the hash of the SOP Instance UID
            if _get(record, name) is not None:
                detail[name] = str(_get(record, name))
        self._audit(record, "instance.refused", FAILURE, detail=detail)

    def _stow(self, record: logging.LogRecord) -> None:
        m = self.metrics
        stored, failed = _number(record, "stored"), _number(record, "failed")
        result = "stored" if not failed else ("partial" if stored else "failed")
        m.stow_requests.labels(result).inc()
        seconds = _get(record, "seconds")
        if seconds is not None:
            m.stow_seconds.observe(float(seconds))
        self._audit(
            record,
            "stow.request",
            SUCCESS if not failed else FAILURE,
            detail={
                "stored": int(stored),
                "failed": int(failed),
                "bytes": int(_number(record, "bytes")),
            },
        )

    def _stow_refused(self, record: logging.LogRecord) -> None:
        self.metrics.stow_requests.labels("refused").inc()
        seconds = _get(record, "seconds")
        if seconds is not None:
            self.metrics.stow_seconds.observe(float(seconds))
        self._audit(
            record,
            "stow.request",
            FAILURE,
            detail={"status": _get(record, "status"), "reason": record.getMessage()},
        )

    def _retention(self, record: logging.LogRecord) -> None:
        count = _number(record, "instances")
        self.metrics.retention_deleted.inc(count)
        self._audit(record, "retention.deleted", SUCCESS, detail={"instances": int(count)})

    # -- egress -------------------------------------------------------------------------

    def _delivered(self, record: logging.LogRecord) -> None:
        m = self.metrics
        dest = m.name(_get(record, "destination", ""))
        m.deliveries.labels(dest, "done").inc(_number(record, "instances", 1.0))
        seconds = _get(record, "seconds")
        if seconds is not None:
            m.delivery_seconds.labels(dest).observe(float(seconds))

    def _delivery_failed(self, record: logging.LogRecord, outcome: str) -> None:
        m = self.metrics
        m.deliveries.labels(m.name(_get(record, "destination", "")), outcome).inc()

    # -- query / retrieve / security ----------------------------------------------------

    def _query(self, record: logging.LogRecord, service: str, outcome: str) -> None:
        result = "refused" if outcome == FAILURE else "answered"
        self.metrics.queries.labels(service, result).inc()
        if outcome == FAILURE and str(_get(record, "status", "")).upper() == "0X0124":
            self.metrics.auth_failures.labels("dimse").inc()  # dimse.allow.<service>
        kind = "query" if service == "find" else "retrieve"
        detail: dict[str, Any] = {
            "service": service,
            "status": _get(record, "status"),
            "message": record.getMessage(),
        }
        for name in _QR_FIELDS:
            value = _get(record, name)
            if value is not None and value != "":
                detail[name] = value
        # audit_* fields: PHI (search keys, study UIDs), for the audit row only.
        query = _get(record, "audit_query")
        if query:
            detail["query"] = query
        identifier = _get(record, "audit_identifier")
        if identifier:
            detail["identifier"] = identifier  # base64, for the ATNA Query message
        studies = _get(record, "audit_studies") or {}
        if studies:
            detail["studies"] = studies  # {study UID: {SOP class UID: instances}}
        self._audit(
            record,
            kind,
            outcome,
            object=f"C-{service.upper()}",
            study_uid=next(iter(studies), None),
            detail=detail,
        )

    def _redriven(self, record: logging.LogRecord) -> None:
        destination = str(_get(record, "destination", "") or "")
        job = _get(record, "job_id")
        detail: dict[str, Any] = {
            "jobs": int(_number(record, "jobs")),
            "message": record.getMessage(),
        }
        if destination:
            detail["destination"] = destination
        if job is not None:
            detail["job_id"] = job
        self._audit(
            record,
            "queue.redriven",
            SUCCESS,
            object=destination or (f"job {job}" if job is not None else "dead jobs"),
            detail=detail,
        )

    def _destination(self, record: logging.LogRecord, kind: str) -> None:
        destination = str(_get(record, "destination", "") or "")
        # The destination is the object; who paused it is the operator (never the
        # destination, as _ACTOR_FIELDS would not take it anyway).
        self._audit(
            record,
            kind,
            SUCCESS,
            object=destination,
            detail={"destination": destination, "message": record.getMessage()},
        )

    def _tls_reload(self, record: logging.LogRecord, outcome: str) -> None:
        self._audit(
            record,
            "tls.reloaded" if outcome == SUCCESS else "tls.reload_failed",
            outcome,
            actor="dicomgate",
            object=str(_get(record, "listener", "") or ""),
            detail={
                "trigger": str(_get(record, "trigger", "") or ""),
                "subject": str(_get(record, "subject", "") or ""),
                "not_after": str(_get(record, "not_after", "") or ""),
                "message": record.getMessage(),
            },
        )

    def _auth_denied(self, record: logging.LogRecord) -> None:
        self.metrics.auth_failures.labels(str(_get(record, "kind", "http"))[:32]).inc()
        self._audit(
            record,
            "auth.denied",
            FAILURE,
            object=str(_get(record, "audit_path", "") or _get(record, "area", "") or ""),
            detail={
                "reason": str(_get(record, "reason", "") or record.getMessage()),
                "status": _get(record, "status"),
                "method": str(_get(record, "method", "") or ""),
                **({"permission": p} if (p := _get(record, "permission")) else {}),
            },
        )


__all__ = ["EventHandler"]
