"""The index database: open (and migrate), record received instances, look them up.

SQLAlchemy Core on SQLite (embedded default) or PostgreSQL via psycopg 3. ``record`` is on
the C-STORE hot path: its statements are built once per :class:`Index` and every batch is
one transaction (group commit).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    delete,
    event,
    false,
    func,
    inspect,
    select,
    text,
    true,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Dialect, ExceptionContext, make_url
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool

if TYPE_CHECKING:
    from alembic.config import Config

from dicomgate import __version__
from dicomgate.config import DatabaseConfig, DuplicatePolicy
from dicomgate.errors import CommitUncertain, IndexError_, IndexUnavailable, one_line
from dicomgate.index.extract import STUDY_PATIENT_COLUMNS, InstanceRecord
from dicomgate.index.schema import (
    audit_event,
    delivery_job,
    instance,
    metadata,
    patient,
    request_attribute,
    series,
    stable_member,
    stable_timer,
    storable,
    study,
)
from dicomgate.queue.jobs import JobState, NewJob, NewTimer
from dicomgate.queue.notify import notify_statement

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 5000
# database.timeout's default: seconds the gateway waits on PostgreSQL
DEFAULT_TIMEOUT: float = DatabaseConfig.model_fields["timeout"].default
_RETRIES = 3  # attempts of a batch that hit a unique or foreign-key conflict
_PENDING = JobState.PENDING.value  # a plain str: the DBAPI drivers bind no str subclass
LAST_RECEIVED_GRANULARITY = timedelta(seconds=1)


@dataclass(frozen=True)
class StoredInstance:
    """An instance whose bytes are durable in the store, ready to be indexed."""

    record: InstanceRecord
    relpath: str  # path in the store, relative to its root
    size: int  # bytes
    sha256: str  # hex digest of the stored file
    transfer_syntax_uid: str
    calling_ae: str
    called_ae: str
    source_ip: str
    received_via: str  # 'dimse' | 'stow' | 'folder' ...
    received_at: datetime  # UTC aware


class Outcome(Enum):
    """What :meth:`Index.record` did with one instance."""

    STORED = "stored"  # new row (policy keep_both also lands here for a duplicate)
    REPLACED = "replaced"  # policy overwrite: the previous row was deleted
    REJECTED = "rejected"  # policy reject: a current row exists; nothing written


@dataclass(frozen=True)
class RecordResult:
    """The outcome of one item of a :meth:`Index.record` batch."""

    outcome: Outcome
    obsolete_relpath: str | None  # overwrite: the old file, to delete AFTER the commit


def normalize_url(url: str) -> URL:
    """Parse ``url``; plain ``postgresql://`` (or ``postgres://``) selects psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


class SchemaTooNew(IndexUnavailable):
    """The database was migrated by a newer dicomgate than this one."""


# The newest revision in migrations/versions (a unit test holds it to alembic's head). A
# start on a database already there reads ``alembic_version`` itself: alembic, with mako
# and pygments, is imported only to migrate or to name a revision (~0.15 s of every start).
SCHEMA_HEAD = "0005"


def _alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest schema revision this version of dicomgate knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package ships its migrations
        raise RuntimeError("no migrations found")
    return head


def current_revision(connection: Connection) -> str | None:
    """The schema revision of the database on ``connection`` (None: no schema yet)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _at_head(connection: Connection) -> bool:
    """Whether the database is at :data:`SCHEMA_HEAD`, read without alembic."""
    if not inspect(connection).has_table("alembic_version"):
        return False
    rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    return [row[0] for row in rows] == [SCHEMA_HEAD]


def check_schema_not_newer(connection: Connection) -> None:
    """Refuse a database whose revision this code does not know (a newer dicomgate's)."""
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    current = current_revision(connection)
    if current is None:
        return
    scripts = ScriptDirectory.from_config(_alembic_config())
    try:
        scripts.get_revision(current)
    except CommandError:
        raise SchemaTooNew(
            f"database.url: the schema is at revision {current!r}, newer than this dicomgate"
            f" {__version__} knows (up to {head_revision()!r}); run the newer dicomgate, or"
            " restore a backup taken before it migrated"
        ) from None


def migrate(connection: Connection, revision: str = "head") -> None:
    """Upgrade the schema on ``connection`` to ``revision`` (idempotent).

    Raises :class:`SchemaTooNew` for a database migrated by a newer version, and
    :class:`~dicomgate.errors.IndexUnavailable` for any other revision alembic cannot reach.
    """
    if revision == "head" and _at_head(connection):
        return
    from alembic import command
    from alembic.util.exc import CommandError

    check_schema_not_newer(connection)
    try:
        command.upgrade(_alembic_config(connection), revision)
    except CommandError as error:
        raise IndexUnavailable(f"cannot migrate the database: {one_line(error)}") from error


def _set_sqlite_pragmas(durable: bool) -> Callable[[Any, ConnectionPoolEntry], None]:
    def on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Autocommit at the driver level: SQLAlchemy's "begin" event below issues BEGIN itself,
        # so PRAGMAs run outside a transaction and writers can take the lock up front.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    return on_connect


def _sqlite_begin(connection: Connection) -> None:
    # A writer takes the write lock at BEGIN: a deferred transaction that reads first and
    # writes later fails at once with SQLITE_BUSY when another writer got in between.
    mode = "IMMEDIATE" if connection.get_execution_options().get("sqlite_immediate") else ""
    connection.exec_driver_sql(f"BEGIN {mode}".strip())


def _is_unavailable(error: sa_exc.DBAPIError) -> bool:
    return isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError) or bool(
        error.connection_invalidated
    )


