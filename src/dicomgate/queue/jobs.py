"""The delivery queue: one job per (instance, destination, route) in the index database.

Jobs are created by :meth:`dicomgate.index.db.Index.record` in the same transaction as the
instance row (DESIGN rule 1), or by :meth:`JobQueue.fire_due_timers` when a series or study
has been quiet for its route's ``stable_after``. Workers then::

    jobs = queue.lease("pacs", 32, "node1-worker3")   # pending -> leased, attempts + 1
    ...deliver...
    queue.complete(delivered)                          # leased -> done
    queue.fail(job, "association rejected")            # leased -> pending later, or dead
    queue.postpone(ids, 30.0)                          # leased -> pending, attempt not counted

Each finished attempt (complete, fail) and each operator re-drive adds a row to
``delivery_attempt`` in the same transaction: the job's history (:meth:`JobQueue.history`).
A postponed lease was not tried and leaves none; nor does a lease lost by a crashed worker
(the next attempt's number then skips one).

Delivery is at-least-once: a worker that dies holding a lease loses it after
``lease_seconds`` and the job is leased again (its attempt counted). On PostgreSQL several
nodes lease concurrently with ``SELECT ... FOR UPDATE SKIP LOCKED``. On SQLite the due jobs
are read outside any transaction (WAL readers never wait) and leased by one short
``UPDATE ... RETURNING`` that checks their state again, so the database write lock is held
for one statement only; and this process's writers queue on a Python lock instead of
meeting in SQLite, whose busy handler sleeps 1, 2, 5, 10 ... ms between tries (measured:
with delivery running, those sleeps cut the ingest rate by two thirds). Times come from
this process's clock (UTC): nodes sharing a database need synchronized clocks (NTP), as
leases compare them.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import exc as sa_exc

from dicomgate.errors import IndexError_, IndexUnavailable, one_line
from dicomgate.index import let_writers_in
from dicomgate.index.schema import (
    UtcDateTime,
    delivery_attempt,
    delivery_job,
    instance,
    series,
    stable_member,
    stable_timer,
    storable,
    study,
)
from dicomgate.queue.models import QueueConfig, RetryPolicy

log = logging.getLogger(__name__)

_ID_CHUNK = 500  # ids per IN (...) list, well under every backend's parameter limit
_TIMER_BATCH = 100  # timers fired per transaction
# Jobs purged or re-driven per transaction: a dead-letter set of a million jobs neither holds
# SQLite's write lock (and the C-STOREs waiting on it) nor runs one statement past
# database.timeout on PostgreSQL.
_OPERATOR_BATCH = 2000
_ERROR_MAX = 2000  # characters of last_error kept
# Any 64-bit constant: one node at a time fires stable timers on a shared PostgreSQL.
_TIMER_LOCK_ID = 0x646963_6F6D68


class JobState(StrEnum):
    """Where a delivery job stands."""

    PENDING = "pending"  # waiting for its not_before, then for a worker
    LEASED = "leased"  # a worker owns it until lease_until
    DONE = "done"  # delivered; kept for the operator and retention until purged
    DEAD = "dead"  # given up (max attempts, max age or a permanent error); re-drivable


class AttemptOutcome(StrEnum):
    """How a row of a job's history ended."""

    DELIVERED = "delivered"  # the destination acknowledged it: the job is done
    FAILED = "failed"  # to be retried after a back-off
    DEAD = "dead"  # failed and given up: the job is dead-lettered
    REDRIVEN = "redriven"  # an operator re-drove the job: its attempts start again at 1


@dataclass(frozen=True)
class NewJob:
    """One delivery of one instance to one destination, decided by a route."""

    destination: str  # key of ``destinations:`` in the config
    route: str  # name of the route that decided it
    priority: int = 0  # higher is leased first


@dataclass(frozen=True)
class NewTimer:
    """A series_stable / study_stable trigger armed (or pushed) by a received instance."""

    route: str  # name of the route
    level: str  # 'series' | 'study'
    uid: str  # the Series or Study Instance UID
    stable_after: float  # seconds of quiet before the timer fires
    destinations: tuple[str, ...]  # the route's ``to:``
    priority: int = 0  # priority of the jobs it creates


