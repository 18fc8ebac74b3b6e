"""Readiness (``/readyz``): one check per component, with the facts an operator needs.

A load balancer takes a node out of service on 503 (deploy/haproxy checks both the DIMSE
and the HTTP backends on ``/readyz``). So only what stops the node from keeping images
safe makes it 503: the database, the delivery queue, the store, the DIMSE listener, the
audit writer. An unreachable ATNA repository does not, unless ``audit.syslog.required``:
audit rows are still written to the database, and taking every node out because the
audit repository is down would stop the modalities. The status is then ``degraded``.
"""

from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dicomgate.errors import IndexError_, IndexUnavailable

if TYPE_CHECKING:
    from dicomgate.service import Gateway

READY, DEGRADED, NOT_READY = "ready", "degraded", "not ready"
DATABASE_DEADLINE = 5.0  # seconds /readyz waits for the database's answers
INGEST_STALL = 10.0  # seconds one batch of instances may take before storing is stalled,
INGEST_DISK_RATE = 50e6  # plus the time its files' flushes take at this many bytes/s


@dataclass
class Check:
    """One component's answer."""

    name: str
    problem: str | None = None  # None = ok; else why (no PHI, no secrets)
    required: bool = True  # a problem makes /readyz 503
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "ok" if self.problem is None else f"failed: {self.problem}"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _database(gateway: Gateway) -> Check:
    try:
        gateway.index.ping()
    except IndexUnavailable as exc:
        return Check("database", _one_line(exc))
    return Check("database")


def _queue(gateway: Gateway, now: datetime) -> Check:
    """The jobs table answers (a real query, not ``SELECT 1``); backlog facts as info."""
    try:
        depth = gateway.queue.depth()
    except IndexError_ as exc:  # unreachable, or the query itself failed
        return Check("queue", _one_line(exc))
    totals = {"pending": 0, "leased": 0, "dead": 0}
    oldest: datetime | None = None
    for counts, first in depth.values():
        for state in totals:
            totals[state] += counts.get(state, 0)
        if first is not None and (oldest is None or first < oldest):
            oldest = first
    age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
    return Check("queue", info={**totals, "oldest_job_age_seconds": round(age, 1)})


@dataclass
class _Probe:
    """The database checks of one /readyz, run on a thread of their own."""

    started: float
    answer: Future[list[Check]]


_probes: weakref.WeakKeyDictionary[Any, _Probe] = weakref.WeakKeyDictionary()
_probes_lock = threading.Lock()


def _database_checks(gateway: Gateway, now: datetime) -> list[Check]:
    """``database`` and ``queue``, answered within DATABASE_DEADLINE whatever the database
    does: a server that stops answering (a network partition, a hung host) left /readyz
    hanging as long as the connection did, so a load balancer saw a timeout, not a 503.
    One probe at a time: while one waits, later requests report it rather than pile up
    threads and pooled connections behind it."""
    with _probes_lock:
        probe = _probes.get(gateway)
        if probe is None or probe.answer.done():
            probe = _Probe(time.monotonic(), Future())
            _probes[gateway] = probe

            def run(answer: Future[list[Check]] = probe.answer) -> None:
                try:
                    answer.set_result([_database(gateway), _queue(gateway, now)])
                except BaseException as exc:
                    answer.set_result(
                        [Check("database", _one_line(exc)), Check("queue", _one_line(exc))]
                    )

            threading.Thread(target=run, name="readyz-database", daemon=True).start()
    left = DATABASE_DEADLINE - (time.monotonic() - probe.started)
    try:
        return probe.answer.result(timeout=max(0.0, left))
    except TimeoutError:
        waited = time.monotonic() - probe.started
        problem = f"no answer from the database for {waited:.0f} s"
        return [Check("database", problem), Check("queue", problem)]


def _ingest(gateway: Gateway) -> Check:
    """Storing goes on: the batch of instances being committed (files flushed, rows
    written) has not taken INGEST_STALL seconds (or half ``database.timeout``), plus its
    files' size at INGEST_DISK_RATE. A database that answers ``SELECT 1`` but not the
    committer (a lock held by another session, an I/O stall on its host) or a store disk
    that stopped answering shows here, not in ``database``."""
    ingestor = getattr(gateway, "ingestor", None)  # not yet made early in start-up
    if ingestor is not None and ingestor.dead:
        return Check("ingest", "the committer thread has stopped: restart the gateway")
    allowed = min(INGEST_STALL, gateway.config.database.timeout / 2)
    late = 0.0 if ingestor is None else ingestor.stalled_for(allowed, INGEST_DISK_RATE)
    if late > 0:
        return Check(
            "ingest",
            f"storing has waited {late:.0f} s too long on the index database or the store's disk",
        )
    return Check("ingest")


def _store(gateway: Gateway) -> Check:
    try:
        problem = gateway.store.problem()
    except OSError as exc:  # the file system itself gone (an unmounted share)
        problem = f"cannot read its file system: {exc.strerror or exc}"
    return Check("store", problem)


def _dimse(gateway: Gateway) -> Check:
    return Check("dimse", None if gateway.dimse.listening else "not listening")


def _audit(gateway: Gateway) -> Check | None:
    trail = gateway.observability.audit
    if trail is None:
        return None
    health = trail.health()
    info: dict[str, Any] = {
        "backlog": health.backlog,
        "dropped": health.dropped,
        "journaled": health.journaled,
    }
    if health.failing_since is not None:
        info["failing_since"] = _iso(health.failing_since)
    if not health.alive:
        return Check("audit", "the audit writer is not running", info=info)
    if health.error is not None:
        return Check("audit", f"cannot write audit rows: {health.error}", info=info)
    return Check("audit", info=info)


def _syslog(gateway: Gateway) -> Check | None:
    sender = gateway.observability.syslog
    if sender is None:
        return None
    config = sender.config
    health = sender.health()
    info: dict[str, Any] = {
        "repository": f"{config.protocol}://{config.host}:{config.port}",
        "sent": health.sent,
    }
    if health.failing_since is not None:
        info["failing_since"] = _iso(health.failing_since)
    problem = None if health.error is None else f"audit repository unreachable: {health.error}"
    return Check("syslog", problem, required=config.required, info=info)


def _startup(gateway: Gateway) -> Check:
    """Start-up finished (delivery, folder ingest and retention started) and no stop began.

    HTTP answers from early in start-up; without this check ``/readyz`` said 200 before
    the delivery workers and the watched folder were started, so a load balancer (or a
    script waiting for ``ready``) could go ahead too soon."""
    if gateway.stopping:
        return Check("startup", "stopping")
    if not gateway.started:
        return Check("startup", "still starting")
    return Check("startup")


def readiness(gateway: Gateway) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of ``/readyz``."""
    now = datetime.now(UTC)
    checks = [
        _startup(gateway),
        *_database_checks(gateway, now),
        _ingest(gateway),
        _store(gateway),
        _dimse(gateway),
    ]
    checks += [c for c in (_audit(gateway), _syslog(gateway)) if c is not None]
    failing = [c.name for c in checks if c.problem is not None]
    blocking = [c.name for c in checks if c.problem is not None and c.required]
    status = NOT_READY if blocking else DEGRADED if failing else READY
    body = {
        "status": status,
        "checks": {c.name: c.text for c in checks},
        "failing": failing,
        "details": {c.name: c.info for c in checks if c.info},
    }
    return (503 if blocking else 200), body


__all__ = ["Check", "readiness"]
