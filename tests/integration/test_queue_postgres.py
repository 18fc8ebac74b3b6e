"""Delivery queue on the real PostgreSQL at 127.0.0.1:5432 (a throw-away database per run)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomgate.config import DuplicatePolicy
from dicomgate.errors import IndexError_
from dicomgate.index.db import Index, Outcome, StoredInstance
from dicomgate.index.extract import extract_record
from dicomgate.queue import JobQueue, JobState, NewJob, NewTimer, QueueConfig
from dicomgate.queue import jobs as queue_jobs

pytestmark = pytest.mark.postgres

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def index(database_url: str) -> Iterator[Index]:
    idx = Index.open(database_url)
    with idx.engine.begin() as connection:
        connection.exec_driver_sql(
            "TRUNCATE delivery_job, stable_timer, instance, series, study, patient"
            " RESTART IDENTITY CASCADE"
        )
    yield idx
    idx.close()


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC) + timedelta(seconds=1)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(index: Index, clock: Clock) -> JobQueue:
    return JobQueue(index.engine, QueueConfig(lease_seconds=60), clock=clock)


def make_item(sop_uid: str, *, relpath: str | None = None, size: int = 1000) -> StoredInstance:
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.SOPInstanceUID = sop_uid
    return StoredInstance(
        record=extract_record(ds),
        relpath=relpath or f"{sop_uid}.dcm",
        size=size,
        sha256="ab" * 32,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MODALITY",
        called_ae="DICOMGATE",
        source_ip="10.0.0.7",
        received_via="stow",
        received_at=T0,
    )


def store_many(index: Index, count: int, *jobs: NewJob) -> None:
    items = [make_item(f"1.9.{n}") for n in range(count)]
    index.record(items, DuplicatePolicy.REJECT, [jobs] * count)


def test_jobs_commit_with_their_rows_or_not_at_all(index: Index, queue: JobQueue) -> None:
    store_many(index, 3, NewJob("pacs", "r"), NewJob("cloud", "r", priority=5))
    assert queue.counts() == {("pacs", "pending"): 3, ("cloud", "pending"): 3}
    bad = [make_item("2.1"), make_item("2.2", size=-1)]
    with pytest.raises(IndexError_):
        index.record(bad, DuplicatePolicy.REJECT, [[NewJob("pacs", "r")]] * 2)
    assert queue.counts() == {("pacs", "pending"): 3, ("cloud", "pending"): 3}


def test_skip_locked_leases_around_a_leaser_in_the_middle_of_its_transaction(
    index: Index, queue: JobQueue
) -> None:
    store_many(index, 4, NewJob("pacs", "r"))
    with index.engine.connect() as other:
        # Another node has selected the two oldest jobs FOR UPDATE and not yet committed.
        locked = other.exec_driver_sql(
            "SELECT id FROM delivery_job ORDER BY id LIMIT 2 FOR UPDATE"
        ).scalars()
        held = set(locked)
        started = time.monotonic()
        jobs = queue.lease("pacs", 10, "node-b")
        assert time.monotonic() - started < 2.0  # did not wait for the other transaction
        assert {job.id for job in jobs}.isdisjoint(held)
        assert len(jobs) == 2
        other.rollback()
    assert {job.id for job in queue.lease("pacs", 10, "node-b")} == held


def test_two_nodes_leasing_concurrently_get_each_job_exactly_once(
    database_url: str, index: Index, clock: Clock
) -> None:
    store_many(index, 200, NewJob("pacs", "r"))
    nodes = [Index.open(database_url) for _ in range(2)]
    taken: dict[str, list[int]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def work(name: str, node: Index) -> None:
        queue = JobQueue(node.engine, QueueConfig(), clock=clock)
        barrier.wait()
        while jobs := queue.lease("pacs", 5, f"node-{name}"):
            taken[name].extend(job.id for job in jobs)
            queue.complete(jobs)

    threads = [
        threading.Thread(target=work, args=(name, node))
        for name, node in zip(taken, nodes, strict=True)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for node in nodes:
            node.close()
    every = taken["a"] + taken["b"]
    assert len(every) == 200 and len(set(every)) == 200
    assert taken["a"] and taken["b"]  # both nodes worked
    queue = JobQueue(index.engine, QueueConfig(), clock=clock)
    assert queue.counts() == {("pacs", "done"): 200}


def test_priority_expiry_fail_and_redrive(index: Index, queue: JobQueue, clock: Clock) -> None:
    store_many(index, 2, NewJob("pacs", "bulk"))
    index.record([make_item("3.1")], DuplicatePolicy.REJECT, [[NewJob("pacs", "urgent", 9)]])
    first = queue.lease("pacs", 1, "w")[0]
    assert first.route == "urgent" and first.created_at.tzinfo is not None
    clock.now += timedelta(seconds=61)
    again = queue.lease("pacs", 1, "w")[0]
    assert (again.id, again.attempts) == (first.id, 2)
    assert queue.fail(again, "refused", retryable=False) is JobState.DEAD
    assert queue.retry_dead("pacs") == 1
    row = queue.get(first.id)
    assert row is not None and row["state"] == "pending" and row["attempts"] == 0


def test_overwrite_repoints_the_pending_job(index: Index, queue: JobQueue) -> None:
    index.record([make_item("4.1")], DuplicatePolicy.REJECT, [[NewJob("pacs", "r")]])
    (waiting,) = queue.list()
    (result,) = index.record(
        [make_item("4.1", relpath="new.dcm")], DuplicatePolicy.OVERWRITE, [[NewJob("pacs", "r")]]
    )
    assert result.outcome is Outcome.REPLACED
    (job,) = queue.lease("pacs", 10, "w")
    assert (job.id, job.relpath) == (waiting["id"], "new.dcm")


def test_timers_fire_once_and_one_node_at_a_time(
    index: Index, queue: JobQueue, clock: Clock
) -> None:
    timer = NewTimer("stable", "series", "1.2.3.4", 5.0, ("pacs", "cloud"))
    index.record(
        [make_item("5.1"), make_item("5.2")], DuplicatePolicy.REJECT, None, [[timer], [timer]]
    )
    assert queue.fire_due_timers() == 0
    clock.now += timedelta(seconds=10)
    with index.engine.connect() as other:  # another node is firing right now
        other.exec_driver_sql(f"SELECT pg_advisory_xact_lock({queue_jobs._TIMER_LOCK_ID})")
        assert queue.fire_due_timers() == 0
        other.rollback()
    assert queue.fire_due_timers() == 4
    assert queue.fire_due_timers() == 0
    assert queue.counts() == {("pacs", "pending"): 2, ("cloud", "pending"): 2}


def test_a_large_dead_letter_set_is_purged_within_database_timeout(
    database_url: str, index: Index
) -> None:
    """200,000 dead jobs with a million attempts, against a 1-second database.timeout: one
    DELETE of them all takes seconds here (cancelled); each batch of the purge, a few ms."""
    store_many(index, 1, NewJob("pacs", "r"))
    with psycopg.connect(database_url, autocommit=True) as connection:  # no time limit
        connection.execute("SET session_replication_role = replica")  # no FK checks: quick
        connection.execute(
            "INSERT INTO delivery_job (instance_pk, destination, route, state, attempts,"
            " not_before, created_at, updated_at)"
            " SELECT (SELECT min(id) FROM instance), 'pacs', 'r', 'dead', 5, now(), now(), now()"
            " FROM generate_series(1, 200000)"
        )
        connection.execute(
            "INSERT INTO delivery_attempt (job_id, attempt, started_at, finished_at, outcome)"
            " SELECT j.id, a, now(), now(), 'failed' FROM delivery_job j,"
            " generate_series(1, 5) a WHERE j.state = 'dead'"
        )
        connection.execute("ANALYZE")
    strict = Index.open(database_url, timeout=1)
    try:
        queue = JobQueue(strict.engine, QueueConfig())
        assert queue.purge(state="dead") == 200_000
        assert queue.counts() == {("pacs", "pending"): 1}
        with strict.engine.connect() as connection:
            left = connection.exec_driver_sql("SELECT count(*) FROM delivery_attempt").scalar()
        assert left == 0
    finally:
        strict.close()