@dataclass(frozen=True)
class Job:
    """A leased job joined with what delivery needs."""

    id: int
    destination: str
    route: str
    priority: int
    attempts: int  # deliveries tried, this one included (1 on the first lease)
    created_at: datetime  # UTC; max_age counts from here (reset by a re-drive)
    instance_pk: int  # the instance row (the newest version after an overwrite)
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    relpath: str  # file in the content store, relative to its root
    size: int  # bytes
    study_instance_uid: str
    series_instance_uid: str
    leased_at: datetime  # UTC; when this attempt began (its history row's started_at)
    leased_by: str  # the worker that holds the lease (its history row's node)


def backoff(attempts: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt.

    ``initial * multiplier ** (attempts - 1)``, capped at ``max``, then spread by
    ``+- jitter`` and capped again: near the cap the waits spread below ``max``, never above,
    so a destination that comes back sees its whole backlog retried within ``max``.
    """
    exponent = max(attempts, 1) - 1
    try:
        delay = min(policy.initial * policy.multiplier**exponent, policy.max)
    except OverflowError:
        delay = policy.max
    if policy.jitter:
        delay *= 1.0 + (rng or random).uniform(-policy.jitter, policy.jitter)
    return min(delay, policy.max)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    unique = sorted(set(ids))  # a fixed order: concurrent updates lock rows alike
    for start in range(0, len(unique), _ID_CHUNK):
        yield unique[start : start + _ID_CHUNK]


def _job(row: Any, attempts: int, leased_at: datetime, worker: str) -> Job:
    """A :class:`Job` from a row of ``_JOB_COLUMNS`` and its attempts, this lease counted."""
    return Job(
        id=row.id,
        destination=row.destination,
        route=row.route,
        priority=row.priority,
        attempts=attempts,
        created_at=row.created_at,
        instance_pk=row.instance_pk,
        sop_instance_uid=row.sop_instance_uid,
        sop_class_uid=row.sop_class_uid,
        transfer_syntax_uid=row.transfer_syntax_uid,
        relpath=row.relpath,
        size=row.size,
        study_instance_uid=row.study_instance_uid,
        series_instance_uid=row.series_instance_uid,
        leased_at=leased_at,
        leased_by=worker,
    )


def _attempt_row(
    job: Job, outcome: AttemptOutcome, error: str | None, now: datetime
) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "attempt": job.attempts,
        "started_at": job.leased_at,
        "finished_at": now,
        "outcome": outcome.value,
        "error": error,
        "node": job.leased_by,
    }


def _best(
    connection: Connection, expired: Any, pending: Any, params: dict[str, Any], limit: int
) -> list[Any]:
    """The ``limit`` best due jobs: expired leases and pending jobs, by priority then age."""
    rows = list(connection.execute(expired, params)) + list(connection.execute(pending, params))
    rows.sort(key=lambda row: (-row.priority, row.not_before))
    return rows[:limit]


_JOINED = (
    delivery_job.join(instance, delivery_job.c.instance_pk == instance.c.id)
    .join(series, instance.c.series_pk == series.c.id)
    .join(study, series.c.study_pk == study.c.id)
)
_JOB_COLUMNS = (
    delivery_job.c.id,
    delivery_job.c.destination,
    delivery_job.c.route,
    delivery_job.c.priority,
    delivery_job.c.attempts,
    delivery_job.c.created_at,
    delivery_job.c.not_before,
    delivery_job.c.instance_pk,
    instance.c.sop_instance_uid,
    instance.c.sop_class_uid,
    instance.c.transfer_syntax_uid,
    instance.c.relpath,
    instance.c.size,
    study.c.study_instance_uid,
    series.c.series_instance_uid,
)
_LISTED_COLUMNS = (
    delivery_job.c.id,
    delivery_job.c.instance_pk,
    delivery_job.c.destination,
    delivery_job.c.route,
    delivery_job.c.state,
    delivery_job.c.priority,
    delivery_job.c.attempts,
    delivery_job.c.not_before,
    delivery_job.c.lease_until,
    delivery_job.c.leased_by,
    delivery_job.c.last_error,
    delivery_job.c.created_at,
    delivery_job.c.updated_at,
    instance.c.sop_instance_uid,
    series.c.series_instance_uid,
    study.c.study_instance_uid,
)


def _due_query(state: JobState, due_column: Any, *, strict: bool) -> Any:
    """Due jobs of ``:destination`` in ``state``, best first, at most ``:limit``."""
    j = delivery_job.c
    due = due_column < bindparam("now") if strict else due_column <= bindparam("now")
    return (
        select(*_JOB_COLUMNS)
        .select_from(_JOINED)
        .where(j.destination == bindparam("destination"), j.state == state.value, due)
        .order_by(j.priority.desc(), j.not_before)
        .limit(bindparam("limit"))
    )


def _lease_statement() -> Any:
    """Lease the jobs ``:ids`` (parameters ``ids``, ``p_now``, ``p_until``, ``p_worker``)."""
    j = delivery_job.c
    return (
        update(delivery_job)
        .where(j.id.in_(bindparam("ids", expanding=True)))
        .values(
            state=JobState.LEASED.value,
            attempts=j.attempts + 1,
            lease_until=bindparam("p_until"),
            leased_by=bindparam("p_worker"),
            updated_at=bindparam("p_now"),
        )
    )


# Built once: building and cache-keying these per call cost more than running them
# (about 2 ms a lease on the machine of bench/delivery.py).
_PENDING = _due_query(JobState.PENDING, delivery_job.c.not_before, strict=False)
_EXPIRED = _due_query(JobState.LEASED, delivery_job.c.lease_until, strict=True)
_PENDING_LOCKED = _PENDING.with_for_update(skip_locked=True, of=delivery_job)
_EXPIRED_LOCKED = _EXPIRED.with_for_update(skip_locked=True, of=delivery_job)
_LEASE = _lease_statement()
# SQLite: lease only what is still due, and say which jobs and their attempts.
_LEASE_DUE = _LEASE.where(
    or_(
        and_(
            delivery_job.c.state == JobState.PENDING.value,
            delivery_job.c.not_before <= bindparam("p_now"),
        ),
        and_(
            delivery_job.c.state == JobState.LEASED.value,
            delivery_job.c.lease_until < bindparam("p_now"),
        ),
    )
).returning(delivery_job.c.id, delivery_job.c.attempts)
_COMPLETE = (
    update(delivery_job)
    .where(
        delivery_job.c.id.in_(bindparam("ids", expanding=True)),
        delivery_job.c.state.in_([JobState.LEASED.value, JobState.PENDING.value]),
    )
    # A delivered job has no error: an earlier attempt's stays in its history only.
    .values(
        state=JobState.DONE.value,
        lease_until=None,
        last_error=None,
        updated_at=bindparam("p_now"),
    )
    .returning(delivery_job.c.id)
)
_RECORD_ATTEMPTS = insert(delivery_attempt)
_HISTORY_COLUMNS = (
    delivery_attempt.c.attempt,
    delivery_attempt.c.outcome,
    delivery_attempt.c.started_at,
    delivery_attempt.c.finished_at,
    delivery_attempt.c.error,
    delivery_attempt.c.node,
)


class JobQueue:
    """Leasing, retry, dead-letter and operator control of the delivery jobs.

    ``engine`` is :attr:`Index.engine` (its SQLite connections take the write lock at
    BEGIN). On SQLite, ``write_lock`` is held around every write transaction: pass the lock
    the other writers of this process hold around theirs (the index's), so that they wait
    for each other in Python, woken at once, rather than in SQLite's sleeping busy handler;
    by default the queue's writers share a lock of their own. ``clock`` and ``rng`` are for
    tests. Database failures raise :class:`IndexUnavailable` (unreachable, locked) or
    :class:`IndexError_`.
    """

    def __init__(
        self,
        engine: Engine,
        config: QueueConfig,
        *,
        write_lock: threading.Lock | None = None,
        clock: Callable[[], datetime] = _utcnow,
        rng: random.Random | None = None,
        same_pipeline: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self._engine = engine
        # route -> routes delivering the same bytes (Router.same_pipeline); a stable timer
        # adds no job for an instance one of them already has for the destination.
        self._same_pipeline = dict(same_pipeline or {})
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._postgres = engine.dialect.name == "postgresql"
        self._write_lock = write_lock or threading.Lock()
        # Per destination: this process's workers lease one after the other, so that two of
        # them never read the same due jobs (the SQLite path reads before it locks).
        self._lease_locks: dict[str, threading.Lock] = {}

    @property
    def config(self) -> QueueConfig:
        return self._config

    # -- workers ----------------------------------------------------------------------

    def lease(self, destination: str, limit: int, worker: str) -> list[Job]:
        """Lease up to ``limit`` due jobs of ``destination`` for ``lease_seconds``.

        Highest priority first, then earliest due (for a new job: oldest). Jobs whose lease
        expired (a crashed or hung worker) are leased again. Each lease counts an attempt.
        """
        if limit <= 0:
            return []
        now = self._clock()
        until = now + timedelta(seconds=self._config.lease_seconds)
        due = {"destination": destination, "now": now, "limit": limit}
        lease = {"p_now": now, "p_until": until, "p_worker": worker[:64]}
        if self._postgres:
            with self._write() as connection:
                rows = _best(connection, _EXPIRED_LOCKED, _PENDING_LOCKED, due, limit)
                for chunk in _chunks([row.id for row in rows]):
                    connection.execute(_LEASE, {**lease, "ids": chunk})
            return [_job(row, row.attempts + 1, now, worker[:64]) for row in rows]
        # SQLite: read outside the write lock, then lease what is still due in one UPDATE.
        attempts: dict[int, int] = {}
        with self._lease_locks.setdefault(destination, threading.Lock()):
            with self._read() as connection:
                rows = _best(connection, _EXPIRED, _PENDING, due, limit)
            if not rows:
                return []
            with self._write() as connection:
                for chunk in _chunks([row.id for row in rows]):
                    result = connection.execute(_LEASE_DUE, {**lease, "ids": chunk})
                    attempts.update((r.id, r.attempts) for r in result)
        # A job missing from ``attempts`` was leased by another process in between.
        return [_job(row, attempts[row.id], now, worker[:64]) for row in rows if row.id in attempts]

    def complete(self, jobs: Sequence[Job]) -> None:
        """Mark delivered jobs done (a job whose lease expired meanwhile too) and add a
        ``delivered`` row to each one's history, in one transaction."""
        if not jobs:
            return
        now = self._clock()
        by_id = {job.id: job for job in jobs}
        with self._write() as connection:
            for chunk in _chunks(list(by_id)):
                done = connection.execute(_COMPLETE, {"ids": chunk, "p_now": now}).scalars()
                rows = [
                    _attempt_row(by_id[job_id], AttemptOutcome.DELIVERED, None, now)
                    for job_id in done
                ]
                if rows:  # only jobs still there: a deleted one would break the foreign key
                    connection.execute(_RECORD_ATTEMPTS, rows)

    def fail(self, job: Job, error: str, *, retryable: bool = True, wait: float = 0.0) -> JobState:
        """Record a failed attempt of a leased job; returns its new state.

        Retryable and within ``max_attempts`` and ``max_age``: pending again after
        :func:`backoff`, or after ``wait`` (the peer's Retry-After) if that is longer, up to
        the policy's ``max``. Otherwise dead, ``error`` kept as ``last_error``. A job that is no
        longer leased (completed or re-driven meanwhile) is left alone and its state
        returned; a job that is gone counts as dead.
        """
        policy = self._config.retry
        now = self._clock()
        j = delivery_job.c
        with self._write() as connection:
            row = connection.execute(
                select(j.state, j.attempts, j.created_at).where(j.id == job.id)
            ).first()
            if row is None:
                return JobState.DEAD
            if row.state != JobState.LEASED.value:
                return JobState(row.state)
            age = (now - row.created_at).total_seconds()
            exhausted = policy.max_attempts > 0 and row.attempts >= policy.max_attempts
            if not retryable or exhausted or age >= policy.max_age:
                state = JobState.DEAD
                not_before = now
            else:
                state = JobState.PENDING
                delay = max(backoff(row.attempts, policy, self._rng), min(wait, policy.max))
                not_before = now + timedelta(seconds=delay)
            connection.execute(
                update(delivery_job)
                .where(j.id == job.id)
                .values(
                    state=state.value,
                    not_before=not_before,
                    lease_until=None,
                    last_error=storable(error[:_ERROR_MAX]),
                    updated_at=now,
                )
            )
            outcome = AttemptOutcome.DEAD if state is JobState.DEAD else AttemptOutcome.FAILED
            connection.execute(
                _RECORD_ATTEMPTS, _attempt_row(job, outcome, storable(error[:_ERROR_MAX]), now)
            )
        if state is JobState.DEAD:
            log.warning(
                "delivery dead-lettered",
                extra={
                    "event": "queue.dead_lettered",
                    "job": job.id,
                    "destination": job.destination,
                    "attempts": row.attempts,
                    "retryable": retryable,
                },
            )
        return state

    def expire_leases_of(self, node: str, worker: str) -> int:
        """End now the leases that earlier processes of ``node`` still hold; returns how many.

        Called when a node starts, before its workers lease: those processes are gone (a
        restart after ``kill -9``, a crash, or a stop whose sends outlived its grace), so
        their jobs need not wait ``lease_seconds`` for the lease to run out. They are then
        leased again like any expired lease (the next lease counts the next attempt).
        ``worker`` is this process's own ``leased_by``, left alone. Safe because a node
        name belongs to one live process: on PostgreSQL a second one is refused at start
        (the node-name lock, queue/notify.py); SQLite serves one node.
        """
        now = self._clock()
        j = delivery_job.c
        prefix = f"{node}:"[:64]  # leased_by is "node:pid", cut to 64 characters
        with self._write() as connection:
            result = connection.execute(
                update(delivery_job)
                .where(
                    j.state == JobState.LEASED.value,
                    j.leased_by.startswith(prefix, autoescape=True),
                    j.leased_by != worker[:64],
                    j.lease_until > now,
                )
                .values(lease_until=now, updated_at=now)
            )
            return int(result.rowcount or 0)

    def postpone(self, job_ids: Sequence[int], seconds: float) -> None:
        """Put jobs back to pending for ``seconds`` without counting their attempt.

        For a delivery that was not tried: circuit open, outside the schedule window,
        rate limit.
        """
        if not job_ids:
            return
        now = self._clock()
        j = delivery_job.c
        with self._write() as connection:
            for chunk in _chunks(job_ids):
                connection.execute(
                    update(delivery_job)
                    .where(
                        j.id.in_(chunk),
                        j.state.in_([JobState.LEASED.value, JobState.PENDING.value]),
                    )
                    .values(
                        state=JobState.PENDING.value,
                        attempts=case(
                            (
                                and_(j.state == JobState.LEASED.value, j.attempts > 0),
                                j.attempts - 1,
                            ),
                            else_=j.attempts,
                        ),
                        not_before=now + timedelta(seconds=max(seconds, 0.0)),
                        lease_until=None,
                        updated_at=now,
                    )
                )

    def destinations_with_due_jobs(self) -> list[str]:
        """Destinations that have a job to lease now (due pending or lease expired)."""
        now = self._clock()
        j = delivery_job.c
        query = (
            select(j.destination)
            .where(
                or_(
                    and_(j.state == JobState.PENDING.value, j.not_before <= now),
                    and_(j.state == JobState.LEASED.value, j.lease_until < now),
                )
            )
            .distinct()
            .order_by(j.destination)
        )
        with self._read() as connection:
            return [str(name) for name in connection.execute(query).scalars()]

    def fire_due_timers(self) -> int:
        """Fire every stable timer whose deadline passed; returns the number of jobs created.

        Per timer, in one transaction: one pending job per instance its route matched
        (current ones; ``stable_member``) and per destination, unless that instance already
        has a job of that route and destination (a timer pushed after firing sends only
        what is new); then the timer and its members are deleted, unless an instance pushed
        its deadline meanwhile.
        """
        t = stable_timer.c
        with self._read() as connection:  # most calls find nothing: no write transaction
            due = connection.execute(
                select(t.deadline).where(t.deadline <= self._clock()).limit(1)
            ).first()
        if due is None:
            return 0
        created = 0
        while True:
            fired, jobs = self._fire_timer_batch()
            created += jobs
            if fired < _TIMER_BATCH:
                return created

    # -- operators --------------------------------------------------------------------

    def counts(self) -> dict[tuple[str, str], int]:
        """Number of jobs per (destination, state)."""
        j = delivery_job.c
        query = select(j.destination, j.state, func.count()).group_by(j.destination, j.state)
        with self._read() as connection:
            return {(row[0], row[1]): int(row[2]) for row in connection.execute(query)}

    def history(self, job_id: int) -> list[dict[str, Any]]:
        """The job's finished attempts and re-drives, oldest first (empty for no such job)."""
        a = delivery_attempt.c
        query = select(*_HISTORY_COLUMNS).where(a.job_id == job_id).order_by(a.id)
        with self._read() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    def list(
        self,
        *,
        state: str | None = None,
        destination: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Jobs, oldest first, with their instance's UIDs; optionally of one state/destination."""
        query = select(*_LISTED_COLUMNS).select_from(_JOINED)
        if state is not None:
            query = query.where(delivery_job.c.state == JobState(state).value)
        if destination is not None:
            query = query.where(delivery_job.c.destination == destination)
        query = query.order_by(delivery_job.c.id).limit(max(limit, 0)).offset(max(offset, 0))
        with self._read() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    def get(self, job_id: int) -> dict[str, Any] | None:
        """One job as :meth:`list` shows it, or None."""
        query = select(*_LISTED_COLUMNS).select_from(_JOINED).where(delivery_job.c.id == job_id)
        with self._read() as connection:
            row = connection.execute(query).mappings().first()
        return dict(row) if row is not None else None

    def retry(self, job_id: int, *, by: Mapping[str, str] | None = None) -> bool:
        """Re-drive a dead (or waiting pending) job now; False if no such job in those states.

        A re-driven job starts over: attempts 0 and a fresh ``max_age`` budget. ``by``:
        who asked (``actor``, ``source_ip``), for the ``queue.redriven`` audit row.
        """
        j = delivery_job.c
        states = [JobState.DEAD.value, JobState.PENDING.value]
        condition = and_(j.id == job_id, j.state.in_(states))
        return self._redrive(condition, {**(by or {}), "job_id": job_id}) == 1

    def retry_dead(
        self, destination: str | None = None, *, by: Mapping[str, str] | None = None
    ) -> int:
        """Re-drive every dead job (of ``destination``); returns how many. ``by``: who
        asked, as for :meth:`retry`."""
        j = delivery_job.c
        condition = j.state == JobState.DEAD.value
        if destination is not None:
            condition = and_(condition, j.destination == destination)
        return self._redrive(condition, {**(by or {}), "destination": destination or ""})

    def purge(self, *, state: str, destination: str | None = None) -> int:
        """Delete done or dead jobs (of ``destination``), their history with them (ON DELETE
        CASCADE); returns how many.

        The jobs there when asked, in transactions of ``_OPERATOR_BATCH``: stores and
        deliveries go on between them.
        """
        chosen = JobState(state)
        if chosen not in (JobState.DONE, JobState.DEAD):
            raise ValueError(f"only done or dead jobs can be purged, not {chosen.value!r}")
        j = delivery_job.c
        condition = and_(j.state == chosen.value, j.id <= self._newest_job())
        if destination is not None:
            condition = and_(condition, j.destination == destination)
        batch = select(j.id).where(condition).limit(_OPERATOR_BATCH).scalar_subquery()
        deleted = 0
        while True:
            # The condition again outside the subquery: PostgreSQL re-checks it on a row
            # another transaction changed meanwhile (a job re-driven is not purged).
            with self._write() as connection:
                stmt = delete(delivery_job).where(j.id.in_(batch), condition)
                count = int(connection.execute(stmt).rowcount)
            deleted += count
            if count < _OPERATOR_BATCH:
                return deleted
            let_writers_in(not self._postgres)

    def depth(self) -> dict[str, tuple[dict[str, int], datetime | None]]:
        """Per destination: unfinished jobs by state (pending, leased, dead) and the creation
        time of its oldest pending or leased job (the metrics collector, at scrape time).

        Done jobs are not read: the query walks ``ix_delivery_job_state_not_before``.
        """
        j = delivery_job.c
        query = (
            select(j.destination, j.state, func.count(), func.min(j.created_at))
            .where(
                j.state.in_([JobState.PENDING.value, JobState.LEASED.value, JobState.DEAD.value])
            )
            .group_by(j.destination, j.state)
        )
        out: dict[str, tuple[dict[str, int], datetime | None]] = {}
        with self._read() as connection:
            for name, state, count, oldest in connection.execute(query):
                counts, first = out.setdefault(str(name), ({}, None))
                counts[str(state)] = int(count)
                if state != JobState.DEAD.value and oldest is not None:
                    created = UtcDateTime().process_result_value(oldest, self._engine.dialect)
                    if created is not None and (first is None or created < first):
                        out[str(name)] = (counts, created)
        return out

    # -- internals --------------------------------------------------------------------

    def _redrive(self, condition: Any, fields: Mapping[str, Any] | None = None) -> int:
        """Re-drive the jobs matching ``condition`` that are there now, in transactions of
        ``_OPERATOR_BATCH`` jobs.

        A re-driven job is pending, so the condition must leave out pending jobs, or match
        fewer than a batch (:meth:`retry`). Unordered: an ORDER BY would sort every dead job
        again for each batch.
        """
        j = delivery_job.c
        pick = select(j.id).where(condition, j.id <= self._newest_job()).limit(_OPERATOR_BATCH)
        if self._postgres:  # the rows stay as read until both statements ran
            pick = pick.with_for_update()
        count = 0
        while True:
            with self._write() as connection:
                ids = list(connection.execute(pick).scalars())
                for start in range(0, len(ids), _ID_CHUNK):
                    count += self._redrive_ids(connection, ids[start : start + _ID_CHUNK])
            if len(ids) < _OPERATOR_BATCH:
                break
            let_writers_in(not self._postgres)
        if count:
            log.info(
                "jobs re-driven",
                extra={"event": "queue.redriven", "jobs": count, **(fields or {})},
            )
        return count

    def _redrive_ids(self, connection: Connection, ids: Sequence[int]) -> int:
        now = self._clock()
        j = delivery_job.c
        chosen = j.id.in_(ids)
        # The history keeps what the reset counter forgets: one "redriven" row per job.
        marks = insert(delivery_attempt).from_select(
            ["job_id", "attempt", "started_at", "finished_at", "outcome", "node"],
            select(
                j.id,
                j.attempts,
                literal(now, UtcDateTime()),
                literal(now, UtcDateTime()),
                literal(AttemptOutcome.REDRIVEN.value),
                literal(""),
            ).where(chosen),
        )
        stmt = (
            update(delivery_job)
            .where(chosen)
            .values(
                state=JobState.PENDING.value,
                attempts=0,
                not_before=now,
                lease_until=None,
                created_at=now,
                updated_at=now,
            )
        )
        connection.execute(marks)
        return int(connection.execute(stmt).rowcount)

    def _newest_job(self) -> int:
        """The highest job id now (0 for none): operators act on the jobs there when asked."""
        with self._read() as connection:
            return int(connection.execute(select(func.max(delivery_job.c.id))).scalar() or 0)

    def _fire_timer_batch(self) -> tuple[int, int]:
        """Fire up to ``_TIMER_BATCH`` due timers; returns (timers fired, jobs created)."""
        now = self._clock()
        t = stable_timer.c
        with self._write() as connection:
            if self._postgres:
                locked = connection.execute(
                    select(func.pg_try_advisory_xact_lock(_TIMER_LOCK_ID))
                ).scalar_one()
                if not locked:  # another node is firing them right now
                    return 0, 0
            timers = connection.execute(
                select(t.route, t.level, t.uid, t.destinations, t.priority)
                .where(t.deadline <= now)
                .order_by(t.deadline)
                .limit(_TIMER_BATCH)
            ).all()
            created = 0
            for timer in timers:
                for destination in json.loads(timer.destinations):
                    created += self._create_timer_jobs(connection, timer, str(destination), now)
                # An instance that pushed the deadline meanwhile keeps the timer armed (the
                # jobs already created stay: the next firing adds only the new instances).
                gone = connection.execute(
                    delete(stable_timer).where(
                        t.route == timer.route,
                        t.level == timer.level,
                        t.uid == timer.uid,
                        t.deadline <= now,
                    )
                ).rowcount
                if gone:  # its members were sent: the next arming starts a new list
                    m = stable_member.c
                    connection.execute(
                        delete(stable_member).where(
                            m.route == timer.route, m.level == timer.level, m.uid == timer.uid
                        )
                    )
        if created:
            log.info(
                "stable timers fired",
                extra={"event": "queue.timers_fired", "timers": len(timers), "jobs": created},
            )
        return len(timers), created

    def _create_timer_jobs(
        self, connection: Connection, timer: Any, destination: str, now: datetime
    ) -> int:
        """Jobs for the instances the timer's route matched (``stable_member``), current
        ones, that have no job of that route and destination yet. Not every instance of
        the series or study: the route's match (and a ``final`` route before it) decided
        which instances it takes, as ``dicomgate route test`` shows."""
        if timer.level not in ("series", "study"):
            log.error(
                "unknown stable timer level %r",
                timer.level,
                extra={"event": "queue.bad_timer", "route": timer.route},
            )
            return 0
        m = stable_member.c
        members = select(m.instance_pk).where(
            m.route == timer.route, m.level == timer.level, m.uid == timer.uid
        )
        if timer.level == "series":
            series_ids = select(series.c.id).where(series.c.series_instance_uid == timer.uid)
        else:
            series_ids = (
                select(series.c.id)
                .join(study, series.c.study_pk == study.c.id)
                .where(study.c.study_instance_uid == timer.uid)
            )
        j = delivery_job.c
        # One job per (instance, destination, pipeline): another route with the same
        # pipeline (a second stable route, an instance route) may have queued it already.
        routes = self._same_pipeline.get(timer.route, (timer.route,))
        already = exists().where(
            j.instance_pk == instance.c.id,
            j.route.in_(routes),
            j.destination == destination,
        )
        rows = select(
            instance.c.id,
            literal(destination),
            literal(timer.route),
            literal(JobState.PENDING.value),
            literal(int(timer.priority)),
            literal(0),
            literal(now, UtcDateTime()),
            literal(now, UtcDateTime()),
            literal(now, UtcDateTime()),
        ).where(
            instance.c.id.in_(members),
            instance.c.series_pk.in_(series_ids),  # and still of its series or study
            instance.c.is_current == true(),
            ~already,
        )
        stmt = (
            insert(delivery_job)
            .from_select(
                [
                    "instance_pk",
                    "destination",
                    "route",
                    "state",
                    "priority",
                    "attempts",
                    "not_before",
                    "created_at",
                    "updated_at",
                ],
                rows,
            )
            .returning(delivery_job.c.id)
        )
        return len(connection.execute(stmt).all())  # INSERT ... SELECT rowcount: -1 on psycopg

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        if self._postgres:  # row locks: writers of different jobs do not wait for each other
            with self._transaction() as connection:
                yield connection
            return
        with self._write_lock, self._transaction() as connection:
            yield connection

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        try:
            with self._engine.connect() as connection:
                if not self._postgres:
                    connection = connection.execution_options(sqlite_immediate=True)
                with connection.begin():
                    yield connection
        except sa_exc.DBAPIError as error:
            raise _database_error(error) from error

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self._engine.connect() as connection:
                yield connection
        except sa_exc.DBAPIError as error:
            raise _database_error(error) from error


def _database_error(error: sa_exc.DBAPIError) -> IndexError_:
    if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError) or bool(
        error.connection_invalidated
    ):
        return IndexUnavailable(one_line(error))
    return IndexError_(f"queue refused the operation: {one_line(error)}")


__all__ = [
    "AttemptOutcome",
    "Job",
    "JobQueue",
    "JobState",
    "NewJob",
    "NewTimer",
    "backoff",
]