def _connect_failed(context: ExceptionContext) -> None:
    """A new connection cannot be opened (the server is down, refuses, or is full): raise
    IndexUnavailable, whoever asked for the connection.

    Callers that run statements turn a failing statement into IndexUnavailable themselves;
    a failure to connect surfaced in every ``engine.connect()`` instead, as SQLAlchemy's own
    exception, which readers of the index (QIDO-RS, FHIR, C-FIND, C-GET, the console) did
    not expect: a 500 with a traceback, or an aborted association, instead of 503 or
    0xA701. Installed once the index is open, so start-up keeps its own message. A failed
    pre-ping is left alone: the pool reconnects, and a failure of that reconnect comes
    here again as a new connection.
    """
    if context.connection is not None or context.is_pre_ping:
        return
    error = context.sqlalchemy_exception
    if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
        raise IndexUnavailable(one_line(error)) from error


class Index:
    """The index database of one gateway node (thread-safe: one writer, many readers)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._write_lock = threading.Lock()
        self._statements = _Statements(engine.dialect)
        self._dbapi: Any = engine.dialect.loaded_dbapi
        self._levels = _LevelCache()
        self._relaxed = False
        self._sqlite = engine.dialect.name == "sqlite"
        # SQLite: the DBAPI connection record() writes with, kept checked out (under the
        # write lock) instead of a pool checkout and SQLAlchemy's transaction per batch.
        self._writer: Any = None

    @property
    def write_lock(self) -> threading.Lock:
        """Held around this process's write transactions. Other writers of the same
        SQLite database (the delivery queue, retention) hold it too, so they queue in Python
        and are woken at once instead of sleeping in SQLite's busy handler (1-10 ms naps)."""
        return self._write_lock

    @classmethod
    def open(cls, url: str, *, durable: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Index:
        """Connect to ``url``, migrate the schema to head and return the index.

        ``timeout`` (``database.timeout``, PostgreSQL only) bounds every wait on the
        server: a statement, a dead connection, a new connection, a free pooled connection
        (:func:`pg_connect_args`). Migrations run without the statement limit.
        """
        try:
            parsed = normalize_url(url)
        except sa_exc.ArgumentError as error:
            raise IndexUnavailable(f"bad database url: {one_line(error)}") from error
        shown = parsed.render_as_string(hide_password=True)
        try:
            engine = _create_engine(parsed, durable=durable, timeout=timeout)
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, OSError) as error:
            raise IndexUnavailable(f"cannot use database {shown}: {one_line(error)}") from error
        try:
            with engine.connect() as connection:
                postgres = connection.dialect.name == "postgresql"
                if postgres:  # a migration of a large index may take longer
                    connection.exec_driver_sql("SET statement_timeout = 0")
                migrate(connection)
                connection.commit()
                if postgres:  # back to the connection's own limit
                    connection.exec_driver_sql("RESET statement_timeout")
                    connection.commit()
        except SchemaTooNew:
            engine.dispose()
            raise
        except sa_exc.DBAPIError as error:
            engine.dispose()
            raise IndexUnavailable(f"cannot open database {shown}: {one_line(error)}") from error
        except IndexUnavailable as error:  # alembic could not reach the head
            engine.dispose()
            raise IndexUnavailable(f"database {shown}: {error}") from error
        event.listen(engine, "handle_error", _connect_failed)
        index = cls(engine)
        index._relaxed = not durable
        return index

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for the query side and the job queue)."""
        return self._engine

    def ping(self) -> None:
        """Check that the database answers; IndexUnavailable if not."""
        try:
            with self._engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except sa_exc.DBAPIError as error:
            raise IndexUnavailable(one_line(error)) from error

    def record(
        self,
        items: Sequence[StoredInstance],
        policy: DuplicatePolicy,
        jobs: Sequence[Sequence[NewJob]] | None = None,
        timers: Sequence[Sequence[NewTimer]] | None = None,
        audit: Callable[[list[RecordResult]], Sequence[dict[str, Any]]] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> list[RecordResult]:
        """Index ``items`` in one transaction; one result per item, in order.

        A duplicate SOP Instance UID (a current row exists, possibly written earlier in the
        same batch) follows ``policy``. ``jobs[i]`` are the deliveries of ``items[i]`` and
        ``timers[i]`` the stable timers it arms or pushes (deadline = now + stable_after);
        both are written in the same transaction as the rows (DESIGN rule 1), for items
        stored or replaced, never for a rejected duplicate.

        Overwrite re-points the unfinished jobs (pending, leased, dead) of the replaced row
        to the new one, so a waiting delivery sends the newest version; a new job equal
        (route, destination) to a re-pointed pending one is not added twice. The replaced
        row's done jobs are deleted with it (ON DELETE CASCADE): the new version is new
        content, which a later stable timer must send again.

        ``audit`` maps the results to ``audit_event`` rows written in the same transaction
        (observability/audit.py): a received instance always has its audit row.

        ``before_commit`` runs inside the transaction, after every statement and before the
        commit (the ingest committer waits there for the files' flushes, so the statements
        run beside them); whatever it raises rolls the transaction back and is raised.

        Nothing is committed if any item fails: IndexUnavailable for a locked or lost
        database, IndexError_ for a refused row.
        """
        if not items:
            return []
        if jobs is not None and len(jobs) != len(items):
            raise ValueError("jobs must have one entry per item")
        if timers is not None and len(timers) != len(items):
            raise ValueError("timers must have one entry per item")
        dbapi = self._dbapi
        with self._write_lock:
            for attempt in range(1, _RETRIES + 1):
                try:
                    results = self._record_batch(items, policy, jobs, timers, audit, before_commit)
                except (dbapi.IntegrityError, sa_exc.IntegrityError) as error:
                    # A row this process remembers may have been deleted since (the retry
                    # reads it again), or, on PostgreSQL, another node stored the same SOP
                    # Instance UID concurrently (the retry sees its row and applies the policy).
                    self._levels.clear()
                    if attempt < _RETRIES:
                        log.info("index conflict, retrying", extra={"event": "index.record_retry"})
                        continue
                    raise IndexError_(f"index refused the batch: {one_line(error)}") from error
                except (dbapi.OperationalError, dbapi.InterfaceError) as error:
                    self._levels.discard()
                    raise IndexUnavailable(one_line(error)) from error
                except dbapi.Error as error:
                    self._levels.discard()
                    raise IndexError_(f"index refused the batch: {one_line(error)}") from error
                except sa_exc.DBAPIError as error:
                    self._levels.discard()
                    if _is_unavailable(error):
                        raise IndexUnavailable(one_line(error)) from error
                    raise IndexError_(f"index refused the batch: {one_line(error)}") from error
                except BaseException:
                    self._levels.discard()
                    raise
                self._levels.commit()
                return results
        raise AssertionError("unreachable")  # pragma: no cover

    def instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """The current row of ``sop_instance_uid`` with its series, study and patient columns."""
        rows = self._read(self._statements.current_instance, sop_instance_uid)
        return rows[0] if rows else None

    def instances(self, sop_instance_uid: str) -> list[dict[str, Any]]:
        """Every row of ``sop_instance_uid``, current or not, oldest first."""
        return self._read(self._statements.all_instances, sop_instance_uid)

    def count_instances(self, current_only: bool = True) -> int:
        """How many instance rows (by default only current ones) the index holds."""
        query = select(func.count()).select_from(instance)
        if current_only:
            query = query.where(instance.c.is_current == true())
        try:
            with self._engine.connect() as connection:
                return int(connection.execute(query).scalar_one())
        except sa_exc.DBAPIError as error:
            raise IndexUnavailable(one_line(error)) from error

    @property
    def relaxed_commits(self) -> bool:
        """True when commits are crash-safe but not power-loss-safe until :meth:`sync`."""
        return self._engine.dialect.name == "sqlite" and self._relaxed

    def sync(self) -> None:
        """Barrier: make every transaction committed so far durable on disk.

        With SQLite in WAL mode and ``synchronous=NORMAL`` a commit survives a crash of the
        process but not of the machine until the WAL is synced; fsync of the WAL file is
        that barrier (checkpoints sync the WAL before copying it, PRAGMA synchronous docs).
        """
        url = self._engine.url
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            return
        try:
            fd = os.open(url.database + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close every pooled connection."""
        with self._write_lock:
            self._drop_writer()
        self._engine.dispose()

    # -- internals -------------------------------------------------------------------

    def _record_batch(
        self,
        items: Sequence[StoredInstance],
        policy: DuplicatePolicy,
        jobs: Sequence[Sequence[NewJob]] | None,
        timers: Sequence[Sequence[NewTimer]] | None,
        audit: Callable[[list[RecordResult]], Sequence[dict[str, Any]]] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> list[RecordResult]:
        now = datetime.now(UTC)
        job_binds = self._statements.insert_job.sharing(
            {
                "state": _PENDING,
                "attempts": 0,
                "not_before": now,
                "created_at": now,
                "updated_at": now,
            }
        )

        def statements(cursor: Any) -> list[RecordResult]:
            results = [
                self._record_one(
                    cursor,
                    item,
                    policy,
                    jobs[i] if jobs else (),
                    job_binds,
                    timers[i] if timers else (),
                )
                for i, item in enumerate(items)
            ]
            if timers:
                self._upsert_timers(cursor, results, timers, now)
            if audit is not None and (rows := audit(results)):
                self._statements.insert_audit.executemany(cursor, rows)
            if jobs and not self._sqlite:
                self._announce_jobs(cursor, results, jobs)
            if before_commit is not None:
                before_commit()
            return results

        if self._sqlite:
            return self._sqlite_write(statements)
        with self._engine.connect() as connection:
            transaction = connection.begin()  # rolled back by the close unless committed
            cursor = connection.connection.cursor()
            try:
                results = statements(cursor)
            except self._dbapi.Error as error:
                if self._engine.dialect.is_disconnect(
                    error, connection.connection.dbapi_connection, cursor
                ):
                    connection.invalidate(error)
                raise
            finally:
                cursor.close()
            try:
                transaction.commit()
            except sa_exc.DBAPIError as error:
                # The COMMIT was sent; whether the server applied it is unknown when the
                # connection went (a partition, a server killed): a row may name a file.
                if _is_unavailable(error):
                    raise CommitUncertain(one_line(error)) from error
                raise
            return results

    def _sqlite_write(self, statements: Callable[[Any], list[RecordResult]]) -> list[RecordResult]:
        """Run ``statements`` in one BEGIN IMMEDIATE ... COMMIT on the writer connection
        (the caller holds the write lock). Whatever they raise rolls the transaction back
        and is raised; a connection that cannot begin or roll back is closed, and the next
        call opens another.

        Saves ~0.15 ms of pool checkout, SQLAlchemy transaction and checkin per batch, a
        tenth of the committer's work for a small instance."""
        if self._writer is None:
            self._writer = self._engine.raw_connection()
        writer = self._writer
        try:
            cursor = writer.cursor()
            cursor.execute("BEGIN IMMEDIATE")
        except self._dbapi.Error:
            self._drop_writer()  # locked (harmless: reopened next time) or broken
            raise
        try:
            results = statements(cursor)
            cursor.execute("COMMIT")
            return results
        except BaseException:
            try:
                if writer.dbapi_connection.in_transaction:
                    cursor.execute("ROLLBACK")
            except self._dbapi.Error:
                self._drop_writer()
            raise
        finally:
            with contextlib.suppress(self._dbapi.Error):
                cursor.close()

    def _drop_writer(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(Exception):
                writer.invalidate()

    @staticmethod
    def _announce_jobs(
        cursor: Any, results: list[RecordResult], jobs: Sequence[Sequence[NewJob]]
    ) -> None:
        """PostgreSQL: wake the delivery workers of every node at commit (queue/notify.py)."""
        names = sorted(
            {
                job.destination
                for result, item_jobs in zip(results, jobs, strict=True)
                if result.outcome is not Outcome.REJECTED
                for job in item_jobs
            }
        )
        if names:
            cursor.execute(notify_statement(), (",".join(names),))

    def _read(self, query: Any, sop_instance_uid: str) -> list[dict[str, Any]]:
        try:
            with self._engine.connect() as connection:
                result = connection.execute(query, {"sop_instance_uid": sop_instance_uid})
                return [dict(row) for row in result.mappings()]
        except sa_exc.DBAPIError as error:
            raise IndexUnavailable(one_line(error)) from error

    def _record_one(
        self,
        cursor: Any,
        item: StoredInstance,
        policy: DuplicatePolicy,
        jobs: Sequence[NewJob],
        job_binds: list[_Bind],
        timers: Sequence[NewTimer] = (),
    ) -> RecordResult:
        stmts = self._statements
        record = item.record
        existing = stmts.find_current.execute(
            cursor, {"sop_instance_uid": record.sop_instance_uid}
        ).fetchone()
        if existing is not None and policy is DuplicatePolicy.REJECT:
            return RecordResult(Outcome.REJECTED, None)

        patient_pk = self._upsert_level(
            stmts.upsert_patient,
            ("patient", record.patient["patient_id"], record.patient["issuer_of_patient_id"]),
            record.patient,
            None,
            cursor,
        )
        study_pk = self._upsert_level(
            stmts.upsert_study,
            ("study", record.study_uid),
            {**record.study, "patient_pk": patient_pk},
            item.received_at,
            cursor,
        )
        series_pk = self._upsert_level(
            stmts.upsert_series,
            ("series", record.series_uid),
            {**record.series, "study_pk": study_pk},
            item.received_at,
            cursor,
        )
        for requested, scheduled in record.requests:  # sequence matching (C.2.2.2.6)
            key = ("request", str(series_pk), requested, scheduled)
            if self._levels.get(key, (), None) is None:
                stmts.insert_request.execute(
                    cursor,
                    {
                        "series_pk": series_pk,
                        "requested_procedure_id": requested,
                        "scheduled_procedure_step_id": scheduled,
                    },
                )
                self._levels.put(key, 0, (), None)

        outcome, obsolete, replaced_pk = Outcome.STORED, None, None
        if existing is not None:
            existing_id, existing_relpath = existing
            # Retired first, so the new row can be current; overwrite deletes it below,
            # once its jobs point to the new row.
            stmts.retire_instance.execute(cursor, {"row_id": existing_id})
            if policy is DuplicatePolicy.OVERWRITE:
                replaced_pk = existing_id
                outcome = Outcome.REPLACED
                # Never ask the caller to delete the file this very row now points to.
                obsolete = existing_relpath if existing_relpath != item.relpath else None

        stmts.insert_instance.execute(
            cursor,
            {
                **record.instance,
                "series_pk": series_pk,
                "transfer_syntax_uid": item.transfer_syntax_uid,
                "relpath": item.relpath,
                "size": item.size,
                "sha256": item.sha256,
                # On recovery, from a file meta's Source AE Title: any length, NULs.
                "calling_ae": storable(item.calling_ae)[:16],
                "called_ae": storable(item.called_ae)[:16],
                "source_ip": item.source_ip,
                "received_via": item.received_via,
                "received_at": item.received_at,
                "is_current": True,
            },
        )
        if jobs or replaced_pk is not None or timers:
            instance_pk = int(cursor.lastrowid) if self._sqlite else int(cursor.fetchone()[0])
            if timers:  # the instances each stable timer sends (schema.stable_member)
                stmts.insert_member.executemany(
                    cursor,
                    [
                        {
                            "route": t.route,
                            "level": t.level,
                            "uid": t.uid,
                            "instance_pk": instance_pk,
                        }
                        for t in timers
                    ],
                )
            if replaced_pk is not None:
                jobs = self._repoint_jobs(cursor, replaced_pk, instance_pk, jobs)
                stmts.delete_instance.execute(cursor, {"row_id": replaced_pk})
            if jobs:
                stmts.insert_job.executemany(
                    cursor,
                    [
                        {
                            "instance_pk": instance_pk,
                            "destination": job.destination,
                            "route": job.route,
                            "priority": job.priority,
                        }
                        for job in jobs
                    ],
                    job_binds,
                )
        return RecordResult(outcome, obsolete)

    def _repoint_jobs(
        self, cursor: Any, old_pk: int, new_pk: int, jobs: Sequence[NewJob]
    ) -> Sequence[NewJob]:
        """Move the unfinished jobs of a replaced row to its successor; the new jobs to add."""
        stmts = self._statements
        waiting: set[tuple[str, str]] = set()
        if jobs:
            rows = stmts.pending_jobs.execute(cursor, {"instance_pk": old_pk}).fetchall()
            waiting = {(str(destination), str(route)) for destination, route in rows}
        stmts.repoint_jobs.execute(cursor, {"old_pk": old_pk, "new_pk": new_pk})
        return [job for job in jobs if (job.destination, job.route) not in waiting]

    def _upsert_timers(
        self,
        cursor: Any,
        results: Sequence[RecordResult],
        timers: Sequence[Sequence[NewTimer]],
        now: datetime,
    ) -> None:
        """Arm or push the stable timers of the stored items (one write per timer)."""
        latest: dict[tuple[str, str, str], dict[str, Any]] = {}
        for result, armed in zip(results, timers, strict=True):
            if result.outcome is Outcome.REJECTED:
                continue
            for timer in armed:
                if timer.level not in ("series", "study"):
                    raise ValueError(f"stable timer level must be series or study: {timer.level}")
                latest[(timer.route, timer.level, timer.uid)] = {
                    "route": timer.route,
                    "level": timer.level,
                    "uid": timer.uid,
                    "deadline": now + timedelta(seconds=timer.stable_after),
                    "destinations": json.dumps(list(timer.destinations)),
                    "priority": timer.priority,
                }
        if latest:
            self._statements.upsert_timer.executemany(cursor, list(latest.values()))

    def _upsert_level(
        self,
        stmt: _Prepared,
        key: tuple[str, ...],
        row: dict[str, Any],
        received_at: datetime | None,
        cursor: Any,
    ) -> int:
        """Upsert a patient, study or series row and return its key; skipped if unchanged."""
        values = tuple(row.values())
        known = self._levels.get(key, values, received_at)
        if known is not None:
            return known
        params = row if received_at is None else {**row, "last_received_at": received_at}
        pk = int(stmt.execute(cursor, params).fetchone()[0])
        self._levels.put(key, pk, values, received_at)
        return pk


class _LevelCache:
    """Patient, study and series rows this process wrote lately: key -> (pk, values, time).

    Most instances of a series carry the same patient, study and series attributes; when
    they equal what this process last wrote, the three upserts are skipped (the hot path
    then runs two statements). ``last_received_at`` is refreshed at most every
    ``LAST_RECEIVED_GRANULARITY``. Entries of an open transaction stay pending until commit.
    Primary keys are never reused (SQLite AUTOINCREMENT, PostgreSQL identity), so a row
    deleted behind our back shows up as a foreign-key error; :meth:`Index.record` then
    clears the cache and retries.
    """

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._committed: OrderedDict[tuple[str, ...], _LevelEntry] = OrderedDict()
        self._pending: dict[tuple[str, ...], _LevelEntry] = {}

    def get(
        self, key: tuple[str, ...], values: tuple[Any, ...], received_at: datetime | None
    ) -> int | None:
        entry = self._pending.get(key) or self._committed.get(key)
        if entry is None or entry[1] != values:
            return None
        written_at = entry[2]
        if received_at is not None and (
            written_at is None or received_at - written_at > LAST_RECEIVED_GRANULARITY
        ):
            return None
        return entry[0]

    def put(
        self, key: tuple[str, ...], pk: int, values: tuple[Any, ...], at: datetime | None
    ) -> None:
        self._pending[key] = (pk, values, at)

    def commit(self) -> None:
        for key, entry in self._pending.items():
            self._committed[key] = entry
            self._committed.move_to_end(key)
        self._pending.clear()
        while len(self._committed) > self._size:
            self._committed.popitem(last=False)

    def discard(self) -> None:
        self._pending.clear()

    def clear(self) -> None:
        self._pending.clear()
        self._committed.clear()


_LevelEntry = tuple[int, tuple[Any, ...], datetime | None]


def pg_connect_args(url: URL, timeout: float, durable: bool = True) -> dict[str, str]:
    """libpq parameters that bound every wait on a PostgreSQL server to about ``timeout``.

    Without them a network partition (packets dropped, no reset) hangs each connection
    until the kernel gives up retransmitting, about 15 minutes: every store, query and
    health check of the gateway waits that long, and even once the network is back the
    stuck connections wait out their retransmission backoff. With them:

    - ``statement_timeout``: the server cancels a statement that runs longer (a lock held
      by another session, an overloaded server);
    - ``tcp_user_timeout``: the connection fails when what was sent is unacknowledged that
      long (the partition);
    - keepalives: an idle pooled connection to a vanished server is found dead;
    - ``connect_timeout``: a new connection gives up (at most 10 s, libpq's minimum 2).

    A parameter given in the URL's query (``?connect_timeout=3``) wins over ours.
    """
    given = {str(key) for key in url.query}
    seconds = max(1, int(timeout))
    args = {
        "connect_timeout": str(max(2, min(10, seconds))),
        "keepalives": "1",
        "keepalives_idle": str(min(10, seconds)),
        "keepalives_interval": str(max(1, min(5, seconds // 3))),
        "keepalives_count": "3",
        "tcp_user_timeout": str(seconds * 1000),
    }
    args = {key: value for key, value in args.items() if key not in given}
    options = [] if durable else ["-c synchronous_commit=off"]
    options.append(f"-c statement_timeout={seconds * 1000}")
    user_options = url.query.get("options")
    if isinstance(user_options, str):
        options.insert(0, user_options)
    args["options"] = " ".join(options)
    return args


class _Pool(QueuePool):
    """The pool whose wait for a free connection ends as IndexUnavailable (503, 0xA700),
    like every other way the database can fail to answer, instead of SQLAlchemy's own
    TimeoutError (a 500, an aborted association)."""

    def _do_get(self) -> ConnectionPoolEntry:
        try:
            return super()._do_get()
        except sa_exc.TimeoutError as error:
            raise IndexUnavailable(
                f"no free database connection within {self.timeout():.0f} s"
                f" ({self.checkedout()} in use)"
            ) from error


def _create_engine(url: URL, *, durable: bool, timeout: float = DEFAULT_TIMEOUT) -> Engine:
    if url.get_backend_name() == "sqlite":
        database = url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine, "connect", _set_sqlite_pragmas(durable))
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if url.get_backend_name() == "postgresql":
        # Durability on PostgreSQL is the server's synchronous_commit; durable=False relaxes
        # it for this client only (a crash may lose the last commits, never corrupt).
        # Every wait on the server is bounded by ``timeout`` (pg_connect_args).
        return create_engine(
            url,
            pool_pre_ping=True,
            poolclass=_Pool,
            pool_timeout=timeout,
            connect_args=pg_connect_args(url, timeout, durable),
        )
    raise sa_exc.ArgumentError(f"unsupported database backend {url.get_backend_name()!r}")


def _upsert(table: Any, key: list[str], dialect: str) -> Any:
    """INSERT ... ON CONFLICT (key) DO UPDATE, keeping the old value where the new is NULL."""
    insert_fn = sqlite.insert if dialect == "sqlite" else postgresql.insert
    stmt: Any = insert_fn(table)
    updates = {
        column.name: func.coalesce(stmt.excluded[column.name], column)
        for column in table.columns
        if column.name != "id" and column.name not in key
    }
    return stmt.on_conflict_do_update(index_elements=key, set_=updates).returning(table.c.id)


class _Prepared:
    """One statement compiled once for a dialect and run straight on the DBAPI cursor.

    The hot path skips SQLAlchemy's per-execution work (cache key, compiled-cache lookup,
    result wrapping), which costs more than the SQLite statements themselves.
    """

    __slots__ = ("_binds", "_positional", "sql")

    def __init__(self, stmt: Any, dialect: Dialect, column_keys: list[str] | None = None) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=column_keys)
        self.sql = compiled.string
        self._positional = bool(dialect.positional)
        by_name = {name: bind for bind, name in compiled.bind_names.items()}
        names = list(compiled.positiontup or []) if self._positional else list(by_name)
        # A bind given a value in the statement (a literal such as a job state) keeps it.
        self._binds: list[_Bind] = [
            (
                name,
                by_name[name].type.bind_processor(dialect),
                None if by_name[name].required else by_name[name].value,
            )
            for name in names
        ]

    def execute(self, cursor: Any, params: dict[str, Any]) -> Any:
        """Run with ``params`` (missing names bind NULL or the statement's literal)."""
        cursor.execute(self.sql, self._args(params))
        return cursor

    def executemany(
        self, cursor: Any, rows: Sequence[dict[str, Any]], binds: list[_Bind] | None = None
    ) -> Any:
        """Run once per mapping of ``rows`` (one driver call); return the cursor.

        ``binds`` from :meth:`sharing` supplies values common to every row, converted once.
        """
        chosen = binds or self._binds
        cursor.executemany(self.sql, [self._args(params, chosen) for params in rows])
        return cursor

    def sharing(self, values: dict[str, Any]) -> list[_Bind]:
        """The binds with ``values`` converted to driver values once, for :meth:`executemany`."""
        return [
            (name, None, processor(values[name]) if processor else values[name])
            if name in values
            else (name, processor, default)
            for name, processor, default in self._binds
        ]

    def _args(self, params: dict[str, Any], binds: list[_Bind] | None = None) -> Any:
        if self._positional:
            return tuple(
                processor(params.get(name, value)) if processor else params.get(name, value)
                for name, processor, value in binds or self._binds
            )
        return {
            name: processor(params.get(name, value)) if processor else params.get(name, value)
            for name, processor, value in binds or self._binds
        }


_Bind = tuple[str, Callable[[Any], Any] | None, Any]  # name, driver conversion, default


class _Statements:
    """The statements of the index, built and compiled once per dialect."""

    def __init__(self, dialect: Dialect) -> None:
        if dialect.name not in ("sqlite", "postgresql"):
            raise IndexUnavailable(f"unsupported database backend {dialect.name!r}")

        def columns(table: Any) -> list[str]:
            return [column.name for column in table.columns if column.name != "id"]

        def prepare(stmt: Any, keys: list[str] | None = None) -> _Prepared:
            return _Prepared(stmt, dialect, keys)

        self.upsert_patient = prepare(
            _upsert(patient, ["patient_id", "issuer_of_patient_id"], dialect.name),
            columns(patient),
        )
        self.upsert_study = prepare(
            _upsert(study, ["study_instance_uid"], dialect.name), columns(study)
        )
        self.upsert_series = prepare(
            _upsert(series, ["series_instance_uid"], dialect.name), columns(series)
        )
        # SQLite reports the new key in cursor.lastrowid; PostgreSQL returns it.
        insert_instance: Any = instance.insert().inline()
        if dialect.name != "sqlite":
            insert_instance = insert_instance.returning(instance.c.id)
        self.insert_instance = prepare(insert_instance, columns(instance))
        self.insert_job = prepare(delivery_job.insert().inline(), columns(delivery_job))
        request_insert: Any = (sqlite.insert if dialect.name == "sqlite" else postgresql.insert)(
            request_attribute
        )
        self.insert_request = prepare(
            request_insert.on_conflict_do_nothing(),
            [c.name for c in request_attribute.columns],
        )
        member_insert: Any = (sqlite.insert if dialect.name == "sqlite" else postgresql.insert)(
            stable_member
        )
        self.insert_member = prepare(
            member_insert.on_conflict_do_nothing(), [c.name for c in stable_member.columns]
        )
        self.insert_audit = prepare(audit_event.insert().inline(), columns(audit_event))
        self.pending_jobs = prepare(
            select(delivery_job.c.destination, delivery_job.c.route).where(
                delivery_job.c.instance_pk == bindparam("instance_pk"),
                delivery_job.c.state == _PENDING,
            )
        )
        self.repoint_jobs = prepare(
            update(delivery_job)
            .where(
                delivery_job.c.instance_pk == bindparam("old_pk"),
                delivery_job.c.state != JobState.DONE.value,
            )
            .values(instance_pk=bindparam("new_pk"))
        )
        timer_insert: Any = (sqlite.insert if dialect.name == "sqlite" else postgresql.insert)(
            stable_timer
        )
        self.upsert_timer = prepare(
            timer_insert.on_conflict_do_update(
                index_elements=["route", "level", "uid"],
                set_={
                    name: timer_insert.excluded[name]
                    for name in ("deadline", "destinations", "priority")
                },
            ),
            [column.name for column in stable_timer.columns],
        )
        self.find_current = prepare(
            select(instance.c.id, instance.c.relpath).where(
                instance.c.sop_instance_uid == bindparam("sop_instance_uid"),
                instance.c.is_current == true(),
            )
        )
        self.delete_instance = prepare(delete(instance).where(instance.c.id == bindparam("row_id")))
        self.retire_instance = prepare(
            update(instance).where(instance.c.id == bindparam("row_id")).values(is_current=false())
        )
        joined = (
            instance.join(series, instance.c.series_pk == series.c.id)
            .join(study, series.c.study_pk == study.c.id)
            .join(patient, study.c.patient_pk == patient.c.id)
        )
        hidden = {"id", "series_pk", "study_pk", "patient_pk", "last_received_at"}
        # The patient's name, birth date and sex as the instance's study has them; the
        # patient row holds only the latest ones of its Patient ID.
        from_study = set(STUDY_PATIENT_COLUMNS)
        selected = [instance.c.id.label("instance_pk")] + [
            column
            for table in (instance, series, study, patient)
            for column in table.columns
            if column.name not in hidden and not (table is patient and column.name in from_study)
        ]
        by_uid = (
            select(*selected)
            .select_from(joined)
            .where(instance.c.sop_instance_uid == bindparam("sop_instance_uid"))
        )
        self.current_instance = by_uid.where(instance.c.is_current == true())
        self.all_instances = by_uid.order_by(instance.c.id)


__all__ = [
    "Index",
    "Outcome",
    "RecordResult",
    "StoredInstance",
    "metadata",
    "migrate",
    "normalize_url",
]
