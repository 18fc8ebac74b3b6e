"""The audit trail: security-relevant and data-moving events, in the database.

Unlike the application log (DESIGN rule 5), audit rows may hold PHI: the patient ID and
name and the study UID of the instances received and delivered. Rows are written

- for received instances, by the ingest committer in the SAME transaction as the index rows
  (:meth:`AuditTrail.rows`, passed to :meth:`Index.record`): a received instance always
  has its audit row, at the cost of one insert per study and batch;
- for everything else, by a writer thread that batches events (:meth:`AuditTrail.record`,
  non-blocking, safe from any thread and from the event loop): a few rows per second in
  one short transaction. While the database is away, these rows go to a journal file in
  the node's directory (:mod:`dicomgate.observability.audit_journal`) and are inserted,
  in order, once it answers again.

Every row can also be sent to an ATNA audit repository (:mod:`dicomgate.observability.atna`)
by the writer thread. Rows older than ``audit.keep_for`` are deleted in batches.

Event kinds (``event`` column) and what ``actor`` / ``object`` hold: see
docs/observability.md.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select
from sqlalchemy import exc as sa_exc

from dicomgate.errors import IndexUnavailable
from dicomgate.index import let_writers_in
from dicomgate.index.schema import audit_event, patient, storable, study
from dicomgate.observability.audit_journal import AuditJournal
from dicomgate.observability.logging import Outage

log = logging.getLogger("dicomgate.audit")

SUCCESS = "success"
FAILURE = "failure"
_BATCH = 500  # rows per insert transaction
_FLUSH_EVERY = 0.5  # seconds the writer waits to gather a batch
_PRUNE_EVERY = 3600.0  # seconds between two retention sweeps
_PRUNE_BATCH = 2000  # rows deleted per transaction
_BACKLOG_MAX = 100_000  # events queued for the writer; more are dropped (counted)
_JOURNAL_MAX_BYTES = 1 << 30  # events kept on disk while the database is away (~2M events)
_DETAIL_MAX = 16_000  # characters of the JSON detail kept
_RECHECK_EVERY = 2.0  # seconds between two looks at a database that failed a write


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _cut(value: str | None, size: int) -> str | None:
    return None if value is None else storable(value[:size])


@dataclass(frozen=True)
class AuditEvent:
    """One audit row. PHI goes into ``study_uid``, ``patient_*`` and ``detail`` only."""

    event: str  # kind, e.g. "instance.received" (docs/observability.md lists them)
    outcome: str = SUCCESS  # success | failure
    actor: str = ""  # who: calling AE title, user or API key name
    source_ip: str = ""  # from where
    object: str = ""  # what: study UID, destination, route template ...
    study_uid: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    detail: Mapping[str, Any] | None = None  # JSON-able extra facts
    time: datetime = field(default_factory=_utcnow)

    def row(self, node: str) -> dict[str, Any]:
        detail = None
        if self.detail:
            detail = json.dumps(self.detail, default=str, ensure_ascii=False)[:_DETAIL_MAX]
        return {
            "time": self.time,
            "event": storable(self.event[:64]),
            "outcome": storable(self.outcome[:16]),
            "actor": storable((self.actor or "")[:64]),
            "source_ip": storable((self.source_ip or "")[:45]),
            "node": storable(node[:64]),
            "object": storable((self.object or "")[:1024]),
            "study_uid": _cut(self.study_uid, 128),
            "patient_id": _cut(self.patient_id, 64),
            "patient_name": _cut(self.patient_name, 194),
            "detail": detail,
        }


@dataclass(frozen=True)
class AuditHealth:
    """What ``/readyz`` says of the audit writer."""

    alive: bool  # the writer thread runs
    backlog: int  # events queued, not yet written (or forwarded)
    dropped: int  # events lost since start: backlog full, journal full or unwritable
    error: str | None  # the last database write's error, None once writing works
    failing_since: datetime | None
    journaled: int = 0  # events kept on disk until the database takes them


@dataclass(frozen=True)
class AuditQuery:
    """Filters of :meth:`AuditTrail.query` (``/api/audit``); all optional, combined by AND."""

    since: datetime | None = None
    until: datetime | None = None
    event: str | None = None  # exact kind, or a prefix ending in '.' / '*' ("delivery.")
    actor: str | None = None
    study: str | None = None  # Study Instance UID
    patient: str | None = None  # Patient ID
    outcome: str | None = None
    limit: int = 100
    offset: int = 0


Sink = Callable[[Sequence[AuditEvent]], None]


class ForwardFailed(Exception):
    """A :data:`Sink` could not send ``unsent`` of the messages it had to send (the events
    without a message of its kind are not among them)."""

    def __init__(self, unsent: int, cause: BaseException) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.unsent = unsent


# Kinds whose rows name a study but not its patient (the delivery worker and the
# retrieve log lines do not have it): the writer looks the patient up in the index.
_NEEDS_PATIENT = ("delivery.", "retrieve")


class AuditTrail:
    """Writes and reads the audit trail of one node (thread-safe)."""

    def __init__(
        self,
        engine: Engine,
        *,
        node: str | None = None,
        keep_for: float = 365 * 86400.0,
        forward: Sink | None = None,
        on_recorded: Callable[[str], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = _utcnow,
        journal: Path | None = None,
        journal_max_bytes: int = _JOURNAL_MAX_BYTES,
    ) -> None:
        self._engine = engine
        self.node = node or socket.gethostname()
        self.keep_for = keep_for
        self._forward = forward
        self._on_recorded = on_recorded
        self._on_failure = on_failure
        self._on_idle = on_idle  # the writer thread has nothing to write (~every 0.5 s)
        self._clock = clock
        self._sqlite = engine.dialect.name == "sqlite"
        self._queue: queue.SimpleQueue[tuple[AuditEvent, bool] | None] = queue.SimpleQueue()
        self._backlog = 0
        self._backlog_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0
        # The last write's error (None once one succeeds), when failing began, events lost.
        self._write_error: str | None = None
        self._failing_since: datetime | None = None
        self._dropped = 0
        self._last_recheck = 0.0
        # Without a journal (tests of one function), rows the database refuses are dropped.
        self._journal = None if journal is None else AuditJournal(journal, journal_max_bytes)
        self._journaling = False  # said so in the log during this outage
        # One audit.forward_failed line per repository outage, then a reminder every 5 min
        # (a line per batch buried the log while the repository was down).
        self._forward_outage = Outage(
            log,
            "audit repository",
            "audit.forward_failed",
            "audit.forward_recovered",
            level=logging.WARNING,
            expected=(OSError, ForwardFailed),
        )

    # -- writing ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dicomgate-audit", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def health(self) -> AuditHealth:
        """The writer's state for ``/readyz``."""
        thread = self._thread
        with self._backlog_lock:
            backlog = self._backlog
        return AuditHealth(
            alive=thread is not None and thread.is_alive(),
            backlog=backlog,
            dropped=self._dropped,
            error=self._write_error,
            failing_since=self._failing_since,
            journaled=0 if self._journal is None else self._journal.pending,
        )

    def record(self, *events: AuditEvent) -> None:
        """Queue events for the writer thread (never blocks, never raises)."""
        for event in events:
            self._enqueue(event, stored=False)

    def rows(self, events: Sequence[AuditEvent]) -> list[dict[str, Any]]:
        """Rows to insert into ``audit_event`` in a caller's own transaction."""
        return [event.row(self.node) for event in events]

    def stored(self, events: Sequence[AuditEvent]) -> None:
        """Events the caller committed itself (:meth:`rows`): counted and forwarded only."""
        for event in events:
            if self._on_recorded is not None:
                self._on_recorded(event.event)
            if self._forward is not None:
                self._enqueue(event, stored=True)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every event queued so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._backlog_lock:
                if self._backlog == 0:
                    return
            time.sleep(0.02)

    def _enqueue(self, event: AuditEvent, *, stored: bool) -> None:
        with self._backlog_lock:
            if self._backlog >= _BACKLOG_MAX:
                self._dropped += 1
                if self._on_failure is not None:
                    self._on_failure("database")
                return
            self._backlog += 1
        self._queue.put((event, stored))

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=_FLUSH_EVERY)
            except queue.Empty:
                self._idle()
                continue
            items: list[tuple[AuditEvent, bool]] = []
            if first is None:
                stopping = True
            else:
                items.append(first)
            deadline = time.monotonic() + 0.05
            while len(items) < _BATCH and not stopping:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                items.append(nxt)
            if items:
                self._write(items)
            self._maybe_prune()

    def _write(self, items: list[tuple[AuditEvent, bool]]) -> None:
        items = self._with_patients(items)
        new = [event for event, stored in items if not stored]
        if new:
            self._keep(new)
        if self._forward is not None:
            try:
                self._forward([event for event, _ in items])
            except Exception as exc:
                # Only the messages that were to be sent count as failed: most kinds
                # (association.accepted ...) have none.
                unsent = exc.unsent if isinstance(exc, ForwardFailed) else len(items)
                self._forward_outage.failed(exc)
                if self._on_failure is not None:
                    for _ in range(unsent):
                        self._on_failure("syslog")
            else:
                self._forward_outage.ok()
        with self._backlog_lock:
            self._backlog -= len(items)

    def _with_patients(self, items: list[tuple[AuditEvent, bool]]) -> list[tuple[AuditEvent, bool]]:
        """Deliveries and retrievals with the Patient ID and name of their study, from the
        index (one query per batch). While the index does not answer they go without."""
        wanted = {
            event.study_uid
            for event, stored in items
            if not stored
            and event.study_uid
            and event.patient_id is None
            and event.event.startswith(_NEEDS_PATIENT)
        }
        if not wanted:
            return items
        query = (
            select(study.c.study_instance_uid, patient.c.patient_id, study.c.patient_name)
            .select_from(study.join(patient, study.c.patient_pk == patient.c.id))
            .where(study.c.study_instance_uid.in_(sorted(wanted)))
        )
        try:
            with self._engine.connect() as connection:
                found = {str(r[0]): (r[1], r[2]) for r in connection.execute(query)}
        except Exception as exc:  # IndexUnavailable, a driver error ...: best effort only
            # (an escape here ended the audit writer thread during a database outage)
            log.debug("no patient for the audit rows: %s", exc, extra={"event": "audit.no_patient"})
            return items
        out = []
        for event, stored in items:
            known = found.get(event.study_uid or "") if not stored else None
            if (
                known is not None
                and event.patient_id is None
                and event.event.startswith(_NEEDS_PATIENT)
            ):
                event = replace(event, patient_id=known[0] or "", patient_name=known[1])
            out.append((event, stored))
        return out

    def _keep(self, new: list[AuditEvent]) -> None:
        """Insert ``new``; while the database is away (or earlier rows still wait in the
        journal, which keeps the order), append them to the journal instead."""
        journal = self._journal
        if journal is not None and journal.pending:
            if self._database_answers():
                self._replay()
            if journal.pending:
                self._spill(new)
                return
        try:
            for attempt in range(3):
                try:
                    self._insert(self.rows(new))
                    break
                except IndexUnavailable:
                    if attempt == 2:
                        raise
                    time.sleep(0.2 * (attempt + 1))
            self._write_error = self._failing_since = None
            self._counted([event.event for event in new])
        except Exception as exc:  # the writer thread must survive the database going away
            self._failed(exc)
            if journal is not None:
                self._spill(new)
            else:
                self._lose(len(new), str(exc))

    def _spill(self, new: list[AuditEvent]) -> None:
        assert self._journal is not None
        try:
            self._journal.append(self.rows(new))
        except Exception as exc:  # full, the disk refuses ...: the writer thread goes on
            self._lose(len(new), f"{self._write_error or 'database unavailable'}; journal: {exc}")
            return
        if not self._journaling:
            self._journaling = True
            log.warning(
                "audit events wait in %s until the database answers: %s",
                self._journal.path,
                self._write_error,
                extra={"event": "audit.journaling", "journal": str(self._journal.path)},
            )

    def _replay(self) -> None:
        """Insert the journaled rows (oldest first); on failure they stay for later."""
        journal = self._journal
        assert journal is not None
        waiting = journal.pending

        def insert(rows: list[dict[str, Any]]) -> None:
            try:
                self._insert(rows)
            except IndexUnavailable:
                if not self._probe():
                    raise
                self._insert_one_by_one(rows)  # the database answers: a row it refuses
                return
            self._counted([str(row["event"]) for row in rows])

        try:
            unreadable = journal.replay(insert, _BATCH)
        except Exception as exc:
            self._failed(exc)
            return
        self._write_error = self._failing_since = None
        self._journaling = False
        if unreadable:
            self._lose(unreadable, f"{unreadable} unreadable lines in {journal.path}")
        log.info(
            "wrote %d audit events kept on disk while the database was away",
            waiting - unreadable,
            extra={"event": "audit.journal_replayed", "events": waiting - unreadable},
        )

    def _insert_one_by_one(self, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` each in its own transaction, dropping (counted) those the
        database refuses while it answers (PostgreSQL refuses a NUL character in text):
        one such row must not hold back the journal for ever."""
        for row in rows:
            try:
                self._insert([row])
            except IndexUnavailable as exc:
                if not self._probe():
                    raise
                self._lose(1, f"the database refuses a {row['event']} row: {exc}")
            else:
                self._counted([str(row["event"])])

    def _database_answers(self) -> bool:
        """True unless the last write failed and a look (every 2 s at most) says it still
        does."""
        if self._write_error is None:
            return True
        now = time.monotonic()
        if now - self._last_recheck < _RECHECK_EVERY:
            return False
        self._last_recheck = now
        if not self._probe():
            return False
        self._write_error = self._failing_since = None
        return True

    def _probe(self) -> bool:
        """Whether the audit table answers a read now."""
        try:
            with self._transaction() as connection:
                connection.execute(select(audit_event.c.id).limit(1)).all()
        except Exception as exc:
            self._failed(exc)
            return False
        return True

    def _counted(self, kinds: list[str]) -> None:
        if self._on_recorded is not None:
            for kind in kinds:
                self._on_recorded(kind)

    def _lose(self, count: int, why: str) -> None:
        self._dropped += count
        log.error(
            "cannot write %d audit events: %s",
            count,
            why,
            extra={"event": "audit.write_failed", "events": count},
        )
        if self._on_failure is not None:
            for _ in range(count):
                self._on_failure("database")

    def _failed(self, exc: BaseException) -> None:
        if self._failing_since is None:
            self._failing_since = self._clock()
        self._write_error = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__

    def _idle(self) -> None:
        """Nothing to write: prune, look again at a database that failed, run ``on_idle``."""
        self._maybe_prune()
        answers = self._database_answers()
        if answers and self._journal is not None and self._journal.pending:
            self._replay()  # after an outage, or left by a run that stopped during one
        if self._on_idle is not None:
            try:
                self._on_idle()
            except Exception as exc:  # a hook must not stop the writer
                log.warning("audit idle hook failed: %s", exc, extra={"event": "audit.idle_failed"})

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        with self._transaction() as connection:
            connection.execute(insert(audit_event), rows)

    # -- retention ----------------------------------------------------------------------

    def _maybe_prune(self) -> None:
        if self.keep_for <= 0 or time.monotonic() - self._last_prune < _PRUNE_EVERY:
            return
        self._last_prune = time.monotonic()
        try:
            deleted = self.prune()
        except Exception as exc:
            log.warning("audit retention failed: %s", exc, extra={"event": "audit.prune_failed"})
            return
        if deleted:
            log.info(
                "deleted %d audit rows older than %.0f days",
                deleted,
                self.keep_for / 86400,
                extra={"event": "audit.pruned", "rows": deleted},
            )

    def prune(self) -> int:
        """Delete rows older than ``keep_for``, ``_PRUNE_BATCH`` per transaction."""
        if self.keep_for <= 0:
            return 0
        cutoff = self._clock() - timedelta(seconds=self.keep_for)
        a = audit_event.c
        total = 0
        while True:
            oldest = select(a.id).where(a.time < cutoff).order_by(a.time).limit(_PRUNE_BATCH)
            with self._transaction() as connection:
                ids = [int(i) for i in connection.execute(oldest).scalars()]
                if ids:
                    connection.execute(delete(audit_event).where(a.id.in_(ids)))
            total += len(ids)
            if len(ids) < _PRUNE_BATCH:
                return total
            let_writers_in(self._sqlite)

    # -- reading ------------------------------------------------------------------------

    def query(self, q: AuditQuery) -> list[dict[str, Any]]:
        """Rows matching ``q``, newest first; ``detail`` decoded."""
        a = audit_event.c
        stmt = select(audit_event)
        if q.since is not None:
            stmt = stmt.where(a.time >= q.since)
        if q.until is not None:
            stmt = stmt.where(a.time < q.until)
        if q.event:
            if q.event.endswith(("*", ".")):
                prefix = q.event.rstrip("*")
                stmt = stmt.where(a.event >= prefix, a.event < prefix + "\uffff")
            else:
                stmt = stmt.where(a.event == q.event)
        if q.actor is not None:
            stmt = stmt.where(a.actor == q.actor)
        if q.study:
            stmt = stmt.where(a.study_uid == q.study)
        if q.patient:
            stmt = stmt.where(a.patient_id == q.patient)
        if q.outcome:
            stmt = stmt.where(a.outcome == q.outcome)
        stmt = stmt.order_by(a.time.desc(), a.id.desc()).limit(q.limit).offset(q.offset)
        try:
            with self._engine.connect() as connection:
                rows = [dict(r) for r in connection.execute(stmt).mappings()]
        except sa_exc.DBAPIError as error:
            raise IndexUnavailable(str(error.orig or error).splitlines()[0]) from error
        for row in rows:
            row["time"] = row["time"].isoformat().replace("+00:00", "Z")
            row["detail"] = json.loads(row["detail"]) if row["detail"] else {}
        return rows

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        try:
            with self._engine.connect() as connection:
                if self._sqlite:
                    connection = connection.execution_options(sqlite_immediate=True)
                with connection.begin():
                    yield connection
        except sa_exc.DBAPIError as error:
            raise IndexUnavailable(str(error.orig or error).splitlines()[0]) from error


__all__ = [
    "FAILURE",
    "SUCCESS",
    "AuditEvent",
    "AuditHealth",
    "AuditQuery",
    "AuditTrail",
    "ForwardFailed",
]
